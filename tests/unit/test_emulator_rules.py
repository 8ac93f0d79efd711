"""Pure tests of the emulator's hub rules (no sockets): property bags, topics, usernames, authorization,
twin patches, and the emulator's standard-library-only promise."""
import ast
import hashlib
from pathlib import Path

import pytest

from lightclient.emulator import codec, namespace, registry
from lightclient.emulator.registry import SELF_SIGNED, Identity, PeerCertificate, Registry
from lightclient.emulator.twin import Twin

CA = {"organizationName": "lightclient", "commonName": "lightclient emulator CA"}
HOST = "hub.example"


def test_bag_decoding_null_empty_and_percent():
    bag = namespace.decode_property_bag("%24.mid=a%20b&k&e=&p=1%2B1&u=%C3%A9")
    assert bag.system == {"$.mid": "a b"}
    assert bag.application == {"k": None, "e": "", "p": "1+1", "u": "é"}
    assert bag.problems == ()


@pytest.mark.parametrize("bag,rule,words", [
    ("$.ct=x", "telemetry.property-encoding", "'$.ct' sent unencoded"),
    ("a=b+c", "telemetry.property-encoding", "literal plus"),
    ("a=b c", "telemetry.property-encoding", "unencoded character"),
    ("a=%zz", "telemetry.property-encoding", "invalid percent-escape"),
    ("%24.nope=1", "telemetry.system-property", "unknown system property"),
    ("a=1&a=2", "telemetry.property-bag", "duplicate key"),
    ("a=1&&b=2", "telemetry.property-bag", "stray '&'"),
])
def test_bag_deviations_are_named(bag, rule, words):
    problems = namespace.decode_property_bag(bag).problems
    assert any(r == rule and words in m for r, m in problems), problems


def test_plus_stays_literal_when_decoding():
    assert namespace.decode_property_bag("a=b+c").application == {"a": "b+c"}


def test_c2d_bag_encoding():
    assert namespace.encode_property_bag([("$.mid", "x y"), ("k", None), ("e", ""), ("s", "a/b~")]) == \
        "%24.mid=x%20y&k&e=&s=a%2Fb~"


@pytest.mark.parametrize("topic,kind", [
    ("devices/d1/messages/events/", namespace.Telemetry("")),
    ("devices/d1/messages/events", namespace.Telemetry("")),
    ("devices/d1/messages/events/a=1/", namespace.Telemetry("a=1")),
    ("$iothub/twin/GET/?$rid=5", namespace.TwinGet({"$rid": "5"}, "5")),
    ("$iothub/twin/PATCH/properties/reported/?$rid=6", namespace.TwinReported({"$rid": "6"}, "6")),
    ("$iothub/methods/res/200/?$rid=7", namespace.MethodResponse("200", {"$rid": "7"}, "7")),
])
def test_device_publish_topics(topic, kind):
    assert namespace.classify_publish(topic, "d1", None) == kind


@pytest.mark.parametrize("topic", [
    "devices/d2/messages/events/", "devices/d1/modules/m1/messages/events/", "$iothub/twin/res/200/?$rid=1",
    "$iothub/methods/POST/x/?$rid=1", "devices/d1/messages/devicebound/", "anything", "devices/d1x/messages/events/",
])
def test_forbidden_device_publish_topics(topic):
    assert isinstance(namespace.classify_publish(topic, "d1", None), namespace.Forbidden)


def test_module_publishes_only_on_module_events_topic():
    assert namespace.classify_publish("devices/d1/modules/m1/messages/events/", "d1", "m1") == \
        namespace.Telemetry("")
    assert isinstance(namespace.classify_publish("devices/d1/messages/events/", "d1", "m1"), namespace.Forbidden)


def test_documented_filters_are_the_only_ones_granted():
    for f in namespace.documented_filters("d1", None):
        assert namespace.refuse_subscription(f, "d1", None) is None
    for f in ("devices/d2/messages/devicebound/#", "$iothub/#", "#", "$iothub/twin/res/+",
              namespace.CREDENTIALS_FILTER, "devices/d1/modules/m1/#"):
        assert namespace.refuse_subscription(f, "d1", None)


def test_topic_matching():
    assert namespace.topic_matches("a/#", "a") and namespace.topic_matches("a/#", "a/b/c")
    assert namespace.topic_matches("a/+/c", "a/b/c") and not namespace.topic_matches("a/+", "a/b/c")


def _peer(cn, issuer=CA, der=b"cert"):
    return PeerCertificate(der, {"commonName": cn}, issuer)


def _authorize(reg, client_id, username, peer, password=None):
    return registry.authorize(codec.Connect(client_id, username=username, password=password), peer, reg,
                              HOST, CA)


