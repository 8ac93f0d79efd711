"""The IoT Hub MQTT topics: formatters for what the device publishes, ``parse()`` for what it receives.

Pure: no I/O, no clock, no randomness. Exact wire strings, for device ``d1`` (module ``m1``)::

    subscribe   devices/d1/messages/devicebound/#                    c2d_filter()
                devices/d1/modules/m1/#                              input_filter()   (modules)
                $iothub/methods/POST/#                               METHODS_FILTER
                $iothub/twin/res/#                                   TWIN_RESPONSE_FILTER
                $iothub/twin/PATCH/properties/desired/#              DESIRED_PATCH_FILTER
    publish     devices/d1/messages/events/%24.mid=m%201&a=b          telemetry_topic()
                devices/d1/modules/m1/messages/events/%24.on=out1     telemetry_topic(output_name=…)
                $iothub/twin/GET/?$rid=1                             twin_get_topic()
                $iothub/twin/PATCH/properties/reported/?$rid=2       twin_patch_reported_topic()
                $iothub/methods/res/200/?$rid=3                      method_response_topic()
    receive     devices/d1/messages/devicebound/%24.mid=x&a=b        -> C2DMessage
                devices/d1/modules/m1/inputs/in1/%24.mid=x           -> InputMessage
                $iothub/methods/POST/reboot/?$rid=3                  -> MethodRequest
                $iothub/twin/res/204/?$rid=2&$version=7              -> TwinResponse
                $iothub/twin/PATCH/properties/desired/?$version=8    -> DesiredPatch

Property bags (``k=v&k2=v2``) are percent-encoded with an empty safe set: only ``A-Z a-z 0-9 _ . - ~``
stay as they are, ``$`` becomes ``%24``, a space ``%20`` and ``+`` ``%2B``. Never ``quote_plus``: the hub
reads ``+`` as a literal plus. Device and module ids are never encoded (the hub does not decode them).

Errors: bad arguments raise :class:`ConfigError`; a message the hub would refuse for its size raises
:class:`MessageTooLargeError`; a malformed topic in IoT Hub's namespace raises :class:`ProtocolError`.
"""
from __future__ import annotations

import datetime as _dt
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Dict, Iterable, List, Mapping, Optional, Tuple, Union
from urllib.parse import quote, unquote

from .exceptions import ConfigError, MessageTooLargeError, ProtocolError
from .identity import Identity

# --------------------------------------------------------------------------------------------------------
# Subscribe filters

TWIN_RESPONSE_FILTER = "$iothub/twin/res/#"
DESIRED_PATCH_FILTER = "$iothub/twin/PATCH/properties/desired/#"
METHODS_FILTER = "$iothub/methods/POST/#"


def c2d_filter(identity: Identity) -> str:
    """Cloud-to-device messages of a device: ``devices/{device_id}/messages/devicebound/#``."""
    if identity.module_id is not None:
        raise ConfigError(
            f"module {identity.client_id!r} cannot receive cloud-to-device messages; "
            "subscribe to input_filter(identity) for module input messages"
        )
    return f"devices/{identity.device_id}/messages/devicebound/#"


def input_filter(identity: Identity) -> str:
    """Input messages of a module: ``devices/{device_id}/modules/{module_id}/#``."""
    if identity.module_id is None:
        raise ConfigError(
            f"device {identity.device_id!r} has no module id, so it has no inputs; "
            "subscribe to c2d_filter(identity) for cloud-to-device messages"
        )
    return f"devices/{identity.device_id}/modules/{identity.module_id}/#"


# --------------------------------------------------------------------------------------------------------
# Property bags

#: A property value: ``None`` is a property without a value (``key`` on the wire), ``""`` an empty one (``key=``).
PropertyValue = Optional[str]
Properties = Union[Mapping[str, PropertyValue], Iterable[Tuple[str, PropertyValue]]]

_BAD_ESCAPE_RE = re.compile(r"%(?![0-9A-Fa-f]{2})")


def _encode(text: str, what: str) -> str:
    try:
        return quote(text, safe="", encoding="utf-8", errors="strict")
    except UnicodeEncodeError:
        raise ConfigError(f"{what} {text!r} is not valid Unicode text (it holds a lone surrogate)") from None


