"""Pure parts of connect-from-anywhere: proxy URLs and their redaction, the proxy environment rules the
CLI applies, transport checks, what counts as "blocked" for auto, the transport memory file, and the
emulator's WebSocket upgrade and frame checks (no sockets)."""
import errno
import os
import socket
import ssl
import stat
import struct

import pytest

from lightclient import _transport
from lightclient.emulator.websocket import (CLOSE_PROTOCOL, CLOSE_TOO_BIG, OP_BINARY, OP_CLOSE, OP_CONTINUATION,
                                            OP_PING, FrameDecoder, FramingError, HandshakeRefused, encode_frame,
                                            parse_upgrade)
from lightclient.exceptions import ConfigError, ProxyError
from lightclient.proxy import Proxy, bypassed, from_environment

SECRET = "s3cr3t-Pa55"


@pytest.mark.parametrize("url, expected", [
    ("http://proxy.corp:3128", ("http", "proxy.corp", 3128, None, None)),
    ("http://proxy.corp", ("http", "proxy.corp", 3128, None, None)),
    ("HTTP://u:p@Proxy.Corp:8080/", ("http", "proxy.corp", 8080, "u", "p")),
    ("socks5://10.0.0.1:1080", ("socks5", "10.0.0.1", 1080, None, None)),
    ("socks://h", ("socks5", "h", 1080, None, None)),
    ("socks5h://us%40er:p%3Ass@h:9", ("socks5h", "h", 9, "us@er", "p:ss")),
    ("http://[::1]:3128", ("http", "::1", 3128, None, None)),
])
def test_proxy_urls(url, expected):
    p = Proxy.parse(url)
    assert (p.scheme, p.host, p.port, p.username, p.password) == expected


@pytest.mark.parametrize("url, words", [
    ("ftp://h:1", "scheme must be"),
    (f"https://u:{SECRET}@h:1", "not supported"),
    ("http://", "no host name"),
    ("http://h:70000", "port is not a number"),
    (f"http://u:{SECRET}@h:1/path", "no path or query"),
    ("", "must be a URL"),
    (f"socks5://{'u' * 300}:{SECRET}@h", "at most 255 bytes"),
])
def test_bad_proxy_urls_are_config_errors_that_never_show_the_password(url, words):
    with pytest.raises(ConfigError) as info:
        Proxy.parse(url)
    assert words in str(info.value) and SECRET not in str(info.value)


def test_a_proxy_never_shows_its_credentials_except_in_url():
    p = Proxy.parse(f"http://alice:{SECRET}@proxy:3128")
    for text in (repr(p), str(p), p.address, f"{p!r} {p!s}"):
        assert SECRET not in text and "alice" not in text
    assert str(p) == "http://proxy:3128 (with credentials)"
    assert Proxy.parse(p.url()) == p and SECRET in p.url()


@pytest.mark.parametrize("host, no_proxy, expected", [
    ("hub.azure-devices.net", "", False),
    ("hub.azure-devices.net", "*", True),
    ("hub.azure-devices.net", "azure-devices.net", True),
    ("hub.azure-devices.net", ".azure-devices.net", True),
    ("hub.azure-devices.net", "*.azure-devices.net", True),
    ("hub.azure-devices.net", "devices.net.evil", False),
    ("notazure-devices.net", "azure-devices.net", False),
    ("127.0.0.1", "localhost, 127.0.0.1", True),
    ("localhost", "localhost:8883", True),
])
def test_no_proxy_matching(host, no_proxy, expected):
    assert bypassed(host, no_proxy) is expected


def test_proxy_from_the_environment_mapping():
    env = {"HTTPS_PROXY": "proxy:3128", "NO_PROXY": "internal.example"}
    assert from_environment(env, "hub.example") == Proxy("http", "proxy", 3128)
    assert from_environment(env, "x.internal.example") is None
    assert from_environment({"all_proxy": "socks5://s:1"}, "hub") == Proxy("socks5", "s", 1)
    assert from_environment({}, "hub") is None


def test_transport_and_proxy_arguments_are_checked():
    assert _transport.check_transport("auto") == "auto"
    with pytest.raises(ConfigError, match="transport must be one of"):
        _transport.check_transport("ws")
    with pytest.raises(ConfigError, match="URL string"):
        _transport.check_proxy(3128)
    assert _transport.check_proxy(None) is None


