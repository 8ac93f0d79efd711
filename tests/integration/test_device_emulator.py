"""The Device against the strict IoT Hub emulator (the same behaviours as against mosquitto, plus the
hub's own rules: the emulator records every protocol deviation, and these tests require none)."""
import queue
import time
import uuid

import pytest

from lightclient import _native, tls
from lightclient.backoff import Backoff
from lightclient.device import Device, MethodResponse
from lightclient.emulator.service import Emulator
from lightclient.identity import Identity
from tests.lab import free_port

from ..conftest import csr_pem

FAST = Backoff(initial=0.05, maximum=0.3, not_authorized=1.0)


@pytest.fixture
def emulator(tmp_path):
    with Emulator(tmp_path / "emu", hostname="localhost", port=free_port()) as emu:
        yield emu


def _enroll(emu, device, tmp_path, device_id):
    """Register device_id and issue it a certificate for the SoftHSM EC key (CSR signed in the token)."""
    (tmp_path / f"{device_id}.csr").write_bytes(csr_pem(_native.sign_csr(device["ec"]["key"], [("CN", device_id)])))
    cert = emu.sign_csr(tmp_path / f"{device_id}.csr", tmp_path / f"{device_id}.pem")
    emu.register_device(device_id)
    return tls.client_context(cert=cert, key=device["ec"]["key"], ca=emu.ca_path)


@pytest.fixture
def make_device(emulator, device, tmp_path):
    made = []

    def make(**kwargs):
        device_id = f"emu-{uuid.uuid4().hex[:8]}"
        ctx = _enroll(emulator, device, tmp_path, device_id)
        kwargs.setdefault("backoff", FAST)
        kwargs.setdefault("twin_timeout", 5)
        dev = Device(Identity("localhost", device_id), ctx, host="127.0.0.1", port=emulator.port, **kwargs)
        made.append(dev)
        return dev

    yield make
    for dev in made:
        dev.disconnect(timeout=0)


def test_telemetry_methods_twin_and_c2d(emulator, make_device):
    c2d = queue.Queue()
    desired = queue.Queue()
    dev = make_device(on_c2d=lambda m, p: c2d.put((m, p)), on_desired=lambda patch, v: desired.put((v, patch)))

    @dev.method("setLevel")
    def set_level(payload):
        if payload.get("level", 0) > 10:
            return MethodResponse(400, {"error": "too high"})
        return {"level": payload["level"]}

    with dev:
        dev.send_and_wait(b'{"t": 1}', {"unit": "C", "note": "a&b=c"}, message_id="m-1",
                          content_type="application/json", content_encoding="utf-8", timeout=5)
        (event,) = emulator.wait_for_events(1, dev.identity.device_id)
        assert event.body == b'{"t": 1}'
        assert event.properties == {"unit": "C", "note": "a&b=c"}
        assert event.system_properties == {"$.mid": "m-1", "$.ct": "application/json", "$.ce": "utf-8"}

        ok = emulator.invoke_method(dev.identity.device_id, "setLevel", {"level": 3}, timeout=5)
        assert (ok.status, ok.payload) == (200, {"level": 3})
        refused = emulator.invoke_method(dev.identity.device_id, "setLevel", {"level": 99}, timeout=5)
        assert (refused.status, refused.payload) == (400, {"error": "too high"})
        unknown = emulator.invoke_method(dev.identity.device_id, "nope", None, timeout=5)
        assert unknown.status == 404

        assert dev.patch_reported({"fw": "1.0", "gone": None}, timeout=5) >= 1
        twin = dev.get_twin(timeout=5)
        assert twin["reported"]["fw"] == "1.0"
        assert emulator.get_twin(dev.identity.device_id)["reported"]["fw"] == "1.0"

        version = emulator.update_desired(dev.identity.device_id, {"interval": 30})
        got_version, patch = desired.get(timeout=5)
        while got_version < version:
            got_version, patch = desired.get(timeout=5)
        assert patch["interval"] == 30

        emulator.send_c2d(dev.identity.device_id, b"hello", message_id="c-1", content_type="text/plain",
                          properties={"k": "v w", "null": None, "empty": ""})
        message, payload = c2d.get(timeout=5)
        assert payload == b"hello" and message.message_id == "c-1" and message.content_type == "text/plain"
        assert message.properties == {"k": "v w", "null": None, "empty": ""}
    assert emulator.diagnostics(dev.identity.device_id) == []


def test_reconnects_after_the_hub_restarts_and_resyncs_the_twin(tmp_path, device):
    port = free_port()
    state = tmp_path / "emu"
    first = Emulator(state, hostname="localhost", port=port).start()
    device_id = f"emu-{uuid.uuid4().hex[:8]}"
    ctx = _enroll(first, device, tmp_path, device_id)
    states, desired = queue.Queue(), queue.Queue()
    dev = Device(Identity("localhost", device_id), ctx, host="127.0.0.1", port=port, backoff=FAST,
                 twin_timeout=5, on_connection_state=lambda up, why: states.put(up),
                 on_desired=lambda patch, v: desired.put((v, patch)))
    second = None
    try:
        dev.connect(timeout=10)
        assert states.get(timeout=5) is True
        first.stop()
        assert states.get(timeout=10) is False
        # A new hub process on the same port: same CA (state dir), the identity registered again,
        # a desired value set while the device was away.
        second = Emulator(state, hostname="localhost", port=port).start()
        second.register_device(device_id)
        second.update_desired(device_id, {"mode": "eco"})
        assert states.get(timeout=10) is True
        # The twin re-read after the reconnect hands over what changed while offline...
        deadline_patch = None
        while deadline_patch is None or "mode" not in deadline_patch:
            _, deadline_patch = desired.get(timeout=10)
        assert deadline_patch["mode"] == "eco"
        # ...and the subscriptions are back: a live desired change and a method call arrive.
        second.update_desired(device_id, {"mode": "turbo"})
        while deadline_patch.get("mode") != "turbo":
            _, deadline_patch = desired.get(timeout=10)
        dev.add_method_handler("ping", lambda payload: "pong")
        assert second.invoke_method(device_id, "ping", None, timeout=5).payload == "pong"
        dev.send_and_wait(b"back", timeout=5)
        assert second.wait_for_events(1, device_id)[0].body == b"back"
        assert second.diagnostics(device_id) == []
    finally:
        dev.disconnect(timeout=0)
        first.stop()
        if second is not None:
            second.stop()


def test_disconnect_lets_a_running_method_handler_answer_first(emulator, make_device):
    import threading

    started, results = threading.Event(), queue.Queue()
    dev = make_device()

    @dev.method("slow")
    def slow(payload):
        started.set()
        time.sleep(0.5)
        return {"done": True}

    dev.connect(timeout=10)
    caller = threading.Thread(target=lambda: results.put(
        emulator.invoke_method(dev.identity.device_id, "slow", None, timeout=5)))
    caller.start()
    assert started.wait(5)
    dev.disconnect(timeout=5)  # the handler is still sleeping here
    caller.join(10)
    answer = results.get_nowait()
    assert (answer.status, answer.payload) == (200, {"done": True})
