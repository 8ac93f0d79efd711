"""The pure IoT Hub MQTT topic layer, driven by the vectors in tests/vectors/ plus property-based tests."""
import datetime as dt
import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightclient import topics
from lightclient.exceptions import ConfigError, MessageTooLargeError, ProtocolError
from lightclient.identity import Identity

VECTOR_DIR = Path(__file__).parent.parent / "vectors"


def _load(name):
    return json.loads((VECTOR_DIR / name).read_text(encoding="utf-8"))


TELEMETRY = _load("telemetry.json")
BAGS = _load("property_bag.json")
REQUESTS = _load("requests.json")
PARSE = _load("parse.json")

ERRORS = {"ConfigError": ConfigError, "MessageTooLargeError": MessageTooLargeError, "ProtocolError": ProtocolError}
DEVICE = Identity("myiothub.azure-devices.net", "my_device")
MODULE = Identity("myiothub.azure-devices.net", "my_device", "my_module_id")


def _ids(case):
    return case["name"]


def _pairs(pairs):
    return None if pairs is None else [tuple(p) for p in pairs]


# ---------------------------------------------------------------------------------------------- filters


def test_subscribe_filters_are_the_documented_strings():
    # EMB and PY test strings; the hub accepts only these exact filters.
    assert topics.TWIN_RESPONSE_FILTER == "$iothub/twin/res/#"
    assert topics.DESIRED_PATCH_FILTER == "$iothub/twin/PATCH/properties/desired/#"
    assert topics.METHODS_FILTER == "$iothub/methods/POST/#"
    assert topics.c2d_filter(DEVICE) == "devices/my_device/messages/devicebound/#"
    assert topics.input_filter(MODULE) == "devices/my_device/modules/my_module_id/#"


def test_filters_are_refused_for_the_wrong_kind_of_identity():
    with pytest.raises(ConfigError, match="cannot receive cloud-to-device messages"):
        topics.c2d_filter(MODULE)
    with pytest.raises(ConfigError, match="has no module id"):
        topics.input_filter(DEVICE)


def test_every_received_topic_matches_its_filter():
    # What the filters subscribe to must be what parse() accepts, or messages would be lost.
    c2d = "devices/my_device/messages/devicebound/%24.mid=1"
    assert c2d.startswith(topics.c2d_filter(DEVICE)[:-1])
    assert isinstance(topics.parse(c2d, DEVICE), topics.C2DMessage)
    inp = "devices/my_device/modules/my_module_id/inputs/in1/"
    assert inp.startswith(topics.input_filter(MODULE)[:-1])
    assert isinstance(topics.parse(inp, MODULE), topics.InputMessage)


# ---------------------------------------------------------------------------------------------- telemetry


@pytest.mark.parametrize("case", TELEMETRY["valid"], ids=_ids)
def test_telemetry_topic_vectors(case):
    identity = Identity(**case["identity"])
    assert topics.telemetry_topic(identity, _pairs(case["properties"]), **case["kwargs"]) == case["topic"]


@pytest.mark.parametrize("case", TELEMETRY["invalid"], ids=_ids)
def test_telemetry_topic_refuses_what_the_hub_would_refuse(case):
    identity = Identity(**case["identity"])
    with pytest.raises(ERRORS[case["error"]], match=re.escape(case["match"])):
        topics.telemetry_topic(identity, _pairs(case["properties"]), **case["kwargs"])


def test_telemetry_properties_as_mapping_or_pairs_give_the_same_topic():
    pairs = [("b", "2"), ("a", "1")]
    assert topics.telemetry_topic(DEVICE, dict(pairs)) == topics.telemetry_topic(DEVICE, pairs)
    assert topics.telemetry_topic(DEVICE, dict(pairs)).endswith("/b=2&a=1")


@pytest.mark.parametrize(
    "properties, match",
    [("a=b", "not a string"), (5, "not int"), ([("a", "1", "x")], "is not a (key, value) pair")],
    ids=["string", "int", "triple"],
)
def test_telemetry_properties_must_be_a_mapping_or_pairs(properties, match):
    with pytest.raises(ConfigError, match=re.escape(match)):
        topics.telemetry_topic(DEVICE, properties)


@pytest.mark.parametrize(
    "when, wire",
    [
        (dt.datetime(2021, 4, 21, 11, 30, 16, tzinfo=dt.timezone.utc), "2021-04-21T11%3A30%3A16Z"),
        (dt.datetime(2021, 4, 21, 13, 30, 16, tzinfo=dt.timezone(dt.timedelta(hours=2))), "2021-04-21T11%3A30%3A16Z"),
        (dt.datetime(2021, 4, 21, 11, 30, 16, 123456, tzinfo=dt.timezone.utc), "2021-04-21T11%3A30%3A16.123Z"),
    ],
    ids=["utc", "converted to utc", "milliseconds"],
)
def test_datetimes_are_sent_as_utc_iso8601(when, wire):
    topic = topics.telemetry_topic(DEVICE, absolute_expiry=when, creation_time=when)
    assert topic == f"devices/my_device/messages/events/%24.exp={wire}&%24.ctime={wire}"


