"""Device (level 3) against a real mosquitto with the key in SoftHSM; a paho peer plays the hub."""
import json
import logging
import os
import queue
import shutil
import subprocess
import threading
import time
import uuid

import pytest

from lightclient import pnp, tls
from tests import lab
from lightclient.backoff import Backoff
from lightclient.device import ConnectRefusedError, Device, MethodResponse
from lightclient.exceptions import ConfigError, OperationTimeout, ServiceError
from lightclient.identity import Identity

from .hubside import HubSide

FAST = Backoff(initial=0.05, maximum=0.3, not_authorized=1.0)


@pytest.fixture(scope="module")
def token_context(device, test_ca):
    return tls.client_context(cert=device["ec"]["cert"], key=device["ec"]["key"], ca=test_ca.cert)


@pytest.fixture
def hub(service_context, broker):
    side = HubSide(service_context, broker.port)
    yield side
    side.close()


@pytest.fixture
def make_device(token_context, broker):
    """Devices with fresh ids (mosquitto keeps persistent sessions per client id across tests)."""
    made = []

    def make(module_id=None, model_id=None, port=None, **kwargs):
        identity = Identity("localhost", f"dev-{uuid.uuid4().hex[:8]}", module_id, model_id)
        kwargs.setdefault("backoff", FAST)
        kwargs.setdefault("twin_timeout", 5)
        dev = Device(identity, token_context, port=port or broker.port, **kwargs)
        made.append(dev)
        return dev

    yield make
    for dev in made:
        dev.disconnect(timeout=0)
    # Every thread a Device started is gone once it is disconnected.
    leftovers = [t.name for t in threading.enumerate() if t.name.startswith(("lightclient-", "paho-mqtt-client-dev"))]
    assert leftovers == []


def test_telemetry_with_properties_arrives_with_the_exact_topic(make_device, hub):
    dev = make_device()
    with dev:
        handle = dev.send(b'{"t":21.5}', {"a b": "c&d=e", "plus": "1+1", "empty": ""}, message_id="m 1",
                          content_type="application/json", content_encoding="utf-8")
        handle.wait(5)
        assert handle.done()
        dev.send_and_wait("plain", timeout=5)
    topic, payload = hub.wait_for(lambda t, p: p == b'{"t":21.5}')
    assert topic == (f"devices/{dev.identity.device_id}/messages/events/%24.mid=m%201&%24.ct=application%2Fjson"
                     "&%24.ce=utf-8&a%20b=c%26d%3De&plus=1%2B1&empty=")
    # Without message_id=, every message gets a unique $.mid (so duplicates are identifiable downstream):
    # a random 96-bit prefix per Device and a counter, 36 characters like a UUID.
    plain_topic = hub.wait_for(lambda t, p: p == b"plain")[0]
    prefix = f"devices/{dev.identity.device_id}/messages/events/%24.mid="
    assert plain_topic.startswith(prefix)
    random_part, _, counter = plain_topic[len(prefix):].partition("-")
    assert len(random_part) == 24 and len(counter) == 11 and int(counter, 16) >= 1
    assert not dev.is_connected
    # Queued while disconnected, sent once connected again: a Device can be reconnected after disconnect().
    queued = dev.send(b"after reconnect")
    with dev:
        queued.wait(5)


def test_pipelined_sends_are_all_acknowledged_in_order(make_device, hub):
    dev = make_device(max_inflight=8)
    with dev:
        handles = [dev.send(b"%d" % i, {"i": str(i)}) for i in range(300)]
        for h in handles:
            h.wait(10)
        prefix = f"devices/{dev.identity.device_id}/messages/events/"
        hub.wait_for(lambda t, p: p == b"299" and t.startswith(prefix))
    got = [p for t, p in hub.received if t.startswith(prefix)]
    assert got == [b"%d" % i for i in range(300)]
    assert len({h.mid for h in handles[:8]}) == 8


