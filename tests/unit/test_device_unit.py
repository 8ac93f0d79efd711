"""Pure logic behind Device and the paho glue: back-off, desired-state reconciliation, PnP, argument checks."""
import ssl

import paho.mqtt.client as mqtt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from lightclient import paho as lcpaho
from lightclient import pnp
from lightclient._twin import DesiredState, diff, merge_patch
from lightclient.backoff import Backoff
from lightclient.device import MAX_KEEPALIVE, Device
from lightclient.exceptions import ConfigError
from lightclient.identity import Identity

DEVICE = Identity("hub.azure-devices.net", "d1")
MODULE = Identity("hub.azure-devices.net", "d1", "m1")

# ----------------------------------------------------------------------------------------- back-off


def test_backoff_doubles_up_to_the_maximum_and_jitter_only_shortens():
    b = Backoff(initial=1, maximum=8, jitter=0.5)
    assert [b.delay(n, rand=lambda: 0.0) for n in range(6)] == [1, 2, 4, 8, 8, 8]
    assert [b.delay(n, rand=lambda: 0.999999) for n in range(3)] == pytest.approx([0.5, 1, 2], rel=1e-5)
    assert b.delay(10_000, rand=lambda: 0.0) == 8  # no float overflow for long outages


def test_backoff_waits_long_after_not_authorized():
    b = Backoff()
    delays = [b.delay(0, not_authorized=True) for _ in range(50)]
    assert all(150 <= d <= 300 for d in delays)
    assert len(set(delays)) > 1  # jittered, so a fleet does not retry in lock-step


@pytest.mark.parametrize("kwargs, match", [
    ({"initial": 0}, "must be > 0"), ({"maximum": 0.5}, "at least"), ({"jitter": 1.5}, "0..1"),
    ({"multiplier": 0.5}, ">= 1"), ({"initial": "1"}, "must be a number"),
])
def test_backoff_refuses_nonsense(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Backoff(**kwargs)


# ------------------------------------------------------------------------------------ desired state

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                           lambda inner: st.dictionaries(st.text(max_size=3), inner, max_size=3), max_leaves=8)
docs = st.dictionaries(st.text(max_size=3).filter(lambda k: not k.startswith("$")),
                       json_values.filter(lambda v: v is not None), max_size=4)


def _no_nulls(doc):
    return {k: _no_nulls(v) if isinstance(v, dict) else v for k, v in doc.items() if v is not None}


@given(docs, docs)
def test_diff_is_the_patch_between_two_documents(old, new):
    old, new = _no_nulls(old), _no_nulls(new)
    assert merge_patch(old, diff(old, new)) == new


def test_merge_patch_deletes_with_null_and_merges_objects():
    assert merge_patch({"a": 1, "b": {"c": 1, "d": 2}}, {"a": None, "b": {"c": None, "e": 3}}) == {"b": {"d": 2, "e": 3}}


def test_desired_state_drops_old_patches_and_reports_what_was_missed():
    state = DesiredState()
    assert state.reconcile({"a": 1, "$version": 3}) == ({"a": 1, "$version": 3}, 3)  # first connect: all of it
    assert state.apply({"b": 2, "$version": 4}, 4)
    assert not state.apply({"b": 9, "$version": 4}, 4)                                 # duplicate
    assert state.reconcile({"a": 1, "b": 2, "$version": 4}) is None                     # nothing missed
    assert state.reconcile({"b": 3, "c": {"x": 1}, "$version": 7}) == ({"a": None, "b": 3, "c": {"x": 1}, "$version": 7}, 7)
    assert state.reconcile({"b": 0, "$version": 6}) is None                             # older than known
    assert state.doc == {"b": 3, "c": {"x": 1}} and state.version == 7


# --------------------------------------------------------------------------------------------- PnP


def test_writable_property_ack_follows_the_convention():
    assert pnp.writable_property_ack("targetTemp", 21.5, 7, description="applied") == {
        "targetTemp": {"value": 21.5, "ac": 200, "av": 7, "ad": "applied"}}
    assert pnp.writable_property_ack("t", 1, 2, status=400, component="th1") == {
        "th1": {"__t": "c", "t": {"value": 1, "ac": 400, "av": 2}}}
    with pytest.raises(ConfigError, match="version"):
        pnp.writable_property_ack("t", 1, "7")
    assert pnp.split_command("th1*reboot") == ("th1", "reboot")
    assert pnp.split_command("reboot") == (None, "reboot")