def _decode(text: str, what: str) -> str:
    bad = _BAD_ESCAPE_RE.search(text)
    if bad:
        raise ProtocolError(f"{what} {text!r} has a '%' at offset {bad.start()} that starts no %XX escape")
    try:
        return unquote(text, encoding="utf-8", errors="strict")
    except UnicodeDecodeError:
        raise ProtocolError(f"{what} {text!r} percent-decodes to bytes that are not UTF-8") from None


def _pairs(properties: Optional[Properties]) -> List[Tuple[str, PropertyValue]]:
    """Properties as a list of pairs, checked for types and duplicate keys."""
    if properties is None:
        return []
    if isinstance(properties, (str, bytes)):
        raise ConfigError("properties must be a mapping or (key, value) pairs, not a string")
    try:
        items = list(properties.items() if isinstance(properties, Mapping) else properties)
    except TypeError:
        raise ConfigError(
            f"properties must be a mapping or (key, value) pairs, not {type(properties).__name__}"
        ) from None
    pairs: List[Tuple[str, PropertyValue]] = []
    seen = set()
    for item in items:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ConfigError(f"property {item!r} is not a (key, value) pair")
        key, value = item
        if not isinstance(key, str) or not key:
            raise ConfigError(f"property key {key!r} must be a non-empty str")
        if value is not None and not isinstance(value, str):
            raise ConfigError(
                f"property {key!r} has a {type(value).__name__} value; values must be str (or None), "
                f"e.g. str({value!r})"
            )
        if key in seen:
            raise ConfigError(f"property {key!r} is given twice; IoT Hub keeps one value per key")
        seen.add(key)
        pairs.append((key, value))
    return pairs


def encode_property_bag(properties: Optional[Properties]) -> str:
    """Encode properties as the hub expects them in a topic, in the order given.

    ``{"a": "b c", "$.mid": "1", "flag": None, "empty": ""}`` -> ``a=b%20c&%24.mid=1&flag&empty=``.
    Duplicate keys raise :class:`ConfigError`.
    """
    parts = []
    for key, value in _pairs(properties):
        enc_key = _encode(key, "property key")
        parts.append(enc_key if value is None else f"{enc_key}={_encode(value, f'value of property {key!r}')}")
    return "&".join(parts)


def decode_property_bag(bag: str) -> Dict[str, PropertyValue]:
    """Decode a received property bag into a dict, in wire order.

    ``a=b%20c&%24.mid=1&flag&empty=&p=1+1`` -> ``{"a": "b c", "$.mid": "1", "flag": None, "empty": "",
    "p": "1+1"}``: a key without ``=`` has the value ``None``, ``key=`` the empty string, and ``+`` is a
    literal plus. A repeated key, an empty key or a broken ``%`` escape raises :class:`ProtocolError`.
    """
    result: Dict[str, PropertyValue] = {}
    for part in bag.split("&"):
        if not part:
            continue  # "a=1&&b=2" or a trailing "&": nothing to lose by skipping it
        raw_key, sep, raw_value = part.partition("=")
        key = _decode(raw_key, "property key")
        if not key:
            raise ProtocolError(f"property {part!r} in {bag!r} has an empty key")
        if key in result:
            raise ProtocolError(f"property {key!r} appears twice in {bag!r}")
        result[key] = _decode(raw_value, f"value of property {key!r}") if sep else None
    return result


# --------------------------------------------------------------------------------------------------------
# Telemetry

#: The most IoT Hub accepts for one device-to-cloud message, counted by :func:`message_size`.
MAX_MESSAGE_SIZE = 262144
#: MQTT encodes a topic's length in two bytes.
MAX_TOPIC_LENGTH = 65535

# Wire names of the system properties, in the order they go on the wire (the Python SDK's order, with
# the creation time and component name, which it does not send, appended).
_SYSTEM_PROPERTY_NAMES = (
    ("output_name", "$.on"),
    ("message_id", "$.mid"),
    ("correlation_id", "$.cid"),
    ("user_id", "$.uid"),
    ("content_type", "$.ct"),
    ("content_encoding", "$.ce"),
    ("absolute_expiry", "$.exp"),
    ("creation_time", "$.ctime"),
    ("component", "$.sub"),
)
_TIMES = ("absolute_expiry", "creation_time")

