"""MQTT over WebSockets (RFC 6455) on the emulator's own port, as IoT Hub serves it on 443.

After TLS (the same client-certificate handshake as on the MQTT port) the device sends::

    GET /$iothub/websocket HTTP/1.1
    Host: {hub}
    Upgrade: websocket
    Connection: Upgrade
    Sec-WebSocket-Key: {base64 of 16 random bytes}
    Sec-WebSocket-Version: 13
    Sec-WebSocket-Protocol: mqtt

and gets ``101 Switching Protocols`` with ``Sec-WebSocket-Accept`` and the chosen subprotocol. From then
on the MQTT byte stream travels in binary frames; packet and frame boundaries need not line up
(MQTT 3.1.1 §6), so frames are reassembled into one stream for the MQTT decoder of :mod:`.connection`.

The emulator's choices where the protocol notes (§8) say UNCERTAIN, each stated on the wire or in a
diagnostic rather than hidden:

* Subprotocol: ``mqtt`` is matched case-insensitively, so paho's ``mqtt`` and the C SDK's ``MQTT`` are
  both accepted, and the client's own spelling is echoed back (a client compares what it sent).
* ``?iothub-no-client-cert=true`` (what SDKs add for SAS) is accepted on the path and ignored: the emulator
  authenticates X.509 only, so the TLS handshake always asks for the client certificate.

Strict everywhere else, as the hub is strict about MQTT: a wrong path, method, version, key or subprotocol is
refused with an HTTP status and a ``websocket.handshake`` diagnostic; a frame that breaks RFC 6455
(unmasked, RSV bits, reserved opcodes, fragmented or oversized control frames, a continuation with
nothing to continue, non-minimal lengths, text frames, a malformed close) closes the connection with the
RFC's close code and a ``websocket.framing`` diagnostic.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import struct
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

PATH = "/$iothub/websocket"
SUBPROTOCOL = "mqtt"
#: The query SDKs append for SAS authentication; accepted and ignored (see the module docstring).
SAS_QUERY = "iothub-no-client-cert=true"
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
#: The largest upgrade request head; browsers and SDKs send well under 1 KiB.
MAX_HEAD = 8192

OP_CONTINUATION, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_DATA = (OP_CONTINUATION, OP_TEXT, OP_BINARY)
_CONTROL = (OP_CLOSE, OP_PING, OP_PONG)

CLOSE_NORMAL = 1000
CLOSE_PROTOCOL = 1002
CLOSE_UNSUPPORTED = 1003
CLOSE_INVALID_DATA = 1007
CLOSE_TOO_BIG = 1009


def accept_key(key: str) -> str:
    """``Sec-WebSocket-Accept`` for a ``Sec-WebSocket-Key`` (RFC 6455 §4.2.2)."""
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + _GUID).digest()).decode("ascii")


# ---------------------------------------------------------------------------------------- handshake


@dataclass(frozen=True)
class Upgrade:
    """An accepted upgrade: the ``101`` answer to send and the subprotocol spelling chosen."""

    response: bytes
    subprotocol: str


class HandshakeRefused(Exception):
    """The upgrade request is refused: ``status`` and ``message`` go into the HTTP answer and the diagnostic."""

    def __init__(self, status: int, message: str, extra_headers: Tuple[Tuple[str, str], ...] = ()):
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra_headers = extra_headers

    def response(self) -> bytes:
        reason = {400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 426: "Upgrade Required",
                  431: "Request Header Fields Too Large"}.get(self.status, "Error")
        body = (self.message + "\n").encode("utf-8")
        headers = [f"HTTP/1.1 {self.status} {reason}", "Content-Type: text/plain; charset=utf-8",
                   f"Content-Length: {len(body)}", "Connection: close"]
        headers += [f"{name}: {value}" for name, value in self.extra_headers]
        return ("\r\n".join(headers) + "\r\n\r\n").encode("ascii") + body


def _tokens(value: Optional[str]) -> List[str]:
    return [t.strip() for t in (value or "").split(",") if t.strip()]


def parse_upgrade(head: bytes) -> Upgrade:
    """Check one upgrade request head (up to and including the blank line); raise HandshakeRefused."""
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        raise HandshakeRefused(400, "the upgrade request is not ASCII") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise HandshakeRefused(400, f"malformed request line {lines[0][:100]!r}")
    method, target, version = parts
    if version != "HTTP/1.1":
        raise HandshakeRefused(400, f"a WebSocket upgrade needs HTTP/1.1, got {version[:20]!r} (RFC 6455 §4.1)")
    if method != "GET":
        raise HandshakeRefused(405, f"a WebSocket upgrade is a GET, got {method[:20]!r} (RFC 6455 §4.1)",
                               (("Allow", "GET"),))
    path, _, query = target.partition("?")
    if path != PATH:
        raise HandshakeRefused(404, f"IoT Hub serves MQTT over WebSockets on {PATH}, not {target[:200]!r}")
    if query and query != SAS_QUERY:
        raise HandshakeRefused(404, f"unexpected query {query[:200]!r} on {PATH} (only {SAS_QUERY!r} is known)")
    headers: Dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise HandshakeRefused(400, f"malformed header line {line[:100]!r}")
        key = name.lower()
        # Repeated headers join with commas (RFC 9110 §5.3); that is how token lists are read anyway.
        headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    if "host" not in headers:
        raise HandshakeRefused(400, "the upgrade request has no Host header (RFC 6455 §4.1)")
    if "websocket" not in [t.lower() for t in _tokens(headers.get("upgrade"))]:
        raise HandshakeRefused(400, f"Upgrade must be 'websocket', got {headers.get('upgrade')!r}")
    if "upgrade" not in [t.lower() for t in _tokens(headers.get("connection"))]:
        raise HandshakeRefused(400, f"Connection must include 'Upgrade', got {headers.get('connection')!r}")
    if headers.get("sec-websocket-version") != "13":
        raise HandshakeRefused(426, f"Sec-WebSocket-Version must be 13, got {headers.get('sec-websocket-version')!r}",
                               (("Sec-WebSocket-Version", "13"),))
    key = headers.get("sec-websocket-key", "")
    try:
        valid_key = len(base64.b64decode(key, validate=True)) == 16
    except (binascii.Error, ValueError):
        valid_key = False
    if not valid_key:
        raise HandshakeRefused(400, f"Sec-WebSocket-Key must be base64 of 16 bytes, got {key[:60]!r}")
    offered = _tokens(headers.get("sec-websocket-protocol"))
    chosen = next((t for t in offered if t.lower() == SUBPROTOCOL), None)
    if chosen is None:
        raise HandshakeRefused(400, f"the subprotocol must be {SUBPROTOCOL!r} (Sec-WebSocket-Protocol), "
                                    f"offered: {', '.join(offered) or 'none'}")
    if "sec-websocket-extensions" in headers:
        pass  # none is agreed to: the answer names none, so frames must not use RSV bits (checked below)
    response = ("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Accept: {accept_key(key)}\r\nSec-WebSocket-Protocol: {chosen}\r\n\r\n")
    return Upgrade(response.encode("ascii"), chosen)


# ---------------------------------------------------------------------------------------- frames


class FramingError(Exception):
    """A frame broke RFC 6455: the connection is closed with ``code``."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Frame:
    fin: bool
    opcode: int
    payload: bytes


