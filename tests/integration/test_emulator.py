"""The IoT Hub emulator, driven only by clients lightclient did not write: raw paho with hand-built topics
and a plain ssl.SSLContext, mosquitto_pub/mosquitto_sub, and raw TLS sockets with hand-built bytes.

Device keys and CSRs are made with the openssl CLI in a pytest temp dir; everything runs on loopback
with free ports, and every emulator, thread and process started here is stopped here.
"""
from __future__ import annotations

import itertools
import json
import os
import queue
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import requests

from lightclient.emulator import Emulator, HubError

ROOT = Path(__file__).resolve().parents[2]
API = "api-version=2021-04-12"
_ids = itertools.count(1)


# --------------------------------------------------------------------------- certificates (openssl CLI)


def openssl(*args: str) -> str:
    proc = subprocess.run(["openssl", *args], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _subj(cn: str) -> str:
    return "/CN=" + cn.replace("/", "\\/")


def ca_signed_cert(emu: Emulator, directory: Path, cn: str):
    """Key + CSR made here; the certificate issued by the emulator's CSR helper."""
    stem = directory / cn.replace("/", "__")
    key, csr, cert = (stem.with_suffix(s) for s in (".key", ".csr", ".pem"))
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(key))
    openssl("req", "-new", "-key", str(key), "-subj", _subj(cn), "-out", str(csr))
    emu.sign_csr(csr, cert)
    return cert, key


def self_signed_cert(directory: Path, cn: str):
    stem = directory / f"self-{cn}-{next(_ids)}"
    key, cert = stem.with_suffix(".key"), stem.with_suffix(".pem")
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", _subj(cn))
    return cert, key


def client_context(emu: Emulator, cert=None, key=None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cafile=str(emu.ca_path))
    if cert:
        context.load_cert_chain(str(cert), str(key))
    return context


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("emulator")


@pytest.fixture(scope="module")
def emu(workdir):
    with Emulator(workdir / "state", http_port=0) as emulator:
        yield emulator
    leftover = [t.name for t in threading.enumerate() if t.name.startswith("iothub-emulator")]
    assert not leftover, f"emulator threads still running after stop(): {leftover}"


@pytest.fixture
def device(emu, workdir):
    """Factory: register a fresh CA-signed identity and return (identity, cert, key)."""

    def make(prefix="dev", module=None):
        device_id = f"{prefix}-{next(_ids)}"
        emu.register_device(device_id, module)
        identity = f"{device_id}/{module}" if module else device_id
        cert, key = ca_signed_cert(emu, workdir, identity)
        return identity, cert, key

    return make


@pytest.fixture
def clients():
    """Every client a test opens is closed afterwards, even when the test fails."""
    opened = []
    yield opened
    for client in opened:
        client.close()


# --------------------------------------------------------------------------- a raw paho device


class PahoDevice:
    """A paho client with hand-built IoT Hub topics; our own loop thread so paho never reconnects."""

    def __init__(self, emu, identity, cert, key, *, clean_session=True, client_id=None, username=None,
                 keepalive=60):
        self.emu = emu
        self.identity = identity
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or identity,
                                  clean_session=clean_session, protocol=mqtt.MQTTv311)
        if username is None:
            username = f"localhost/{identity}/?{API}"
        self.client.username_pw_set(username)
        self.client.tls_set_context(client_context(emu, cert, key))
        self.keepalive = keepalive
        self.connacks = queue.Queue()
        self.disconnected = threading.Event()
        self._messages = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = None
        self.client.on_connect = lambda c, u, flags, rc, p: self.connacks.put((rc, flags.session_present))
        self.client.on_message = self._on_message
        self.client.on_disconnect = lambda *a: self.disconnected.set()
        # Every socket write on the loop thread. Without a register-write hook (and without loop_start) paho
        # writes from whichever thread calls publish()/subscribe(), while the loop thread may be reading the
        # same SSL object: OpenSSL forbids that, and under load it showed as a rare "connection lost". With
        # the hook, publish() only queues the packet and wakes the loop thread's select() (paho's sockpair).
        self.client.on_socket_register_write = lambda client, userdata, sock: None

    def _on_message(self, client, userdata, message):
        with self._cond:
            self._messages.append(message)
            self._cond.notify_all()

    def _loop(self):
        while not self._stop.is_set():
            if self.client.loop(timeout=0.02) != mqtt.MQTT_ERR_SUCCESS:
                time.sleep(0.02)

    def connect(self, expect=0):
        self.disconnected.clear()
        self.client.connect("127.0.0.1", self.emu.port, keepalive=self.keepalive)
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        rc, session_present = self.connacks.get(timeout=15)  # generous: CI shares 2 cores
        assert rc.value == expect, f"CONNACK {rc} ({rc.value}), expected {expect}"
        return session_present

    def subscribe(self, *filters, qos=1):
        granted = queue.Queue()
        self.client.on_subscribe = lambda c, u, mid, codes, p: granted.put([r.value for r in codes])
        self.client.subscribe([(f, qos) for f in filters])
        return granted.get(timeout=15)

    def publish(self, topic, payload=b"", qos=1, retain=False):
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if qos:
            info.wait_for_publish(timeout=15)
            assert info.is_published(), f"no PUBACK for {topic}"
        return info

    def wait_message(self, prefix, timeout=10.0):
        """Pop the first received message whose topic starts with ``prefix``."""
        with self._cond:
            found = []

            def ready():
                found[:] = [m for m in self._messages if m.topic.startswith(prefix)]
                return bool(found)

            assert self._cond.wait_for(ready, timeout), \
                f"no message on {prefix!r}; got {[m.topic for m in self._messages]}"
            self._messages.remove(found[0])
            return found[0]

    def topics(self):
        with self._cond:
            return [m.topic for m in self._messages]

    def disconnect(self):
        """Send DISCONNECT and return once the emulator has let the connection go."""
        self.client.disconnect()
        assert self.disconnected.wait(5)
        deadline = time.monotonic() + 5
        while self.emu.is_connected(*self.identity.split("/")):
            assert time.monotonic() < deadline, "the emulator kept the connection after DISCONNECT"
            time.sleep(0.01)

    def close(self):
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=5)
        try:
            self.client.disconnect()
            self.client.loop(timeout=0.01)
        except Exception:
            pass
        if self.client.socket():
            self.client.socket().close()