TimeValue = Union[str, _dt.datetime]


def _format_time(name: str, value: _dt.datetime) -> str:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ConfigError(
            f"{name} {value!r} has no time zone, so the hub would guess; "
            "pass an aware datetime such as datetime.now(timezone.utc)"
        )
    utc = value.astimezone(_dt.timezone.utc).replace(tzinfo=None)
    return utc.isoformat(timespec="milliseconds" if utc.microsecond else "seconds") + "Z"


def system_properties(
    *,
    message_id: Optional[str] = None,
    correlation_id: Optional[str] = None,
    user_id: Optional[str] = None,
    content_type: Optional[str] = None,
    content_encoding: Optional[str] = None,
    absolute_expiry: Optional[TimeValue] = None,
    creation_time: Optional[TimeValue] = None,
    component: Optional[str] = None,
    output_name: Optional[str] = None,
) -> Dict[str, str]:
    """The system properties of a telemetry message, by wire name, in wire order.

    ``system_properties(message_id="m1", content_type="application/json")`` ->
    ``{"$.mid": "m1", "$.ct": "application/json"}``. Times may be aware datetimes (sent as UTC ISO-8601,
    ``2021-04-21T11:30:16Z``) or strings sent as given. Arguments left at ``None`` are omitted.
    """
    given = dict(
        message_id=message_id, correlation_id=correlation_id, user_id=user_id, content_type=content_type,
        content_encoding=content_encoding, absolute_expiry=absolute_expiry, creation_time=creation_time,
        component=component, output_name=output_name,
    )
    result: Dict[str, str] = {}
    for name, wire_name in _SYSTEM_PROPERTY_NAMES:
        value = given[name]
        if value is None:
            continue
        if name in _TIMES and isinstance(value, _dt.datetime):
            value = _format_time(name, value)
        if not isinstance(value, str):
            expected = "a str or an aware datetime" if name in _TIMES else "a str"
            raise ConfigError(f"{name} must be {expected}, not {type(value).__name__}")
        if not value:
            raise ConfigError(f"{name} is an empty string; leave it as None to send no {wire_name}")
        result[wire_name] = value
    return result


def _utf8_len(text: Optional[str]) -> int:
    if text is None:
        return 0
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise ConfigError(f"{text!r} is not valid Unicode text (it holds a lone surrogate)") from None


def message_size(
    body: Union[bytes, bytearray, memoryview, str, None],
    properties: Optional[Properties] = None,
    system_properties: Optional[Mapping[str, str]] = None,
) -> int:
    """The size of a device-to-cloud message as IoT Hub counts it against :data:`MAX_MESSAGE_SIZE`.

    Body bytes + the UTF-8 bytes of every application property name and value + the UTF-8 bytes of every
    system property value (names not counted). A str body counts as its UTF-8 encoding. Sizes are of the
    decoded text, not of its percent-encoded form in the topic.
    """
    if body is None:
        size = 0
    elif isinstance(body, str):
        size = _utf8_len(body)
    elif isinstance(body, (bytes, bytearray, memoryview)):
        size = memoryview(body).nbytes
    else:
        raise ConfigError(f"body must be bytes or str, not {type(body).__name__}")
    for key, value in _pairs(properties):
        size += _utf8_len(key) + _utf8_len(value)
    for value in (system_properties or {}).values():
        size += _utf8_len(value)
    return size


def check_message_size(
    body: Union[bytes, bytearray, memoryview, str, None],
    properties: Optional[Properties] = None,
    system_properties: Optional[Mapping[str, str]] = None,
) -> int:
    """Return :func:`message_size`, or raise :class:`MessageTooLargeError` above :data:`MAX_MESSAGE_SIZE`."""
    size = message_size(body, properties, system_properties)
    if size > MAX_MESSAGE_SIZE:
        raise MessageTooLargeError(
            f"message is {size} bytes as IoT Hub counts it (body + property names and values); the limit is "
            f"{MAX_MESSAGE_SIZE}: shrink or split the body, or drop properties"
        )
    return size


