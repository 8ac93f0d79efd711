"""The hub's per-identity MQTT namespace: which topics a device may use, and property-bag encoding.

Pure functions only.  ``classify_publish()`` turns a device's PUBLISH topic into a typed record (or
:class:`Forbidden`), ``refuse_subscription()`` says why a filter would be refused, and the property-bag
helpers decode telemetry bags and encode cloud-to-device bags exactly as IoT Hub does::

    devices/d1/messages/events/%24.ct=application%2Fjson&a=b          telemetry (device)
    devices/d1/modules/m1/messages/events/                            telemetry (module, empty bag)
    $iothub/twin/GET/?$rid=7                                          twin GET
    $iothub/twin/PATCH/properties/reported/?$rid=8                    reported patch
    $iothub/methods/res/200/?$rid=1                                   method response
    devices/d1/messages/devicebound/%24.mid=m1&%24.to=%2Fdevices%2Fd1%2Fmessages%2Fdevicebound&k=v

Each decoding problem is returned as a ``(rule, message)`` pair for the diagnostics log; the hub itself is
lenient about most of them, so they never stop the message unless the caller decides so.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union
from urllib.parse import quote, unquote

Problem = Tuple[str, str]

#: System property keys IoT Hub understands in a telemetry bag (protocol notes §2.1).
TELEMETRY_SYSTEM_PROPERTIES = frozenset({
    "$.mid", "$.cid", "$.uid", "$.ct", "$.ce", "$.exp", "$.ctime", "$.on", "$.ifid", "$.sub",
    "$.diagid", "$.diagctx", "$.schema",
})

TWIN_RESPONSE_FILTER = "$iothub/twin/res/#"
DESIRED_FILTER = "$iothub/twin/PATCH/properties/desired/#"
METHODS_FILTER = "$iothub/methods/POST/#"
CREDENTIALS_FILTER = "$iothub/credentials/res/#"

#: RFC 2396 "unreserved" (reference §2.1: bags are RFC 2396 encoded) plus '%' escapes: sent as they are,
#: these read the same at the hub, so ``! ' ( ) *`` left raw by encodeURIComponent (Node SDK) are fine.
_UNRESERVED_OR_ESCAPE = re.compile(r"[^A-Za-z0-9\-._~!*'()%]")
#: Named in every encoding diagnostic, so the reader can check the rule.
ENCODING_REFERENCE = "reference §2.1: RFC 2396 percent-encoding, as in an HTTPS query string"
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_METHOD_RESPONSE = re.compile(r"^\$iothub/methods/res/([^/]*)/$")


def split_identity(identity: str) -> Tuple[str, Optional[str]]:
    device_id, _, module_id = identity.partition("/")
    return device_id, module_id or None


def events_prefix(device_id: str, module_id: Optional[str]) -> str:
    if module_id:
        return f"devices/{device_id}/modules/{module_id}/messages/events"
    return f"devices/{device_id}/messages/events"


def c2d_filter(device_id: str) -> str:
    return f"devices/{device_id}/messages/devicebound/#"


def documented_filters(device_id: str, module_id: Optional[str]) -> Tuple[str, ...]:
    """The subscription filters IoT Hub documents for this identity (all granted at QoS ≤ 1)."""
    common = (TWIN_RESPONSE_FILTER, DESIRED_FILTER, METHODS_FILTER)
    if module_id:
        return (f"devices/{device_id}/modules/{module_id}/#",
                f"devices/{device_id}/modules/{module_id}/inputs/#") + common
    return (c2d_filter(device_id),) + common


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT filter matching (``+`` one level, trailing ``#`` any number of levels, including none)."""
    f_levels, t_levels = topic_filter.split("/"), topic.split("/")
    for index, level in enumerate(f_levels):
        if level == "#":
            return True
        if index >= len(t_levels) or (level != "+" and level != t_levels[index]):
            return False
    return len(f_levels) == len(t_levels)