def test_module_and_plug_and_play_topics(make_device, hub):
    dev = make_device(module_id="filter", model_id="dtmi:com:example:Thermostat;1")
    with dev:
        dev.send_and_wait(b"m", output_name="out1", component="thermostat1", message_id="m1", timeout=5)
        assert dev.patch_reported(pnp.writable_property_ack("targetTemp", 21.5, 4, component="thermostat1")) == 2
    topic, _ = hub.wait_for(lambda t, p: p == b"m")
    assert topic == f"devices/{dev.identity.device_id}/modules/filter/messages/events/%24.on=out1&%24.mid=m1&%24.sub=thermostat1"
    assert hub.reported["thermostat1"] == {"__t": "c", "targetTemp": {"value": 21.5, "ac": 200, "av": 4}}


def test_methods_are_answered_with_the_right_rid_and_status(make_device, hub):
    dev = make_device()

    @dev.method("echo")
    def echo(payload):
        return {"got": payload}

    dev.add_method_handler("fail", lambda payload: 1 / 0)
    dev.add_method_handler("custom", lambda payload: MethodResponse(202, "later"))
    with dev:
        assert hub.call_method("echo", b'{"x": [1, 2]}', rid="r-42") == (200, {"got": {"x": [1, 2]}})
        hub.wait_for(lambda t, p: t == "$iothub/methods/res/200/?$rid=r-42")
        assert hub.call_method("echo") == (200, {"got": None})
        assert hub.call_method("fail") == (500, {"error": "handler raised ZeroDivisionError"})
        assert hub.call_method("nope") == (404, {"error": "no handler for method 'nope' on this device"})
        assert hub.call_method("echo", b"{not json") == (400, {"error": "the method payload is not valid JSON"})
        assert hub.call_method("custom") == (202, "later")


def test_a_slow_method_handler_blocks_neither_the_network_nor_other_methods(make_device, hub):
    dev = make_device()
    release = threading.Event()
    dev.add_method_handler("slow", lambda payload: release.wait(10) and "slow done")
    dev.add_method_handler("fast", lambda payload: "fast done")
    with dev:
        hub.publish("$iothub/methods/POST/slow/?$rid=s1", b"", qos=0)
        assert hub.call_method("fast") == (200, "fast done")
        dev.send_and_wait(b"while slow runs", timeout=5)
        assert dev.get_twin(timeout=5)["desired"]["$version"] == 1
        assert hub.count("$iothub/methods/res/200/?$rid=s1") == 0
        release.set()
        topic, body = hub.wait_for(lambda t, p: t.endswith("?$rid=s1"))
    assert (topic, body) == ("$iothub/methods/res/200/?$rid=s1", b'"slow done"')


def test_twin_get_and_reported_patch_round_trip(make_device, hub):
    dev = make_device()
    hub.desired = {"interval": 5, "$version": 3}
    with dev:
        twin = dev.get_twin(timeout=5)
        assert twin == {"desired": {"interval": 5, "$version": 3}, "reported": {"$version": 1}}
        assert dev.patch_reported({"fw": "1.2", "nested": {"a": None}}, timeout=5) == 2
        assert dev.patch_reported({"fw": None}, timeout=5) == 3
    topic, body = hub.wait_for(lambda t, p: t.startswith("$iothub/twin/PATCH/properties/reported/"))
    assert topic.startswith("$iothub/twin/PATCH/properties/reported/?$rid=")
    assert json.loads(body) == {"fw": "1.2", "nested": {"a": None}}
    assert hub.reported == {"nested": {"a": None}, "$version": 3}
    get_topic, get_body = hub.wait_for(lambda t, p: t.startswith("$iothub/twin/GET/"))
    assert get_topic.startswith("$iothub/twin/GET/?$rid=") and get_body == b""


def test_twin_errors_are_typed(make_device, hub):
    dev = make_device()
    with dev:
        hub.twin_status = 429
        with pytest.raises(ServiceError, match="status 429") as err:
            dev.get_twin(timeout=5)
        assert err.value.status == 429 and err.value.retryable
        hub.twin_status = 400
        with pytest.raises(ServiceError) as err:
            dev.patch_reported({"a": 1}, timeout=5)
        assert err.value.status == 400 and not err.value.retryable
        hub.answer_twin = False
        with pytest.raises(OperationTimeout, match="twin GET"):
            dev.get_twin(timeout=0.3)