def test_authorize_ca_signed_device_and_module():
    reg = Registry()
    reg.add(Identity("d1"))
    reg.add(Identity("d1", "m1"))
    assert _authorize(reg, "d1", f"{HOST}/d1/?api-version=2021-04-12", _peer("d1")).return_code == 0
    assert _authorize(reg, "d1/m1", f"{HOST}/d1/m1/?api-version=2021-04-12", _peer("d1/m1")).return_code == 0


@pytest.mark.parametrize("client_id,username,peer,password,rule", [
    ("d9", f"{HOST}/d9/?api-version=2021-04-12", _peer("d9"), None, "connect.client-id"),
    ("d1", None, _peer("d1"), None, "connect.username"),
    ("d1", f"{HOST}/d2/?api-version=2021-04-12", _peer("d1"), None, "connect.username"),
    ("d1", f"{HOST}/d1/?api-version=2021-04-12", _peer("d2"), None, "connect.certificate-cn"),
    ("d1", f"{HOST}/d1/?api-version=2021-04-12", _peer("d1", {"commonName": "d1"}), None, "connect.certificate"),
    ("d1", f"{HOST}/d1/?api-version=2021-04-12", _peer("d1", {"commonName": "other CA"}), None,
     "connect.certificate"),
    ("d1", f"{HOST}/d1/?api-version=2021-04-12", _peer("d1"), b"SharedAccessSignature x", "connect.password"),
])
def test_authorize_refusals_are_connack_5_with_a_named_rule(client_id, username, peer, password, rule):
    reg = Registry()
    reg.add(Identity("d1"))
    result = _authorize(reg, client_id, username, peer, password)
    assert result.return_code == 5 and result.refusal[0] == rule


def test_authorize_self_signed_by_sha1_or_sha256_thumbprint():
    der = b"some certificate"
    sha1, sha256 = hashlib.sha1(der).hexdigest().upper(), hashlib.sha256(der).hexdigest().upper()
    self_issued = {"commonName": "anything"}
    for thumbprint in (sha1, sha256):
        reg = Registry()
        reg.add(Identity("s1", auth=SELF_SIGNED, thumbprints=(thumbprint,)))
        peer = PeerCertificate(der, self_issued, self_issued)
        assert _authorize(reg, "s1", f"{HOST}/s1/?api-version=2021-04-12", peer).return_code == 0
        wrong = PeerCertificate(b"other", self_issued, self_issued)
        assert _authorize(reg, "s1", f"{HOST}/s1/?api-version=2021-04-12", wrong).refusal[0] == \
            "connect.thumbprint"


def test_disabled_identity_is_refused():
    reg = Registry()
    reg.add(Identity("d1", enabled=False))
    assert _authorize(reg, "d1", f"{HOST}/d1/?api-version=2021-04-12", _peer("d1")).refusal[0] == \
        "connect.disabled"


@pytest.mark.parametrize("username,words", [
    (f"{HOST}/d1/", "no api-version"),
    (f"{HOST}/d1/?DeviceClientType=x", "no api-version"),
    (f"{HOST}/d1/?api-version=2001-01-01", "not one current SDKs use"),
    (f"{HOST}/d1/?api-version=2019-10-01&model-id=dtmi:x;1", "model-id needs"),
    (f"{HOST}/d1/?api-version=2021-04-12&DeviceClientType=my client/1.0", "not percent-encoded"),
    (f"{HOST}/d1?api-version=2021-04-12", "missing '/' before '?'"),
])
def test_username_deviations_are_warnings_not_refusals(username, words):
    refusal, warnings = registry.check_username(username, HOST, "d1")
    assert refusal is None
    assert any(words in m for _, m in warnings), warnings


def test_registry_rejects_invalid_ids():
    with pytest.raises(Exception, match="not a valid IoT Hub id"):
        Registry().add(Identity("bad id with spaces"))


def test_twin_patches_merge_delete_and_version():
    twin = Twin()
    assert twin.patch_reported({"a": {"b": 1, "c": 2}, "$version": 99}) == 2
    assert twin.patch_reported({"a": {"b": None}}) == 3
    assert twin.document() == {"desired": {"$version": 1}, "reported": {"a": {"c": 2}, "$version": 3}}


def _stdlib_names():
    import sys

    if hasattr(sys, "stdlib_module_names"):  # Python 3.10+
        return set(sys.stdlib_module_names)
    import pkgutil
    import sysconfig

    stdlib = sysconfig.get_paths()["stdlib"]
    names = {m.name for m in pkgutil.iter_modules([stdlib, stdlib + "/lib-dynload"])}
    return names | set(sys.builtin_module_names)


def test_emulator_imports_only_the_standard_library_and_itself():
    package = Path(__file__).resolve().parents[2] / "lightclient" / "emulator"
    allowed = _stdlib_names() | {"__future__"}
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"
