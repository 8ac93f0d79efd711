"""The emulator's resource bounds, seen from outside: idle-connection floods against the emulator running
in its own process (``python -m lightclient.emulator``), the connection cap, and the handshake and CONNECT
timeouts. Loopback only; every process and socket opened here is closed here."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from lightclient.emulator import Emulator

from .test_emulator import RawClient, ca_signed_cert, connect_bytes, username

ROOT = Path(__file__).resolve().parents[2]
ROUNDS, PER_ROUND = 7, 500


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def _open_sockets(pid: int) -> int:
    count = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            count += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except OSError:
            pass  # closed while we looked
    return count


def _wait_sockets(pid: int, predicate, what: str, timeout: float = 20.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        count = _open_sockets(pid)
        if predicate(count):
            return count
        assert time.monotonic() < deadline, f"{what}: the emulator holds {count} sockets"
        time.sleep(0.05)


@pytest.fixture
def emulator_process(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "lightclient.emulator", "--port", "0", "--http-port", "0",
         "--state-dir", str(tmp_path / "state"), "--device", "flood-dev"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = []
    try:
        while not lines or lines[-1] != "ready":
            line = process.stdout.readline()
            assert line, "emulator exited early:\n" + "\n".join(lines)
            lines.append(line.rstrip("\n"))
        text = "\n".join(lines)
        process.mqtt_port = int(text.split("mqtts://127.0.0.1:")[1].split()[0])
        process.http_port = int(text.split("service API: http://127.0.0.1:")[1].split()[0])
        process.state = tmp_path / "state"
        yield process
    finally:
        process.terminate()
        assert process.wait(timeout=15) == 0
        process.stdout.close()


def _publish(process, body: str) -> None:
    """A real device (mosquitto_pub with the emulator-issued certificate) sends one QoS 1 message, and
    the hub has it."""
    devices = process.state / "devices"
    subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(process.mqtt_port),
                    "--cafile", str(process.state / "ca.pem"), "--cert", str(devices / "flood-dev.pem"),
                    "--key", str(devices / "flood-dev.key"), "-i", "flood-dev",
                    "-u", "localhost/flood-dev/?api-version=2021-04-12",
                    "-t", "devices/flood-dev/messages/events/", "-m", body, "-q", "1"], check=True, timeout=20)
    events = requests.get(f"http://127.0.0.1:{process.http_port}/emulator/events",
                          params={"deviceId": "flood-dev"}, timeout=10).json()
    assert body in [e["body"] for e in events]


def test_idle_connection_floods_leave_rss_where_it_started(emulator_process):
    pid = emulator_process.pid
    _publish(emulator_process, "before")      # warm up every path a device uses before the baseline
    idle = _wait_sockets(pid, lambda n: True, "baseline")
    before = _rss_kib(pid)
    peak = before
    for _ in range(ROUNDS):
        held = [socket.create_connection(("127.0.0.1", emulator_process.mqtt_port), timeout=10)
                for _ in range(PER_ROUND)]
        try:
            # Hold until the emulator has accepted every one of them.
            _wait_sockets(pid, lambda n: n >= idle + PER_ROUND, "accepting the flood")
            peak = max(peak, _rss_kib(pid))
        finally:
            for sock in held:
                sock.close()
        _wait_sockets(pid, lambda n: n <= idle, "closing the flood")
    time.sleep(0.5)  # settle: let the loop run its close callbacks
    after = _rss_kib(pid)
    assert after <= before * 1.2, f"RSS {before} KiB before, {after} KiB after {ROUNDS} floods (peak {peak})"
    _publish(emulator_process, "after")