def paho_device(emu, clients, identity, cert, key, **options) -> PahoDevice:
    client = PahoDevice(emu, identity, cert, key, **options)
    clients.append(client)
    return client


# --------------------------------------------------------------------------- a raw TLS socket


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("!H", len(data)) + data


def _frame(first: int, body: bytes) -> bytes:
    length, encoded = len(body), bytearray()
    while True:
        byte, length = length % 128, length // 128
        encoded.append(byte | (0x80 if length else 0))
        if not length:
            return bytes([first]) + bytes(encoded) + body


def connect_bytes(client_id, username, *, clean=True, keepalive=60, level=4, will=None) -> bytes:
    flags = 0x80 | (0x02 if clean else 0)
    payload = _string(client_id)
    if will:
        flags |= 0x04
        payload += _string(will[0]) + _string(will[1])
    payload += _string(username)
    return _frame(0x10, _string("MQTT") + bytes([level, flags]) + struct.pack("!H", keepalive) + payload)


class RawClient:
    """A TLS socket speaking hand-built MQTT bytes, for what no well-behaved client would send."""

    def __init__(self, emu, cert, key):
        sock = socket.create_connection(("127.0.0.1", emu.port), timeout=5)
        self.sock = client_context(emu, cert, key).wrap_socket(sock, server_hostname="127.0.0.1")
        self.buf = b""

    def send(self, data: bytes):
        self.sock.sendall(data)

    def _fill(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buf += chunk

    def read_packet(self, timeout=3.0):
        """Return (first byte, body)."""
        self.sock.settimeout(timeout)
        self._fill(2)
        length, multiplier, index = 0, 1, 1
        while True:
            self._fill(index + 1)
            byte = self.buf[index]
            length += (byte & 0x7F) * multiplier
            multiplier *= 128
            index += 1
            if not byte & 0x80:
                break
        self._fill(index + length)
        first, body = self.buf[0], self.buf[index:index + length]
        self.buf = self.buf[index + length:]
        return first, body

    def connect(self, client_id, username, expect=0, **options):
        self.send(connect_bytes(client_id, username, **options))
        first, body = self.read_packet()
        assert first == 0x20 and body[1] == expect, (first, body)
        return bool(body[0] & 1)

    def closed_within(self, seconds) -> bool:
        self.sock.settimeout(seconds)
        try:
            while True:
                if not self.sock.recv(65536):
                    return True
        except socket.timeout:
            return False
        except (ConnectionError, ssl.SSLError, OSError):
            return True

    def close(self):
        self.sock.close()


def raw_client(emu, clients, cert, key) -> RawClient:
    client = RawClient(emu, cert, key)
    clients.append(client)
    return client


def username(identity):
    return f"localhost/{identity}/?{API}"


# =========================================================================== 1. MQTT server over TLS


def test_handshake_without_client_certificate_is_refused(emu):
    tls = None
    try:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            tls = client_context(emu).wrap_socket(socket.create_connection(("127.0.0.1", emu.port), timeout=5),
                                                  server_hostname="127.0.0.1")
            # TLS 1.3 reports the missing certificate only on the first read after the handshake.
            tls.sendall(connect_bytes("x", "localhost/x/"))
            if tls.recv(1) == b"":
                raise ConnectionError("closed without an alert")
    finally:
        if tls is not None:
            tls.close()
    emu.wait_for_diagnostic("tls.handshake")


def test_ca_signed_device_connects_and_qos1_telemetry_is_acknowledged(emu, device, clients):
    identity, cert, key = device()
    client = paho_device(emu, clients, identity, cert, key)
    assert client.connect() is False
    client.publish(f"devices/{identity}/messages/events/", b'{"t": 21}', qos=1)  # returns after PUBACK
    client.publish(f"devices/{identity}/messages/events/", b"qos0", qos=0)
    events = emu.wait_for_events(2, identity)
    assert [e.body for e in events] == [b'{"t": 21}', b"qos0"]


def test_protocol_level_other_than_3_1_1_gets_connack_1(emu, device, clients):
    identity, cert, key = device()
    raw = raw_client(emu, clients, cert, key)
    raw.connect(identity, username(identity), expect=1, level=5)
    assert raw.closed_within(2)
    emu.wait_for_diagnostic("connect.protocol", identity)


def test_first_packet_must_be_connect(emu, device, clients):
    identity, cert, key = device()
    raw = raw_client(emu, clients, cert, key)
    raw.send(b"\xc0\x00")  # PINGREQ
    assert raw.closed_within(2)
    assert any("first packet must be CONNECT" in str(d) for d in emu.diagnostics(rule="connect.first"))


def test_pingreq_answered_and_keeps_connection_alive(emu, device, clients):
    identity, cert, key = device()
    raw = raw_client(emu, clients, cert, key)
    raw.connect(identity, username(identity), keepalive=1)
    for _ in range(4):  # 2 s in all: longer than the 1.5 s window, but each PINGREQ resets it
        time.sleep(0.5)
        raw.send(b"\xc0\x00")
        assert raw.read_packet() == (0xD0, b"")
    assert emu.is_connected(identity)


def test_keep_alive_enforced_at_one_and_a_half_times_client_value(emu, device, clients):
    identity, cert, key = device()
    raw = raw_client(emu, clients, cert, key)
    raw.connect(identity, username(identity), keepalive=1)
    start = time.monotonic()
    assert raw.closed_within(3)
    assert 1.4 <= time.monotonic() - start < 2.5
    emu.wait_for_diagnostic("mqtt.keep-alive", identity)


def test_malformed_packet_closes_only_that_connection(emu, device, clients):
    good_id, good_cert, good_key = device("good")
    good = paho_device(emu, clients, good_id, good_cert, good_key)
    good.connect()
    bad_id, bad_cert, bad_key = device("bad")
    bad = raw_client(emu, clients, bad_cert, bad_key)
    bad.connect(bad_id, username(bad_id))
    bad.send(bytes.fromhex("36050003612f62"))  # PUBLISH with QoS bits 3
    assert bad.closed_within(2)
    emu.wait_for_diagnostic("mqtt.malformed", bad_id)
    good.publish(f"devices/{good_id}/messages/events/", b"still here")
    assert emu.wait_for_events(1, good_id)[0].body == b"still here"
    assert emu.is_connected(good_id)


def test_oversized_packet_refused_from_its_header(emu, device, clients):
    identity, cert, key = device()
    raw = raw_client(emu, clients, cert, key)
    raw.connect(identity, username(identity))
    raw.send(b"\x30\xff\xff\xff\x7f")  # declares a 256 MB PUBLISH; no body follows
    assert raw.closed_within(2)
    assert "exceeds the limit" in emu.wait_for_diagnostic("mqtt.packet-too-large", identity).message


def test_persistent_session_reconnect_receives_queued_c2d(emu, device, clients):
    identity, cert, key = device()
    client = paho_device(emu, clients, identity, cert, key, clean_session=False)
    assert client.connect() is False
    assert client.subscribe(f"devices/{identity}/messages/devicebound/#") == [1]
    client.disconnect()
    emu.send_c2d(identity, b"one", message_id="m1")
    emu.send_c2d(identity, b"two", message_id="m2")
    assert emu.queued_c2d(identity) == 2
    assert client.connect() is True  # session present: the subscription survived
    first = client.wait_message(f"devices/{identity}/messages/devicebound/")
    second = client.wait_message(f"devices/{identity}/messages/devicebound/")
    assert (first.payload, second.payload) == (b"one", b"two")
    assert "%24.mid=m1" in first.topic and first.qos == 1
    assert emu.queued_c2d(identity) == 0


def test_clean_session_forgets_subscriptions(emu, device, clients):
    identity, cert, key = device()
    client = paho_device(emu, clients, identity, cert, key, clean_session=True)
    client.connect()
    client.subscribe(f"devices/{identity}/messages/devicebound/#")
    client.disconnect()
    assert client.connect() is False
    emu.send_c2d(identity, b"waiting")
    time.sleep(0.2)  # give a wrongly kept subscription the chance to deliver
    assert client.topics() == []
    assert emu.queued_c2d(identity) == 1  # it waits in the hub's queue until the device subscribes
    client.subscribe(f"devices/{identity}/messages/devicebound/#")
    assert client.wait_message("devices/").payload == b"waiting"


def test_unacknowledged_qos1_redelivered_with_dup_to_persistent_session(emu, device, clients):
    identity, cert, key = device()
    c2d_filter = f"devices/{identity}/messages/devicebound/#".encode()
    first = raw_client(emu, clients, cert, key)
    first.connect(identity, username(identity), clean=False)
    first.send(_frame(0x82, b"\x00\x01" + struct.pack("!H", len(c2d_filter)) + c2d_filter + b"\x01"))
    assert first.read_packet() == (0x90, b"\x00\x01\x01")
    emu.send_c2d(identity, b"ack me", message_id="r1")
    header, body = first.read_packet()
    assert header == 0x32  # PUBLISH qos 1, no DUP
    packet_id = body[-(len(b"ack me") + 2):-len(b"ack me")]
    first.close()  # gone without PUBACK

    second = raw_client(emu, clients, cert, key)
    assert second.connect(identity, username(identity), clean=False) is True
    header, body = second.read_packet()
    assert header == 0x3A  # PUBLISH qos 1 with DUP
    assert body.endswith(packet_id + b"ack me")
    second.send(b"\x40\x02" + packet_id)  # PUBACK completes it
    second.send(b"\xe0\x00")
    assert second.closed_within(2)

    third = raw_client(emu, clients, cert, key)
    assert third.connect(identity, username(identity), clean=False) is True
    third.send(b"\xc0\x00")
    assert third.read_packet() == (0xD0, b"")  # nothing redelivered before the PINGRESP


def test_unsubscribe_gets_unsuback_and_stops_delivery(emu, device, clients):
    identity, cert, key = device()
    client = paho_device(emu, clients, identity, cert, key)
    client.connect()
    client.subscribe("$iothub/twin/res/#")
    unsubscribed = queue.Queue()
    client.client.on_unsubscribe = lambda *a: unsubscribed.put(True)
    client.client.unsubscribe("$iothub/twin/res/#")
    assert unsubscribed.get(timeout=10)
    client.publish("$iothub/twin/GET/?$rid=1")
    emu.wait_for_diagnostic("twin.not-subscribed", identity)
    assert client.topics() == []


def test_will_is_delivered_as_telemetry_on_unclean_close(emu, device, clients):
    identity, cert, key = device()
    raw = raw_client(emu, clients, cert, key)
    raw.connect(identity, username(identity), will=(f"devices/{identity}/messages/events/k=v", "gone"))
    raw.close()
    event = emu.wait_for_events(1, identity)[0]
    assert event.body == b"gone"
    assert event.properties == {"k": "v", "iothub-MessageType": "Will"}


# =========================================================================== 2. hub authentication


def test_module_identity_connects_with_cn_device_slash_module(emu, device, clients):
    identity, cert, key = device("modhost", module="m1")
    client = paho_device(emu, clients, identity, cert, key)
    client.connect()
    client.publish(f"devices/{identity.split('/')[0]}/modules/m1/messages/events/", b"from module")
    event = emu.wait_for_events(1, identity.split("/")[0], "m1")[0]
    assert (event.identity, event.body) == (identity, b"from module")


def test_self_signed_device_connects_by_thumbprint(emu, workdir, clients):
    cert, key = self_signed_cert(workdir, "selfie")
    emu.register_device("selfie", certificate=cert)
    client = paho_device(emu, clients, "selfie", cert, key)
    client.connect()
    client.publish("devices/selfie/messages/events/", b"thumb")
    assert emu.wait_for_events(1, "selfie")[0].body == b"thumb"


def test_thumbprint_mismatch_gets_connack_5(emu, workdir, clients):
    registered, _ = self_signed_cert(workdir, "thumbdev")
    emu.register_device("thumbdev", certificate=registered)
    other_cert, other_key = ca_signed_cert(emu, workdir, "thumbdev")  # right CN, wrong certificate
    client = paho_device(emu, clients, "thumbdev", other_cert, other_key)
    client.connect(expect=135)  # paho's name for MQTT 3.1.1 CONNACK 5 "Not authorized"
    emu.wait_for_diagnostic("connect.thumbprint", "thumbdev")


def test_certificate_cn_must_equal_identity(emu, device, clients):
    _, cert, key = device("owner")
    victim, _, _ = device("victim")
    client = paho_device(emu, clients, victim, cert, key)
    client.connect(expect=135)
    diagnostic = emu.wait_for_diagnostic("connect.certificate-cn", victim)
    assert "must equal the identity" in diagnostic.message


def test_client_id_must_be_a_registered_identity(emu, device, clients):
    identity, cert, key = device()
    client = paho_device(emu, clients, identity, cert, key, client_id="not-" + identity,
                         username=username("not-" + identity))
    client.connect(expect=135)
    diagnostic = emu.wait_for_diagnostic("connect.client-id", "not-" + identity)
    assert "not a registered" in diagnostic.message and repr(identity) in diagnostic.message


def test_username_must_name_this_hub_and_the_identity(emu, device, clients):
    identity, cert, key = device()
    client = paho_device(emu, clients, identity, cert, key, username=f"otherhub/{identity}/?{API}")
    client.connect(expect=135)
    assert "host name" in emu.wait_for_diagnostic("connect.username", identity).message
    client2 = paho_device(emu, clients, identity, cert, key, username=f"localhost/someone/?{API}")
    client2.connect(expect=135)
    assert "differs from the client id" in emu.diagnostics(identity, "connect.username")[-1].message


def test_missing_api_version_is_accepted_with_a_diagnostic(emu, device, clients):
    identity, cert, key = device()
    client = paho_device(emu, clients, identity, cert, key, username=f"localhost/{identity}/")
    client.connect()
    assert "no api-version" in emu.wait_for_diagnostic("connect.api-version", identity).message


def test_second_connection_with_same_identity_drops_the_first(emu, device, clients):
    identity, cert, key = device()
    first = paho_device(emu, clients, identity, cert, key)
    first.connect()
    second = paho_device(emu, clients, identity, cert, key)
    second.connect()
    assert first.disconnected.wait(3)
    emu.wait_for_diagnostic("connect.duplicate", identity)
    second.publish(f"devices/{identity}/messages/events/", b"second wins")
    assert emu.wait_for_events(1, identity)[0].body == b"second wins"


# =========================================================================== 3. namespaces and hub rules


def test_telemetry_property_bag_is_decoded_like_the_hub(emu, device, clients):
    identity, cert, key = device()
    client = paho_device(emu, clients, identity, cert, key)
    client.connect()
    bag = ("%24.mid=m%201&%24.ct=application%2Fjson&%24.ce=utf-8&plus=a%2Bb&space=a%20b"
           "&slash=x%2Fy&nullkey&empty=")
    client.publish(f"devices/{identity}/messages/events/{bag}", b"{}")
    event = emu.wait_for_events(1, identity)[0]
    assert event.system_properties == {"$.mid": "m 1", "$.ct": "application/json", "$.ce": "utf-8"}
    assert event.properties == {"plus": "a+b", "space": "a b", "slash": "x/y", "nullkey": None, "empty": ""}
    assert emu.diagnostics(identity) == []  # a correctly encoded bag raises no diagnostic
    assert emu.events(identity) == [event]


def test_unencoded_dollar_in_system_property_is_diagnosed(emu, device, clients):
    identity, cert, key = device()
    client = paho_device(emu, clients, identity, cert, key)
    client.connect()
    client.publish(f"devices/{identity}/messages/events/$.ct=application%2Fjson", b"{}")
    assert emu.wait_for_events(1, identity)[0].system_properties == {"$.ct": "application/json"}
    diagnostic = emu.wait_for_diagnostic("telemetry.property-encoding", identity)
    assert "'$.ct' sent unencoded" in str(diagnostic) and "'%24.ct'" in str(diagnostic)


def test_qos2_publish_closes_the_connection(emu, device, clients):
    identity, cert, key = device()
    client = paho_device(emu, clients, identity, cert, key)
    client.connect()
    client.client.publish(f"devices/{identity}/messages/events/", b"x", qos=2)
    assert client.disconnected.wait(3)
    emu.wait_for_diagnostic("publish.qos2", identity)
    assert emu.events(identity) == []


def test_publish_over_256_kb_closes_the_connection(emu, device, clients):
    identity, cert, key = device()
    client = paho_device(emu, clients, identity, cert, key)
    client.connect()
    client.publish(f"devices/{identity}/messages/events/", b"x" * 262_144)  # exactly the limit: fine
    client.client.publish(f"devices/{identity}/messages/events/a=b", b"x" * 262_144, qos=1)
    assert client.disconnected.wait(3)
    assert "exceeds the hub's 262144-byte limit" in emu.wait_for_diagnostic("publish.size", identity).message
    assert len(emu.events(identity)) == 1


def test_publish_to_another_devices_topic_closes_the_connection(emu, device, clients):
    identity, cert, key = device()
    other, _, _ = device("other")
    client = paho_device(emu, clients, identity, cert, key)
    client.connect()
    client.client.publish(f"devices/{other}/messages/events/", b"spoof", qos=1)
    assert client.disconnected.wait(3)
    assert f"identity {other!r}" in emu.wait_for_diagnostic("publish.topic", identity).message
    assert emu.events(other) == []


def test_retained_publish_is_forwarded_with_mqtt_retain_property(emu, device, clients):
    identity, cert, key = device()
    client = paho_device(emu, clients, identity, cert, key)
    client.connect()
    client.publish(f"devices/{identity}/messages/events/a=1", b"r", retain=True)
    event = emu.wait_for_events(1, identity)[0]
    assert event.properties == {"a": "1", "mqtt-retain": "true"}


def test_undocumented_subscription_filters_get_suback_0x80(emu, device, clients):
    identity, cert, key = device()
    other, _, _ = device("other")
    client = paho_device(emu, clients, identity, cert, key)
    client.connect()
    codes = client.subscribe("$iothub/twin/res/#", "devices/+/messages/devicebound/#",
                             f"devices/{other}/messages/devicebound/#", "#")
    assert codes == [1, 128, 128, 128]
    assert len(emu.diagnostics(identity, "subscribe.filter")) == 3


def test_subscription_qos2_is_granted_qos1(emu, device, clients):
    identity, cert, key = device()
    client = paho_device(emu, clients, identity, cert, key)
    client.connect()
    assert client.subscribe("$iothub/methods/POST/#", qos=2) == [1]


def test_subscription_limit_is_enforced(workdir, clients):
    # A device has only four documented filters (a module five), so the hub's limit of five can
    # only be exceeded through a lower configured limit: that is what this test uses.
    with Emulator(workdir / "state", max_subscriptions=2) as small:
        small.register_device("limited")
        cert, key = ca_signed_cert(small, workdir, "limited")
        client = paho_device(small, clients, "limited", cert, key)
        client.connect()
        assert client.subscribe("$iothub/twin/res/#", "$iothub/methods/POST/#",
                                "$iothub/twin/PATCH/properties/desired/#") == [1, 1, 128]
        assert "only subscribe to 2 topics" in small.wait_for_diagnostic("subscribe.limit").message
        client.close()


def test_twin_get_returns_200_with_desired_reported_and_versions(emu, device, clients):
    identity, cert, key = device()
    emu.update_desired(identity, {"fan": 3})
    client = paho_device(emu, clients, identity, cert, key)
    client.connect()
    client.subscribe("$iothub/twin/res/#")
    client.publish("$iothub/twin/GET/?$rid=get-1")
    response = client.wait_message("$iothub/twin/res/")
    assert response.topic == "$iothub/twin/res/200/?$rid=get-1"
    assert json.loads(response.payload) == {"desired": {"fan": 3, "$version": 2},
                                            "reported": {"$version": 1}}


def test_reported_patch_gets_204_with_new_version_and_null_deletes(emu, device, clients):
    identity, cert, key = device()
    client = paho_device(emu, clients, identity, cert, key)
    client.connect()
    client.subscribe("$iothub/twin/res/#")
    client.publish("$iothub/twin/PATCH/properties/reported/?$rid=1", b'{"a": 1, "b": {"c": 2, "d": 3}}')
    assert client.wait_message("$iothub/twin/res/").topic == "$iothub/twin/res/204/?$rid=1&$version=2"
    client.publish("$iothub/twin/PATCH/properties/reported/?$rid=2", b'{"a": null, "b": {"c": null}}')
    assert client.wait_message("$iothub/twin/res/").topic == "$iothub/twin/res/204/?$rid=2&$version=3"
    assert emu.get_twin(identity)["reported"] == {"b": {"d": 3}, "$version": 3}


def test_reported_patch_with_invalid_json_gets_400(emu, device, clients):
    identity, cert, key = device()
    client = paho_device(emu, clients, identity, cert, key)
    client.connect()
    client.subscribe("$iothub/twin/res/#")
    client.publish("$iothub/twin/PATCH/properties/reported/?$rid=9", b"{not json")
    assert client.wait_message("$iothub/twin/res/").topic == "$iothub/twin/res/400/?$rid=9"
    emu.wait_for_diagnostic("twin.reported-json", identity)
    assert emu.get_twin(identity)["reported"] == {"$version": 1}


def _nested(levels: int) -> bytes:
    """A twin section with ``levels`` objects nested below its root: {"l1": {"l2": … {"v": 1}}}.
    IoT Hub's example of the deepest valid section is _nested(10)."""
    return b"".join(b'{"l%d": ' % i for i in range(1, levels + 1)) + b'{"v": 1}' + b"}" * levels


def test_too_deep_reported_patch_gets_400_and_the_device_keeps_working(emu, device, clients):
    identity, cert, key = device()
    client = paho_device(emu, clients, identity, cert, key)
    client.connect()
    client.subscribe("$iothub/twin/res/#")
    # Deep enough to overflow json.loads' recursion, and one level over the hub's limit of 10.
    for rid, body in (("deep", b"[" * 100_000 + b"]" * 100_000), ("eleven", _nested(11))):
        client.publish(f"$iothub/twin/PATCH/properties/reported/?$rid={rid}", body)
        assert client.wait_message("$iothub/twin/res/").topic == f"$iothub/twin/res/400/?$rid={rid}"
    rules = [d for d in emu.diagnostics(identity, "twin.reported-depth")]
    assert len(rules) == 2 and "the hub allows 10" in rules[1].message
    assert emu.get_twin(identity)["reported"] == {"$version": 1}
    # The connection carries on: ten levels is the limit and is accepted, telemetry still flows.
    client.publish("$iothub/twin/PATCH/properties/reported/?$rid=ten", _nested(10))
    assert client.wait_message("$iothub/twin/res/").topic == "$iothub/twin/res/204/?$rid=ten&$version=2"
    client.publish(f"devices/{identity}/messages/events/", b"still here")
    assert emu.wait_for_events(1, identity)[0].body == b"still here"


def test_too_deep_desired_patch_from_the_service_gets_400_with_a_diagnostic(emu, device):
    identity, _, _ = device()
    base = f"http://127.0.0.1:{emu.http_port}"
    desired = json.loads(_nested(11))
    reply = requests.patch(f"{base}/twins/{identity}", json={"properties": {"desired": desired}}, timeout=10)
    assert reply.status_code == 400 and "10 levels" in reply.json()["message"]
    assert emu.wait_for_diagnostic("service.twin-depth", identity)
    deep = b'{"properties": {"desired": ' + b"[" * 50_000 + b"]" * 50_000 + b"}}"
    reply = requests.patch(f"{base}/twins/{identity}", data=deep, timeout=10)
    assert reply.status_code == 400 and "nested" in reply.json()["message"]
    assert emu.wait_for_diagnostic("service.json-depth")
    with pytest.raises(HubError) as info:
        emu.update_desired(identity, desired)
    assert info.value.status == 400
    assert emu.update_desired(identity, json.loads(_nested(10))) == 2  # the limit itself is fine
    reply = requests.get(f"{base}/twins/{identity}", timeout=10)
    assert reply.status_code == 200 and reply.json()["properties"]["desired"]["$version"] == 2


def test_twin_sections_are_capped_at_32_kb_as_on_the_hub(emu, device, clients):
    identity, cert, key = device()
    client = paho_device(emu, clients, identity, cert, key)
    client.connect()
    client.subscribe("$iothub/twin/res/#")
    for n in range(3):   # a device adding keys forever
        client.publish(f"$iothub/twin/PATCH/properties/reported/?$rid={n}",
                       json.dumps({f"k{n}": "x" * 12_000}).encode())
    statuses = [client.wait_message("$iothub/twin/res/").topic.split("/")[3] for _ in range(3)]
    assert statuses == ["204", "204", "400"]
    assert "IoT Hub allows 32768" in emu.wait_for_diagnostic("twin.reported-size", identity).message
    assert sorted(emu.get_twin(identity)["reported"]) == ["$version", "k0", "k1"]
    with pytest.raises(HubError) as info:
        emu.update_desired(identity, {"big": "x" * 40_000})
    assert info.value.status == 400 and emu.get_twin(identity)["desired"] == {"$version": 1}


def test_twin_request_without_rid_is_diagnosed(emu, device, clients):
    identity, cert, key = device()
    client = paho_device(emu, clients, identity, cert, key)
    client.connect()
    client.subscribe("$iothub/twin/res/#")
    client.publish("$iothub/twin/GET/")
    assert "no '$rid'" in emu.wait_for_diagnostic("twin.rid", identity).message


def test_desired_update_is_pushed_with_version(emu, device, clients):
    identity, cert, key = device()
    client = paho_device(emu, clients, identity, cert, key)
    client.connect()
    client.subscribe("$iothub/twin/PATCH/properties/desired/#")
    version = emu.update_desired(identity, {"interval": 5, "gone": None})
    message = client.wait_message("$iothub/twin/PATCH/properties/desired/")
    assert message.topic == f"$iothub/twin/PATCH/properties/desired/?$version={version}"
    assert json.loads(message.payload) == {"interval": 5, "gone": None, "$version": version}


def _answer_methods(client, status=200, body=None):
    def respond(c, userdata, message):
        rid = message.topic.split("?$rid=")[1]
        reply = body if body is not None else json.dumps({"echo": json.loads(message.payload)}).encode()
        c.publish(f"$iothub/methods/res/{status}/?$rid={rid}", reply, qos=1)
    client.client.message_callback_add("$iothub/methods/POST/#", respond)


def test_direct_method_round_trip(emu, device, clients):
    identity, cert, key = device()
    client = paho_device(emu, clients, identity, cert, key)
    client.connect()
    client.subscribe("$iothub/methods/POST/#")
    _answer_methods(client, status=201)
    result = emu.invoke_method(identity, "reboot", {"delay": 2}, timeout=10)
    assert (result.status, result.payload) == (201, {"echo": {"delay": 2}})


def test_method_to_offline_device_gets_404(emu, device):
    identity, _, _ = device()
    with pytest.raises(HubError) as info:
        emu.invoke_method(identity, "reboot", timeout=1)
    assert (info.value.status, info.value.error_code) == (404, 404103)


def test_method_timeout_gets_504(emu, device, clients):
    identity, cert, key = device()
    client = paho_device(emu, clients, identity, cert, key)
    client.connect()
    client.subscribe("$iothub/methods/POST/#")  # subscribed, but never answers
    with pytest.raises(HubError) as info:
        emu.invoke_method(identity, "slow", timeout=0.3)
    assert (info.value.status, info.value.error_code) == (504, 504101)
    request = client.wait_message("$iothub/methods/POST/slow/")
    client.publish(f"$iothub/methods/res/200/?$rid={request.topic.split('=')[1]}", b"{}")
    assert "no pending method call" in emu.wait_for_diagnostic("method.rid", identity).message


def test_two_devices_never_see_each_others_twin_responses_or_method_calls(emu, device, clients):
    a_id, a_cert, a_key = device("a")
    b_id, b_cert, b_key = device("b")
    a = paho_device(emu, clients, a_id, a_cert, a_key)
    b = paho_device(emu, clients, b_id, b_cert, b_key)
    for client in (a, b):
        client.connect()
        client.subscribe("$iothub/twin/res/#", "$iothub/methods/POST/#")
    _answer_methods(a, body=b'"from a"')
    _answer_methods(b, body=b'"from b"')
    a.publish("$iothub/twin/PATCH/properties/reported/?$rid=1", b'{"who": "a"}')
    b.publish("$iothub/twin/GET/?$rid=1")  # same rid on purpose
    assert a.wait_message("$iothub/twin/res/").topic == "$iothub/twin/res/204/?$rid=1&$version=2"
    assert json.loads(b.wait_message("$iothub/twin/res/").payload)["reported"] == {"$version": 1}
    assert emu.invoke_method(a_id, "m", timeout=10).payload == "from a"
    assert emu.invoke_method(b_id, "m", timeout=10).payload == "from b"
    time.sleep(0.1)  # any stray cross-delivery would have arrived by now
    assert a.topics() == [] and b.topics() == []


def test_c2d_properties_are_encoded_as_the_hub_does(emu, device, clients):
    identity, cert, key = device()
    client = paho_device(emu, clients, identity, cert, key)
    client.connect()
    client.subscribe(f"devices/{identity}/messages/devicebound/#")
    emu.send_c2d(identity, "hello", message_id="id 1", correlation_id="c/1", content_type="text/plain",
                 properties={"k": "v&w", "empty": "", "null": None})
    message = client.wait_message(f"devices/{identity}/messages/devicebound/")
    assert message.topic == (f"devices/{identity}/messages/devicebound/%24.mid=id%201"
                             f"&%24.to=%2Fdevices%2F{identity}%2Fmessages%2Fdevicebound&%24.cid=c%2F1"
                             f"&%24.ct=text%2Fplain&k=v%26w&empty=&null")
    assert message.payload == b"hello"


# =========================================================================== mosquitto clients


def _mosquitto_args(emu, identity, cert, key):
    return ["-h", "127.0.0.1", "-p", str(emu.port), "--cafile", str(emu.ca_path), "--cert", str(cert),
            "--key", str(key), "-i", identity, "-u", username(identity), "-V", "mqttv311"]


def test_mosquitto_pub_telemetry(emu, device):
    identity, cert, key = device()
    subprocess.run(["mosquitto_pub", *_mosquitto_args(emu, identity, cert, key), "-q", "1",
                    "-t", f"devices/{identity}/messages/events/%24.ct=text%2Fplain", "-m", "from mosquitto"],
                   check=True, timeout=10)
    event = emu.wait_for_events(1, identity)[0]
    assert (event.body, event.system_properties) == (b"from mosquitto", {"$.ct": "text/plain"})


def test_mosquitto_sub_receives_c2d_queued_while_offline(emu, device):
    identity, cert, key = device()
    emu.send_c2d(identity, "queued for mosquitto", properties={"a": "1"})
    out = subprocess.run(["mosquitto_sub", *_mosquitto_args(emu, identity, cert, key), "-q", "1", "-C", "1",
                          "-W", "5", "-v", "-t", f"devices/{identity}/messages/devicebound/#"],
                         capture_output=True, text=True, timeout=10, check=True).stdout
    assert out.startswith(f"devices/{identity}/messages/devicebound/%24.mid=")
    assert out.strip().endswith("&a=1 queued for mosquitto")


# =========================================================================== 4. service side


def test_http_api_twin_methods_c2d_events_and_diagnostics(emu, device, clients):
    base = f"http://127.0.0.1:{emu.http_port}"
    identity, cert, key = device()
    client = paho_device(emu, clients, identity, cert, key)
    client.connect()
    client.subscribe("$iothub/methods/POST/#", "$iothub/twin/PATCH/properties/desired/#",
                     f"devices/{identity}/messages/devicebound/#")
    _answer_methods(client, status=200)

    reply = requests.post(f"{base}/twins/{identity}/methods?{API}",
                          json={"methodName": "ping", "payload": [1], "responseTimeoutInSeconds": 3})
    assert reply.status_code == 200 and reply.json() == {"status": 200, "payload": {"echo": [1]}}

    reply = requests.patch(f"{base}/twins/{identity}?{API}", json={"properties": {"desired": {"x": 1}}})
    assert reply.json()["properties"]["desired"] == {"x": 1, "$version": 2}
    assert client.wait_message("$iothub/twin/PATCH/").topic.endswith("?$version=2")
    assert requests.get(f"{base}/twins/{identity}").json()["properties"]["reported"] == {"$version": 1}

    reply = requests.post(f"{base}/devices/{identity}/messages/deviceBound", data=b"c2d over http",
                          headers={"iothub-messageid": "h1", "iothub-app-color": "red"})
    assert reply.json() == {"messageId": "h1"}
    assert client.wait_message("devices/").topic.endswith("%24.mid=h1&%24.to=%2Fdevices%2F"
                                                          f"{identity}%2Fmessages%2Fdevicebound&color=red")

    client.publish(f"devices/{identity}/messages/events/$.ct=x", b"t")
    emu.wait_for_events(1, identity)
    events = requests.get(f"{base}/emulator/events", params={"deviceId": identity}).json()
    assert [(e["body"], e["systemProperties"]) for e in events] == [("t", {"$.ct": "x"})]
    diagnostics = requests.get(f"{base}/emulator/diagnostics", params={"identity": identity}).json()
    assert [d["rule"] for d in diagnostics] == ["telemetry.property-encoding"]

    unknown = requests.post(f"{base}/twins/never-registered/methods", json={"methodName": "x"})
    assert unknown.status_code == 404 and unknown.json()["errorCode"] == 404001


def test_http_api_registers_identities(emu, workdir, clients):
    base = f"http://127.0.0.1:{emu.http_port}"
    assert requests.put(f"{base}/devices/httpdev", json={}).status_code == 200
    cert, key = ca_signed_cert(emu, workdir, "httpdev")
    client = paho_device(emu, clients, "httpdev", cert, key)
    client.connect()
    assert "httpdev" in [d["deviceId"] for d in requests.get(f"{base}/devices").json()]


def _raw_http(port: int, request: bytes):
    """Send raw bytes and nothing more, return (status, decoded JSON body) of the answer read with
    http.client."""
    import http.client

    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)  # a body shorter than its Content-Length ends here
        response = http.client.HTTPResponse(sock)
        response.begin()
        body = response.read()
        assert response.getheader("Content-Type", "").startswith("application/json"), (response.status, body)
        return response.status, json.loads(body)


