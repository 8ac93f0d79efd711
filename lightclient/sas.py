"""Shared access signatures (SAS): the pure formulas. No I/O, no clock: callers pass ``now``.

Wire format (protocol notes §9; device ``d1`` on ``hub.azure-devices.net``, expiry 1700000000)::

    resource URI    hub.azure-devices.net/devices/d1          (module: …/devices/d1/modules/m1)
                    0ne00000001/registrations/reg-1           (DPS, with skn=registration)
    string to sign  hub.azure-devices.net%2Fdevices%2Fd1\\n1700000000
    signature       base64(HMAC-SHA256(key=base64-decode(device key), msg=string to sign))
    token           SharedAccessSignature sr=hub.azure-devices.net%2Fdevices%2Fd1&sig=<url-encoded signature>&se=1700000000
                    (+ &skn=registration for DPS)

Choices where the sources differ: the resource URI is percent-encoded with Python's ``quote(uri, safe="")``
(upper-case ``%2F``, as the Python SDK), ids keep their case (they are case-sensitive), and the signature
covers exactly the ``sr`` text that is sent. Fields go out in the SDKs' order ``sr, sig, se[, skn]``.

Group enrollments (DPS): the device key is ``base64(HMAC-SHA256(key=base64-decode(group key),
msg=UTF-8 registration id))`` (:func:`derive_device_key` here is the reference; lightclient computes it
inside the token, see :mod:`lightclient.symkey`).

A SAS token is a bearer secret: :class:`SasToken` and :class:`ConnectionString` never show it in ``repr``.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from dataclasses import dataclass, field
from typing import Optional
from urllib.parse import quote

from .exceptions import ConfigError

#: Default token lifetime (s): what the Python and C SDKs use.
DEFAULT_LIFETIME = 3600
#: Shortest lifetime accepted: renewal at 80 % must leave time to sign and reconnect.
MIN_LIFETIME = 10
#: Longest lifetime accepted (a year): a leaked token must not live for ever.
MAX_LIFETIME = 365 * 24 * 3600
#: Renew when this share of the lifetime is used (C SDK ``SAS_REFRESH_MULTIPLIER``, UNI ``renewal_percent``).
RENEW_FRACTION = 0.8
#: Key sizes IoT Hub and DPS accept (bytes, after base64 decoding).
MIN_KEY_BYTES, MAX_KEY_BYTES = 16, 64
DPS_POLICY = "registration"

_B64_RE = re.compile(r"^[A-Za-z0-9+/]+={0,2}$")
# DPS documents only lowercase alphanumerics and '-' for registration ids of group enrollments (the
# general DPS rule is wider); lightclient enforces the strict one for derivation (protocol notes §9).
_GROUP_REG_ID_RE = re.compile(r"^[a-z0-9-]{1,128}$")


def resource_uri(hostname: str, device_id: str, module_id: Optional[str] = None) -> str:
    """``{hostname}/devices/{device_id}`` or ``…/modules/{module_id}`` (not yet percent-encoded)."""
    uri = f"{hostname}/devices/{device_id}"
    return f"{uri}/modules/{module_id}" if module_id else uri


def dps_resource_uri(id_scope: str, registration_id: str) -> str:
    """``{id_scope}/registrations/{registration_id}`` (not yet percent-encoded)."""
    return f"{id_scope}/registrations/{registration_id}"


def encode_uri(uri: str) -> str:
    """The ``sr`` value: every character but unreserved ones percent-encoded (``/`` → ``%2F``)."""
    return quote(uri, safe="")


def string_to_sign(uri: str, expiry: int) -> bytes:
    """``{encode_uri(uri)}\\n{expiry}`` as UTF-8: what the key signs."""
    return f"{encode_uri(uri)}\n{_expiry(expiry)}".encode("utf-8")


def expiry_for(now: float, lifetime: int = DEFAULT_LIFETIME) -> int:
    """The ``se`` of a token issued at ``now`` (Unix s) for ``lifetime`` s."""
    check_lifetime(lifetime)
    return int(now) + int(lifetime)


def renew_at(issued: float, expiry: int) -> float:
    """When a token issued at ``issued`` and expiring at ``expiry`` is renewed: after 80 % of its life."""
    return issued + RENEW_FRACTION * max(0.0, expiry - issued)


def check_lifetime(lifetime: object, name: str = "lifetime") -> int:
    """``lifetime`` as int seconds, or ConfigError naming ``name``."""
    if isinstance(lifetime, bool) or not isinstance(lifetime, (int, float)) or lifetime != int(lifetime):
        raise ConfigError(f"{name} must be a whole number of seconds, not {lifetime!r}")
    if not MIN_LIFETIME <= lifetime <= MAX_LIFETIME:
        raise ConfigError(f"{name} must be between {MIN_LIFETIME} s and {MAX_LIFETIME} s (a year), got {lifetime}; "
                          f"the default is {DEFAULT_LIFETIME} s")
    return int(lifetime)


def _expiry(expiry: object) -> int:
    if isinstance(expiry, bool) or not isinstance(expiry, int) or expiry <= 0:
        raise ConfigError(f"a SAS expiry must be a positive Unix time in whole seconds, not {expiry!r}")
    return expiry


@dataclass(frozen=True)
class SasToken:
    """A signed token: ``str(token)``/``value`` is the ``SharedAccessSignature …`` text (a secret);
    ``repr()`` shows only the resource and the expiry."""

    value: str = field(repr=False)
    uri: str
    expiry: int
    issued: float = 0.0

    def __str__(self) -> str:
        return self.value

    def __repr__(self) -> str:
        return f"SasToken(uri={self.uri!r}, expiry={self.expiry}, value=<secret>)"

    @property
    def renew_at(self) -> float:
        return renew_at(self.issued, self.expiry)


def token(uri: str, signature: bytes, expiry: int, policy: Optional[str] = None, issued: float = 0.0) -> SasToken:
    """Assemble ``SharedAccessSignature sr=…&sig=…&se=…[&skn=…]`` from the raw HMAC ``signature``."""
    sig = quote(base64.b64encode(signature).decode("ascii"), safe="")
    text = f"SharedAccessSignature sr={encode_uri(uri)}&sig={sig}&se={_expiry(expiry)}"
    if policy:
        text += f"&skn={quote(policy, safe='')}"
    return SasToken(text, uri, expiry, issued)


def decode_key(key_b64: object, what: str = "the symmetric key") -> bytearray:
    """The key bytes of a base64 key (16-64 bytes), as a bytearray the caller can wipe.

    Errors name ``what`` and never show the key.
    """
    if isinstance(key_b64, (bytes, bytearray)):
        try:
            key_b64 = bytes(key_b64).decode("ascii")
        except UnicodeDecodeError:
            raise ConfigError(f"{what} is not base64 text (it has non-ASCII bytes)") from None
    if not isinstance(key_b64, str):
        raise ConfigError(f"{what} must be base64 text, not {type(key_b64).__name__}")
    text = key_b64.strip()
    if not text:
        raise ConfigError(f"{what} is empty: give the base64 key from the portal, the connection string or DPS")
    if not _B64_RE.match(text) or len(text) % 4:
        raise ConfigError(f"{what} is not valid base64 ({len(text)} characters): copy the whole primary or "
                          "secondary key, including any trailing '='")
    try:
        raw = bytearray(base64.b64decode(text, validate=True))
    except (binascii.Error, ValueError):
        raise ConfigError(f"{what} is not valid base64") from None
    if not MIN_KEY_BYTES <= len(raw) <= MAX_KEY_BYTES:
        size = len(raw)
        wipe(raw)
        raise ConfigError(f"{what} decodes to {size} bytes; IoT Hub and DPS keys are "
                          f"{MIN_KEY_BYTES} to {MAX_KEY_BYTES} bytes")
    return raw


def wipe(buf: bytearray) -> None:
    """Overwrite a key buffer with zeros (Python may have copies elsewhere; this removes ours)."""
    for i in range(len(buf)):
        buf[i] = 0


def hmac_sha256(key: bytes, message: bytes) -> bytes:
    """HMAC-SHA256: the software reference of what the token's C_Sign(CKM_SHA256_HMAC) computes."""
    return hmac.new(bytes(key), message, hashlib.sha256).digest()