def refuse_subscription(topic_filter: str, device_id: str, module_id: Optional[str],
                        credentials: bool = False) -> Optional[str]:
    """None if the hub grants ``topic_filter`` to this identity, else the reason it is refused."""
    if topic_filter in documented_filters(device_id, module_id):
        return None
    if topic_filter == CREDENTIALS_FILTER:
        return None if credentials else ("certificate renewal ($iothub/credentials) is a hub preview this hub "
                                         "does not offer (the emulator runs with the credentials API off)")
    match = re.match(r"^devices/([^/]+)/", topic_filter)
    if match and match.group(1) != device_id:
        return f"filter is in device {match.group(1)!r}'s namespace, not {device_id!r}'s"
    if "+" in topic_filter:
        return "the hub accepts only its documented filters; '+' wildcards are not supported"
    return ("not a documented IoT Hub filter; this identity may subscribe to: "
            + ", ".join(documented_filters(device_id, module_id)))


# --------------------------------------------------------------------------- publish classification


@dataclass(frozen=True)
class Telemetry:
    bag: str
    """The raw (still percent-encoded) property bag, without the trailing ``/``."""


@dataclass(frozen=True)
class TwinGet:
    query: Dict[str, Optional[str]]
    raw_rid: Optional[str]


@dataclass(frozen=True)
class TwinReported:
    query: Dict[str, Optional[str]]
    raw_rid: Optional[str]


@dataclass(frozen=True)
class MethodResponse:
    status: str
    query: Dict[str, Optional[str]]
    raw_rid: Optional[str]


@dataclass(frozen=True)
class CredentialsRequest:
    query: Dict[str, Optional[str]]
    raw_rid: Optional[str]


@dataclass(frozen=True)
class Forbidden:
    reason: str


PublishKind = Union[Telemetry, TwinGet, TwinReported, MethodResponse, CredentialsRequest, Forbidden]


def classify_publish(topic: str, device_id: str, module_id: Optional[str]) -> PublishKind:
    """Say what a device's PUBLISH topic means, or why this identity may not publish there."""
    prefix = events_prefix(device_id, module_id)
    if topic == prefix or topic.startswith(prefix + "/"):
        bag = topic[len(prefix) + 1:]
        # The C# SDK appends '/' after the bag; the hub ignores one trailing slash.
        return Telemetry(bag[:-1] if bag.endswith("/") else bag)
    if topic.startswith("$iothub/"):
        path, has_query, query = topic.partition("?")
        raw_rid = _raw_query_value(query, "$rid") if has_query else None
        parsed = parse_query(query) if has_query else {}
        if path == "$iothub/twin/GET/":
            return TwinGet(parsed, raw_rid)
        if path == "$iothub/twin/PATCH/properties/reported/":
            return TwinReported(parsed, raw_rid)
        if path == "$iothub/credentials/POST/issueCertificate/" and module_id is None:
            return CredentialsRequest(parsed, raw_rid)
        match = _METHOD_RESPONSE.match(path)
        if match:
            return MethodResponse(unquote(match.group(1)), parsed, raw_rid)
        return Forbidden(f"{path!r} is not a topic devices may publish to")
    match = re.match(r"^devices/([^/]+)/(?:modules/([^/]+)/)?messages/events(?:/|$)", topic)
    if match:
        owner = match.group(1) + (f"/{match.group(2)}" if match.group(2) else "")
        me = device_id + (f"/{module_id}" if module_id else "")
        return Forbidden(f"telemetry topic of identity {owner!r}, but this connection is {me!r}; use "
                         f"{prefix + '/'!r}")
    return Forbidden(f"not a topic IoT Hub accepts from devices; telemetry goes to {prefix + '/'!r}")


def _raw_query_value(query: str, key: str) -> Optional[str]:
    for item in query.split("&"):
        k, sep, v = item.partition("=")
        if unquote(k) == key:
            return v if sep else ""
    return None


