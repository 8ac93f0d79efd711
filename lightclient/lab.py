"""A local lab for demos, examples and tests: a SoftHSM2 token, a test CA and a mosquitto broker.

Everything lives in one directory the caller owns; every process started here is stopped by PID.
PINs are handed to child processes on stdin, never in their arguments.

Token operations run in child processes: a PKCS#11 module keeps per-process state, and the
process that later loads the key through OpenSSL's engine must be the only one initialising it.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

SOFTHSM_MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/arm-linux-gnueabihf/softhsm/libsofthsm2.so",
)


class LabError(RuntimeError):
    """A lab component (SoftHSM, openssl, mosquitto) could not be set up."""


def find_softhsm_module() -> str:
    for path in SOFTHSM_MODULE_CANDIDATES:
        if os.path.exists(path):
            return path
    raise LabError("SoftHSM2 is not installed: apt install softhsm2")


def free_port() -> int:
    """A free loopback TCP port (below the ephemeral range is not guaranteed; good enough here)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, host: str = "127.0.0.1", timeout: float = 10.0, proc: Optional[subprocess.Popen] = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise LabError(f"process exited with {proc.returncode} before listening on {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise LabError(f"nothing listening on {host}:{port} after {timeout} s")


def stop_process(proc: Optional[subprocess.Popen], timeout: float = 5.0) -> None:
    """SIGTERM (so the program can save its state), then SIGKILL after ``timeout`` seconds; reaped."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


def _run(cmd: List[str], *, input: Optional[str] = None, env: Optional[Dict[str, str]] = None,
         cwd: Optional[Path] = None, timeout: float = 60) -> str:
    try:
        proc = subprocess.run(cmd, input=input, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    except FileNotFoundError:
        raise LabError(f"{cmd[0]} is not installed") from None
    if proc.returncode != 0:
        raise LabError(f"{' '.join(cmd[:3])} … failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
    return proc.stdout


# ---------------------------------------------------------------------------------------- SoftHSM


class SoftHSM:
    """A private SoftHSM2 token directory with its own config file."""

    def __init__(self, root: Path, module_path: Optional[str] = None):
        self.root = Path(root)
        self.module_path = module_path or find_softhsm_module()
        self.tokendir = self.root / "tokens"
        self.conf = self.root / "softhsm2.conf"
        self.tokendir.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(
            f"directories.tokendir = {self.tokendir}\nobjectstore.backend = file\nlog.level = ERROR\n"
            "slots.removable = false\n")

    @property
    def env(self) -> Dict[str, str]:
        return {**os.environ, "SOFTHSM2_CONF": str(self.conf)}

    def activate(self) -> None:
        """Point this process's SoftHSM at the lab token directory (SoftHSM reads SOFTHSM2_CONF)."""
        os.environ["SOFTHSM2_CONF"] = str(self.conf)

    def _child(self, *args: str, secrets: List[str]) -> str:
        return _run([sys.executable, "-m", "lightclient.lab", *args], input="\n".join(secrets) + "\n", env=self.env)

    def init_token(self, label: str, pin: str, so_pin: str) -> None:
        self._child("init-token", self.module_path, label, secrets=[so_pin, pin])

    def keygen(self, token_label: str, pin: str, key_label: str, key_type: str = "ec-p256") -> dict:
        return json.loads(self._child("keygen", self.module_path, token_label, key_label, key_type, secrets=[pin]))


# ---------------------------------------------------------------------------------------- test CA


CLIENT_EXT = "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n"


class TestCA:
    """A throwaway CA (file keys: it plays the cloud side) with a server certificate for localhost."""

    __test__ = False  # not a pytest test class

    def __init__(self, root: Path, name: str = "lightclient lab CA"):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.key = self.root / "ca.key"
        self.cert = self.root / "ca.pem"
        self.server_key = self.root / "server.key"
        self.server_cert = self.root / "server.pem"
        self.ext = self.root / "client-ext.cnf"
        if not self.cert.exists():
            _run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(self.key),
                  "-out", str(self.cert), "-days", "30", "-subj", f"/CN={name}",
                  "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"])
            _run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(self.server_key),
                  "-out", str(self.server_cert), "-days", "30", "-subj", "/CN=localhost",
                  "-CA", str(self.cert), "-CAkey", str(self.key),
                  "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
                  "-addext", "extendedKeyUsage=serverAuth", "-addext", "basicConstraints=critical,CA:FALSE",
                  # Without these, `req -x509` makes the server certificate a CA, which Python 3.13 rejects.
                  "-addext", "keyUsage=critical,digitalSignature,keyEncipherment"])
            self.ext.write_text(CLIENT_EXT)

    def sign_csr(self, csr_pem: bytes, out: Path, days: int = 30) -> Path:
        """Issue a client certificate for a CSR (the CSR's subject is kept)."""
        csr_path = Path(out).with_suffix(".csr")
        csr_path.write_bytes(csr_pem)
        _run(["openssl", "x509", "-req", "-in", str(csr_path), "-CA", str(self.cert), "-CAkey", str(self.key),
              "-CAcreateserial", "-days", str(days), "-sha256", "-extfile", str(self.ext), "-out", str(out)])
        return Path(out)

    def issue_file_key(self, cn: str, out_dir: Path, key_type: str = "ec") -> "tuple[Path, Path]":
        """A file key + certificate (for peers that play the service side in tests)."""
        out_dir = Path(out_dir)
        key, csr, cert = out_dir / f"{cn}.key", out_dir / f"{cn}.csr", out_dir / f"{cn}.pem"
        newkey = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"] if key_type == "ec" else ["-newkey", "rsa:2048"]
        _run(["openssl", "req", "-new", *newkey, "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={cn}"])
        self.sign_csr(csr.read_bytes(), cert)
        return cert, key