def telemetry_topic(
    identity: Identity,
    properties: Optional[Properties] = None,
    *,
    message_id: Optional[str] = None,
    correlation_id: Optional[str] = None,
    user_id: Optional[str] = None,
    content_type: Optional[str] = None,
    content_encoding: Optional[str] = None,
    absolute_expiry: Optional[TimeValue] = None,
    creation_time: Optional[TimeValue] = None,
    component: Optional[str] = None,
    output_name: Optional[str] = None,
) -> str:
    """The topic to publish a device-to-cloud message on, with its property bag.

    System properties come first, then application ``properties`` in the order given::

        telemetry_topic(Identity(h, "d1"))
            -> devices/d1/messages/events/
        telemetry_topic(Identity(h, "d1"), {"a": "b"}, message_id="m 1", content_type="application/json")
            -> devices/d1/messages/events/%24.mid=m%201&%24.ct=application%2Fjson&a=b
        telemetry_topic(Identity(h, "d1", "m1"), output_name="out1")
            -> devices/d1/modules/m1/messages/events/%24.on=out1

    Application property keys must be non-empty, unique and must not start with ``$`` (the hub reads those
    as system properties); values must be str (``""`` is allowed). ``component`` (``$.sub``) names an
    IoT Plug and Play component; ``output_name`` (``$.on``) is for modules only. Raises
    :class:`ConfigError`, or :class:`MessageTooLargeError` if the topic would exceed 65535 bytes.
    Check the whole message with :func:`check_message_size`.
    """
    if not isinstance(identity, Identity):
        raise ConfigError(f"identity must be an Identity, not {type(identity).__name__}")
    if output_name is not None and identity.module_id is None:
        raise ConfigError(
            f"output_name is for modules, and {identity.device_id!r} is a device identity; "
            "drop output_name or give the Identity a module_id"
        )
    system = system_properties(
        message_id=message_id, correlation_id=correlation_id, user_id=user_id, content_type=content_type,
        content_encoding=content_encoding, absolute_expiry=absolute_expiry, creation_time=creation_time,
        component=component, output_name=output_name,
    )
    application = _pairs(properties)
    for key, value in application:
        if key.startswith("$"):
            raise ConfigError(
                f"property key {key!r} starts with '$', which IoT Hub reserves for system properties; "
                "use the keyword arguments (message_id=…, content_type=…) or rename the property"
            )
        if value is None:
            # A bare key's meaning on the device-to-cloud path is undocumented; do not guess.
            raise ConfigError(f"property {key!r} has no value; send '' for an empty value")
    if identity.module_id is None:
        base = f"devices/{identity.device_id}/messages/events/"
    else:
        base = f"devices/{identity.device_id}/modules/{identity.module_id}/messages/events/"
    topic = base + encode_property_bag(list(system.items()) + application)
    if len(topic) > MAX_TOPIC_LENGTH:  # the topic is ASCII: ids are ASCII, the bag is percent-encoded
        raise MessageTooLargeError(
            f"the properties make the topic {len(topic)} bytes long; MQTT allows at most {MAX_TOPIC_LENGTH}: "
            "move data from properties into the body"
        )
    return topic


# --------------------------------------------------------------------------------------------------------
# Requests: twin and method responses

RequestId = Union[str, int]


def _rid(rid: RequestId) -> str:
    if isinstance(rid, bool) or not isinstance(rid, (str, int)):
        raise ConfigError(f"rid must be a str or int, not {type(rid).__name__}")
    text = str(rid)
    if not text:
        raise ConfigError("rid is empty; the hub echoes $rid so the answer can be matched to the request")
    return _encode(text, "rid")


def twin_get_topic(rid: RequestId) -> str:
    """Request the whole twin (publish an empty body): ``$iothub/twin/GET/?$rid={rid}``."""
    return f"$iothub/twin/GET/?$rid={_rid(rid)}"


def twin_patch_reported_topic(rid: RequestId) -> str:
    """Patch reported properties (publish the JSON patch): ``$iothub/twin/PATCH/properties/reported/?$rid={rid}``."""
    return f"$iothub/twin/PATCH/properties/reported/?$rid={_rid(rid)}"


