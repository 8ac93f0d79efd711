"""lightclient.aio.Device against the strict IoT Hub emulator (which records every protocol deviation;
these tests require none), and its durable outbox through a SIGKILL."""
import asyncio
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from lightclient import aio
from lightclient.backoff import Backoff
from lightclient.device import MethodResponse
from lightclient.emulator.service import Emulator
from lightclient.identity import Identity
from tests.lab import free_port

from ..conftest import PIN
from .faults import Receiver, TcpProxy
from .test_device_emulator import _enroll

FAST = Backoff(initial=0.05, maximum=0.3, not_authorized=1.0)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def emulator(tmp_path):
    with Emulator(tmp_path / "emu", hostname="localhost", port=free_port()) as emu:
        yield emu


async def _off_loop(fn, *args, **kwargs):
    """The emulator's service-side calls block until the device answers: run them off the loop."""
    return await asyncio.get_running_loop().run_in_executor(None, lambda: fn(*args, **kwargs))


def test_telemetry_methods_twin_desired_and_c2d(emulator, device, tmp_path):
    device_id = f"aio-{uuid.uuid4().hex[:8]}"
    ctx = _enroll(emulator, device, tmp_path, device_id)
    dev = aio.Device(Identity("localhost", device_id), ctx, host="127.0.0.1", port=emulator.port, backoff=FAST,
                     twin_timeout=5)

    @dev.method("setLevel")
    async def set_level(payload):
        if payload.get("level", 0) > 10:
            return MethodResponse(400, {"error": "too high"})
        return {"level": payload["level"]}

    dev.add_method_handler("blocking", lambda payload: {"sync": True})

    async def scenario():
        async with dev:
            await dev.send(b'{"t": 1}', {"unit": "C"}, message_id="m-1", content_type="application/json")
            await dev.send_many([b"a", b"b"])
            ok = await _off_loop(emulator.invoke_method, device_id, "setLevel", {"level": 3}, timeout=5)
            refused = await _off_loop(emulator.invoke_method, device_id, "setLevel", {"level": 99}, timeout=5)
            sync = await _off_loop(emulator.invoke_method, device_id, "blocking", None, timeout=5)
            unknown = await _off_loop(emulator.invoke_method, device_id, "nope", None, timeout=5)
            assert [(r.status, r.payload) for r in (ok, refused, sync)] == [
                (200, {"level": 3}), (400, {"error": "too high"}), (200, {"sync": True})]
            assert unknown.status == 404
            assert await dev.patch_reported({"fw": "1.0"}) >= 1
            assert (await dev.get_twin())["reported"]["fw"] == "1.0"
            patches = dev.desired()  # the desired document is empty: nothing to hand over yet
            version = await _off_loop(emulator.update_desired, device_id, {"interval": 30})
            patch = await asyncio.wait_for(patches.__anext__(), 5)
            assert patch == {"interval": 30, "$version": version}
            await _off_loop(emulator.send_c2d, device_id, b"hello", message_id="c-1", properties={"k": "v"})
            message = await asyncio.wait_for(dev.c2d().__anext__(), 5)
            assert (message.payload, message.message_id, dict(message.properties)) == (b"hello", "c-1", {"k": "v"})

    asyncio.run(asyncio.wait_for(scenario(), 60))
    events = emulator.events(device_id)
    assert [e.body for e in events] == [b'{"t": 1}', b"a", b"b"]
    assert events[0].system_properties == {"$.mid": "m-1", "$.ct": "application/json"}
    assert emulator.queued_c2d(device_id) == 0
    assert emulator.diagnostics(device_id) == []


def test_reconnects_after_the_hub_restarts(tmp_path, device):
    port = free_port()
    state = tmp_path / "emu"
    hub = Emulator(state, hostname="localhost", port=port).start()
    device_id = f"aio-{uuid.uuid4().hex[:8]}"
    ctx = _enroll(hub, device, tmp_path, device_id)
    dev = aio.Device(Identity("localhost", device_id), ctx, host="127.0.0.1", port=port, backoff=FAST,
                     twin_timeout=3)

    async def scenario():
        async with dev:
            patches = dev.desired()
            await asyncio.gather(*[dev.send(b"%d" % i) for i in range(100)])
            await _off_loop(hub.stop)
            offline = [dev.send(b"%d" % i) for i in range(100, 200)]
            await _off_loop(hub.start)  # the same Emulator object keeps its registry and event log
            await _off_loop(hub.update_desired, device_id, {"mode": "eco"})
            await asyncio.gather(*offline)
            patch = await asyncio.wait_for(patches.__anext__(), 15)
            assert patch["mode"] == "eco"

    try:
        asyncio.run(asyncio.wait_for(scenario(), 60))
        bodies = {e.body for e in hub.events(device_id)}
        assert bodies >= {b"%d" % i for i in range(200)}
        assert hub.diagnostics(device_id) == []
    finally:
        hub.stop()


def test_sigkill_with_the_outbox_loses_nothing(device, test_ca, broker, service_context, tmp_path):
    proxy = TcpProxy(broker.port)
    device_id = f"aio-{uuid.uuid4().hex[:8]}"
    outbox = tmp_path / "outbox.db"
    args = [sys.executable, "-m", "tests.integration.aio_outbox_child", str(proxy.port), str(test_ca.cert),
            str(device["ec"]["cert"]), device["ec"]["uri"], device_id, str(outbox)]

    def spawn(count):
        proc = subprocess.Popen(args + [str(count)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, cwd=ROOT)
        proc.stdin.write(PIN + "\n")
        proc.stdin.close()
        proc.stdin = None
        return proc

    receiver = Receiver(service_context, broker.port, device_id)
    child = None
    try:
        child = spawn(1000)
        accepted = -1
        for line in child.stdout:
            if line.startswith("accepted "):
                accepted = int(line.split()[1])
            if accepted == 200:
                proxy.black_hole()  # from here on nothing is acknowledged: the rest stays in the outbox
            if accepted >= 400:
                break
        child.kill()
        child.wait(10)
        assert child.returncode == -9
        child = spawn(0)
        out, err = child.communicate(timeout=40)
        assert child.returncode == 0, err[-2000:]
        assert int(out.split("recovered ")[1].split()[0]) > 0 and "drained" in out
        assert PIN not in out + err
        assert receiver.wait_distinct(accepted + 1, 20), f"{receiver.distinct()} of {accepted + 1}"
        assert all(len(receiver.mids[b"%d" % i]) == 1 for i in range(accepted + 1))
    finally:
        if child is not None and child.poll() is None:
            child.kill()
            child.wait(5)
        receiver.close()
        proxy.close()
