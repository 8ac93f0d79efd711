"""SAS token verification for the emulated hub (MQTT CONNECT password) and DPS (HTTP Authorization).

Stdlib only. The rules (protocol notes §9), with the emulator's choices where the sources differ:

* ``SharedAccessSignature sr=…&sig=…&se=…[&skn=…]``; fields in any order (the docs show several).
* The signature must be base64(HMAC-SHA256(base64-decode(key), sr + "\\n" + se)) over the ``sr`` text
  exactly as sent (what the SDKs sign), with either upper- or lower-case percent escapes. The docs'
  other reading, a lower-cased ``sr``, is accepted too (UNCERTAIN which the hub requires).
* The decoded ``sr`` must be the identity's resource: ``{hub}/devices/{id}[/modules/{id}]`` or, for DPS,
  ``{idScope}/registrations/{registrationId}`` with ``skn=registration``; host and scope compare
  case-insensitively, ids exactly (unless the whole ``sr`` was lower-cased, the docs' reading).
* ``se`` in the past: refused. A device key token carries no ``skn`` (a policy token is for services).
  A DPS token may carry ``skn=registration`` (docs, C SDK) or no ``skn`` at all: the official Python SDK
  (azure-iot-device 2.14, ``RenewableSasToken`` without ``key_name``) sends none and provisions against
  DPS, so DPS accepts both; any other ``skn`` is refused.
* The primary or the secondary key may sign.

:func:`check` returns ``(rule, message)`` for a refusal or ``None``; messages never contain the token.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from typing import Dict, Optional, Sequence, Tuple
from urllib.parse import unquote

PREFIX = "SharedAccessSignature "
Problem = Tuple[str, str]


def parse(text) -> Tuple[Optional[Dict[str, str]], Optional[str]]:
    """(fields, None) or (None, why it is not a SAS token). ``text`` may be the raw MQTT password bytes."""
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError:
            return None, "the MQTT password is not UTF-8 text, so it is no SAS token"
    if not text:
        return None, "no SAS token (the MQTT password or Authorization header is empty)"
    if not text.startswith(PREFIX):
        return None, "the token must start with 'SharedAccessSignature '"
    fields: Dict[str, str] = {}
    for part in text[len(PREFIX):].split("&"):
        name, sep, value = part.partition("=")
        if not sep or name in fields:
            return None, f"malformed or repeated field {name[:20]!r} in the SAS token"
        fields[name] = value
    missing = [f for f in ("sr", "sig", "se") if not fields.get(f)]
    if missing:
        return None, f"the SAS token lacks {', '.join(missing)}"
    return fields, None


def _signs(key_b64: str, sr: str, se: str, sig: bytes) -> bool:
    try:
        key = base64.b64decode(key_b64, validate=True)
    except (binascii.Error, ValueError):
        return False
    for text in (sr, sr.lower()):
        mac = hmac.new(key, f"{text}\n{se}".encode("utf-8"), hashlib.sha256).digest()
        if hmac.compare_digest(mac, sig):
            return True
    return False


def check(text, keys: Sequence[str], resource: str, *, policy: Optional[str] = None,
          now: Optional[float] = None, rule: str = "connect.sas") -> Tuple[Optional[Problem], Optional[int]]:
    """Verify ``text`` for ``resource`` with any of ``keys``: (refusal or None, expiry or None)."""
    fields, why = parse(text)
    if fields is None:
        return (rule, why), None
    try:
        expiry = int(fields["se"])
    except ValueError:
        return (rule, f"se must be a Unix time in seconds, got {fields['se'][:20]!r}"), None
    now = time.time() if now is None else now
    if expiry <= now:
        return (f"{rule}-expired", f"the SAS token expired {int(now - expiry)} s ago (se={expiry}); sign a new "
                "one (and check the device clock)"), expiry
    skn = unquote(fields.get("skn", ""))
    if skn != (policy or "") and (skn or policy is None):   # DPS: skn=registration or none (docstring)
        want = f"skn={policy} or no skn" if policy else "no skn (device keys have no policy name)"
        return (rule, f"the token has skn={skn!r}; expected {want}"), expiry
    sr = unquote(fields["sr"])
    host, _, rest = resource.partition("/")
    got_host, _, got_rest = sr.partition("/")
    lowered = sr == sr.lower() and resource != resource.lower()
    if got_host.lower() != host.lower() or (got_rest != rest and not (lowered and got_rest == rest.lower())):
        return (f"{rule}-resource", f"the token is for {sr!r}; this identity's resource URI is {resource!r}"), expiry
    try:
        sig = base64.b64decode(unquote(fields["sig"]), validate=True)
    except (binascii.Error, ValueError):
        return (rule, "sig is not URL-encoded base64"), expiry
    if not any(_signs(k, fields["sr"], fields["se"], sig) for k in keys if k):
        return (f"{rule}-signature", "the signature matches neither the primary nor the secondary key "
                f"(string to sign: the sr text as sent + '\\n' + se, HMAC-SHA256 with the base64-decoded key)"), expiry
    return None, expiry


def derive_device_key(group_key: str, registration_id: str) -> str:
    """base64(HMAC-SHA256(base64-decode(group key), registration id)): a group enrollment's device key."""
    key = base64.b64decode(group_key)
    return base64.b64encode(hmac.new(key, registration_id.encode("utf-8"), hashlib.sha256).digest()).decode()


def watch(connection, expiry: int):
    """Close ``connection`` when its SAS token expires, as the hub does (docs, SAS page); a diagnostic says so."""
    import asyncio

    def expire() -> None:
        if not connection.closed:
            connection.diag("connect.sas-expired", "the SAS token expired while connected; the connection is "
                            "closed (renew the token before se and reconnect)")
            connection.abort()

    return asyncio.get_running_loop().call_later(max(0.0, expiry - time.time()), expire)