def method_response_topic(status: int, rid: RequestId) -> str:
    """Answer a direct method (publish JSON or nothing): ``$iothub/methods/res/{status}/?$rid={rid}``.

    ``rid`` must be the ``rid`` of the :class:`MethodRequest` being answered.
    """
    if isinstance(status, bool) or not isinstance(status, int) or status < 0:
        raise ConfigError(f"status must be a non-negative int such as 200, not {status!r}")
    return f"$iothub/methods/res/{status}/?$rid={_rid(rid)}"


# --------------------------------------------------------------------------------------------------------
# Received topics


class _MessageProperties:
    """Read-only accessors for the system properties of a received message."""

    system_properties: Mapping[str, PropertyValue]

    @property
    def message_id(self) -> PropertyValue:
        return self.system_properties.get("$.mid")

    @property
    def correlation_id(self) -> PropertyValue:
        return self.system_properties.get("$.cid")

    @property
    def user_id(self) -> PropertyValue:
        return self.system_properties.get("$.uid")

    @property
    def content_type(self) -> PropertyValue:
        return self.system_properties.get("$.ct")

    @property
    def content_encoding(self) -> PropertyValue:
        return self.system_properties.get("$.ce")

    @property
    def absolute_expiry(self) -> PropertyValue:
        """``$.exp`` as sent by the hub (ISO-8601 text, e.g. ``3237-07-19T23:06:40.0000000Z``)."""
        return self.system_properties.get("$.exp")


def _split_properties(bag: str) -> Tuple[Mapping[str, PropertyValue], Mapping[str, PropertyValue]]:
    """Application and system properties of a received bag. System ones are ``$.*`` and ``iothub-ack``."""
    app: Dict[str, PropertyValue] = {}
    system: Dict[str, PropertyValue] = {}
    for key, value in decode_property_bag(bag).items():
        (system if key.startswith("$.") or key == "iothub-ack" else app)[key] = value
    return MappingProxyType(app), MappingProxyType(system)


@dataclass(frozen=True)
class C2DMessage(_MessageProperties):
    """A cloud-to-device message: ``devices/{device_id}/messages/devicebound/{bag}``.

    ``system_properties`` keeps wire names (``$.mid``, ``$.to``, ``iothub-ack``…); ``message_id`` and the
    other accessors read them.
    """

    properties: Mapping[str, PropertyValue] = field(hash=False)
    system_properties: Mapping[str, PropertyValue] = field(hash=False)


@dataclass(frozen=True)
class InputMessage(_MessageProperties):
    """A module input message: ``devices/{device_id}/modules/{module_id}/inputs/{input_name}/{bag}``."""

    input_name: str
    properties: Mapping[str, PropertyValue] = field(hash=False)
    system_properties: Mapping[str, PropertyValue] = field(hash=False)


@dataclass(frozen=True)
class MethodRequest:
    """A direct method call: ``$iothub/methods/POST/{name}/?$rid={rid}``; answer with method_response_topic()."""

    name: str
    rid: str


@dataclass(frozen=True)
class TwinResponse:
    """The answer to a twin request: ``$iothub/twin/res/{status}/?$rid={rid}[&$version={version}]``.

    ``version`` is the new reported-properties version after a reported patch (status 204), else ``None``.
    """

    status: int
    rid: str
    version: Optional[int] = None


@dataclass(frozen=True)
class DesiredPatch:
    """A desired-properties patch: ``$iothub/twin/PATCH/properties/desired/?$version={version}``."""

    version: int


Record = Union[C2DMessage, InputMessage, MethodRequest, TwinResponse, DesiredPatch]

# Bounded so a hostile topic cannot make int() slow or hit Python's int/str conversion limit.
_STATUS_RE = re.compile(r"[0-9]{1,9}")
_VERSION_RE = re.compile(r"[0-9]{1,19}")


def _query(topic: str, path: str, prefix_len: int) -> Tuple[str, Dict[str, PropertyValue]]:
    """Split ``{prefix}{segment}/?{query}``: return the segment and the decoded query."""
    rest = topic[prefix_len:]
    segment, sep, query = rest.partition("/?")
    if not sep or "/" in segment:
        raise ProtocolError(f"{topic!r} is not of the form {path}")
    return segment, decode_property_bag(query)