def encode_frame(opcode: int, payload: bytes, fin: bool = True, mask: Optional[bytes] = None) -> bytes:
    """One frame; servers send unmasked (``mask=None``), clients masked (tests build client frames here)."""
    length = len(payload)
    first = (0x80 if fin else 0) | opcode
    mask_bit = 0x80 if mask is not None else 0
    if length < 126:
        head = struct.pack("!BB", first, mask_bit | length)
    elif length < 65536:
        head = struct.pack("!BBH", first, mask_bit | 126, length)
    else:
        head = struct.pack("!BBQ", first, mask_bit | 127, length)
    if mask is None:
        return head + payload
    return head + mask + _unmask(payload, mask)


def _unmask(data: bytes, mask: bytes) -> bytes:
    if not data:
        return b""
    # XOR with the 4-byte key repeated, on whole integers rather than byte by byte.
    key = (mask * (len(data) // 4 + 1))[:len(data)]
    return (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(len(data), "big")


def _close_code_valid(code: int) -> bool:
    # RFC 6455 §7.4: 1004-1006 and 1015 are never sent; 1016-2999 are reserved; 3000-4999 are for use.
    return (1000 <= code <= 1014 and code not in (1004, 1005, 1006)) or 3000 <= code <= 4999


class FrameDecoder:
    """Client-to-server frames from a byte stream, checked against RFC 6455 (no I/O)."""

    def __init__(self, max_payload: int):
        self.max_payload = max_payload
        self._buffer = bytearray()
        self._in_message = False   # a fragmented binary message is in progress

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next_frame(self) -> Optional[Frame]:
        """The next complete frame (payload unmasked), None if more bytes are needed; FramingError."""
        buf = self._buffer
        if len(buf) < 2:
            return None
        first, second = buf[0], buf[1]
        fin, rsv, opcode = bool(first & 0x80), first & 0x70, first & 0x0F
        masked, length = bool(second & 0x80), second & 0x7F
        if rsv:
            raise FramingError(CLOSE_PROTOCOL, f"RSV bits {rsv >> 4:03b} set, but no extension was negotiated "
                                               "(RFC 6455 §5.2)")
        if opcode not in _DATA and opcode not in _CONTROL:
            raise FramingError(CLOSE_PROTOCOL, f"reserved opcode 0x{opcode:X} (RFC 6455 §5.2)")
        if not masked:
            raise FramingError(CLOSE_PROTOCOL, "a client frame is not masked; clients must mask every frame "
                                               "(RFC 6455 §5.1)")
        if opcode in _CONTROL:
            if not fin:
                raise FramingError(CLOSE_PROTOCOL, "a control frame is fragmented (RFC 6455 §5.5)")
            if length > 125:
                raise FramingError(CLOSE_PROTOCOL, "a control frame's payload is over 125 bytes (RFC 6455 §5.5)")
        offset = 2
        if length == 126:
            if len(buf) < 4:
                return None
            (length,) = struct.unpack_from("!H", buf, 2)
            offset = 4
            if length < 126:
                raise FramingError(CLOSE_PROTOCOL, f"length {length} sent in the 16-bit form; the minimal "
                                                   "encoding is required (RFC 6455 §5.2)")
        elif length == 127:
            if len(buf) < 10:
                return None
            (length,) = struct.unpack_from("!Q", buf, 2)
            offset = 10
            if length >> 63:
                raise FramingError(CLOSE_PROTOCOL, "the 64-bit length has its top bit set (RFC 6455 §5.2)")
            if length < 65536:
                raise FramingError(CLOSE_PROTOCOL, f"length {length} sent in the 64-bit form; the minimal "
                                                   "encoding is required (RFC 6455 §5.2)")
        if length > self.max_payload:
            raise FramingError(CLOSE_TOO_BIG, f"a frame of {length} bytes is over the {self.max_payload}-byte "
                                              "limit (the largest MQTT packet accepted)")
        if opcode == OP_TEXT:
            raise FramingError(CLOSE_UNSUPPORTED, "a text frame: MQTT travels in binary frames only "
                                                  "[MQTT-6.0.0-1]")
        if opcode == OP_CONTINUATION and not self._in_message:
            raise FramingError(CLOSE_PROTOCOL, "a continuation frame with no fragmented message to continue "
                                               "(RFC 6455 §5.4)")
        if opcode == OP_BINARY and self._in_message:
            raise FramingError(CLOSE_PROTOCOL, "a new binary frame while a fragmented message is unfinished "
                                               "(RFC 6455 §5.4)")
        if len(buf) < offset + 4 + length:
            return None
        mask = bytes(buf[offset:offset + 4])
        payload = _unmask(bytes(buf[offset + 4:offset + 4 + length]), mask)
        del buf[:offset + 4 + length]
        if opcode in _DATA:
            self._in_message = not fin
        if opcode == OP_CLOSE:
            self._check_close(payload)
        return Frame(fin, opcode, payload)

    @staticmethod
    def _check_close(payload: bytes) -> None:
        if len(payload) == 1:
            raise FramingError(CLOSE_PROTOCOL, "a close frame with a 1-byte payload (RFC 6455 §5.5.1)")
        if len(payload) >= 2:
            (code,) = struct.unpack_from("!H", payload)
            if not _close_code_valid(code):
                raise FramingError(CLOSE_PROTOCOL, f"close code {code} is not one an endpoint may send "
                                                   "(RFC 6455 §7.4)")
            try:
                payload[2:].decode("utf-8")
            except UnicodeDecodeError:
                raise FramingError(CLOSE_INVALID_DATA, "the close reason is not UTF-8 (RFC 6455 §5.5.1)") from None


# ---------------------------------------------------------------------------------------- channel


class WebSocketChannel:
    """The MQTT byte stream inside a WebSocket, with the interface :class:`.connection.Connection` uses
    on a :class:`.tls_channel.TlsChannel` (``read``, ``write``, ``drain``, ``close``, ``abort``)."""

    def __init__(self, inner, decoder: FrameDecoder, report: Callable[[str, str], None]):
        self._inner = inner
        self._decoder = decoder
        self.report = report           # (rule, message): a diagnostic, with the identity once known
        self.peer = inner.peer
        self._closing = False
        self._close_sent = False
        self._closer: Optional[asyncio.Task] = None

    @property
    def ssl_object(self):
        return self._inner.ssl_object

    @property
    def transport(self):
        return self._inner.transport

    async def read(self) -> bytes:
        """The next MQTT bytes; b"" once the peer closed (a close frame or the end of the stream)."""
        while True:
            try:
                frame = self._decoder.next_frame()
            except FramingError as exc:
                self.report("websocket.framing", f"{exc.message}; closing with {exc.code}")
                self._send_close(exc.code, exc.message)
                self._closing = True
                raise ConnectionAbortedError(exc.message) from None
            if frame is None:
                data = await self._inner.read()
                if not data:
                    return b""
                self._decoder.feed(data)
                continue
            if frame.opcode in (OP_BINARY, OP_CONTINUATION):
                if frame.payload:
                    return frame.payload
            elif frame.opcode == OP_PING:
                self._inner.write(encode_frame(OP_PONG, frame.payload))
            elif frame.opcode == OP_CLOSE:
                code = struct.unpack_from("!H", frame.payload)[0] if frame.payload else CLOSE_NORMAL
                if not self._closing:
                    self._send_close(code if code != 1005 else CLOSE_NORMAL)
                    self._closing = True
                return b""
            # OP_PONG: unsolicited pongs are allowed and ignored (RFC 6455 §5.5.3)

    def write(self, data: bytes) -> None:
        if not self._closing:
            self._inner.write(encode_frame(OP_BINARY, data))

    def write_buffer_size(self) -> int:
        return self._inner.write_buffer_size()

    async def drain(self) -> None:
        await self._inner.drain()

    def _send_close(self, code: int, reason: str = "") -> None:
        if not self._close_sent:
            self._close_sent = True
            # A control frame carries at most 125 bytes: the code and up to 123 bytes of whole UTF-8 characters.
            text = reason.encode("utf-8")[:123].decode("utf-8", "ignore").encode("utf-8")
            self._inner.write(encode_frame(OP_CLOSE, struct.pack("!H", code) + text))

    async def close(self, timeout: float) -> None:
        self._send_close(CLOSE_NORMAL)
        self._closing = True
        await self._inner.close(timeout)

    def abort(self) -> None:
        if self._close_sent and self._closer is None:
            # A close frame is queued (a framing violation): let it reach the client, which then knows
            # why (the code), instead of dropping it with the socket; the TLS close is bounded.
            self._closer = asyncio.get_running_loop().create_task(self._inner.close(1.0))
        elif self._closer is None:
            self._inner.abort()


async def read_head(channel, limit: int = MAX_HEAD) -> Tuple[bytes, bytes]:
    """The upgrade request head (through the blank line) and whatever came after it; HandshakeRefused
    (431) past ``limit``, ConnectionError if the peer left first."""
    data = b""
    while True:
        end = data.find(b"\r\n\r\n")
        if end >= 0:
            return data[:end + 4], data[end + 4:]
        if len(data) > limit:
            raise HandshakeRefused(431, f"the upgrade request head is over {limit} bytes")
        chunk = await channel.read()
        if not chunk:
            raise ConnectionResetError("the peer closed before finishing the upgrade request")
        data += chunk


async def serve(hub, channel) -> None:
    """Run one WebSocket connection whose TLS handshake is done: the upgrade, then MQTT as on the TCP port."""
    from .connection import Connection  # circular: a Connection needs the Hub it serves

    try:
        head, rest = await asyncio.wait_for(read_head(channel), hub.connect_timeout)
        upgrade = parse_upgrade(head)
    except asyncio.TimeoutError:
        hub.diag("websocket.handshake", f"no complete upgrade request within {hub.connect_timeout:g} s of the "
                 "TLS handshake; connection closed", peer=channel.peer)
        channel.abort()
        return
    except HandshakeRefused as exc:
        hub.diag("websocket.handshake", f"{exc.status}: {exc.message}", peer=channel.peer)
        channel.write(exc.response())
        await channel.close(2.0)
        return
    except (ConnectionError, OSError):
        channel.abort()
        return
    channel.write(upgrade.response)
    # MQTT packets are at most max_packet_size; a frame is never bigger than the packet it carries
    # (plus a little slack for clients that put several small packets in one frame).
    decoder = FrameDecoder(hub.max_packet_size + 4096)
    decoder.feed(rest)
    holder: List[Connection] = []
    ws = WebSocketChannel(channel, decoder,
                          lambda rule, message: (holder[0].diag(rule, message) if holder
                                                 else hub.diag(rule, message, peer=channel.peer)))
    connection = Connection(hub, ws)
    holder.append(connection)
    await connection.run()