def test_desired_patches_reach_the_callback_in_version_order(make_device, hub):
    got = queue.Queue()
    hub.desired = {"interval": 5, "$version": 1}
    dev = make_device(on_desired=lambda patch, version: got.put((patch, version)))
    with dev:
        # On connect, the twin is read and everything not yet seen arrives as one patch.
        assert got.get(timeout=5) == ({"interval": 5, "$version": 1}, 1)
        assert hub.patch_desired({"interval": 10}) == 2
        assert hub.patch_desired({"mode": "eco"}) == 3
        # A stale patch (version 2 again) is dropped.
        hub.publish("$iothub/twin/PATCH/properties/desired/?$version=2", b'{"interval": 7, "$version": 2}')
        hub.patch_desired({"interval": 11})
        assert [got.get(timeout=5) for _ in range(3)] == [
            ({"interval": 10, "$version": 2}, 2), ({"mode": "eco", "$version": 3}, 3),
            ({"interval": 11, "$version": 4}, 4)]
    assert got.empty()


def test_c2d_properties_are_decoded(make_device, hub):
    got = queue.Queue()
    dev = make_device(on_c2d=lambda message, payload: got.put((message, payload)))
    with dev:
        device_id = dev.identity.device_id
        # MQTT forbids '+' in a PUBLISH topic, so a plus in a value always travels as %2B.
        hub.send_c2d(device_id, f"%24.mid=abc&%24.to=%2Fdevices%2F{device_id}%2Fmessages%2Fdevicebound"
                                "&%24.ct=text%2Fplain&k=v%20w&flag&empty=&plus=1%2B1&%C3%A4=%E2%82%AC", b"hello")
        message, payload = got.get(timeout=5)
    assert payload == b"hello"
    assert dict(message.properties) == {"k": "v w", "flag": None, "empty": "", "plus": "1+1", "ä": "€"}
    assert message.message_id == "abc" and message.content_type == "text/plain"
    assert message.system_properties["$.to"] == f"/devices/{device_id}/messages/devicebound"


def test_reconnect_after_broker_restart_resubscribes_and_refetches_the_twin(
        token_context, test_ca, service_context, tmp_path):
    port = lab.free_port()
    broker = lab.Mosquitto(tmp_path / "mq", test_ca, port=port).start()
    hub = dev = None
    try:
        hub = HubSide(service_context, port)
        hub.desired = {"interval": 5, "$version": 1}
        states, desired = queue.Queue(), queue.Queue()
        dev = Device(Identity("localhost", f"dev-{uuid.uuid4().hex[:8]}"), token_context, port=port,
                     backoff=Backoff(initial=0.2, maximum=0.4), twin_timeout=1,
                     on_connection_state=lambda up, reason: states.put(up),
                     on_desired=lambda patch, version: desired.put((patch, version)))
        dev.add_method_handler("ping", lambda payload: "pong")
        dev.connect(timeout=10)
        assert states.get(timeout=5) is True
        assert desired.get(timeout=5) == ({"interval": 5, "$version": 1}, 1)

        broker.stop()
        assert states.get(timeout=5) is False
        # Sent while offline: paho keeps it and sends it after the reconnect.
        offline = dev.send(b"sent while offline")
        hub.desired = {"interval": 9, "extra": True, "$version": 4}   # changed while the device was away
        hub.subscribed.clear()
        broker.start()
        assert hub.subscribed.wait(5)
        assert states.get(timeout=10) is True
        # The twin was read again and only what changed is handed over.
        assert desired.get(timeout=10) == ({"interval": 9, "extra": True, "$version": 4}, 4)
        assert hub.count("$iothub/twin/GET/") >= 2
        offline.wait(10)
        # mosquitto forgot every subscription on restart: a method reaching the device proves it resubscribed.
        assert hub.call_method("ping") == (200, "pong")
        log = broker.log()
        # The log spans both broker lives: one SUBSCRIBE each.
        assert log.count(f"Received SUBSCRIBE from {dev.identity.client_id}") == 2
    finally:
        if dev is not None:
            dev.disconnect(timeout=0)
        if hub is not None:
            hub.close()
        broker.stop()