def test_naive_datetime_is_refused():
    with pytest.raises(ConfigError, match="has no time zone"):
        topics.telemetry_topic(DEVICE, creation_time=dt.datetime(2021, 4, 21, 11, 30, 16))


def test_lone_surrogate_is_refused_as_config_error():
    with pytest.raises(ConfigError, match="lone surrogate"):
        topics.telemetry_topic(DEVICE, {"k": "\ud800"})


def test_topic_longer_than_mqtt_allows_is_refused():
    base = len("devices/my_device/messages/events/k=")
    fits = "v" * (topics.MAX_TOPIC_LENGTH - base)
    assert len(topics.telemetry_topic(DEVICE, {"k": fits})) == 65535
    with pytest.raises(MessageTooLargeError, match="65535"):
        topics.telemetry_topic(DEVICE, {"k": fits + "v"})


# ---------------------------------------------------------------------------------------------- message size


@pytest.mark.parametrize("case", TELEMETRY["size"], ids=_ids)
def test_message_size_counts_like_the_hub(case):
    size = topics.message_size(case["body"], _pairs(case["properties"]), case["system_properties"])
    assert size == case["size"]


def test_message_size_accepts_bytes_like_bodies():
    for body in (b"abc", bytearray(b"abc"), memoryview(b"abc")):
        assert topics.message_size(body) == 3
    assert topics.message_size(None, {"k": None}) == 1
    with pytest.raises(ConfigError, match="body must be bytes or str"):
        topics.message_size(123)


def test_size_limit_is_256_kib_inclusive():
    system = topics.system_properties(message_id="m1")  # 2 bytes counted
    body = b"x" * (262144 - 2 - 2)  # and 2 for the property "k" = "v"
    assert topics.check_message_size(body, {"k": "v"}, system) == 262144
    with pytest.raises(MessageTooLargeError, match="262145 bytes"):
        topics.check_message_size(body + b"x", {"k": "v"}, system)


def test_system_properties_are_in_wire_order_with_wire_names():
    assert topics.system_properties(component="c", message_id="m", output_name="o") == {
        "$.on": "o",
        "$.mid": "m",
        "$.sub": "c",
    }
    assert list(topics.system_properties(component="c", message_id="m", output_name="o")) == ["$.on", "$.mid", "$.sub"]


# ---------------------------------------------------------------------------------------------- property bags


@pytest.mark.parametrize("case", BAGS["round_trip"], ids=_ids)
def test_property_bag_encodes_and_decodes(case):
    pairs = _pairs(case["decoded"])
    assert topics.encode_property_bag(pairs) == case["encoded"]
    assert list(topics.decode_property_bag(case["encoded"]).items()) == pairs


@pytest.mark.parametrize("case", BAGS["decode_only"], ids=_ids)
def test_property_bag_decodes(case):
    assert list(topics.decode_property_bag(case["encoded"]).items()) == _pairs(case["decoded"])


@pytest.mark.parametrize("case", BAGS["decode_invalid"], ids=_ids)
def test_malformed_property_bag_is_a_protocol_error(case):
    with pytest.raises(ProtocolError, match=re.escape(case["match"])):
        topics.decode_property_bag(case["encoded"])


@pytest.mark.parametrize("case", BAGS["encode_invalid"], ids=_ids)
def test_unencodable_properties_are_a_config_error(case):
    with pytest.raises(ConfigError, match=re.escape(case["match"])):
        topics.encode_property_bag(_pairs(case["decoded"]))


# ---------------------------------------------------------------------------------------------- requests


@pytest.mark.parametrize("case", REQUESTS["twin_get"], ids=_ids)
def test_twin_get_topic(case):
    assert topics.twin_get_topic(case["rid"]) == case["topic"]


@pytest.mark.parametrize("case", REQUESTS["twin_patch_reported"], ids=_ids)
def test_twin_patch_reported_topic(case):
    assert topics.twin_patch_reported_topic(case["rid"]) == case["topic"]


@pytest.mark.parametrize("case", REQUESTS["method_response"], ids=_ids)
def test_method_response_topic(case):
    assert topics.method_response_topic(case["status"], case["rid"]) == case["topic"]


@pytest.mark.parametrize("case", REQUESTS["invalid"], ids=_ids)
def test_request_topics_refuse_bad_arguments(case):
    with pytest.raises(ConfigError, match=re.escape(case["match"])):
        getattr(topics, case["function"])(*case["args"])


# ---------------------------------------------------------------------------------------------- parse


def _fields(record):
    values = {}
    for name in record.__dataclass_fields__:
        value = getattr(record, name)
        values[name] = dict(value) if name.endswith("properties") else value
    return values


def _identity(case):
    return Identity(**case["identity"]) if "identity" in case else None


@pytest.mark.parametrize("case", PARSE["records"], ids=_ids)
def test_parse_returns_typed_records(case):
    record = topics.parse(case["topic"], _identity(case))
    assert type(record).__name__ == case["type"]
    assert _fields(record) == case["fields"]


@pytest.mark.parametrize("case", PARSE["not_ours"], ids=_ids)
def test_parse_returns_none_for_topics_that_are_not_ours(case):
    assert topics.parse(case["topic"], _identity(case)) is None