def parse_query(query: str) -> Dict[str, Optional[str]]:
    """Decode ``k=v&k2=v2`` the way the hub does: ``%XX`` decoded, ``+`` literal, no ``=`` -> None."""
    values: Dict[str, Optional[str]] = {}
    for item in query.split("&") if query else []:
        key, sep, value = item.partition("=")
        values[unquote(key)] = unquote(value) if sep else None
    return values


# --------------------------------------------------------------------------- property bags


@dataclass(frozen=True)
class PropertyBag:
    system: Dict[str, Optional[str]]
    """System properties keyed as on the wire after decoding, e.g. ``{"$.ct": "application/json"}``."""
    application: Dict[str, Optional[str]]
    """Application properties; a value of None means the key was sent without ``=`` (null)."""
    problems: Tuple[Problem, ...] = ()


def decode_property_bag(bag: str, system_keys: frozenset = TELEMETRY_SYSTEM_PROPERTIES) -> PropertyBag:
    """Decode a property bag as IoT Hub does and list every deviation from how SDKs encode it.

    ``%XX`` is decoded in keys and values, ``+`` stays a literal plus, ``k`` (no ``=``) is null and
    ``k=`` is the empty string.
    """
    system: Dict[str, Optional[str]] = {}
    application: Dict[str, Optional[str]] = {}
    problems: List[Problem] = []
    if not bag:
        return PropertyBag(system, application)
    for item in bag.split("&"):
        if not item:
            problems.append(("telemetry.property-bag", f"empty pair (a stray '&') in bag {bag!r}"))
            continue
        raw_key, sep, raw_value = item.partition("=")
        for raw in (raw_key, raw_value):
            if _BAD_ESCAPE.search(raw):
                problems.append(("telemetry.property-encoding",
                                 f"invalid percent-escape in {raw!r}; the hub leaves it undecoded "
                                 f"({ENCODING_REFERENCE})"))
        if raw_key.startswith("$"):
            problems.append(("telemetry.property-encoding",
                             f"system property key {raw_key!r} sent unencoded; SDKs send "
                             f"{'%24' + raw_key[1:]!r} ('$' percent-encoded)"))
        for raw in (raw_key.lstrip("$"), raw_value):
            bad = sorted(set(_UNRESERVED_OR_ESCAPE.findall(raw)))
            if "+" in bad:
                problems.append(("telemetry.property-encoding",
                                 f"'+' in {raw!r} is a literal plus at the hub, not a space; "
                                 f"encode a space as %20 (never use quote_plus; {ENCODING_REFERENCE})"))
                bad.remove("+")
            if bad:
                problems.append(("telemetry.property-encoding",
                                 f"unencoded character(s) {''.join(bad)!r} in {raw!r}: reserved or excluded in "
                                 f"RFC 2396, so the hub may read them differently; percent-encode everything "
                                 f"except A-Z a-z 0-9 - _ . ! ~ * ' ( ) ({ENCODING_REFERENCE})"))
        key = unquote(raw_key)
        value = unquote(raw_value) if sep else None
        target = system if key.startswith("$.") else application
        if key.startswith("$.") and key not in system_keys:
            problems.append(("telemetry.system-property", f"unknown system property {key!r}; the hub "
                             f"understands {', '.join(sorted(system_keys))}"))
        if key in target:
            problems.append(("telemetry.property-bag", f"duplicate key {key!r}; the last value wins"))
        target[key] = value
    return PropertyBag(system, application, tuple(problems))


def encode_property_bag(pairs: Sequence[Tuple[str, Optional[str]]]) -> str:
    """Encode ``(key, value)`` pairs as the hub does: every character except ``A-Za-z0-9-._~`` as %XX,
    a None value as the bare key, an empty value as ``key=``."""
    parts = []
    for key, value in pairs:
        encoded = quote(key, safe="")
        parts.append(encoded if value is None else f"{encoded}={quote(value, safe='')}")
    return "&".join(parts)


def c2d_topic(device_id: str, pairs: Sequence[Tuple[str, Optional[str]]]) -> str:
    return f"devices/{device_id}/messages/devicebound/{encode_property_bag(pairs)}"
