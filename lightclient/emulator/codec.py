"""MQTT 3.1.1 packet codec: bytes <-> frozen packet records, with no I/O at all.

The emulator's server reads bytes from a socket and hands them to a :class:`Decoder`, which returns one
packet record at a time; :func:`encode` turns a record back into bytes. Everything here is pure, so the
rules of the wire format can be tested byte for byte without sockets.

Parsing is strict and bounded, because the emulator must behave like a hub that refuses garbage:

- the remaining-length field may have at most four bytes, and a packet larger than ``max_packet_size`` is
  refused as soon as its fixed header arrives, before its body is buffered;
- reserved fixed-header flags must have their specified values, strings must be well-formed UTF-8
  without U+0000, and a packet's body must be consumed exactly (no trailing bytes);
- a PUBLISH topic may not contain wildcards; SUBSCRIBE filters must use ``+`` and ``#`` correctly.

Any violation raises :class:`MalformedPacket` naming the rule (the MQTT 3.1.1 normative statement where
there is one); the caller closes that one connection.

Wire examples (hex)::

    PINGREQ                     c0 00
    CONNACK accepted            20 02 00 00
    PUBLISH qos0 "a/b" b"hi"    30 07 00 03 61 2f 62 68 69
    PUBACK id 1                 40 02 00 01
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

# Packet type numbers (MQTT 3.1.1 section 2.2.1).
CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 10, 11, 12, 13, 14

PACKET_NAMES = {
    CONNECT: "CONNECT", CONNACK: "CONNACK", PUBLISH: "PUBLISH", PUBACK: "PUBACK", PUBREC: "PUBREC",
    PUBREL: "PUBREL", PUBCOMP: "PUBCOMP", SUBSCRIBE: "SUBSCRIBE", SUBACK: "SUBACK",
    UNSUBSCRIBE: "UNSUBSCRIBE", UNSUBACK: "UNSUBACK", PINGREQ: "PINGREQ", PINGRESP: "PINGRESP",
    DISCONNECT: "DISCONNECT",
}

# CONNACK return codes (section 3.2.2.3).
CONNACK_ACCEPTED = 0
CONNACK_BAD_PROTOCOL_VERSION = 1
CONNACK_IDENTIFIER_REJECTED = 2
CONNACK_SERVER_UNAVAILABLE = 3
CONNACK_BAD_CREDENTIALS = 4
CONNACK_NOT_AUTHORIZED = 5

SUBACK_FAILURE = 0x80

#: Largest value the four-byte remaining-length field can carry (section 2.2.3).
MAX_REMAINING_LENGTH = 268_435_455

#: Default bound: IoT Hub's 256 KB telemetry limit plus room for the longest possible topic and headers.
#: Anything larger cannot be a message the hub would accept, so it is refused before being buffered.
DEFAULT_MAX_PACKET_SIZE = 262_144 + 65_535 + 16


class MalformedPacket(ValueError):
    """The bytes break MQTT 3.1.1; the connection that sent them must be closed."""


class PacketTooLarge(MalformedPacket):
    """A packet's declared size exceeds the decoder's bound; its body was never buffered."""


# --------------------------------------------------------------------------- packet records


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes = b""
    qos: int = 0
    retain: bool = False


@dataclass(frozen=True)
class Connect:
    client_id: str
    clean_session: bool = True
    keep_alive: int = 60
    username: Optional[str] = None
    password: Optional[bytes] = None
    will: Optional[Will] = None
    protocol_name: str = "MQTT"
    protocol_level: int = 4


@dataclass(frozen=True)
class Connack:
    session_present: bool = False
    return_code: int = CONNACK_ACCEPTED


@dataclass(frozen=True)
class Publish:
    topic: str
    payload: bytes = b""
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: Optional[int] = None


@dataclass(frozen=True)
class Puback:
    packet_id: int


@dataclass(frozen=True)
class Pubrec:
    packet_id: int


@dataclass(frozen=True)
class Pubrel:
    packet_id: int


@dataclass(frozen=True)
class Pubcomp:
    packet_id: int


@dataclass(frozen=True)
class Subscribe:
    packet_id: int
    requests: Tuple[Tuple[str, int], ...]


@dataclass(frozen=True)
class Suback:
    packet_id: int
    return_codes: Tuple[int, ...]


@dataclass(frozen=True)
class Unsubscribe:
    packet_id: int
    filters: Tuple[str, ...]


@dataclass(frozen=True)
class Unsuback:
    packet_id: int


@dataclass(frozen=True)
class Pingreq:
    pass


@dataclass(frozen=True)
class Pingresp:
    pass


@dataclass(frozen=True)
class Disconnect:
    pass


Packet = Union[Connect, Connack, Publish, Puback, Pubrec, Pubrel, Pubcomp, Subscribe, Suback,
               Unsubscribe, Unsuback, Pingreq, Pingresp, Disconnect]

_ACK_TYPES = {PUBACK: Puback, PUBREC: Pubrec, PUBREL: Pubrel, PUBCOMP: Pubcomp, UNSUBACK: Unsuback}
_TYPE_OF_ACK = {cls: number for number, cls in _ACK_TYPES.items()}


# --------------------------------------------------------------------------- decoding


class _Reader:
    """Cursor over one packet body; every read checks bounds so a short body is a clear error."""

    def __init__(self, data: bytes, name: str):
        self.data = data
        self.pos = 0
        self.name = name

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        if self.remaining() < n:
            raise MalformedPacket(f"{self.name}: body ends early (needed {n} more bytes, "
                                  f"{self.remaining()} left)")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def byte(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return struct.unpack("!H", self.take(2))[0]

    def binary(self) -> bytes:
        return self.take(self.u16())

    def string(self, what: str) -> str:
        raw = self.binary()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedPacket(f"{self.name}: {what} is not well-formed UTF-8 "
                                  f"[MQTT-1.5.3-1]: {raw[:40]!r}") from exc
        if "\x00" in text:
            raise MalformedPacket(f"{self.name}: {what} contains U+0000 [MQTT-1.5.3-2]")
        return text

    def packet_id(self) -> int:
        value = self.u16()
        if value == 0:
            raise MalformedPacket(f"{self.name}: packet identifier 0 is not allowed [MQTT-2.3.1-1]")
        return value

    def finish(self) -> None:
        if self.remaining():
            raise MalformedPacket(f"{self.name}: {self.remaining()} unexpected bytes after the packet's "
                                  f"fields")


def _decode_remaining_length(buf, start: int) -> Optional[Tuple[int, int]]:
    """Return (value, bytes used) of the variable-length field at ``start``, or None if incomplete."""
    value = 0
    multiplier = 1
    for i in range(4):
        if start + i >= len(buf):
            return None
        byte = buf[start + i]
        value += (byte & 0x7F) * multiplier
        if not byte & 0x80:
            return value, i + 1
        multiplier *= 128
    raise MalformedPacket("remaining length uses more than four bytes [MQTT 2.2.3]")


def _check_topic_name(topic: str, name: str) -> None:
    if not topic:
        raise MalformedPacket(f"{name}: empty topic name [MQTT-4.7.3-1]")
    if "+" in topic or "#" in topic:
        raise MalformedPacket(f"{name}: topic name {topic!r} contains a wildcard [MQTT-3.3.2-2]")


def check_topic_filter(topic_filter: str, name: str = "SUBSCRIBE") -> None:
    """Raise MalformedPacket unless ``topic_filter`` is a syntactically valid MQTT filter."""
    if not topic_filter:
        raise MalformedPacket(f"{name}: empty topic filter [MQTT-4.7.3-1]")
    levels = topic_filter.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            raise MalformedPacket(f"{name}: '#' must be a whole last level, got {topic_filter!r} "
                                  f"[MQTT-4.7.1-2]")
        if "+" in level and level != "+":
            raise MalformedPacket(f"{name}: '+' must be a whole level, got {topic_filter!r} "
                                  f"[MQTT-4.7.1-3]")


def _expect_flags(kind: int, flags: int, wanted: int) -> None:
    if flags != wanted:
        raise MalformedPacket(f"{PACKET_NAMES[kind]}: reserved fixed-header flags are {flags:#06b}, "
                              f"must be {wanted:#06b} [MQTT-2.2.2-1]")


def _decode_connect(r: _Reader) -> Connect:
    protocol_name = r.string("protocol name")
    if protocol_name not in ("MQTT", "MQIsdp"):
        raise MalformedPacket(f"CONNECT: protocol name {protocol_name!r} is not 'MQTT' [MQTT-3.1.2-1]")
    level = r.byte()
    flags = r.byte()
    if flags & 0x01:
        raise MalformedPacket("CONNECT: reserved flag bit 0 is set [MQTT-3.1.2-3]")
    clean = bool(flags & 0x02)
    will_flag = bool(flags & 0x04)
    will_qos = (flags >> 3) & 0x03
    will_retain = bool(flags & 0x20)
    has_password = bool(flags & 0x40)
    has_username = bool(flags & 0x80)
    if will_qos == 3:
        raise MalformedPacket("CONNECT: will QoS is 3 [MQTT-3.1.2-14]")
    if not will_flag and (will_qos or will_retain):
        raise MalformedPacket("CONNECT: will QoS/retain set without the will flag "
                              "[MQTT-3.1.2-13, MQTT-3.1.2-15]")
    if has_password and not has_username:
        raise MalformedPacket("CONNECT: password flag set without the username flag [MQTT-3.1.2-22]")
    keep_alive = r.u16()
    client_id = r.string("client identifier")
    will = None
    if will_flag:
        will_topic = r.string("will topic")
        _check_topic_name(will_topic, "CONNECT will")
        will = Will(will_topic, r.binary(), will_qos, will_retain)
    username = r.string("user name") if has_username else None
    password = r.binary() if has_password else None
    r.finish()
    return Connect(client_id, clean, keep_alive, username, password, will, protocol_name, level)


def _decode_publish(flags: int, r: _Reader) -> Publish:
    dup = bool(flags & 0x08)
    qos = (flags >> 1) & 0x03
    retain = bool(flags & 0x01)
    if qos == 3:
        raise MalformedPacket("PUBLISH: QoS bits are 3 [MQTT-3.3.1-4]")
    if qos == 0 and dup:
        raise MalformedPacket("PUBLISH: DUP set on a QoS 0 message [MQTT-3.3.1-2]")
    topic = r.string("topic name")
    _check_topic_name(topic, "PUBLISH")
    packet_id = r.packet_id() if qos else None
    payload = r.take(r.remaining())
    return Publish(topic, payload, qos, retain, dup, packet_id)


def _decode_subscribe(r: _Reader) -> Subscribe:
    packet_id = r.packet_id()
    requests: List[Tuple[str, int]] = []
    while r.remaining():
        topic_filter = r.string("topic filter")
        check_topic_filter(topic_filter)
        options = r.byte()
        if options & 0xFC or (options & 0x03) == 3:
            raise MalformedPacket(f"SUBSCRIBE: requested QoS byte {options:#04x} is invalid "
                                  f"[MQTT-3.8.3-4]")
        requests.append((topic_filter, options))
    if not requests:
        raise MalformedPacket("SUBSCRIBE: no topic filters [MQTT-3.8.3-3]")
    return Subscribe(packet_id, tuple(requests))


def _decode_unsubscribe(r: _Reader) -> Unsubscribe:
    packet_id = r.packet_id()
    filters: List[str] = []
    while r.remaining():
        topic_filter = r.string("topic filter")
        check_topic_filter(topic_filter, "UNSUBSCRIBE")
        filters.append(topic_filter)
    if not filters:
        raise MalformedPacket("UNSUBSCRIBE: no topic filters [MQTT-3.10.3-2]")
    return Unsubscribe(packet_id, tuple(filters))


def _decode_suback(r: _Reader) -> Suback:
    packet_id = r.packet_id()
    codes = tuple(r.take(r.remaining()))
    if not codes or any(code not in (0, 1, 2, SUBACK_FAILURE) for code in codes):
        raise MalformedPacket(f"SUBACK: invalid return codes {codes!r} [MQTT-3.9.3-2]")
    return Suback(packet_id, codes)


def decode_packet(first_byte: int, body: bytes) -> Packet:
    """Decode one packet given its first fixed-header byte and its body (the remaining-length bytes)."""
    kind, flags = first_byte >> 4, first_byte & 0x0F
    if kind not in PACKET_NAMES:
        raise MalformedPacket(f"packet type {kind} is reserved [MQTT 2.2.1]")
    r = _Reader(body, PACKET_NAMES[kind])
    if kind == PUBLISH:
        return _decode_publish(flags, r)
    # PUBREL, SUBSCRIBE and UNSUBSCRIBE carry 0b0010; every other packet 0b0000 (section 2.2.2).
    _expect_flags(kind, flags, 0b0010 if kind in (PUBREL, SUBSCRIBE, UNSUBSCRIBE) else 0)
    if kind == CONNECT:
        return _decode_connect(r)
    if kind == CONNACK:
        ack_flags, code = r.byte(), r.byte()
        if ack_flags & 0xFE:
            raise MalformedPacket("CONNACK: reserved acknowledge flags are set [MQTT-3.2.2-1]")
        r.finish()
        return Connack(bool(ack_flags & 1), code)
    if kind in _ACK_TYPES:
        packet = _ACK_TYPES[kind](r.packet_id())
        r.finish()
        return packet
    if kind == SUBSCRIBE:
        return _decode_subscribe(r)
    if kind == SUBACK:
        return _decode_suback(r)
    if kind == UNSUBSCRIBE:
        return _decode_unsubscribe(r)
    r.finish()
    return {PINGREQ: Pingreq, PINGRESP: Pingresp, DISCONNECT: Disconnect}[kind]()


class Decoder:
    """Incremental decoder: ``feed()`` bytes as they arrive, then call ``next_packet()`` until it
    returns None.  After a MalformedPacket the stream is unusable; the connection must be closed."""

    def __init__(self, max_packet_size: int = DEFAULT_MAX_PACKET_SIZE):
        self.max_packet_size = max_packet_size
        self._buf = bytearray()
        self._failed = False

    def feed(self, data: bytes) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def next_packet(self) -> Optional[Packet]:
        if self._failed:
            raise MalformedPacket("decoder already failed on an earlier packet")
        try:
            return self._next()
        except MalformedPacket:
            self._failed = True
            self._buf.clear()
            raise

    def _next(self) -> Optional[Packet]:
        if not self._buf:
            return None
        # The type nibble is checked at once so a stream of garbage is refused on its first byte.
        if self._buf[0] >> 4 not in PACKET_NAMES:
            raise MalformedPacket(f"packet type {self._buf[0] >> 4} is reserved [MQTT 2.2.1]")
        length = _decode_remaining_length(self._buf, 1)
        if length is None:
            return None
        remaining, used = length
        total = 1 + used + remaining
        if total > self.max_packet_size:
            raise PacketTooLarge(f"{PACKET_NAMES[self._buf[0] >> 4]} of {total} bytes exceeds the "
                                 f"limit of {self.max_packet_size} bytes")
        if len(self._buf) < total:
            return None
        first = self._buf[0]
        body = bytes(self._buf[1 + used:total])
        del self._buf[:total]
        return decode_packet(first, body)


# --------------------------------------------------------------------------- encoding


def encode_remaining_length(value: int) -> bytes:
    if not 0 <= value <= MAX_REMAINING_LENGTH:
        raise ValueError(f"remaining length {value} is outside 0..{MAX_REMAINING_LENGTH}")
    out = bytearray()
    while True:
        byte, value = value % 128, value // 128
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _string(text: str) -> bytes:
    return _binary(text.encode("utf-8"))


def _binary(data: bytes) -> bytes:
    if len(data) > 0xFFFF:
        raise ValueError(f"field of {len(data)} bytes exceeds 65535")
    return struct.pack("!H", len(data)) + data


def _frame(first: int, body: bytes) -> bytes:
    return bytes([first]) + encode_remaining_length(len(body)) + body


def encode(packet: Packet) -> bytes:
    """Encode a packet record to its exact wire bytes."""
    if isinstance(packet, Publish):
        body = _string(packet.topic)
        if packet.qos:
            body += struct.pack("!H", packet.packet_id or 0)
        flags = (0x08 if packet.dup else 0) | (packet.qos << 1) | (0x01 if packet.retain else 0)
        return _frame((PUBLISH << 4) | flags, body + packet.payload)
    if isinstance(packet, Connect):
        flags = (0x02 if packet.clean_session else 0)
        payload = _string(packet.client_id)
        if packet.will is not None:
            flags |= 0x04 | (packet.will.qos << 3) | (0x20 if packet.will.retain else 0)
            payload += _string(packet.will.topic) + _binary(packet.will.payload)
        if packet.username is not None:
            flags |= 0x80
            payload += _string(packet.username)
        if packet.password is not None:
            flags |= 0x40
            payload += _binary(packet.password)
        header = _string(packet.protocol_name) + bytes([packet.protocol_level, flags])
        return _frame(CONNECT << 4, header + struct.pack("!H", packet.keep_alive) + payload)
    if isinstance(packet, Connack):
        return _frame(CONNACK << 4, bytes([1 if packet.session_present else 0, packet.return_code]))
    if type(packet) in _TYPE_OF_ACK:
        kind = _TYPE_OF_ACK[type(packet)]
        return _frame((kind << 4) | (0b0010 if kind == PUBREL else 0), struct.pack("!H", packet.packet_id))
    if isinstance(packet, Subscribe):
        body = struct.pack("!H", packet.packet_id)
        body += b"".join(_string(f) + bytes([qos]) for f, qos in packet.requests)
        return _frame((SUBSCRIBE << 4) | 0b0010, body)
    if isinstance(packet, Suback):
        return _frame(SUBACK << 4, struct.pack("!H", packet.packet_id) + bytes(packet.return_codes))
    if isinstance(packet, Unsubscribe):
        body = struct.pack("!H", packet.packet_id) + b"".join(_string(f) for f in packet.filters)
        return _frame((UNSUBSCRIBE << 4) | 0b0010, body)
    if isinstance(packet, Pingreq):
        return b"\xc0\x00"
    if isinstance(packet, Pingresp):
        return b"\xd0\x00"
    if isinstance(packet, Disconnect):
        return b"\xe0\x00"
    raise TypeError(f"not an MQTT packet record: {packet!r}")


def describe(packet: Packet) -> str:
    """A short human-readable summary for diagnostics (payloads are summarised, never dumped)."""
    if isinstance(packet, Publish):
        return (f"PUBLISH qos={packet.qos} retain={int(packet.retain)} topic={packet.topic!r} "
                f"({len(packet.payload)} bytes)")
    return repr(packet)