def check_group_registration_id(registration_id: str) -> str:
    """The registration id of a group-enrolled device: lowercase letters, digits and '-' (DPS docs)."""
    if not isinstance(registration_id, str) or not _GROUP_REG_ID_RE.match(registration_id):
        raise ConfigError(f"the registration id {registration_id!r} cannot be used with a group enrollment's "
                          "symmetric key: DPS allows only lowercase letters, digits and '-' (1-128) there")
    return registration_id


def derive_device_key(group_key_b64: str, registration_id: str) -> str:
    """Reference formula (software): the base64 device key of ``registration_id`` in a group enrollment."""
    key = decode_key(group_key_b64, "the group enrollment key")
    try:
        return base64.b64encode(hmac_sha256(key, check_group_registration_id(registration_id).encode())).decode()
    finally:
        wipe(key)


@dataclass(frozen=True)
class ConnectionString:
    """``HostName=…;DeviceId=…[;ModuleId=…];SharedAccessKey=…`` parsed; ``repr()`` hides the key."""

    hostname: str
    device_id: str
    module_id: Optional[str] = None
    shared_access_key: str = field(default="", repr=False)
    gateway_hostname: Optional[str] = None

    def __repr__(self) -> str:
        module = f", module_id={self.module_id!r}" if self.module_id else ""
        return f"ConnectionString(hostname={self.hostname!r}, device_id={self.device_id!r}{module}, key=<secret>)"