def _required(topic: str, query: Dict[str, PropertyValue], key: str) -> str:
    value = query.get(key)
    if not value:
        raise ProtocolError(f"{topic!r} has no {key} value")
    return value


def _int(topic: str, what: str, text: str, pattern: "re.Pattern[str]") -> int:
    if not pattern.fullmatch(text):
        raise ProtocolError(f"{what} {text!r} in {topic!r} is not a decimal integer")
    return int(text)


def _parse_twin_response(topic: str) -> TwinResponse:
    status, query = _query(topic, "$iothub/twin/res/{status}/?$rid={rid}", len("$iothub/twin/res/"))
    rid = _required(topic, query, "$rid")
    version = query.get("$version")
    return TwinResponse(
        status=_int(topic, "status", status, _STATUS_RE),
        rid=rid,
        version=None if version is None else _int(topic, "$version", version, _VERSION_RE),
    )


def _parse_desired_patch(topic: str) -> DesiredPatch:
    prefix = "$iothub/twin/PATCH/properties/desired/?"
    if not topic.startswith(prefix):
        raise ProtocolError(f"{topic!r} is not of the form $iothub/twin/PATCH/properties/desired/?$version={{v}}")
    version = _required(topic, decode_property_bag(topic[len(prefix):]), "$version")
    return DesiredPatch(version=_int(topic, "$version", version, _VERSION_RE))


def _parse_method(topic: str) -> MethodRequest:
    raw_name, query = _query(topic, "$iothub/methods/POST/{name}/?$rid={rid}", len("$iothub/methods/POST/"))
    name = _decode(raw_name, "method name")
    if not name:
        raise ProtocolError(f"{topic!r} has an empty method name")
    return MethodRequest(name=name, rid=_required(topic, query, "$rid"))


def _parse_message(topic: str, segments: List[str], identity: Optional[Identity]) -> Optional[Record]:
    device_id = segments[1]
    if not device_id:
        raise ProtocolError(f"{topic!r} has an empty device id")
    if segments[2] == "messages":  # devices/{d}/messages/devicebound/{bag}
        if identity is not None and (identity.module_id is not None or identity.device_id != device_id):
            return None
        head = f"devices/{device_id}/messages/devicebound/"
        if not topic.startswith(head):
            raise ProtocolError(
                f"{topic!r} is not of the form devices/{{device_id}}/messages/devicebound/{{properties}}"
            )
        app, system = _split_properties(topic[len(head):])
        return C2DMessage(properties=app, system_properties=system)
    # devices/{d}/modules/{m}/inputs/{name}/{bag}
    module_id = segments[3]
    if identity is not None and (identity.device_id != device_id or identity.module_id != module_id):
        return None
    if len(segments) < 7 or not module_id or not segments[5]:
        raise ProtocolError(
            f"{topic!r} is not of the form devices/{{device_id}}/modules/{{module_id}}/inputs/{{input}}/{{properties}}"
        )
    head = "/".join(segments[:6]) + "/"
    app, system = _split_properties(topic[len(head):])
    return InputMessage(input_name=_decode(segments[5], "input name"), properties=app, system_properties=system)


def parse(topic: str, identity: Optional[Identity] = None) -> Optional[Record]:
    """Classify a received topic.

    Returns a :class:`C2DMessage`, :class:`InputMessage`, :class:`MethodRequest`, :class:`TwinResponse` or
    :class:`DesiredPatch`; ``None`` for a topic this module does not handle (not IoT Hub's, one the device
    itself publishes, or, given ``identity``, a message for another device or module). A malformed topic of
    one of those five kinds raises :class:`ProtocolError`, e.g. ``$iothub/twin/res/200`` (no ``?$rid=``),
    ``$iothub/twin/res/abc/?$rid=1`` or ``$iothub/methods/POST/reboot/?x=1``.
    """
    if not isinstance(topic, str):
        raise ConfigError(f"topic must be a str, not {type(topic).__name__}")
    # Only the leading segments classify a topic; property values may hold raw '/' characters.
    segments = topic.split("/", 6)
    head = segments[:5]
    if head[:3] == ["$iothub", "twin", "res"]:
        return _parse_twin_response(topic)
    if head == ["$iothub", "twin", "PATCH", "properties", "desired"]:
        return _parse_desired_patch(topic)
    if head[:3] == ["$iothub", "methods", "POST"]:
        return _parse_method(topic)
    if len(segments) >= 4 and segments[0] == "devices" and segments[2:4] == ["messages", "devicebound"]:
        return _parse_message(topic, segments, identity)
    if len(segments) >= 5 and segments[0] == "devices" and segments[2] == "modules" and segments[4] == "inputs":
        return _parse_message(topic, segments, identity)
    return None


