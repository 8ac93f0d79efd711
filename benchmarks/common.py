"""Shared pieces of the benchmarks: the lab (CA, SoftHSM key, file key, mosquitto), child processes,
the azure-iot-device virtual environment, medians, ratios and the result records.

The runner process itself never loads a PKCS#11 engine or the tpm2 provider: every measurement that
touches a key runs in a child process (one libp11 engine per process; the tpm2 provider changes the
whole process), so the benchmarks cannot disturb each other.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import ssl
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
WORK = BENCH / ".work"                  # caches (the SDK's virtual environment); ignored by git
RESULTS = BENCH / "results"
CLIENTS = BENCH / "clients"
PIN = "bench-pin-2718"                  # lab token only; reaches children on stdin, never in argv
SDK_REQUIREMENT = "azure-iot-device>=2,<3"
PAYLOAD_SIZE = 256
WINDOW = 20                             # QoS 1 messages in flight: lightclient's default, paho 1.x's default

# The lab (tests/lab: CA, SoftHSM, mosquitto, swtpm) is not part of the wheel; import it from the checkout.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


class BenchError(RuntimeError):
    """A benchmark could not run (a child failed, a tool is missing)."""


# ------------------------------------------------------------------------------------------ numbers


def median(values: Iterable[float]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def orders(names: Sequence[str], rounds: int) -> List[List[str]]:
    """Round r runs the programs in ``names`` rotated by r (and reversed every other round), so the
    drift of a shared machine and the first-runner effects hit every program alike."""
    out = []
    for r in range(rounds):
        k = r % len(names)
        order = list(names[k:]) + list(names[:k])
        out.append(order if r % 2 == 0 else order[::-1])
    return out


def fmt(value: Optional[float], digits: int = 0, unit: str = "") -> str:
    if value is None:
        return "—"
    text = f"{value:,.{digits}f}"
    return f"{text} {unit}".rstrip()


def fmt_ratio(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.2f}×"


@dataclass
class Target:
    what: str
    value: Optional[float]
    limit: float
    op: str                              # ">=" or "<="
    note: str = ""

    @property
    def met(self) -> Optional[bool]:
        if self.value is None:
            return None
        return self.value >= self.limit if self.op == ">=" else self.value <= self.limit

    def as_dict(self) -> dict:
        return {"what": self.what, "value": self.value, "limit": self.limit, "op": self.op, "met": self.met,
                "note": self.note}


@dataclass
class Section:
    """What one benchmark reports: a table, targets, notes, bars for the chart and the raw numbers."""

    name: str
    title: str
    header: List[str] = field(default_factory=list)
    rows: List[List[str]] = field(default_factory=list)
    targets: List[Target] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    charts: List[dict] = field(default_factory=list)   # {"title", "unit", "bars": [[label, value], ...]}
    raw: Dict[str, Any] = field(default_factory=dict)
    error: Optional[str] = None
    seconds: float = 0.0

    def chart(self, title: str, unit: str, bars: Sequence[Sequence[Any]], better: str = "") -> None:
        bars = [[label, value] for label, value in bars if value is not None]
        if bars:
            self.charts.append({"title": title, "unit": unit, "bars": bars, "better": better})

    def as_dict(self) -> dict:
        return {"name": self.name, "title": self.title, "header": self.header, "rows": self.rows,
                "targets": [t.as_dict() for t in self.targets], "notes": self.notes, "charts": self.charts,
                "raw": self.raw, "error": self.error, "seconds": round(self.seconds, 1)}


# ------------------------------------------------------------------------------------------ machine


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            fields = dict(line.split(":", 1) for line in fh if ":" in line)
        fields = {k.strip().lower(): v.strip() for k, v in fields.items()}
        cpu = fields.get("model name") or fields.get("hardware") or fields.get("model") or cpu
    except (OSError, ValueError):
        pass
    mem_gb = None
    try:
        with open("/proc/meminfo") as fh:
            mem_gb = round(int(fh.readline().split()[1]) / 1024 / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    try:
        from importlib.metadata import version
        paho = version("paho-mqtt")
    except Exception:  # pragma: no cover
        paho = "?"
    mosq = "?"
    exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if os.path.exists(exe):
        out = subprocess.run([exe, "-h"], capture_output=True, text=True).stdout
        mosq = out.split("version", 1)[1].split()[0] if "version" in out else "?"
    return {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "cpu": cpu, "cores": os.cpu_count(), "memory_gb": mem_gb,
            "os": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
            "openssl": ssl.OPENSSL_VERSION, "paho": paho, "mosquitto": mosq}


# ------------------------------------------------------------------------------------------ children


def bytecode_env(env: Dict[str, str]) -> Dict[str, str]:
    """Children cache bytecode as installed packages do (pip compiles .pyc files at install time).

    Some machines set PYTHONDONTWRITEBYTECODE=1; then the work tree's lightclient (an editable
    install) would be compiled from source on every start while pip-installed packages load .pyc
    files, which would skew import time and peak RSS. The cache goes to .work/pycache, not into
    the source tree."""
    env = {k: v for k, v in env.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(WORK / "pycache")
    return env


def child_env(extra: Optional[Dict[str, str]] = None, drop: Sequence[str] = ()) -> Dict[str, str]:
    env = bytecode_env({k: v for k, v in os.environ.items() if k not in drop and not k.startswith("PYTEST")})
    env["PYTHONPATH"] = str(ROOT)   # the work tree's lightclient, whatever the caller's PYTHONPATH
    env.update(extra or {})
    return env


def run_child(argv: Sequence[str], spec: Optional[dict] = None, *, env: Optional[Dict[str, str]] = None,
              timeout: float = 300, cwd: Optional[Path] = None) -> dict:
    """Run a child that reads a JSON spec on stdin and prints one JSON object last on stdout."""
    try:
        proc = subprocess.run(list(argv), input=json.dumps(spec or {}), capture_output=True, text=True,
                              env=env or child_env(), timeout=timeout, cwd=cwd or ROOT)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{Path(argv[1]).name if len(argv) > 1 else argv[0]} timed out after {timeout} s") from None
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip()[-1500:].replace(PIN, "<pin>")
        raise BenchError(f"{' '.join(Path(a).name for a in argv[:2])} failed ({proc.returncode}): {tail}")
    return json.loads(lines[-1])


def lc_child(spec: dict, env: Optional[Dict[str, str]] = None, timeout: float = 300) -> dict:
    return run_child([sys.executable, str(CLIENTS / "lc_client.py")], spec, env=env, timeout=timeout)


# ------------------------------------------------------------------------------------------ lab


class Lab:
    """A test CA, a SoftHSM token with an EC P-256 key (certificate from a CSR the token signed), a
    file-key certificate from the same CA (for azure-iot-device, which needs a key file), and one
    mosquitto broker requiring client certificates. Built on first use, stopped by :meth:`close`."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._ca = None
        self._hsm = None
        self._broker = None
        self.hsm_cn = "bench-hsm"
        self.file_cn = "bench-file"

    @property
    def ca(self):
        if self._ca is None:
            from tests import lab

            self._ca = lab.TestCA(self.root / "ca")
            self.file_cert, self.file_key = self._ca.issue_file_key(self.file_cn, self.root / "ca")
        return self._ca

    @property
    def hsm(self):
        if self._hsm is None:
            from tests import lab

            ca = self.ca
            hsm = lab.SoftHSM(self.root / "softhsm")
            hsm.init_token("bench", PIN, "so-" + PIN)
            info = hsm.keygen("bench", PIN, "bench-key", "ec-p256")
            self.hsm_uri = f"{info['uri']}?module-path={hsm.module_path}"
            self.hsm_env = child_env({"SOFTHSM2_CONF": str(hsm.conf)})
            csr = lc_child({"task": "csr", "key": self.hsm_uri, "pin": PIN, "cn": self.hsm_cn}, env=self.hsm_env)
            self.hsm_cert = ca.sign_csr(csr["csr"].encode(), self.root / f"{self.hsm_cn}.pem")
            self._hsm = hsm
        return self._hsm

    @property
    def broker(self):
        if self._broker is None:
            self._broker = nodelay_mosquitto(self.root / "mosquitto", self.ca).start()
        return self._broker

    def hsm_key(self) -> dict:
        """The spec fields a child needs to use the SoftHSM key."""
        self.hsm
        return {"key": self.hsm_uri, "pin": PIN, "cert": str(self.hsm_cert), "ca": str(self.ca.cert)}

    def file_key_spec(self) -> dict:
        self.ca
        return {"key": str(self.file_key), "cert": str(self.file_cert), "ca": str(self.ca.cert)}

    def close(self) -> None:
        if self._broker is not None:
            self._broker.stop()
            self._broker = None


