#!/usr/bin/env python3
"""`make test-matrix`: the unit suite and the SoftHSM/mosquitto/emulator integration tests on every
CPython 3.9-3.13 present on this machine, one after another, then one table.

Interpreters come from pyenv (``$PYENV_ROOT/versions/3.X.Y``, the newest patch release of each minor),
else ``python3.X`` on PATH. Each gets a virtual environment in .venv-matrix/3.X with the package installed
in editable mode, which builds the shim for that interpreter: the shims of all versions lie side by side
in lightclient/ (their file names carry the ABI tag). An environment is rebuilt only when packaging, the
shim's sources or the interpreter changed. A version that is present but does not build or does not pass
is a failure (exit status 1); a version that is absent is only reported.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENVS = ROOT / ".venv-matrix"
MINORS = range(9, 14)
BUILD_INPUTS = ["setup.cfg", "setup.py", "pyproject.toml",
                "native/lc_shim.c", "native/lc_shim.h", "native/build_shim.py"]
# Integration tests that need only SoftHSM, mosquitto and the emulator: no TPM, valgrind or benchmarks,
# and none of the long fault-injection runs (`make test` runs those on the default interpreter).
INTEGRATION = ["test_tls_softhsm.py", "test_strict_x509.py", "test_level1_raw_paho.py", "test_paho_glue.py",
               "test_device.py", "test_device_emulator.py", "test_emulator.py", "test_emulator_dps.py",
               "test_dps.py", "test_bad_input.py", "test_cli.py",
               # code that leans on version-specific behaviour: asyncio (aio), CPython's _ssl layout (the
               # emulator's CONNECT-time certificate check), the proxy and WebSocket transports
               "test_aio.py", "test_aio_renewal.py", "test_emulator_hub_features.py", "test_connect_anywhere.py",
               "test_upload.py"]
TEST_TIMEOUT = 15 * 60  # a hung run must not eat CI's whole budget
PROBE = ("import sys, sysconfig; print(sys.implementation.name, '%d.%d.%d' % sys.version_info[:3], "
         "sysconfig.get_config_var('EXT_SUFFIX'))")


def probe(exe: str) -> "tuple[str, str] | None":
    """(full version, extension suffix) of a CPython interpreter, or None if it is not one that runs."""
    try:
        out = subprocess.run([exe, "-c", PROBE], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    words = out.stdout.split()
    if out.returncode != 0 or len(words) != 3 or words[0] != "cpython":
        return None
    return words[1], words[2]


def interpreters() -> "dict[int, tuple[str, str, str]]":
    """minor -> (executable, full version, extension suffix)."""
    found: "dict[int, tuple[str, str, str]]" = {}
    pyenv = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv") / "versions"
    releases = [(tuple(map(int, m.groups())), d) for d in pyenv.glob("3.*")
                if (m := re.fullmatch(r"3\.(\d+)\.(\d+)", d.name))]  # not 3.13.0t, 3.14-dev, venvs
    for (minor, _patch), d in sorted(releases):
        info = probe(str(d / "bin" / "python3")) if minor in MINORS else None
        if info:
            found[minor] = (str(d / "bin" / "python3"), *info)
    for minor in MINORS:
        exe = shutil.which(f"python3.{minor}")
        info = probe(exe) if minor not in found and exe else None
        if info and info[0].startswith(f"3.{minor}."):
            found[minor] = (exe, *info)
    return found


def fingerprint(version: str) -> str:
    digest = hashlib.sha256(version.encode())
    for name in BUILD_INPUTS:
        digest.update((ROOT / name).read_bytes())
    return digest.hexdigest()


def build(exe: str, version: str, suffix: str, venv: Path, log: Path) -> str:
    """The version's venv with the package installed editable, the shim rebuilt with it: "yes", "kept"
    (up to date from an earlier run) or "NO"."""
    py, stamp, shim = venv / "bin" / "python", venv / ".installed", ROOT / "lightclient" / f"_shim{suffix}"
    want = fingerprint(version)
    if py.exists() and shim.exists() and stamp.exists() and stamp.read_text() == want:
        return "kept"
    stamp.unlink(missing_ok=True)
    started = time.time() - 1  # the install compiles the shim anew and replaces this version's file
    with log.open("w") as out:
        for cmd in ([exe, "-m", "venv", "--clear", str(venv)],
                    [str(py), "-m", "pip", "install", "-q", "-e", ".[test,token]"]):
            out.write(f"$ {' '.join(cmd)}\n")
            out.flush()
            if subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT).returncode != 0:
                return "NO"
    if not shim.exists() or shim.stat().st_mtime < started:
        with log.open("a") as out:
            out.write(f"the install did not build {shim.relative_to(ROOT)}\n")
        return "NO"
    stamp.write_text(want)
    return "yes"


def integration_files() -> "list[Path]":
    """The subset by file name, wherever under tests/ a file lives now."""
    return sorted({p.relative_to(ROOT) for name in INTEGRATION for p in (ROOT / "tests").rglob(name)})


def run_tests(venv: Path, log: Path, junit: Path) -> bool:
    files = [str(p) for p in integration_files()]
    cmd = [str(venv / "bin" / "python"), "-m", "pytest", "-q", "-p", "no:cacheprovider",
           f"--junitxml={junit}", "tests/unit", *files]
    junit.unlink(missing_ok=True)
    with log.open("w") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        # Own session, so a hung run is stopped with everything it started (brokers, emulators).
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=TEST_TIMEOUT) == 0
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            out.write(f"\nstopped after {TEST_TIMEOUT} s\n")
            return False


def counts(junit: Path) -> "tuple[int, int, int]":
    """(passed, failed incl. errors, skipped) from pytest's JUnit XML."""
    if not junit.exists():
        return 0, 0, 0
    suites = ET.parse(junit).getroot()
    suite = suites if suites.tag == "testsuite" else suites.find("testsuite")
    n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    return n["tests"] - n["failures"] - n["errors"] - n["skipped"], n["failures"] + n["errors"], n["skipped"]


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def main() -> int:
    started = time.monotonic()
    found = interpreters()
    missing = [f"3.{m}" for m in MINORS if m not in found]
    default = sys.version_info[:2]
    if not set(found) - {default[1]} and default[0] == 3:
        print(f"note: no CPython 3.9-3.13 besides the default ({sys.version.split()[0]}) is present")
    rows, failed = [], False
    total_passed = total_failed = 0
    for minor, (exe, version, suffix) in sorted(found.items()):
        venv, logs = VENVS / f"3.{minor}", VENVS / f"3.{minor}-"  # logs outside the venv, which a build clears
        VENVS.mkdir(exist_ok=True)
        print(f"== Python {version} ({exe})", flush=True)
        t0 = time.monotonic()
        shim = build(exe, version, suffix, venv, Path(f"{logs}build.log"))
        t1 = time.monotonic()
        built = shim != "NO"
        ok = built and run_tests(venv, Path(f"{logs}pytest.log"), Path(f"{logs}junit.xml"))
        t2 = time.monotonic()
        passed, nfailed, skipped = counts(Path(f"{logs}junit.xml")) if built else (0, 0, 0)
        if skipped:  # nothing may be skipped in CI: a skip hides a missing component on that Python
            print(f"-- {skipped} test(s) SKIPPED on {version}; see {logs}pytest.log")
            ok = False
        total_passed, total_failed = total_passed + passed, total_failed + nfailed + (0 if built else 1)
        if not ok:
            failed = True
            log = Path(f"{logs}{'pytest' if built else 'build'}.log")
            print(f"-- {'tests' if built else 'build'} FAILED on {version}; last lines of {log}:\n{tail(log)}")
        print(f"   {'tests done' if built else 'no build'} in {t2 - t0:.0f} s", flush=True)
        rows.append((version, shim, str(passed), str(nfailed), str(skipped),
                     f"{t1 - t0:.0f} s", f"{t2 - t1:.0f} s", "ok" if ok else "FAILED"))
    head = ("python", "shim built", "passed", "failed", "skipped", "build", "tests", "result")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    print("\nPython matrix: tests/unit + " + ", ".join(INTEGRATION))
    for r in [head, *rows]:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    for name in sorted(set(INTEGRATION) - {p.name for p in integration_files()}):
        print(f"warning: {name} (in INTEGRATION) is not under tests/ any more: update tools/python_matrix.py")
    for version in missing:
        print(f"{version}: not present on this machine (not tested)")
    print(f"total {time.monotonic() - started:.0f} s; {'FAILED' if failed else 'all present versions passed'}")
    print(f"matrix: {total_passed} passed, {total_failed} failed")  # the plain closing line CI reads
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