def test_connect_reports_why_it_failed(token_context, device, broker):
    closed_port = lab.free_port()
    dev = Device(Identity("localhost", "nobody"), token_context, port=closed_port, backoff=FAST)
    started = time.monotonic()
    with pytest.raises(OperationTimeout, match=f"could not connect to localhost:{closed_port}.*last error"):
        dev.connect(timeout=0.5)
    assert time.monotonic() - started < 2
    assert not dev.is_connected
    # The lab CA is not trusted by the default (IoT Hub roots) context: a configuration error, not retried.
    strict = tls.client_context(cert=device["ec"]["cert"], key=device["ec"]["key"])
    dev = Device(Identity("localhost", "nobody"), strict, port=broker.port, backoff=FAST)
    with pytest.raises(ConfigError, match="failed verification"):
        dev.connect(timeout=5)


def test_keepalive_over_1177_is_refused(token_context):
    with pytest.raises(ConfigError, match="1177"):
        Device(Identity("localhost", "d"), token_context, keepalive=1178)
    Device(Identity("localhost", "d"), token_context, keepalive=1177)


class RefusingBroker:
    """mosquitto that completes TLS but answers CONNACK 5 (not authorized), like IoT Hub for a disabled device."""

    def __init__(self, root, test_ca, port):
        root.mkdir(parents=True, exist_ok=True)
        (root / "passwords").write_text("")  # nobody has a password, so every CONNECT is refused
        conf = root / "mosquitto.conf"
        conf.write_text(
            f"per_listener_settings false\nlistener {port} 127.0.0.1\n"
            f"cafile {test_ca.cert}\ncertfile {test_ca.server_cert}\nkeyfile {test_ca.server_key}\n"
            f"require_certificate true\nallow_anonymous false\npassword_file {root / 'passwords'}\n"
            f"persistence false\nlog_dest file {root / 'mosquitto.log'}\nlog_type all\n"
            + ("user root\n" if os.geteuid() == 0 else ""))
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc = subprocess.Popen([exe, "-c", str(conf)], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        lab.wait_port(port, proc=self.proc)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(5)


def test_not_authorized_is_reported_at_connect_and_backs_off_long_later(
        token_context, test_ca, tmp_path, caplog):
    port = lab.free_port()
    refusing = RefusingBroker(tmp_path / "refusing", test_ca, port)
    try:
        dev = Device(Identity("localhost", "disabled-dev"), token_context, port=port, backoff=FAST)
        with pytest.raises(ConnectRefusedError, match="CONNACK 5 .not authorized.*registered and enabled") as err:
            dev.connect(timeout=5)
        assert err.value.return_code == 5 and not err.value.retryable
    finally:
        refusing.stop()

    # Connected first, then the hub starts refusing: the next attempt waits the long not-authorized delay.
    broker = lab.Mosquitto(tmp_path / "mq", test_ca, port=port).start()
    dev = Device(Identity("localhost", f"dev-{uuid.uuid4().hex[:8]}"), token_context, port=port,
                 backoff=Backoff(initial=0.05, maximum=0.1, jitter=0, not_authorized=42))
    refusing = None
    try:
        dev.connect(timeout=10)
        broker.stop()
        refusing = RefusingBroker(tmp_path / "refusing2", test_ca, port)
        caplog.set_level(logging.INFO, logger="lightclient.device")
        deadline = time.monotonic() + 10
        while "reconnecting in 42.0 s" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "refused the connection: CONNACK 5 (not authorized)" in caplog.text
        assert "reconnecting in 42.0 s" in caplog.text
    finally:
        dev.disconnect(timeout=0)
        broker.stop()
        if refusing is not None:
            refusing.stop()