# --------------------------------------------------------------------------------------------------------
# Certificate renewal over the hub (preview): $iothub/credentials (protocol reference section 7.3)

CREDENTIALS_RESPONSE_FILTER = "$iothub/credentials/res/#"
#: The CONNECT api-version every SDK with the credentials API sends (whether older ones work is UNCERTAIN).
CREDENTIALS_API_VERSION = "2025-08-01-preview"
_CREDENTIALS_RESPONSE = "$iothub/credentials/res/"
# The hub's rule for `replace` (an earlier rid): 4-36 alphanumerics and '-', no leading or trailing '-'.
_REPLACE_RID_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{2,34})[A-Za-z0-9]")


def credentials_request_topic(rid: RequestId) -> str:
    """Ask the hub to issue a certificate (publish :func:`credentials_request_body`, QoS 1):
    ``$iothub/credentials/POST/issueCertificate/?$rid={rid}``. Subscribe to
    :data:`CREDENTIALS_RESPONSE_FILTER` and wait for its SUBACK first: the hub does not answer a request
    published before the subscription is active."""
    return f"$iothub/credentials/POST/issueCertificate/?$rid={_rid(rid)}"


def credentials_request_body(device_id: str, csr_der: bytes, replace: Optional[str] = None) -> bytes:
    """``{"id": device_id, "csr": base64(DER PKCS#10)[, "replace": …]}``; the hub refuses any other key.

    ``replace`` is ``"*"`` (cancel whatever request is pending) or the rid of an earlier request.
    """
    import base64
    import json

    if not isinstance(device_id, str) or not device_id:
        raise ConfigError(f"device_id must be a non-empty str, not {device_id!r}")
    if not isinstance(csr_der, (bytes, bytearray)) or not csr_der or csr_der[0] != 0x30:
        raise ConfigError("csr_der must be a DER PKCS#10 request (bytes starting with 0x30), e.g. from "
                          "lightclient.keys.sign_csr()")
    body: Dict[str, str] = {"id": device_id, "csr": base64.b64encode(bytes(csr_der)).decode()}
    if replace is not None:
        if replace != "*" and not (isinstance(replace, str) and _REPLACE_RID_RE.fullmatch(replace)):
            raise ConfigError(f"replace must be '*' or an earlier request's rid (4 to 36 letters, digits and "
                              f"'-', not starting or ending with '-'), not {replace!r}")
        body["replace"] = replace
    return json.dumps(body, separators=(",", ":")).encode()


@dataclass(frozen=True)
class CredentialsResponse:
    """``$iothub/credentials/res/{status}/?$rid={rid}``: 202 accepted, 200 issued, else an error."""

    status: int
    rid: str


def parse_credentials_response(topic: str) -> Optional[CredentialsResponse]:
    """The status and ``$rid`` of a credentials answer; ``None`` for any other topic.

    Both readings of the sources are accepted (UNCERTAIN, section 7.3): the ``?$rid={rid}`` query every
    parser reads (other query keys ignored), and the shorthand ``res/{status}/{rid}`` of one document's
    tables. A malformed credentials topic raises :class:`ProtocolError`.
    """
    if not isinstance(topic, str):
        raise ConfigError(f"topic must be a str, not {type(topic).__name__}")
    if not topic.startswith(_CREDENTIALS_RESPONSE):
        return None
    rest = topic[len(_CREDENTIALS_RESPONSE):]
    status, sep, tail = rest.partition("/")
    if not sep:
        raise ProtocolError(f"{topic!r} is not of the form $iothub/credentials/res/{{status}}/?$rid={{rid}}")
    if tail.startswith("?"):
        rid = _required(topic, decode_property_bag(tail[1:]), "$rid")
    elif tail and "/" not in tail and "?" not in tail:
        rid = _decode(tail, "rid")
    else:
        raise ProtocolError(f"{topic!r} is not of the form $iothub/credentials/res/{{status}}/?$rid={{rid}}")
    return CredentialsResponse(status=_int(topic, "status", status, _STATUS_RE), rid=rid)