@pytest.mark.parametrize("case", PARSE["malformed"], ids=_ids)
def test_parse_raises_protocol_error_for_malformed_topics_of_ours(case):
    with pytest.raises(ProtocolError, match=re.escape(case["match"])):
        topics.parse(case["topic"], _identity(case))


def test_message_records_expose_system_properties_by_name():
    topic = next(c["topic"] for c in PARSE["records"] if c["name"] == "PY C2D, all system properties")
    message = topics.parse(topic)
    assert (message.message_id, message.correlation_id, message.user_id) == (
        "6b822696-f75a-46f5-8b02-0680db65abf5",
        "fake_corid",
        None,
    )
    assert (message.content_type, message.content_encoding, message.absolute_expiry) == (
        "fake_content_type",
        "utf-8",
        "3237-07-19T23:06:40.0000000Z",
    )


def test_records_are_read_only_and_hashable():
    message = topics.parse("devices/d1/messages/devicebound/a=1")
    with pytest.raises(TypeError):
        message.properties["a"] = "2"
    response = topics.parse("$iothub/twin/res/204/?$rid=1&$version=2")
    assert {response: 1}[topics.TwinResponse(204, "1", 2)] == 1


def test_parse_refuses_a_non_string_topic():
    with pytest.raises(ConfigError, match="topic must be a str"):
        topics.parse(b"$iothub/twin/res/200/?$rid=1")


# ---------------------------------------------------------------------------------------------- properties

# Characters that break naive encoders (separators, escapes, wildcards, multi-byte UTF-8), mixed into
# arbitrary Unicode text ("utf-8" keeps lone surrogates out: they are not text and cannot be sent).
_ALPHABET = st.one_of(st.sampled_from("+%&=/$ ?#24Bz\u00e9\u2713\U0001f600"), st.characters(codec="utf-8"))
_TEXT = st.text(_ALPHABET, max_size=12)
_KEYS = st.text(_ALPHABET, min_size=1, max_size=12)  # also used for non-empty values
_BAGS = st.dictionaries(_KEYS, st.one_of(st.none(), _TEXT), max_size=6)


@settings(max_examples=300, deadline=None)
@given(_BAGS)
def test_decode_inverts_encode(bag):
    encoded = topics.encode_property_bag(bag)
    assert topics.decode_property_bag(encoded) == bag
    assert list(topics.decode_property_bag(encoded)) == list(bag)  # order survives too


@settings(max_examples=300, deadline=None)
@given(_BAGS)
def test_c2d_topic_properties_survive_the_wire(bag):
    message = topics.parse("devices/d1/messages/devicebound/" + topics.encode_property_bag(bag))
    assert {**message.properties, **message.system_properties} == bag


@settings(max_examples=300, deadline=None)
@given(properties=st.dictionaries(_KEYS.filter(lambda k: not k.startswith("$")), _TEXT, max_size=6), message_id=_KEYS)
def test_telemetry_topic_carries_exactly_the_given_properties(properties, message_id):
    topic = topics.telemetry_topic(DEVICE, properties, message_id=message_id)
    prefix = "devices/my_device/messages/events/"
    assert topic.startswith(prefix)
    assert "+" not in topic and " " not in topic and "#" not in topic  # wildcards and spaces never reach MQTT
    assert topics.decode_property_bag(topic[len(prefix):]) == {"$.mid": message_id, **properties}


@settings(max_examples=300, deadline=None)
@given(st.one_of(_KEYS, st.integers(min_value=0)))
def test_rid_comes_back_as_sent(rid):
    # The hub answers with the $rid it was given; parse() must hand back the same request id.
    query = topics.twin_get_topic(rid).split("?", 1)[1]
    assert topics.parse("$iothub/twin/res/200/?" + query).rid == str(rid)
    query = topics.method_response_topic(200, rid).split("?", 1)[1]
    assert topics.parse("$iothub/methods/POST/m/?" + query).rid == str(rid)


_PREFIXES = st.sampled_from(
    [
        "",
        "$iothub/twin/res/",
        "$iothub/twin/res/200/?",
        "$iothub/twin/PATCH/properties/desired/",
        "$iothub/twin/PATCH/properties/desired/?$version=",
        "$iothub/methods/POST/",
        "$iothub/methods/POST/m/?$rid=",
        "devices/",
        "devices/d1/messages/devicebound/",
        "devices/d1/modules/m1/inputs/",
        "devices/d1/modules/m1/inputs/in/",
    ]
)
_TOPIC_TEXT = st.text(st.one_of(_ALPHABET, st.sampled_from("/?0123456789")), max_size=30)
_RECORDS = (topics.C2DMessage, topics.InputMessage, topics.MethodRequest, topics.TwinResponse, topics.DesiredPatch)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), st.builds(str.__add__, _PREFIXES, _TOPIC_TEXT)), st.sampled_from([None, DEVICE, MODULE]))
def test_parse_raises_nothing_but_protocol_error(topic, identity):
    try:
        result = topics.parse(topic, identity)
    except ProtocolError:
        return
    assert result is None or isinstance(result, _RECORDS)