def nodelay_mosquitto(root: Path, ca):
    """The lab's mosquitto (``set_tcp_nodelay true``, as a tuned broker runs) logging only problems.

    Without TCP_NODELAY, over TLS 1.3 the server's session tickets are still unacknowledged when the
    CONNACK is written, so Nagle holds the CONNACK until the client's delayed ACK (40 ms on Linux):
    every MQTT connect took ~50 ms instead of ~8 ms, whatever the client."""
    from tests import lab

    return lab.Mosquitto(root, ca, quiet=True)


# ------------------------------------------------------------------------------------------ the SDK


def sdk_python(install: bool, log=print) -> "tuple[Optional[str], str]":
    """The interpreter of a virtual environment with azure-iot-device 2.x (cached in .work/sdk-venv).

    Returns (path or None, a note). With ``install`` False, only an existing environment is used."""
    venv = WORK / "sdk-venv"
    python = venv / "bin" / "python"
    stamp = venv / ".installed"
    if python.exists() and stamp.exists():
        return str(python), f"azure-iot-device {stamp.read_text().strip()} (cached environment)"
    if not install:
        return None, "azure-iot-device skipped: its environment is not installed yet (a full run installs it)"
    log(f"   installing {SDK_REQUIREMENT} into {venv.relative_to(ROOT)} (cached for later runs)")
    shutil.rmtree(venv, ignore_errors=True)
    try:
        subprocess.run([base_python(), "-m", "venv", str(venv)], check=True, capture_output=True, timeout=120)
        proc = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                               SDK_REQUIREMENT], capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            errors = [l for l in proc.stderr.splitlines() if "is ignored: it is neither" not in l]
            raise BenchError("\n".join(errors)[-800:])
        version = subprocess.run([str(python), "-c", "from importlib.metadata import version; "
                                  "print(version('azure-iot-device'), version('paho-mqtt'))"],
                                 capture_output=True, text=True, check=True).stdout.split()
    except (subprocess.SubprocessError, OSError, BenchError) as exc:
        shutil.rmtree(venv, ignore_errors=True)
        return None, f"azure-iot-device could not be installed, so it is not measured: {exc}"
    stamp.write_text(f"{version[0]} (paho-mqtt {version[1]})")
    return str(python), f"azure-iot-device {version[0]} (paho-mqtt {version[1]}), installed by this run"


def sdk_child(python: str, spec: dict, timeout: float = 300) -> dict:
    return run_child([python, str(CLIENTS / "sdk_client.py")], spec, env=sdk_env(), timeout=timeout)


def sdk_env() -> Dict[str, str]:
    return bytecode_env({k: v for k, v in os.environ.items() if k != "PYTHONPATH" and not k.startswith("PYTEST")})


def base_python() -> str:
    """The interpreter that made this virtual environment (python -m venv from a venv works too, but
    this is what a fresh machine has)."""
    return getattr(sys, "_base_executable", None) or sys.executable


# ------------------------------------------------------------------------------------------ context


@dataclass
class Context:
    smoke: bool
    lab: Lab
    log: Any = print
    sdk: Optional[str] = None
    sdk_note: str = ""
    _sdk_checked: bool = False

    def sdk_python(self) -> Optional[str]:
        if not self._sdk_checked:
            self.sdk, self.sdk_note = sdk_python(install=not self.smoke, log=self.log)
            self._sdk_checked = True
        return self.sdk

    def n(self, full: int, smoke: int) -> int:
        return smoke if self.smoke else full
