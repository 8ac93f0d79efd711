"""Process plumbing shared by the lab's parts: loopback ports, finding tools, running and stopping them.

Every process the lab starts is a child of the caller and is stopped by its PID (:func:`stop_process`).
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional


class LabError(RuntimeError):
    """A lab component (SoftHSM, openssl, mosquitto, swtpm) could not be set up."""


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


def executable(name: str, package: str) -> str:
    """The path of a system tool, or a :class:`LabError` naming the Debian package to install."""
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.path.exists(p)), None)
    if path is None:
        raise LabError(f"{name} is not installed: apt install {package}")
    return path


def run(cmd: List[str], *, input: Optional[str] = None, env: Optional[Dict[str, str]] = None,
        cwd: Optional[Path] = None, timeout: float = 60) -> str:
    """Run a tool to completion and return its stdout; a :class:`LabError` with its stderr otherwise."""
    try:
        proc = subprocess.run(cmd, input=input, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    except FileNotFoundError:
        raise LabError(f"{cmd[0]} is not installed") from None
    if proc.returncode != 0:
        raise LabError(f"{' '.join(cmd[:3])} … failed ({proc.returncode}): {proc.stderr.strip()[-800:]}")
    return proc.stdout