# ---------------------------------------------------------------------------------------- mosquitto


@dataclass
class Mosquitto:
    """A mosquitto broker on loopback that requires client certificates from the lab CA."""

    root: Path
    ca: TestCA
    port: int = 0
    proc: Optional[subprocess.Popen] = None
    quiet: bool = False   # log errors and warnings only (benchmarks); tests read the full log
    # Keep sessions and their queued messages across restarts (reliability tests count across them).
    persistent: bool = False

    def start(self) -> "Mosquitto":
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not os.path.exists(exe):
            raise LabError("mosquitto is not installed: apt install mosquitto")
        self.root = Path(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        conf = self.root / "mosquitto.conf"
        user = "root" if os.geteuid() == 0 else ""  # as root, mosquitto would drop to 'mosquitto'
        conf.write_text(
            "per_listener_settings false\n"
            f"listener {self.port} 127.0.0.1\n"
            f"cafile {self.ca.cert}\ncertfile {self.ca.server_cert}\nkeyfile {self.ca.server_key}\n"
            "require_certificate true\nuse_identity_as_username true\nallow_anonymous false\n"
            + (f"persistence true\npersistence_location {self.root}/\nautosave_interval 0\n"
               "max_queued_messages 0\nmax_queued_bytes 0\nmax_inflight_messages 100\n"
               if self.persistent else "persistence false\n")
            # Without it a TLS 1.3 CONNACK waits ~40 ms for the client's delayed ACK (Nagle).
            + "set_tcp_nodelay true\n"
            + f"log_dest file {self.root / 'mosquitto.log'}\n"
            + ("log_type error\nlog_type warning\n" if self.quiet else "log_type all\n")
            + (f"user {user}\n" if user else ""))
        self.proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     stdin=subprocess.DEVNULL)
        wait_port(self.port, proc=self.proc)
        return self

    def stop(self) -> None:
        stop_process(self.proc, timeout=10)  # SIGTERM: a persistent broker saves its sessions first
        self.proc = None

    def restart(self) -> "Mosquitto":
        self.stop()
        return self.start()

    def log(self) -> str:
        path = Path(self.root) / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def __enter__(self) -> "Mosquitto":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------- child entry


def _main(argv: List[str]) -> int:
    secrets = sys.stdin.read().splitlines()
    try:
        if argv[:1] == ["init-token"] and len(argv) == 3:
            from .token import init_token

            init_token(argv[1], argv[2], so_pin=secrets[0], pin=secrets[1])
            return 0
        if argv[:1] == ["keygen"] and len(argv) == 5:
            from .token import generate_keypair

            info = generate_keypair(argv[1], argv[2], secrets[0], argv[3], argv[4])
            print(json.dumps({"label": info.label, "id_hex": info.id_hex, "key_type": info.key_type,
                              "uri": info.uri()}))
            return 0
    except Exception as exc:  # reported to the parent, which raises LabError
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print("usage: python -m lightclient.lab init-token MODULE LABEL | keygen MODULE TOKEN LABEL TYPE "
          "(PINs on stdin)", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