@dataclass(frozen=True)
class CredentialsAnswer:
    """The body of a credentials answer, decoded.

    ``certificates`` (DER, leaf first) on 200; ``operation_expires`` (ISO time) on 202; on an error,
    ``error_code``, ``message`` and ``retry_after`` (seconds, the body's top-level ``retryAfter``).
    """

    status: int
    correlation_id: Optional[str] = None
    operation_expires: Optional[str] = None
    certificates: Tuple[bytes, ...] = ()
    error_code: Optional[int] = None
    message: Optional[str] = None
    retry_after: Optional[float] = None

    @property
    def accepted(self) -> bool:
        return self.status == 202

    @property
    def issued(self) -> bool:
        return self.status == 200

    @property
    def retryable(self) -> bool:
        """429 and 5xx are worth retrying (after ``retry_after``); other 4xx need a different request."""
        return self.status == 429 or self.status >= 500


def parse_credentials_body(status: int, payload: bytes) -> CredentialsAnswer:
    """Decode the JSON body of a credentials answer with ``status``; :class:`ProtocolError` if malformed."""
    import base64
    import json

    try:
        data = json.loads(payload) if payload.strip() else {}
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError(f"the hub answered the certificate request ({status}) with a body that is not "
                            "JSON") from None
    if not isinstance(data, dict):
        raise ProtocolError(f"the hub answered the certificate request ({status}) with JSON that is not "
                            "an object")

    def text(key: str) -> Optional[str]:
        value = data.get(key)
        return value if isinstance(value, str) else None

    if status == 200:
        chain = data.get("certificates")
        if not isinstance(chain, list) or not chain or not all(isinstance(c, str) for c in chain):
            raise ProtocolError("the hub's 200 answer has no 'certificates' list of base64 strings")
        try:
            ders = tuple(base64.b64decode(c, validate=True) for c in chain)
        except ValueError:
            raise ProtocolError("the hub sent a certificate that is not base64 DER") from None
        return CredentialsAnswer(200, text("correlationId"), certificates=ders)
    if status == 202:
        return CredentialsAnswer(202, text("correlationId"), text("operationExpires"))
    code = data.get("errorCode")
    try:
        code = int(code) if code is not None and not isinstance(code, bool) else None
    except (TypeError, ValueError):
        code = None
    retry = data.get("retryAfter")
    retry_after = (float(retry) if isinstance(retry, (int, float)) and not isinstance(retry, bool)
                   and 0 <= retry < 86400 else None)
    info = data.get("info") if isinstance(data.get("info"), dict) else {}
    correlation = info.get("correlationId") if isinstance(info.get("correlationId"), str) else None
    return CredentialsAnswer(status, correlation, text("operationExpires"), error_code=code,
                             message=text("message"), retry_after=retry_after)


__all__ = [
    "C2DMessage", "DesiredPatch", "InputMessage", "MethodRequest", "TwinResponse", "Record",
    "TWIN_RESPONSE_FILTER", "DESIRED_PATCH_FILTER", "METHODS_FILTER", "MAX_MESSAGE_SIZE", "MAX_TOPIC_LENGTH",
    "c2d_filter", "input_filter", "encode_property_bag", "decode_property_bag", "system_properties",
    "message_size", "check_message_size", "telemetry_topic", "twin_get_topic", "twin_patch_reported_topic",
    "method_response_topic", "parse", "CREDENTIALS_RESPONSE_FILTER", "CREDENTIALS_API_VERSION", "CredentialsResponse",
    "CredentialsAnswer", "credentials_request_topic", "credentials_request_body", "parse_credentials_response",
    "parse_credentials_body",
]