def _request(method, path, body=b"", length=None, headers=()):
    head = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *headers]
    if length is not False:
        head.append(f"Content-Length: {len(body) if length is None else length}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


_SELF = '{"authentication": {"type": "selfSigned", "x509Certificate": %s}}'
MALFORMED_HTTP = [
    ("register: array body", _request("PUT", "/devices/m1", b"[]"), 400),
    ("register: string body", _request("PUT", "/devices/m1", b'"x"'), 400),
    ("register: number body", _request("PUT", "/devices/m1", b"5"), 400),
    ("register: null body", _request("PUT", "/devices/m1", b"null"), 400),
    ("register: missing body", _request("PUT", "/devices/m1"), 400),
    ("register: invalid JSON", _request("PUT", "/devices/m1", b"{nope"), 400),
    ("register: authentication is an array", _request("PUT", "/devices/m1", b'{"authentication": []}'), 400),
    ("register: status is a number", _request("PUT", "/devices/m1", b'{"status": 5}'), 400),
    ("register: thumbprint is a list", _request(
        "PUT", "/devices/m1", b'{"authentication": {"type": "selfSigned", "x509Thumbprint": {"p": [1]}}}'), 400),
    ("register: garbage certificate", _request("PUT", "/devices/m1", (_SELF % '"garbage"').encode()), 400),
    ("register: armoured garbage certificate", _request("PUT", "/devices/m1", (_SELF % json.dumps(
        "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")).encode()), 400),
    ("register: certificate is a number", _request("PUT", "/devices/m1", (_SELF % "5").encode()), 400),
    ("register: id ..", _request("PUT", "/devices/..", b"{}"), 400),
    ("register: id .", _request("PUT", "/devices/.", b"{}"), 400),
    ("register: id %2e%2e", _request("PUT", "/devices/%2e%2e", b"{}"), 400),
    ("register: module ..", _request("PUT", "/devices/m1/modules/..", b"{}"), 400),
    ("register: id with NUL", _request("PUT", "/devices/a%00b", b"{}"), 400),
    ("Content-Length: abc", _request("PUT", "/devices/m1", b"{}", length="abc"), 400),
    ("Content-Length: -5", _request("PUT", "/devices/m1", b"{}", length="-5"), 400),
    ("Content-Length twice, different", _request("PUT", "/devices/m1", b"{}", headers=["Content-Length: 7"]), 400),
    ("Content-Length over the body", _request("PUT", "/devices/m1", b"{}", length=10), 400),
    ("oversized body", _request("PUT", "/devices/m1", b"", length=10 ** 12), 413),
    ("chunked body", _request("PUT", "/devices/m1", b"2\r\n{}\r\n0\r\n\r\n", length=False,
                              headers=["Transfer-Encoding: chunked"]), 411),
    ("twin patch: array body", _request("PATCH", "/twins/m0", b"[1]"), 400),
    ("twin patch: properties is a string", _request("PATCH", "/twins/m0", b'{"properties": "x"}'), 400),
    ("twin patch: missing body", _request("PATCH", "/twins/m0"), 400),
    ("twin patch: too deep", _request("PATCH", "/twins/m0", b"[" * 20_000 + b"]" * 20_000), 400),
    ("method: string body", _request("POST", "/twins/m0/methods", b'"x"'), 400),
    ("method: methodName is a number", _request("POST", "/twins/m0/methods", b'{"methodName": 5}'), 400),
    ("method: timeout is text", _request(
        "POST", "/twins/m0/methods", b'{"methodName": "m", "responseTimeoutInSeconds": "abc"}'), 400),
    ("method: timeout is negative", _request(
        "POST", "/twins/m0/methods", b'{"methodName": "m", "responseTimeoutInSeconds": -1}'), 400),
    ("unknown route", _request("GET", "/nowhere"), 404),
    ("known path, wrong method", _request("DELETE", "/emulator/events"), 404),
    ("unknown method", _request("BREW", "/devices"), 405),
    ("garbage request line", b"GARBAGE\r\n\r\n", 400),
]


@pytest.mark.parametrize("name,request_bytes,status", MALFORMED_HTTP, ids=[c[0] for c in MALFORMED_HTTP])
def test_http_api_answers_every_malformed_request_with_a_json_4xx(emu, name, request_bytes, status):
    emu.register_device("m0")
    answer_status, answer = _raw_http(emu.http_port, request_bytes)
    assert answer_status == status, (name, answer)
    assert isinstance(answer["message"], str) and answer["message"] and answer["errorCode"] // 1000 == status
    assert emu.registry.get("m1") is None
    # The server carries on: a valid request right after is served.
    ok_status, devices = _raw_http(emu.http_port, _request("GET", "/devices", length=False))
    assert ok_status == 200 and "m0" in [d["deviceId"] for d in devices]


def test_garbage_certificate_is_refused_before_anything_is_written(emu, workdir, clients):
    base = f"http://127.0.0.1:{emu.http_port}"
    kept = emu.state_dir / "registered"
    before = sorted(kept.iterdir()) if kept.exists() else []
    for pem in ("garbage", "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"):
        reply = requests.put(f"{base}/devices/garbled", timeout=10,
                             json={"authentication": {"type": "selfSigned", "x509Certificate": pem}})
        assert reply.status_code == 400 and "x509Certificate" in reply.json()["message"]
    garbage = workdir / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(HubError.__mro__[1]):  # EmulatorError
        emu.register_device("garbled", certificate=garbage)
    assert emu.registry.get("garbled") is None
    assert (sorted(kept.iterdir()) if kept.exists() else []) == before
    # A real self-signed certificate is kept after it was checked, and its device connects.
    cert, key = self_signed_cert(workdir, "selfhttp")
    reply = requests.put(f"{base}/devices/selfhttp", timeout=10, json={"authentication": {
        "type": "selfSigned", "x509Certificate": cert.read_text()}})
    assert reply.status_code == 200 and reply.json()["authentication"]["type"] == "selfSigned"
    assert (kept / "selfhttp__.pem").exists()
    paho_device(emu, clients, "selfhttp", cert, key).connect()


def test_issued_device_certificate_chains_to_the_emulator_ca(emu, workdir):
    cert, _ = emu.issue_certificate("issued", module_id="m", out_dir=workdir / "issued")
    assert "OK" in openssl("verify", "-CAfile", str(emu.ca_path), "-purpose", "sslclient", str(cert))
    assert "CN = issued/m" in openssl("x509", "-in", str(cert), "-noout", "-subject", "-nameopt", "oneline")


def test_emulator_can_take_an_existing_ca_and_server_certificate(emu, workdir, clients):
    state = workdir / "state"
    with Emulator(workdir / "other-state", ca_cert=state / "ca.pem", ca_key=state / "ca.key",
                  server_cert=state / "server.pem", server_key=state / "server.key") as other:
        assert other.ca_path == state / "ca.pem"
        assert not (workdir / "other-state" / "ca.pem").exists()
        other.register_device("taken")
        cert, key = ca_signed_cert(other, workdir, "taken")
        client = paho_device(other, clients, "taken", cert, key)
        client.connect()
        client.close()


# =========================================================================== 5/6. command line


def test_command_line_signs_a_csr_and_exits(tmp_path):
    key, csr, cert = tmp_path / "k.pem", tmp_path / "d.csr", tmp_path / "d.pem"
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(key))
    openssl("req", "-new", "-key", str(key), "-subj", "/CN=csrdev", "-out", str(csr))
    subprocess.run([sys.executable, "-m", "lightclient.emulator", "--state-dir", str(tmp_path / "s"),
                    "--sign-csr", str(csr), "--out", str(cert)], cwd=ROOT, check=True, timeout=30,
                   capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert "OK" in openssl("verify", "-CAfile", str(tmp_path / "s" / "ca.pem"), str(cert))


def test_command_line_prints_ca_devices_and_live_diagnostics(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "lightclient.emulator", "--port", "0", "--state-dir", str(tmp_path),
         "--device", "cli1", "--device", "cli1/mod", "--http-port", "0", "--verbose"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        lines = []
        while not lines or lines[-1] != "ready":
            line = process.stdout.readline()
            assert line, "emulator exited early:\n" + "".join(lines)
            lines.append(line.rstrip("\n"))
        text = "\n".join(lines)
        port = int(text.split("mqtts://127.0.0.1:")[1].split()[0])
        assert f"devices must trust the CA: {tmp_path / 'ca.pem'}" in text
        assert "device cli1: CA-signed" in text and "device cli1/mod: CA-signed" in text
        assert "service API: http://127.0.0.1:" in text
        devices = tmp_path / "devices"
        subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "--cafile", str(tmp_path / "ca.pem"),
                        "--cert", str(devices / "cli1.pem"), "--key", str(devices / "cli1.key"), "-i", "cli1",
                        "-u", "localhost/cli1/", "-t", "devices/cli1/messages/events/", "-m", "x", "-q", "1"],
                       check=True, timeout=10)
        line = process.stdout.readline()
        assert "[cli1] connect.api-version: username has no api-version" in line
    finally:
        process.terminate()
        assert process.wait(timeout=10) == 0
        process.stdout.close()