@pytest.mark.parametrize("exc, expected", [
    (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), True),
    (ConnectionResetError(errno.ECONNRESET, "reset"), True),
    (socket.timeout("timed out"), True),
    (OSError(errno.ENETUNREACH, "unreachable"), True),
    (OSError(errno.ENOENT, "no such file"), False),
    (ssl.SSLError(1, "handshake failure"), False),
    (ProxyError("x", proxy="p", reason="forbidden", status=403), True),
    (ProxyError("x", proxy="p", reason="target", status=502), True),
    (ProxyError("x", proxy="p", reason="auth", status=407), False),
    (ProxyError("x", proxy="p", reason="unreachable"), False),
])
def test_what_auto_takes_for_a_blocked_port(exc, expected):
    assert _transport.blocked(exc) is expected


def test_proxy_errors_are_connection_errors_and_say_if_retrying_may_help():
    exc = ProxyError("m", proxy="http://p:1", reason="unreachable")
    assert isinstance(exc, ConnectionError) and exc.retryable
    assert not ProxyError("m", proxy="p", reason="auth", status=407).retryable


def test_the_transport_memory_file(tmp_path):
    path = tmp_path / "t.json"
    memory = _transport.TransportMemory(path)
    assert memory.recall("hub") is None
    memory.remember("hub", "websockets")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert _transport.TransportMemory(path).recall("hub") == "websockets"
    assert _transport.TransportMemory(path).recall("other-hub") is None
    path.write_text("not json")
    assert _transport.TransportMemory(path).recall("hub") is None   # a hint, never an error
    in_memory = _transport.TransportMemory()
    in_memory.remember("hub", "tcp")
    assert in_memory.recall("hub") == "tcp"


# ------------------------------------------------------------------------------ emulator WebSocket (pure)

KEY = "dGhlIHNhbXBsZSBub25jZQ=="
MASK = b"\x01\x02\x03\x04"


def _head(*lines):
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


GOOD = ["GET /$iothub/websocket HTTP/1.1", "Host: h", "Upgrade: WebSocket", "Connection: keep-alive, Upgrade",
        f"Sec-WebSocket-Key: {KEY}", "Sec-WebSocket-Version: 13", "Sec-WebSocket-Protocol: MQTT"]


def test_a_valid_upgrade_is_answered_101_with_the_clients_spelling():
    upgrade = parse_upgrade(_head(*GOOD))
    assert upgrade.subprotocol == "MQTT"
    assert upgrade.response.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in upgrade.response


@pytest.mark.parametrize("index, line, status", [
    (0, "GET /$iothub/websocket HTTP/1.0", 400),
    (0, "GET /mqtt HTTP/1.1", 404),
    (1, "X-Nothing: 1", 400),                       # no Host
    (5, "Sec-WebSocket-Version: 12", 426),
    (6, "Sec-WebSocket-Protocol: wamp", 400),
    (4, "Sec-WebSocket-Key: !!!", 400),
])
def test_bad_upgrades(index, line, status):
    lines = list(GOOD)
    lines[index] = line
    with pytest.raises(HandshakeRefused) as info:
        parse_upgrade(_head(*lines))
    assert info.value.status == status
    assert info.value.response().startswith(f"HTTP/1.1 {status} ".encode())


def test_frames_are_reassembled_and_control_frames_pass_between_fragments():
    decoder = FrameDecoder(1000)
    wire = (encode_frame(OP_BINARY, b"ab", fin=False, mask=MASK) + encode_frame(OP_PING, b"p", mask=MASK)
            + encode_frame(OP_CONTINUATION, b"c" * 300, mask=MASK))
    for i in range(len(wire)):           # byte by byte: nothing is taken before a frame is complete
        decoder.feed(wire[i:i + 1])
    frames = []
    while True:
        frame = decoder.next_frame()
        if frame is None:
            break
        frames.append((frame.fin, frame.opcode, frame.payload))
    assert frames == [(False, OP_BINARY, b"ab"), (True, OP_PING, b"p"), (True, OP_CONTINUATION, b"c" * 300)]


@pytest.mark.parametrize("wire, code", [
    (encode_frame(OP_BINARY, b"x"), CLOSE_PROTOCOL),                                      # unmasked
    (encode_frame(OP_CONTINUATION, b"x", mask=MASK), CLOSE_PROTOCOL),
    (bytes([0x82, 0xFE]) + struct.pack("!H", 5) + MASK + b"12345", CLOSE_PROTOCOL),     # non-minimal
    (bytes([0x82, 0xFE]) + struct.pack("!H", 2000), CLOSE_TOO_BIG),                     # before the payload
    (encode_frame(OP_CLOSE, struct.pack("!H", 999), mask=MASK), CLOSE_PROTOCOL),
])
def test_bad_frames(wire, code):
    decoder = FrameDecoder(1000)
    decoder.feed(wire)
    with pytest.raises(FramingError) as info:
        decoder.next_frame()
    assert info.value.code == code
