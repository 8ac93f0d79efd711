"""Install footprint: the distributions and megabytes a fresh virtual environment gains from
``pip install`` of lightclient, azure-iot-device 2.x and bare paho-mqtt.

Each gets its own fresh ``python -m venv`` (pip's download cache may be warm; that changes the time,
not the footprint). lightclient is installed from a copy of this work tree's sources, as a user would
from an sdist: pip builds the wheel, which compiles the OpenSSL shim (so a C compiler and the OpenSSL
headers are needed, as ``make`` installs). Sizes count every file the environment gained, .pyc files
included, in MB (10^6 bytes).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, SDK_REQUIREMENT, BenchError, Context, Section, base_python, fmt, fmt_ratio

NAME = "footprint"
TITLE = "Install footprint"
SOURCES = ("setup.py", "setup.cfg", "pyproject.toml", "README.md", "lightclient", "native")


def _size(root: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def _dists(python: Path) -> dict:
    """{name: [version, bytes of its installed files]} in the environment of ``python``."""
    code = ("import json, os, importlib.metadata as m\n"
            "def size(d):\n"
            "    total = 0\n"
            "    for f in d.files or ():\n"
            "        try: total += os.path.getsize(d.locate_file(f))\n"
            "        except OSError: pass\n"
            "    return total\n"
            "print(json.dumps({d.metadata['Name']: [d.version, size(d)] for d in m.distributions()}))")
    return json.loads(subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True).stdout)


def _source_copy(dest: Path) -> Path:
    dest.mkdir(parents=True)
    for name in SOURCES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.o", "*.pyc"))
        else:
            shutil.copy2(src, dest / name)
    return dest


def measure(requirement: str, tmp: Path) -> dict:
    venv = tmp / "venv"
    subprocess.run([base_python(), "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120)
    python = venv / "bin" / "python"
    before_size, before = _size(venv), _dists(python)
    t0 = time.monotonic()
    proc = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", requirement],
                          capture_output=True, text=True, timeout=900)
    seconds = time.monotonic() - t0
    if proc.returncode != 0:
        errors = [l for l in proc.stderr.splitlines() if "is ignored: it is neither" not in l]
        raise BenchError(f"pip install {requirement} failed: {' '.join(errors)[-600:]}")
    after = _dists(python)
    gained = {name: v for name, v in after.items() if name not in before or before[name][0] != v[0]}
    return {"dists": gained, "count": len(gained), "mb": (_size(venv) - before_size) / 1e6, "seconds": seconds}


def run(ctx: Context) -> Section:
    section = Section(NAME, TITLE, header=["package", "distributions gained", "MB gained", "lightclient is",
                                           "install time (s)", "what comes with it (MB)"])
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-footprint-") as tmp:
        tmp = Path(tmp)
        subjects = {"bare paho": "paho-mqtt"}
        if not ctx.smoke:
            src = _source_copy(tmp / "src")
            subjects = {"lightclient": str(src), "azure-iot-device": SDK_REQUIREMENT, **subjects}
        for name, requirement in subjects.items():
            work = tmp / name.replace(" ", "-")
            work.mkdir()
            try:
                results[name] = measure(requirement, work)
            except BenchError as exc:
                if name != "azure-iot-device":
                    raise
                section.notes.append(f"azure-iot-device could not be installed, so its footprint is not measured: {exc}")
                continue
            ctx.log(f"   {name}: {results[name]['count']} distributions, {results[name]['mb']:.1f} MB")
    lc = results.get("lightclient")
    for name, r in results.items():
        versus = "—" if name == "lightclient" or lc is None else f"{fmt_ratio(lc['mb'] / r['mb'])} the MB"
        section.rows.append([name, str(r["count"]), fmt(r["mb"], 1), versus, fmt(r["seconds"], 0),
                             ", ".join(f"{n} {v[0]} ({v[1] / 1e6:.1f})" for n, v in sorted(r["dists"].items(), key=lambda i: -i[1][1]))])
    if ctx.smoke:
        section.notes.append("Smoke run: only bare paho-mqtt is installed (lightclient's build and the SDK take "
                             "about a minute together).")
    section.notes.append("A fresh `python -m venv` per package, then `pip install`; distributions and megabytes "
                         "(every file, .pyc included) the environment gained. lightclient is built from a copy of "
                         "this tree's sources, which compiles its OpenSSL shim.")
    section.chart("Install footprint", "MB", [(n, r["mb"]) for n, r in results.items()], better="lower")
    section.raw = results
    return section


if __name__ == "__main__":
    import run as runner

    sys.exit(runner.main(["--only", NAME, *sys.argv[1:]]))