# -------------------------------------------------------------------------------------- paho glue


def test_new_client_is_an_iothub_client():
    client = lcpaho.new_client(MODULE)
    assert client.protocol == mqtt.MQTTv311
    assert client.username == "hub.azure-devices.net/d1/m1/?api-version=2021-04-12&DeviceClientType=lightclient%2F0.1.0"
    assert client.password is None
    with pytest.raises(ConfigError, match="client_id"):
        lcpaho.new_client(DEVICE, client_id="other")


def test_subscriptions_are_four_documented_filters():
    assert lcpaho.subscriptions(DEVICE) == [("devices/d1/messages/devicebound/#", 1), ("$iothub/methods/POST/#", 0),
                                          ("$iothub/twin/res/#", 0), ("$iothub/twin/PATCH/properties/desired/#", 1)]
    assert lcpaho.subscriptions(MODULE)[0] == ("devices/d1/modules/m1/#", 1)


def test_route_refuses_the_wrong_message_kind():
    client = lcpaho.new_client(MODULE)
    with pytest.raises(ConfigError, match="on_input"):
        lcpaho.route(client, MODULE, on_c2d=print)
    with pytest.raises(ConfigError, match="on_c2d"):
        lcpaho.route(lcpaho.new_client(DEVICE), DEVICE, on_input=print)
    assert lcpaho.route(client, MODULE, on_input=print, on_method=print).filters == (
        "devices/d1/modules/m1/#", "$iothub/methods/POST/#")


def test_json_body_and_fresh_rids():
    assert lcpaho.json_body({"a": "ä"}) == '{"a":"ä"}'.encode()
    assert lcpaho.json_body(None) == b"null" and lcpaho.json_body(b"{}") == b"{}"
    with pytest.raises(ConfigError, match="JSON"):
        lcpaho.json_body({"x": object()})
    rids = {lcpaho.new_rid() for _ in range(1000)}
    assert len(rids) == 1000 and all(r.replace("-", "").isalnum() for r in rids)


# ---------------------------------------------------------------------------------- Device options


@pytest.mark.parametrize("kwargs, match", [
    ({"keepalive": MAX_KEEPALIVE + 1}, "1177"), ({"keepalive": 0}, "keepalive"), ({"port": 0}, "port"),
    ({"max_inflight": 0}, "max_inflight"), ({"twin_timeout": 0}, "twin_timeout"), ({"backoff": 3}, "Backoff"),
])
def test_device_refuses_bad_options(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Device(DEVICE, ssl.create_default_context(), **kwargs)


def test_device_refuses_bad_messages_before_the_wire():
    device = Device(DEVICE, ssl.create_default_context())
    with pytest.raises(ConfigError, match="system properties are"):
        device.send(b"x", colour="red")
    with pytest.raises(ConfigError, match="output_name"):
        device.send(b"x", output_name="o")
    from lightclient.exceptions import MessageTooLargeError
    with pytest.raises(MessageTooLargeError):
        device.send(b"x" * (256 * 1024), {"k": "v"})
    with pytest.raises(ConfigError, match="dict"):
        device.patch_reported([1])


@pytest.mark.parametrize("payload", [None, 5, 2.5, {"t": 1}, [b"x"], object()])
def test_send_refuses_a_payload_that_is_not_bytes_or_str(payload):
    device = Device(DEVICE, ssl.create_default_context())
    with pytest.raises(ConfigError) as err:
        device.send(payload)
    message = str(err.value)
    assert "payload must be bytes or str (sent as UTF-8), bytearray or memoryview" in message
    assert type(payload).__name__ in message and "b''" in message
    assert device.queued == 0
    # The accepted kinds still go through (queued: this device never connects).
    for good in (b"x", bytearray(b"x"), memoryview(b"x"), "x", b""):
        device.send(good)
    assert device.queued == 5
