"""The emulator's MQTT over WebSockets, byte by byte: a raw TLS client sends upgrade requests and frames
(RFC 6455), and the emulator must accept exactly the valid ones, and refuse the others with the right HTTP
status or close code and a diagnostic that says why."""
import os
import socket
import ssl
import struct

import pytest

from lightclient.emulator import codec
from lightclient.emulator.service import Emulator
from lightclient.emulator.websocket import (OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT,
                                            accept_key, encode_frame)
from tests.lab import free_port

DEVICE = "ws-dev"
MASK = b"\x11\x22\x33\x44"


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    with Emulator(tmp_path_factory.mktemp("ws-emu"), port=free_port(), ws_port=0, connect_timeout=5) as hub:
        hub.register_device(DEVICE)
        hub.device_files = hub.issue_certificate(DEVICE)  # not .files: the emulator has its own (file upload)
        yield hub


def _tls(emu):
    ctx = ssl.create_default_context(cafile=str(emu.ca_path))
    cert, key = emu.device_files
    ctx.load_cert_chain(str(cert), str(key))
    raw = socket.create_connection(("127.0.0.1", emu.ws_port), timeout=5)
    return ctx.wrap_socket(raw, server_hostname="localhost")


KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def _request(path="/$iothub/websocket", method="GET", protocol="mqtt", version="13", key=KEY, upgrade="websocket",
             extra=()):
    lines = [f"{method} {path} HTTP/1.1", "Host: localhost"]
    if upgrade is not None:
        lines.append(f"Upgrade: {upgrade}")
    lines.append("Connection: Upgrade")
    if key is not None:
        lines.append(f"Sec-WebSocket-Key: {key}")
    if version is not None:
        lines.append(f"Sec-WebSocket-Version: {version}")
    if protocol is not None:
        lines.append(f"Sec-WebSocket-Protocol: {protocol}")
    lines += list(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _read_head(sock):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data.decode("latin-1")


def _read_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def _read_frame(sock):
    first, second = _read_exact(sock, 2)
    assert second & 0x80 == 0, "server frames must not be masked"
    length = second & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", _read_exact(sock, 2))
    elif length == 127:
        (length,) = struct.unpack("!Q", _read_exact(sock, 8))
    return first & 0x80, first & 0x0F, _read_exact(sock, length)


def _upgraded(emu, protocol="mqtt", path="/$iothub/websocket"):
    sock = _tls(emu)
    sock.sendall(_request(path=path, protocol=protocol))
    head = _read_head(sock)
    assert head.startswith("HTTP/1.1 101 "), head
    return sock, head


def _connect_packet():
    return codec.encode(codec.Connect(client_id=DEVICE, username=f"localhost/{DEVICE}/?api-version=2021-04-12",
                                      clean_session=True, keep_alive=30))


def _expect_connack(sock):
    fin, opcode, payload = _read_frame(sock)
    assert (fin, opcode) == (0x80, OP_BINARY)
    assert payload[:1] == b"\x20" and payload[-1] == 0, payload  # CONNACK, accepted


# ------------------------------------------------------------------------------------- handshake


@pytest.mark.parametrize("protocol", ["mqtt", "MQTT", "mqttv3.1, mqtt"])
def test_upgrade_accepts_both_spellings_of_the_subprotocol_and_echoes_the_clients(emu, protocol):
    sock, head = _upgraded(emu, protocol)
    with sock:
        chosen = "MQTT" if protocol == "MQTT" else "mqtt"
        assert f"Sec-WebSocket-Protocol: {chosen}\r\n" in head
        assert f"Sec-WebSocket-Accept: {accept_key(KEY)}\r\n" in head
        assert accept_key(KEY) == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC 6455 §1.3's own example
        sock.sendall(encode_frame(OP_BINARY, _connect_packet(), mask=MASK))
        _expect_connack(sock)


def test_the_sas_query_is_accepted_on_the_path(emu):
    sock, _ = _upgraded(emu, path="/$iothub/websocket?iothub-no-client-cert=true")
    with sock:
        sock.sendall(encode_frame(OP_BINARY, _connect_packet(), mask=MASK))
        _expect_connack(sock)


REFUSED = {
    "wrong path": (dict(path="/mqtt"), 404, "/$iothub/websocket"),
    "unknown query": (dict(path="/$iothub/websocket?x=1"), 404, "unexpected query"),
    "wrong subprotocol": (dict(protocol="amqp"), 400, "subprotocol must be 'mqtt'"),
    "no subprotocol": (dict(protocol=None), 400, "offered: none"),
    "old version": (dict(version="8"), 426, "Sec-WebSocket-Version must be 13"),
    "POST": (dict(method="POST"), 405, "is a GET"),
    "no key": (dict(key=None), 400, "Sec-WebSocket-Key"),
    "short key": (dict(key="c2hvcnQ="), 400, "base64 of 16 bytes"),
    "no upgrade": (dict(upgrade=None), 400, "Upgrade must be 'websocket'"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_bad_upgrade_requests_are_refused_with_a_status_and_a_diagnostic(emu, case):
    kwargs, status, words = REFUSED[case]
    before = emu.diagnostic_counts().get("websocket.handshake", 0)
    with _tls(emu) as sock:
        sock.sendall(_request(**kwargs))
        head = _read_head(sock)
        body = sock.recv(4096).decode()
    assert head.startswith(f"HTTP/1.1 {status} "), head
    assert words in body
    if status == 426:
        assert "Sec-WebSocket-Version: 13" in head
    # Recorded before the answer is written, so it is there once the answer arrived.
    assert emu.diagnostic_counts()["websocket.handshake"] == before + 1
    assert words in emu.diagnostics(rule="websocket.handshake")[-1].message


# ------------------------------------------------------------------------------------- framing


def _closed_with(sock):
    """The close code the server sent (it must send a close frame before closing)."""
    while True:
        _, opcode, payload = _read_frame(sock)
        if opcode == OP_CLOSE:
            return struct.unpack("!H", payload[:2])[0], payload[2:].decode()


BAD_FRAMES = {
    "unmasked": (encode_frame(OP_BINARY, b"\x10\x00"), 1002, "not masked"),
    "rsv1 set": (bytes([0x80 | 0x40 | OP_BINARY]) + encode_frame(OP_BINARY, b"x", mask=MASK)[1:], 1002, "RSV"),
    "reserved opcode": (encode_frame(0x3, b"x", mask=MASK), 1002, "reserved opcode 0x3"),
    "text frame": (encode_frame(OP_TEXT, b"hello", mask=MASK), 1003, "binary frames only"),
    "lone continuation": (encode_frame(OP_CONTINUATION, b"x", mask=MASK), 1002, "no fragmented message"),
    "binary inside a fragmented message": (
        encode_frame(OP_BINARY, b"\x10", fin=False, mask=MASK) + encode_frame(OP_BINARY, b"x", mask=MASK),
        1002, "fragmented message is unfinished"),
    "fragmented ping": (encode_frame(OP_PING, b"p", fin=False, mask=MASK), 1002, "control frame is fragmented"),
    "ping over 125 bytes": (bytes([0x80 | OP_PING, 0x80 | 126]) + struct.pack("!H", 126) + MASK + b"\0" * 126,
                            1002, "over 125 bytes"),
    "non-minimal 16-bit length": (bytes([0x80 | OP_BINARY, 0x80 | 126]) + struct.pack("!H", 2) + MASK + b"\0\0",
                                  1002, "minimal encoding"),
    "non-minimal 64-bit length": (bytes([0x80 | OP_BINARY, 0x80 | 127]) + struct.pack("!Q", 200) + MASK,
                                  1002, "minimal encoding"),
    "64-bit length top bit": (bytes([0x80 | OP_BINARY, 0x80 | 127]) + struct.pack("!Q", 1 << 63) + MASK,
                              1002, "top bit"),
    "oversized frame": (bytes([0x80 | OP_BINARY, 0x80 | 127]) + struct.pack("!Q", 1 << 40) + MASK, 1009, "limit"),
    "close with one byte": (encode_frame(OP_CLOSE, b"\x03", mask=MASK), 1002, "1-byte payload"),
    "close code 1005": (encode_frame(OP_CLOSE, struct.pack("!H", 1005), mask=MASK), 1002, "close code 1005"),
    "close reason not UTF-8": (encode_frame(OP_CLOSE, struct.pack("!H", 1000) + b"\xff", mask=MASK), 1007,
                               "not UTF-8"),
}


@pytest.mark.parametrize("case", sorted(BAD_FRAMES))
def test_frames_that_break_rfc_6455_close_the_connection_with_the_rfc_code_and_a_diagnostic(emu, case):
    data, code, words = BAD_FRAMES[case]
    before = emu.diagnostic_counts().get("websocket.framing", 0)
    sock, _ = _upgraded(emu)
    with sock:
        sock.sendall(data)
        got, reason = _closed_with(sock)
        assert sock.recv(1) == b""  # and then the connection ends
    assert got == code
    assert words in reason  # the close frame says why, too
    # Recorded before the close frame is written, so it is there once the close frame arrived.
    assert emu.diagnostic_counts()["websocket.framing"] == before + 1
    assert words in emu.diagnostics(rule="websocket.framing")[-1].message


def test_a_connect_fragmented_over_three_frames_with_a_ping_between_is_accepted(emu):
    packet = _connect_packet()
    a, b, c = packet[:3], packet[3:10], packet[10:]
    before = dict(emu.diagnostic_counts())
    sock, _ = _upgraded(emu)
    with sock:
        sock.sendall(encode_frame(OP_BINARY, a, fin=False, mask=MASK)
                     + encode_frame(OP_PING, b"are you there", mask=MASK)   # control frames may interleave
                     + encode_frame(OP_CONTINUATION, b, fin=False, mask=MASK)
                     + encode_frame(OP_CONTINUATION, c, fin=True, mask=os.urandom(4)))
        fin, opcode, payload = _read_frame(sock)
        assert (opcode, payload) == (OP_PONG, b"are you there")
        _expect_connack(sock)
        # Two MQTT packets in one frame: PINGREQ twice, two PINGRESPs back.
        sock.sendall(encode_frame(OP_BINARY, b"\xc0\x00\xc0\x00", mask=MASK))
        replies = b""
        while len(replies) < 4:
            replies += _read_frame(sock)[2]
        assert replies == b"\xd0\x00\xd0\x00"
        sock.sendall(encode_frame(OP_CLOSE, struct.pack("!H", 1000), mask=MASK))
        code, _ = _closed_with(sock)
        assert code == 1000
    assert emu.diagnostic_counts() == before  # nothing in all this broke a rule
