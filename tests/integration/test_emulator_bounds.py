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
    # The defect this guards against grew RSS by hundreds of MiB (29 -> 650 MB over 7 floods: a 256 KiB
    # buffer per accepted socket). A fixed 16 MiB allowance catches that with a wide margin while leaving
    # room for allocator fragmentation on a loaded machine (a 20 % ratio of ~30 MB flaked under load).
    assert after <= before + 16 * 1024, f"RSS {before} KiB before, {after} KiB after {ROUNDS} floods (peak {peak})"
    _publish(emulator_process, "after")


# --------------------------------------------------------------------------- in-process bounds


def _closed_by_peer(sock: socket.socket, within: float) -> bool:
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except socket.timeout:
        return False
    except OSError:
        return True  # reset


def _wait(predicate, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_connections_over_the_cap_are_closed_at_once_and_counted(tmp_path):
    with Emulator(tmp_path / "state", max_connections=3) as emu:
        emu.register_device("capped")
        cert, key = ca_signed_cert(emu, tmp_path, "capped")
        held = [socket.create_connection(("127.0.0.1", emu.port), timeout=10) for _ in range(3)]
        try:
            _wait(lambda: emu.connection_count() == 3, "the emulator did not accept three connections")
            extra = [socket.create_connection(("127.0.0.1", emu.port), timeout=10) for _ in range(2)]
            for sock in extra:
                assert _closed_by_peer(sock, 5.0), "a connection over the cap was kept"
                sock.close()
            assert emu.diagnostic_counts()["connection.limit"] == 2
            assert len(emu.diagnostics(rule="connection.limit")) == 1   # one record per episode
            assert not _closed_by_peer(held[0], 0.2)                   # those under the cap stay
        finally:
            for sock in held:
                sock.close()
        _wait(lambda: emu.connection_count() == 0, "closed connections still counted")
        device = RawClient(emu, cert, key)  # room again: a device is served
        try:
            device.connect("capped", username("capped"))
        finally:
            device.close()


def test_a_connection_that_never_finishes_tls_is_closed_after_the_handshake_timeout(tmp_path):
    with Emulator(tmp_path / "state", handshake_timeout=0.5, connect_timeout=0.5) as emu:
        silent = socket.create_connection(("127.0.0.1", emu.port), timeout=10)
        try:
            assert _closed_by_peer(silent, 10.0)
        finally:
            silent.close()
        assert "within 0.5 s" in emu.wait_for_diagnostic("tls.handshake-timeout").received
        # After TLS, the CONNECT must follow in time too.
        emu.register_device("slow")
        cert, key = ca_signed_cert(emu, tmp_path, "slow")
        device = RawClient(emu, cert, key)
        try:
            assert device.closed_within(10.0)
        finally:
            device.close()
        emu.wait_for_diagnostic("connect.timeout")
        assert emu.connection_count() == 0


def test_diagnostics_are_a_bounded_ring_with_counts(tmp_path):
    with Emulator(tmp_path / "state", max_diagnostics=5) as emu:
        for _ in range(12):
            with socket.create_connection(("127.0.0.1", emu.port), timeout=10) as sock:
                sock.sendall(b"not a ClientHello" * 4)
                assert _closed_by_peer(sock, 10.0)
        _wait(lambda: emu.diagnostic_counts().get("tls.handshake") == 12, "twelve failed handshakes counted")
        assert len(emu.diagnostics()) == 5


def test_a_c2d_message_counts_against_the_queue_depth_until_acknowledged(tmp_path):
    import struct

    from lightclient.emulator import HubError
    from lightclient.emulator.hub import C2D_QUEUE_DEPTH

    from .test_emulator import _frame, _string

    with Emulator(tmp_path / "state") as emu:
        emu.register_device("noack")
        cert, key = ca_signed_cert(emu, tmp_path, "noack")
        device = RawClient(emu, cert, key)
        try:
            device.connect("noack", username("noack"))
            device.send(_frame(0x82, struct.pack("!H", 1) + _string("devices/noack/messages/devicebound/#")
                               + b"\x01"))
            assert device.read_packet()[0] == 0x90
            for n in range(C2D_QUEUE_DEPTH):   # each goes out at once; the device never sends PUBACK
                emu.send_c2d("noack", f"m{n}")
            with pytest.raises(HubError) as info:
                emu.send_c2d("noack", "one too many")
            assert (info.value.status, info.value.error_code) == (403, 403004)
        finally:
            device.close()


# --------------------------------------------------------------------------- command line and limits


def _run_cli(args, tmp_path, preexec_fn=None, timeout=30):
    """Start the emulator CLI, return (process, its start-up text) once it is ready or has exited."""
    process = subprocess.Popen([sys.executable, "-m", "lightclient.emulator", "--port", "0",
                                "--state-dir", str(tmp_path / "state"), *args], cwd=ROOT, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, preexec_fn=preexec_fn,
                               env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = []
    while not lines or lines[-1] != "ready":
        line = process.stdout.readline()
        if not line:
            process.wait(timeout)
            process.stdout.close()
            return process, "\n".join(lines)
        lines.append(line.rstrip("\n"))
    return process, "\n".join(lines)


def _stop(process):
    process.terminate()
    assert process.wait(timeout=15) == 0
    process.stdout.close()


def _open_files_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no open-files line")


def test_cap_from_flag_and_config_file(tmp_path):
    import json

    config = tmp_path / "emulator.json"
    config.write_text(json.dumps({"max_connections": 7, "handshake_timeout": 2, "connect_timeout": 2.5}))
    process, text = _run_cli(["--config", str(config)], tmp_path)
    try:
        assert "at most 7 connections" in text
    finally:
        _stop(process)
    process, text = _run_cli(["--config", str(config), "--max-connections", "9"], tmp_path)
    try:
        assert "at most 9 connections" in text  # the flag wins
    finally:
        _stop(process)
    for args, words in ((["--max-connections", "0"], "must be at least 1"),
                        (["--max-connections", "many"], "expected a whole number"),
                        (["--handshake-timeout", "-1"], "positive number of seconds")):
        process, text = _run_cli(args, tmp_path)
        assert process.returncode == 2 and words in text, text
    config.write_text(json.dumps({"max_connections": 0}))
    process, text = _run_cli(["--config", str(config)], tmp_path)
    assert process.returncode == 2 and "'max_connections'" in text and "positive" in text, text


def test_open_file_limit_is_raised_to_fit_the_cap_or_the_cap_lowered_with_a_warning(tmp_path):
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4096 + 64:
        pytest.fail(f"this machine's hard open-file limit {hard} is below the default cap; raise it")

    def low_soft_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    process, text = _run_cli([], tmp_path, preexec_fn=low_soft_limit)
    try:
        assert "at most 4096 connections" in text and "warning" not in text, text
        assert _open_files_limit(process.pid) >= 4096 + 64
    finally:
        _stop(process)

    def low_hard_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (200, 200))

    process, text = _run_cli([], tmp_path, preexec_fn=low_hard_limit)
    try:
        assert "at most 136 connections" in text, text
        assert "warning: the open-file limit is 200" in text and "lowered to 136" in text, text
    finally:
        _stop(process)
