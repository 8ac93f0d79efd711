"""The identity registry and the hub's CONNECT authorization rules (pure; no sockets).

An identity is a device id or ``device/module``.  X.509 authentication comes in two kinds, as in the
hub's registry:

- ``certificateAuthority``: the certificate must be issued by the emulator's CA and its subject CN must
  equal the identity (``CN=device`` or ``CN=device/module``);
- ``selfSigned``: the certificate's SHA-1 or SHA-256 thumbprint must be one the identity registered.

:func:`authorize` applies every CONNECT rule and returns the CONNACK code plus readable reasons.
"""
from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple
from urllib.parse import unquote

from . import codec, sas
from .errors import EmulatorError
from .namespace import Problem

CA_SIGNED = "certificateAuthority"
SELF_SIGNED = "selfSigned"
SYMMETRIC_KEY = "sas"      # primary/secondary symmetric keys: the MQTT password is a SAS token (emulator/sas.py)

#: api-versions current SDKs send (protocol notes §1); others still connect, with a diagnostic.
KNOWN_API_VERSIONS = ("2018-06-30", "2019-03-30", "2019-10-01", "2020-09-30", "2021-04-12",
                      "2025-08-01-preview")
EXAMPLE_API_VERSION = "2021-04-12"

_QUERY_RAW = re.compile(r"[^A-Za-z0-9\-._~!*'()%]")
_MODEL_ID_RAW = re.compile(r"[^A-Za-z0-9\-._~!*'()%:;]")
_ID_CHARS = re.compile(r"^[A-Za-z0-9\-.%_*?!(),:=@$']{1,128}$")


@dataclass(frozen=True)
class Identity:
    device_id: str
    module_id: Optional[str] = None
    auth: str = CA_SIGNED
    thumbprints: Tuple[str, ...] = ()
    """Upper-case hex SHA-1 and/or SHA-256 thumbprints (self-signed identities only)."""
    enabled: bool = True
    keys: Tuple[str, ...] = field(default=(), repr=False)
    """Base64 primary and secondary keys (symmetric-key identities only)."""

    @property
    def name(self) -> str:
        return f"{self.device_id}/{self.module_id}" if self.module_id else self.device_id

    def describe(self) -> str:
        if self.auth == SYMMETRIC_KEY:
            how = "symmetric key, SAS token"
        elif self.auth == CA_SIGNED:
            how = f"CA-signed, certificate CN={self.name}"
        else:
            how = "self-signed, thumbprint " + " or ".join(t[:16] + "…" for t in self.thumbprints)
        return f"{self.name} ({how}{'' if self.enabled else ', DISABLED'})"


def check_id(value: str, what: str) -> None:
    """Raise EmulatorError unless ``value`` is a valid IoT Hub device or module id."""
    if not _ID_CHARS.match(value or ""):
        raise EmulatorError(f"{what} {value!r} is not a valid IoT Hub id (1-128 characters of "
                            f"A-Z a-z 0-9 - . % _ * ? ! ( ) , : = @ $ ')")


class Registry:
    """Thread-safe map identity-name -> Identity."""

    def __init__(self) -> None:
        self._items: Dict[str, Identity] = {}
        self._lock = threading.Lock()

    def add(self, identity: Identity) -> Identity:
        check_id(identity.device_id, "device id")
        if identity.module_id is not None:
            check_id(identity.module_id, "module id")
        if identity.auth == SYMMETRIC_KEY and not any(identity.keys):
            raise EmulatorError(f"symmetric-key identity {identity.name!r} needs a primary or secondary key")
        if identity.auth not in (CA_SIGNED, SELF_SIGNED, SYMMETRIC_KEY):
            raise EmulatorError(f"unknown authentication type {identity.auth!r}")
        if identity.auth == SELF_SIGNED and not identity.thumbprints:
            raise EmulatorError(f"self-signed identity {identity.name!r} needs a thumbprint")
        with self._lock:
            self._items[identity.name] = identity
        return identity

    def remove(self, name: str) -> None:
        with self._lock:
            self._items.pop(name, None)

    def get(self, name: str) -> Optional[Identity]:
        with self._lock:
            return self._items.get(name)

    def all(self) -> List[Identity]:
        with self._lock:
            return list(self._items.values())


