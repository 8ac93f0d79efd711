"""Byte-exact tests of the emulator's MQTT 3.1.1 codec (pure: no sockets)."""
import pytest
from hypothesis import given, strategies as st

from lightclient.emulator import codec
from lightclient.emulator.codec import (Connack, Connect, Decoder, Disconnect, MalformedPacket,
                                        PacketTooLarge, Pingreq, Pingresp, Puback, Publish, Suback,
                                        Subscribe, Unsuback, Unsubscribe, Will, decode_packet, encode)

# (packet, exact wire bytes) — both directions must agree.
VECTORS = [
    (Pingreq(), "c000"),
    (Pingresp(), "d000"),
    (Disconnect(), "e000"),
    (Connack(False, 0), "20020000"),
    (Connack(True, 0), "20020100"),
    (Connack(False, 5), "20020005"),
    (Publish("a/b", b"hi"), "3007" "0003612f62" "6869"),
    (Publish("a/b", b"hi", qos=1, packet_id=10), "3209" "0003612f62" "000a" "6869"),
    (Publish("a/b", b"", qos=1, retain=True, dup=True, packet_id=1), "3b07" "0003612f62" "0001"),
    (Puback(1), "40020001"),
    (Subscribe(2, (("a/#", 1),)), "8208" "0002" "0003612f23" "01"),
    (Suback(2, (1, 0x80)), "9004" "0002" "0180"),
    (Unsubscribe(3, ("a/#",)), "a207" "0003" "0003612f23"),
    (Unsuback(3), "b0020003"),
    (Connect("d1", clean_session=True, keep_alive=60, username="h/d1/?api-version=1"),
     "1023" "00044d515454" "04" "82" "003c" "00026431" "0013" + b"h/d1/?api-version=1".hex()),
]


@pytest.mark.parametrize("packet,wire", VECTORS, ids=[type(p).__name__ for p, _ in VECTORS])
def test_vector_encodes_and_decodes(packet, wire):
    data = bytes.fromhex(wire)
    assert encode(packet) == data
    decoder = Decoder()
    decoder.feed(data)
    assert decoder.next_packet() == packet
    assert decoder.next_packet() is None


def test_decoder_reassembles_packets_split_at_every_byte():
    stream = b"".join(bytes.fromhex(w) for _, w in VECTORS)
    decoder = Decoder()
    packets = []
    for i in range(len(stream)):
        decoder.feed(stream[i:i + 1])
        while (packet := decoder.next_packet()) is not None:
            packets.append(packet)
    assert packets == [p for p, _ in VECTORS]


def test_connect_with_will_and_password_round_trips():
    packet = Connect("c", False, 10, "u", b"p", Will("t/x", b"bye", 1, True))
    decoder = Decoder()
    decoder.feed(encode(packet))
    assert decoder.next_packet() == packet


def test_remaining_length_boundaries():
    assert codec.encode_remaining_length(127) == b"\x7f"
    assert codec.encode_remaining_length(128) == b"\x80\x01"
    assert codec.encode_remaining_length(16383) == b"\xff\x7f"
    assert codec.encode_remaining_length(268_435_455) == b"\xff\xff\xff\x7f"
    with pytest.raises(ValueError):
        codec.encode_remaining_length(268_435_456)


MALFORMED = {
    "five-byte remaining length": "30ffffffff7f",
    "reserved packet type 0": "0000",
    "reserved packet type 15": "f000",
    "PUBLISH qos 3": "36050003612f62",
    "PUBLISH qos0 with DUP": "38050003612f62",
    "PUBLISH wildcard topic": "30050003612f23",
    "PUBLISH plus in topic": "3005000361 2b62".replace(" ", ""),
    "PUBLISH empty topic": "30020000",
    "PUBLISH qos1 packet id 0": "32070003612f620000",
    "PUBLISH topic not UTF-8": "30040002c328",
    "PUBLISH topic with U+0000": "30040002 6100".replace(" ", ""),
    "PUBLISH body shorter than topic length": "30030005 61".replace(" ", ""),
    "PINGREQ with body": "c00100",
    "PINGREQ flags set": "c100",
    "SUBSCRIBE flags 0": "8008" "0002" "0003612f23" "01",
    "SUBSCRIBE no filters": "82020002",
    "SUBSCRIBE qos 3": "8208" "0002" "0003612f23" "03",
    "SUBSCRIBE reserved qos bits": "8208" "0002" "0003612f23" "41",
    "SUBSCRIBE # not last": "8208" "0002" "0003232f61" "01",
    "SUBSCRIBE partial +": "8208" "0002" "0003612b62" "01",
    "UNSUBSCRIBE no filters": "a2020002",
    "PUBACK too long": "4003000100",
    "CONNECT protocol name": "100c" "0004585858" "58" "04" "02" "003c" "0000",
    "CONNECT reserved flag": "100c" "00044d515454" "04" "03" "003c" "0000",
    "CONNECT password without username": "100e" "00044d515454" "04" "42" "003c" "0000" "0000",
    "CONNECT will qos without will flag": "100c" "00044d515454" "04" "0a" "003c" "0000",
    "CONNECT trailing bytes": "100d" "00044d515454" "04" "02" "003c" "0000" "ff",
}


@pytest.mark.parametrize("wire", MALFORMED.values(), ids=list(MALFORMED))
def test_malformed_packet_is_refused(wire):
    decoder = Decoder()
    decoder.feed(bytes.fromhex(wire))
    with pytest.raises(MalformedPacket):
        decoder.next_packet()
    # A failed stream stays failed: nothing after a malformed packet can be trusted.
    with pytest.raises(MalformedPacket):
        decoder.next_packet()


def test_oversized_packet_is_refused_from_its_header_alone():
    decoder = Decoder(max_packet_size=1000)
    decoder.feed(b"\x30" + codec.encode_remaining_length(10_000_000))  # no body sent at all
    with pytest.raises(PacketTooLarge, match="exceeds the limit of 1000"):
        decoder.next_packet()


def test_incomplete_header_waits_for_more_bytes():
    decoder = Decoder()
    decoder.feed(b"\x30\x80")
    assert decoder.next_packet() is None
    decoder.feed(b"\x01" + b"\x00\x03a/b" + b"x" * 123)
    assert decoder.next_packet() == Publish("a/b", b"x" * 123)


def test_connect_keeps_unsupported_protocol_level_for_the_server_to_refuse():
    packet = decode_packet(0x10, bytes.fromhex("00044d515454" "05" "02" "003c" "0000"))
    assert packet.protocol_level == 5


def test_topic_filter_rules():
    for good in ("#", "a/#", "+", "a/+/b", "$iothub/twin/res/#"):
        codec.check_topic_filter(good)
    for bad in ("", "a#", "a/#/b", "a+", "a/b+/c"):
        with pytest.raises(MalformedPacket):
            codec.check_topic_filter(bad)


@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise_anything_but_malformed(data):
    decoder = Decoder(max_packet_size=200)
    decoder.feed(data)
    try:
        while decoder.next_packet() is not None:
            pass
    except MalformedPacket:
        pass


@given(st.text(st.characters(blacklist_characters="\x00+#", blacklist_categories=("Cs",)), min_size=1,
               max_size=40), st.binary(max_size=100), st.integers(0, 1), st.booleans(),
       st.integers(1, 65535))
def test_publish_round_trips(topic, payload, qos, retain, packet_id):
    packet = Publish(topic, payload, qos, retain, False, packet_id if qos else None)
    decoder = Decoder()
    decoder.feed(encode(packet))
    assert decoder.next_packet() == packet
