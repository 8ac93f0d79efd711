"""Property-based fuzzing of the parsers of network data not fuzzed elsewhere (bounded example counts).

Already fuzzed: topics.parse and the property bag (test_topics.py), twin diff (test_device_unit.py),
DPS operation JSON (test_dps_unit.py), the emulator's MQTT packet decoder (test_emulator_codec.py).
Here: the twin JSON a hub sends (desired patches, full twins, twin and method bodies as Device reads
them), the emulator's view of device topics and property bags, and the outbox's $.mid recovery.
"""
import json
import ssl

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightclient import device as device_module
from lightclient._pipeline import message_id_of as _message_id_of
from lightclient._twin import DesiredState, merge_patch
from lightclient.device import Device
from lightclient.emulator import namespace
from lightclient.identity import Identity
from lightclient.topics import MethodRequest

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=6)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=12)
json_docs = st.dictionaries(st.text(max_size=4), json_values, max_size=5)
# What a hub could send as a body: valid JSON of any shape, near-JSON, deep nesting, or any bytes.
bodies = st.one_of(
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=200),
    st.integers(1, 5000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(1, 5000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
    st.text(max_size=50).map(lambda t: t.encode("utf-8", "surrogatepass")),
)


@FUZZ
@given(st.lists(st.tuples(json_docs, st.integers(-3, 30)), max_size=6), json_docs,
       st.one_of(st.integers(-5, 40), st.none(), st.text(max_size=3), st.booleans()))
def test_desired_state_takes_any_patches_and_twins(patches, twin, version):
    state = DesiredState()
    for patch, v in patches:
        before = state.version
        applied = state.apply(patch, v)
        assert applied == (before is None or v > before)
        assert all(not k.startswith("$") for k in state.doc or {})
    desired = dict(twin)
    desired["$version"] = version
    result = state.reconcile(desired)
    if result is not None:
        patch, got_version = result
        assert isinstance(patch, dict) and patch["$version"] == got_version


@FUZZ
@given(json_docs, json_docs)
def test_merge_patch_never_mutates_and_deletes_what_is_null(doc, patch):
    frozen = json.dumps(doc, sort_keys=True)
    result = merge_patch(doc, patch)
    assert json.dumps(doc, sort_keys=True) == frozen
    for key, value in patch.items():
        if value is None:
            assert key not in result


_CTX = ssl.create_default_context()
_DEVICE = Device(Identity("localhost", "fuzz"), _CTX)   # offline: nothing here touches the network


def _offline_device(**kwargs):
    if not kwargs:
        return _DEVICE
    return Device(Identity("localhost", "fuzz"), _CTX, **kwargs)


@FUZZ
@given(bodies, st.integers(0, 2 ** 40))
def test_device_takes_any_desired_patch_body_without_raising(payload, version):
    got = []
    dev = _offline_device()
    dev.on_desired = lambda patch, v: got.append((patch, v))
    dev._desired_state = DesiredState()
    dev._apply_desired(version, payload)  # what the twin thread runs for each hub patch
    for patch, v in got:
        assert isinstance(patch, dict) and v == version


@FUZZ
@given(bodies)
def test_method_bodies_always_get_an_answer_status(payload):
    dev = _offline_device()
    dev.add_method_handler("m", lambda argument: argument)
    if payload.strip() and payload.lstrip()[:1] in b"[{":
        try:
            device_module._json(payload)
        except ValueError:
            pass
    status, body = dev._method_result(MethodRequest("m", "r1"), payload)
    assert status in (200, 400)
    if status == 200:
        device_module.lcpaho.json_body(body)


@FUZZ
@given(bodies)
def test_twin_bodies_parse_to_a_value_or_a_value_error(payload):
    try:
        device_module._json(payload)
    except ValueError:
        pass


identities = st.sampled_from([("d1", None), ("d1", "m1"), ("dev-é", None)])
topic_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=60)


@FUZZ
@given(st.one_of(topic_text, topic_text.map(lambda t: "devices/d1/messages/events/" + t),
                 topic_text.map(lambda t: "$iothub/" + t),
                 topic_text.map(lambda t: "devices/d1/modules/m1/messages/events/" + t)), identities)
def test_emulator_classifies_any_device_topic(topic, identity):
    kind = namespace.classify_publish(topic, *identity)
    assert isinstance(kind, (namespace.Telemetry, namespace.TwinGet, namespace.TwinReported,
                             namespace.MethodResponse, namespace.Forbidden))


@FUZZ
@given(st.one_of(topic_text, st.lists(st.tuples(st.text(max_size=6), st.text(max_size=6)), max_size=4).map(
    lambda pairs: "&".join(f"{k}={v}" for k, v in pairs))))
def test_emulator_decodes_any_property_bag_into_problems_not_exceptions(bag):
    decoded = namespace.decode_property_bag(bag)
    assert isinstance(decoded.application, dict) and isinstance(decoded.system, dict)


@FUZZ
@given(st.text(max_size=40), topic_text)
def test_outbox_mid_recovery_reads_what_send_wrote(message_id, rest):
    dev = _offline_device()
    if message_id:
        handle = dev.send(b"x", {"k": rest or "v"}, message_id=message_id)
    else:
        handle = dev.send(b"x", {"k": rest or "v"})
    with dev._acks.lock:
        message = dev._acks.queue.pop()
        dev._acks.count -= 1
        dev._acks.bytes -= message.cost
    assert _message_id_of(message.topic) == handle.message_id