@dataclass(frozen=True)
class PeerCertificate:
    """What the TLS layer learned about the device's (already chain-verified) certificate."""
    der: bytes
    subject: Dict[str, str]
    issuer: Dict[str, str]

    @classmethod
    def from_ssl(cls, der: bytes, decoded: dict) -> "PeerCertificate":
        return cls(der, _flatten_name(decoded.get("subject", ())), _flatten_name(decoded.get("issuer", ())))

    @property
    def present(self) -> bool:
        """The device sent a certificate (a SAS device sends none)."""
        return bool(self.der)

    @property
    def common_name(self) -> Optional[str]:
        return self.subject.get("commonName")

    @property
    def self_signed(self) -> bool:
        return self.subject == self.issuer

    @property
    def sha1(self) -> str:
        return hashlib.sha1(self.der).hexdigest().upper()

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.der).hexdigest().upper()


def _flatten_name(rdns) -> Dict[str, str]:
    return {key: value for rdn in rdns for key, value in rdn}


@dataclass
class Authorization:
    return_code: int
    identity: Optional[Identity] = None
    refusal: Optional[Problem] = None
    """(rule, message) saying why CONNACK was not 0."""
    warnings: List[Problem] = field(default_factory=list)
    """Deviations the hub tolerates (missing api-version, unencoded username values, …)."""
    sas_expiry: Optional[int] = None
    """The accepted SAS token's ``se``: the hub closes the connection then."""


def _refuse(rule: str, message: str, code: int = codec.CONNACK_NOT_AUTHORIZED,
            warnings: Optional[List[Problem]] = None) -> Authorization:
    return Authorization(code, refusal=(rule, message), warnings=warnings or [])


def check_username(username: Optional[str], hostname: str, client_id: str) -> Tuple[Optional[Problem],
                                                                                     List[Problem]]:
    """Check ``{hostname}/{deviceId}[/{moduleId}]/?api-version=…``; return (refusal, warnings)."""
    expected = f"{hostname}/{client_id}/?api-version={EXAMPLE_API_VERSION}"
    warnings: List[Problem] = []
    if username is None:
        return ("connect.username", f"no username; the hub expects {expected!r}"), warnings
    if not username.startswith(hostname + "/"):
        return ("connect.username", f"username must start with this hub's host name {hostname + '/'!r}; "
                f"expected {expected!r}"), warnings
    rest = username[len(hostname) + 1:]
    ident_part, has_query, query = rest.partition("?")
    ident = ident_part[:-1] if ident_part.endswith("/") else ident_part
    if ident != client_id:
        return ("connect.username", f"identity {ident!r} in the username differs from the client id "
                f"{client_id!r}; expected {expected!r}"), warnings
    if has_query and not ident_part.endswith("/"):
        warnings.append(("connect.username", f"missing '/' before '?'; expected {expected!r}"))
    params: Dict[str, Optional[str]] = {}
    for item in query.split("&") if query else []:
        key, sep, value = item.partition("=")
        params[unquote(key)] = unquote(value) if sep else None
        # RFC 2396 unreserved characters read the same encoded or not; so do the ':' and ';' of a raw
        # model id (dtmi:com:example:Thermostat;1), which the Node SDK and its samples send to the hub.
        allowed = _MODEL_ID_RAW if unquote(key) == "model-id" else _QUERY_RAW
        bad = sorted(set(allowed.findall(value)))
        if bad:
            warnings.append(("connect.username-encoding",
                             f"value of {unquote(key)!r} is not percent-encoded ({value!r}): {''.join(bad)!r} "
                             f"may read differently, since the hub percent-decodes every query value "
                             f"(reference §1, URL-encoding rule; RFC 2396)"))
    api_version = params.get("api-version")
    if not api_version:
        warnings.append(("connect.api-version", f"username has no api-version; the hub documents "
                         f"'include api-version to avoid unexpected behavior', e.g. {expected!r}"))
    elif api_version not in KNOWN_API_VERSIONS:
        warnings.append(("connect.api-version", f"api-version {api_version!r} is not one current SDKs "
                         f"use ({', '.join(KNOWN_API_VERSIONS)})"))
    if params.get("model-id") and api_version and api_version < "2020-09-30":
        warnings.append(("connect.api-version", f"model-id needs api-version 2020-09-30 or later, "
                         f"got {api_version!r}"))
    return None, warnings