_CS_FIELDS = {"hostname": "HostName", "deviceid": "DeviceId", "moduleid": "ModuleId",
              "sharedaccesskey": "SharedAccessKey", "gatewayhostname": "GatewayHostName"}


def parse_connection_string(text: object) -> ConnectionString:
    """Parse a device or module connection string; errors name the missing field, never the key."""
    if not isinstance(text, str):
        raise ConfigError(f"a connection string must be a str, not {type(text).__name__}")
    values = {}
    for part in text.strip().split(";"):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        canonical = _CS_FIELDS.get(name.strip().lower())
        if not sep or canonical is None:
            shown = name.strip()[:40]
            if canonical is None and name.strip().lower() in ("sharedaccesskeyname", "x509"):
                raise ConfigError(f"the connection string has {shown}: lightclient takes device or module "
                                  "connection strings (HostName, DeviceId, SharedAccessKey), not service or "
                                  "X.509 ones")
            raise ConfigError(f"the connection string has an unknown part {shown!r}: expected "
                              "HostName=…;DeviceId=…[;ModuleId=…];SharedAccessKey=…")
        values[canonical] = value.strip()  # base64 keys end in '=': partition keeps them whole
    missing = [f for f in ("HostName", "DeviceId", "SharedAccessKey") if not values.get(f)]
    if missing:
        raise ConfigError(f"the connection string lacks {', '.join(missing)}: expected "
                          "HostName=…;DeviceId=…[;ModuleId=…];SharedAccessKey=…")
    wipe(decode_key(values["SharedAccessKey"], "the connection string's SharedAccessKey"))
    return ConnectionString(values["HostName"], values["DeviceId"], values.get("ModuleId") or None,
                            values["SharedAccessKey"], values.get("GatewayHostName") or None)


__all__ = [
    "ConnectionString", "DEFAULT_LIFETIME", "DPS_POLICY", "SasToken", "check_group_registration_id",
    "check_lifetime", "decode_key", "derive_device_key", "dps_resource_uri", "encode_uri", "expiry_for",
    "hmac_sha256", "parse_connection_string", "renew_at", "resource_uri", "string_to_sign", "token", "wipe",
]
