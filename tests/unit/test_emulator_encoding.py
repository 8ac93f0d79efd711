"""Vectors for the line between what IoT Hub reads as sent and what it would reject or read differently
(reference §2.1: property bags are RFC 2396 percent-encoded; §1: the hub percent-decodes username query
values). Both sides of the line are listed, so neither a false alarm nor a missed deviation can return."""
import pytest

from lightclient.emulator import namespace, registry

HOST = "hub.example"

#: Accepted silently: RFC 2396 unreserved characters (what encodeURIComponent leaves raw) and escapes.
SILENT_BAGS = [
    "a=it's(1)*!",                                   # Node SDK: encodeURIComponent leaves ! ' ( ) * raw
    "k!*'()=v",
    "%24.ct=application%2Fjson&%24.ce=utf-8&a=b",   # Python SDK style
    "a=%E2%82%AC&b=x~y.z_w-1",
    "a=&b",                                          # empty and null values
]

#: Flagged: read differently or outside RFC 2396, each with the reference section named.
FLAGGED_BAGS = [
    ("a=b+c", "literal plus"),
    ("a=b c", "unencoded character(s) ' '"),
    ("a=%zz", "invalid percent-escape"),
    ("a=x:y", "unencoded character(s) ':'"),          # ':' is reserved in RFC 2396 (only model-id may carry it)
    ("a=é", "unencoded character(s) 'é'"),
    ("a=x/y", "unencoded character(s) '/'"),
    ("$.ct=x", "'$.ct' sent unencoded"),
]


@pytest.mark.parametrize("bag", SILENT_BAGS)
def test_rfc2396_unreserved_and_escapes_are_silent(bag):
    assert namespace.decode_property_bag(bag).problems == ()


@pytest.mark.parametrize("bag,words", FLAGGED_BAGS)
def test_what_the_hub_reads_differently_is_flagged_with_the_reference(bag, words):
    problems = namespace.decode_property_bag(bag).problems
    assert any(words in message for _, message in problems), problems
    assert all("§2.1" in message for rule, message in problems if rule == "telemetry.property-encoding" and
               "'$." not in message)


def test_decoding_of_unreserved_characters_is_as_sent():
    bag = namespace.decode_property_bag("a=it's(1)*!&%24.mid=m%201")
    assert bag.application == {"a": "it's(1)*!"} and bag.system == {"$.mid": "m 1"}


SILENT_USERNAMES = [
    f"{HOST}/d1/?api-version=2021-04-12&model-id=dtmi:com:example:Thermostat;1&DeviceClientType=node%2F1.0%20(x64)",
    f"{HOST}/d1/?api-version=2021-04-12&model-id=dtmi%3Acom%3Aexample%3AThermostat%3B1",
    f"{HOST}/d1/?api-version=2021-04-12&DeviceClientType=azure-iot-device-iothub-py%2F2.14.0(3.11.7%3BLinux)",
]

FLAGGED_USERNAMES = [
    (f"{HOST}/d1/?api-version=2021-04-12&DeviceClientType=my client/1.0", "' /'"),
    (f"{HOST}/d1/?api-version=2021-04-12&DeviceClientType=a:b", "':'"),     # only model-id may carry raw ':'
    (f"{HOST}/d1/?api-version=2021-04-12&model-id=dtmi:x y;1", "' '"),
    (f"{HOST}/d1/?api-version=2021-04-12&model-id=dtmi:x+y;1", "'+'"),
]


@pytest.mark.parametrize("username", SILENT_USERNAMES)
def test_raw_model_id_and_unreserved_username_values_are_silent(username):
    refusal, warnings = registry.check_username(username, HOST, "d1")
    assert refusal is None and warnings == []


@pytest.mark.parametrize("username,chars", FLAGGED_USERNAMES)
def test_username_values_that_may_read_differently_are_flagged(username, chars):
    refusal, warnings = registry.check_username(username, HOST, "d1")
    assert refusal is None
    (rule, message), = warnings
    assert rule == "connect.username-encoding" and chars in message and "§1" in message