def authorize(connect: codec.Connect, peer: PeerCertificate, registry: Registry, hostname: str,
              ca_subject: Dict[str, str]) -> Authorization:
    """Apply IoT Hub's CONNECT rules.  The hub answers every failure with CONNACK 5 (Not authorized),
    except the MQTT-level ones (protocol level -> 1, empty persistent client id -> 2)."""
    if connect.protocol_level != 4 or connect.protocol_name != "MQTT":
        return _refuse("connect.protocol", f"IoT Hub speaks MQTT 3.1.1 (protocol 'MQTT' level 4), got "
                       f"{connect.protocol_name!r} level {connect.protocol_level}",
                       codec.CONNACK_BAD_PROTOCOL_VERSION)
    if not connect.client_id and not connect.clean_session:
        return _refuse("connect.client-id", "empty client id with clean session 0 [MQTT-3.1.3-8]; the "
                       "client id must be the device id", codec.CONNACK_IDENTIFIER_REJECTED)
    identity = registry.get(connect.client_id)
    if identity is None:
        cn = peer.common_name
        hint = f"; the certificate's CN is {cn!r}" if cn else ""
        return _refuse("connect.client-id", f"client id {connect.client_id!r} is not a registered device "
                       f"or device/module identity{hint}")
    refusal, warnings = check_username(connect.username, hostname, connect.client_id)
    if refusal:
        return _refuse(*refusal, warnings=warnings)
    if not identity.enabled:
        return _refuse("connect.disabled", f"identity {identity.name!r} is disabled in the registry",
                       warnings=warnings)
    if identity.auth == SYMMETRIC_KEY:
        resource = f"{hostname}/devices/{identity.device_id}" + (
            f"/modules/{identity.module_id}" if identity.module_id else "")
        problem, expiry = sas.check(connect.password, identity.keys, resource)
        if problem is not None:
            return _refuse(*problem, warnings=warnings)
        return Authorization(codec.CONNACK_ACCEPTED, identity, warnings=warnings, sas_expiry=expiry)
    if connect.password is not None:
        return _refuse("connect.password", "X.509 devices send no password; the hub would read it as a "
                       "SAS token, which this emulator does not support", warnings=warnings)
    if not peer.present:
        return _refuse("connect.certificate", f"{identity.name!r} authenticates with an X.509 certificate, but the "
                       "device sent none in the TLS handshake", warnings=warnings)
    if identity.auth == CA_SIGNED:
        if peer.self_signed:
            return _refuse("connect.certificate", f"{identity.name!r} is registered as CA-signed, but the "
                           f"certificate is self-signed (CN={peer.common_name!r})", warnings=warnings)
        if peer.issuer != ca_subject:
            return _refuse("connect.certificate", f"certificate issued by {peer.issuer!r}, not by the "
                           f"emulator's CA {ca_subject!r}", warnings=warnings)
        if peer.common_name != identity.name:
            return _refuse("connect.certificate-cn", f"certificate CN {peer.common_name!r} must equal the "
                           f"identity {identity.name!r}", warnings=warnings)
    elif peer.sha1 not in identity.thumbprints and peer.sha256 not in identity.thumbprints:
        return _refuse("connect.thumbprint", f"certificate thumbprint SHA-256 {peer.sha256} matches none "
                       f"registered for {identity.name!r}", warnings=warnings)
    return Authorization(codec.CONNACK_ACCEPTED, identity, warnings=warnings)
