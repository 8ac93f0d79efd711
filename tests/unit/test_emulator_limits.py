"""Pure tests of the emulator's bounds: JSON nesting checked before parsing, and the bounded diagnostic
and event logs (no sockets)."""
import json

import pytest

from lightclient.emulator import jsonlimits
from lightclient.emulator.diagnostics import Diagnostic, DiagnosticLog
from lightclient.emulator.events import Event, EventLog


@pytest.mark.parametrize("text,depth", [
    ("1", 0), ('"{[{["', 0), ("{}", 1), ("[]", 1), ('{"a": [1, {"b": 2}]}', 3),
    ('{"a": "}}}", "b": {"c": "[[["}}', 2), (r'{"a": "\"{"}', 1), ("[[], [[]], []]", 3),
])
def test_nesting_counts_brackets_outside_strings(text, depth):
    assert jsonlimits.nesting(text) == depth
    assert jsonlimits.nesting(text.encode()) == depth


def test_loads_refuses_what_json_loads_would_recurse_on():
    deep = b"[" * 200_000 + b"]" * 200_000
    with pytest.raises(RecursionError):
        json.loads(deep)   # what the emulator used to call
    with pytest.raises(jsonlimits.JsonTooDeep) as info:
        jsonlimits.loads(deep)
    assert isinstance(info.value, ValueError) and info.value.depth == 200_000
    assert "200000 levels deep; at most 64 allowed" in str(info.value)
    assert jsonlimits.loads(b'{"a": [1]}', max_depth=2) == {"a": [1]}
    with pytest.raises(jsonlimits.JsonTooDeep):
        jsonlimits.loads(b'{"a": [1]}', max_depth=1)


def test_depth_of_a_parsed_value_needs_no_recursion_and_ends_on_cycles():
    assert jsonlimits.depth_of(5) == 0
    assert jsonlimits.depth_of({"a": [{"b": {}}], "c": 1}) == 4
    deep = current = {}
    for _ in range(100_000):
        current["x"] = current = {}
    assert jsonlimits.depth_of(deep, stop_above=10) == 11
    loop = {}
    loop["self"] = loop
    assert jsonlimits.depth_of(loop, stop_above=10) == 11


def test_diagnostic_log_keeps_the_newest_and_counts_all():
    log = DiagnosticLog(max_items=3)
    for n in range(10):
        log.add(Diagnostic("tls.handshake", f"failure {n}"))
    log.add(Diagnostic("connection.limit", "cap"), count=False)
    log.count("connection.limit")
    log.count("connection.limit")
    assert [d.message for d in log.items()] == ["failure 8", "failure 9", "cap"]
    assert log.counts() == {"tls.handshake": 10, "connection.limit": 2}
    assert log.wait_for("connection.", timeout=0).message == "cap"
    with pytest.raises(ValueError):
        DiagnosticLog(max_items=0)


def test_event_log_is_a_ring():
    log = EventLog(max_items=2)
    for n in range(5):
        log.add(Event("d", None, str(n).encode(), {}, {}, "devices/d/messages/events/"))
    assert [e.body for e in log.items("d")] == [b"3", b"4"]


def test_twin_section_size_counts_like_the_hub():
    from lightclient.emulator.twin import section_size

    assert section_size({}) == 0
    assert section_size({"a": "xyz"}) == 1 + 3
    assert section_size({"n": 1.5, "b": True, "é": "é"}) == (1 + 8) + (1 + 4) + (2 + 2)
    assert section_size({"o": {"k": [1, "ab"]}, "$version": 4}) == 1 + 1 + 8 + 2


def test_a_patch_that_would_take_a_twin_section_over_32_kb_is_refused_whole():
    from lightclient.emulator.twin import MAX_SECTION_BYTES, Twin, TwinTooLarge

    twin = Twin()
    assert twin.patch_reported({"big": "x" * (MAX_SECTION_BYTES - 3)}) == 2   # exactly at the limit
    with pytest.raises(TwinTooLarge, match="reported properties 32770 bytes; IoT Hub allows 32768"):
        twin.patch_reported({"k": "v"})
    with pytest.raises(TwinTooLarge, match="40006 bytes"):
        twin.patch_reported({"k": "v", "big": None, "more": "x" * 40_000})
    assert twin.reported_version == 2 and list(twin.reported) == ["big"]
    assert twin.patch_reported({"big": None, "small": 1}) == 3          # shrinking is always fine
    with pytest.raises(TwinTooLarge, match="desired"):
        twin.patch_desired({str(n): n for n in range(5000)})
    assert twin.desired == {} and twin.desired_version == 1
