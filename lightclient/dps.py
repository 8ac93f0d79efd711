"""Device Provisioning Service (DPS) over HTTPS, with the same hardware-backed key as MQTT.

Two layers:

* pure helpers that build requests and parse responses (no I/O)::

      PUT https://{endpoint}/{idScope}/registrations/{registrationId}/register?api-version=2021-10-01
      Content-Type: application/json; charset=utf-8
      Accept: application/json
      {"registrationId": "dev-1", "payload": {...}, "csr": "<base64 DER PKCS#10>"}

      GET https://{endpoint}/{idScope}/registrations/{registrationId}/operations/{operationId}?api-version=…

* :func:`provision`, which registers and polls until the device is assigned, failed, disabled or the
  timeout passes, on the shared HTTPS core (``lightclient._https``). All requests of one run share
  one HTTPS connection: with a TPM every TLS handshake costs a hardware signature, so a provisioning
  costs one handshake when the server keeps the connection open. A redirect is never followed: DPS
  answering 3xx is a :class:`~lightclient.exceptions.ProvisioningError` naming where it pointed.

There is no ``Authorization`` header: the client certificate in the TLS handshake authenticates the
device, and ``registrationId`` must equal that certificate's subject CN.
"""
from __future__ import annotations

import base64
import ipaddress
import json
import os
import re
import ssl
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Tuple, Union
from urllib.parse import quote

from ._files import atomic_write as _atomic_write  # one home for atomic writes
from ._https import DEFAULT_RETRY_AFTER, Exchange, Request, authorized, retry_after  # noqa: F401 (dps names since 0.1)
from .backoff import Backoff
from ._files import CHAIN_LIMIT, CSR_LIMIT, read_user_file
from .exceptions import ConfigError, LightClientError, ProtocolError, ProvisioningError
from .identity import check_host

DEFAULT_ENDPOINT = "global.azure-devices-provisioning.net"
API_VERSION = "2021-10-01"
CSR_API_VERSION = "2025-07-01-preview"
FINAL_STATES = ("assigned", "failed", "disabled")

_REG_ID_RE = re.compile(r"^[A-Za-z0-9\-._:]{0,127}[A-Za-z0-9\-]$")
_ID_SCOPE_RE = re.compile(r"^[A-Za-z0-9]{1,64}$")
_PORT_RE = re.compile(r"[0-9]{1,5}")


# ------------------------------------------------------------------------------------------ requests


def _check_ids(id_scope: str, registration_id: str, endpoint: str) -> None:
    if not isinstance(id_scope, str) or not _ID_SCOPE_RE.match(id_scope):
        raise ConfigError(f"invalid DPS ID scope {id_scope!r}: copy it from the DPS overview page (e.g. 0ne00A1B2C3)")
    if not isinstance(registration_id, str) or not _REG_ID_RE.match(registration_id):
        raise ConfigError(
            f"invalid registration id {registration_id!r}: at most 128 characters of letters, digits and "
            "- . _ :, ending in a letter, digit or '-'; with X.509 it must equal the certificate's CN")
    _check_endpoint(endpoint)


def _check_endpoint(endpoint: object) -> None:
    """``host``, ``host:port`` or ``[IPv6]:port``; the host a DNS name or an IP address."""
    form = (f"host or host:port, e.g. {DEFAULT_ENDPOINT!r} or '127.0.0.1:8443' "
            "(no scheme, path, query or spaces)")
    if not isinstance(endpoint, str):
        raise ConfigError(f"endpoint (the DPS host) must be a str, not {type(endpoint).__name__}; give {form}")
    shown = repr(endpoint[:80]) + ("…" if len(endpoint) > 80 else "")
    if "://" in endpoint:
        raise ConfigError(f"endpoint {shown} contains a scheme ('://'); give {form}")
    if endpoint.startswith("["):
        inner, bracket, rest = endpoint[1:].partition("]")
        try:
            ipaddress.IPv6Address(inner)
            ipv6 = "%" not in inner  # a zone id would need %25 in the URL; link-local DPS is no use case
        except ValueError:
            ipv6 = False
        if not bracket or not ipv6 or (rest and not rest.startswith(":")):
            raise ConfigError(f"endpoint {shown}: brackets hold an IPv6 address, e.g. '[::1]:8443'")
        port = rest[1:] if rest else None
    else:
        host, colon, port = endpoint.partition(":")
        if ":" in port:
            raise ConfigError(f"endpoint {shown}: put an IPv6 address in brackets, e.g. '[::1]:8443'")
        check_host(host, argument="endpoint", expected=form)
        port = port if colon else None
    if port is not None and (not _PORT_RE.fullmatch(port) or not 0 < int(port) < 65536):
        raise ConfigError(f"endpoint {shown}: the port must be a number from 1 to 65535; give {form}")


def read_csr(path: Union[str, "os.PathLike[str]"]) -> bytes:
    """A CSR file's bytes (PEM or DER) for ``provision(csr=…)``, read bounded like every file a user names."""
    path = os.fspath(path)
    return read_user_file(path, what=f"the CSR file {path!r}", limit=CSR_LIMIT)


def csr_to_base64(csr: Union[bytes, str]) -> str:
    """The DPS ``csr`` field: base64 of the DER PKCS#10 request, without PEM armour."""
    if isinstance(csr, str):
        csr = csr.encode()
    if b"-----BEGIN CERTIFICATE REQUEST-----" in csr:
        body = csr.split(b"-----BEGIN CERTIFICATE REQUEST-----", 1)[1].split(b"-----END", 1)[0]
        try:
            csr = base64.b64decode(b"".join(body.split()), validate=True)
        except ValueError:
            raise ConfigError("the CSR's PEM body is not valid base64") from None
    if not csr or csr[0] != 0x30:
        raise ConfigError("the CSR must be a DER or PEM PKCS#10 request (see lightclient csr)")
    return base64.b64encode(csr).decode()


def register_request(id_scope: str, registration_id: str, *, endpoint: str = DEFAULT_ENDPOINT,
                     payload: Any = None, csr: Union[bytes, str, None] = None,
                     api_version: Optional[str] = None) -> Request:
    """The registration PUT (see the module docstring for the exact wire format)."""
    _check_ids(id_scope, registration_id, endpoint)
    version = api_version or (CSR_API_VERSION if csr is not None else API_VERSION)
    body: Dict[str, Any] = {"registrationId": registration_id}
    if payload is not None:
        body["payload"] = payload
    if csr is not None:
        body["csr"] = csr_to_base64(csr)
    try:
        data = json.dumps(body, separators=(",", ":")).encode()
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"the DPS payload must be JSON-serialisable: {exc}") from None
    url = (f"https://{endpoint}/{id_scope}/registrations/{quote(registration_id, safe='')}/register"
           f"?api-version={quote(version, safe='')}")
    return Request("PUT", url, _headers(), data)


def operation_status_request(id_scope: str, registration_id: str, operation_id: str, *,
                             endpoint: str = DEFAULT_ENDPOINT, api_version: str = API_VERSION) -> Request:
    """The polling GET for an operation returned by the registration PUT."""
    _check_ids(id_scope, registration_id, endpoint)
    if not operation_id:
        raise ProtocolError("DPS returned an empty operationId")
    url = (f"https://{endpoint}/{id_scope}/registrations/{quote(registration_id, safe='')}/operations/"
           f"{quote(operation_id, safe='')}?api-version={quote(api_version, safe='')}")
    return Request("GET", url, _headers(), None)


def _headers() -> Dict[str, str]:
    from .identity import default_client_type

    return {"Content-Type": "application/json; charset=utf-8", "Accept": "application/json",
            "User-Agent": default_client_type()}


# ------------------------------------------------------------------------------------------ responses


@dataclass(frozen=True)
class RegistrationResult:
    """A DPS ``RegistrationOperationStatus`` (with its ``registrationState``), flattened."""

    operation_id: Optional[str]
    status: str                      # unassigned | assigning | assigned | failed | disabled
    registration_id: Optional[str] = None
    assigned_hub: Optional[str] = None
    device_id: Optional[str] = None
    substatus: Optional[str] = None
    payload: Any = None
    error_code: Optional[int] = None
    error_message: Optional[str] = None
    issued_certificate_chain: Tuple[bytes, ...] = ()     # DER, leaf first
    etag: Optional[str] = None
    last_updated: Optional[str] = None
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def done(self) -> bool:
        return self.status in FINAL_STATES

    def chain_pem(self) -> bytes:
        """The issued certificate chain as PEM, leaf first (empty without certificate issuance)."""
        return "".join(ssl.DER_cert_to_PEM_cert(der) for der in self.issued_certificate_chain).encode()


def _json(body: Union[bytes, str, Mapping]) -> Mapping[str, Any]:
    if isinstance(body, Mapping):
        return body
    try:
        data = json.loads(body)
    except (TypeError, ValueError, UnicodeDecodeError):
        snippet = (body[:80] if isinstance(body, (bytes, str)) else body)
        raise ProtocolError(f"DPS answered with something that is not JSON: {snippet!r}") from None
    if not isinstance(data, dict):
        raise ProtocolError(f"DPS answered with JSON that is not an object: {type(data).__name__}")
    return data


def _opt_str(obj: Mapping, key: str) -> Optional[str]:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ProtocolError(f"DPS sent {key!r} as {type(value).__name__}, expected a string")
    return value


def parse_operation(body: Union[bytes, str, Mapping]) -> RegistrationResult:
    """Parse a register / operation-status response body (200 or 202)."""
    data = _json(body)
    state = data.get("registrationState")
    if state is None:
        state = {}
    if not isinstance(state, dict):
        raise ProtocolError("DPS sent a registrationState that is not an object")
    status = data.get("status") or state.get("status")
    if not isinstance(status, str) or not status:
        raise ProtocolError(f"DPS response has no status: {sorted(data)}")
    chain = state.get("issuedCertificateChain")
    if chain is None:
        chain = ()
    if not isinstance(chain, (list, tuple)):
        raise ProtocolError("DPS sent issuedCertificateChain that is not a list")
    try:
        ders = tuple(base64.b64decode(c, validate=True) for c in chain)
    except (TypeError, ValueError):
        raise ProtocolError("DPS sent an issuedCertificateChain entry that is not base64 DER") from None
    error_code = state.get("errorCode")
    if error_code is not None and not isinstance(error_code, int):
        try:
            error_code = int(error_code)
        except (TypeError, ValueError):
            raise ProtocolError(f"DPS sent a non-numeric errorCode {error_code!r}") from None
    return RegistrationResult(
        operation_id=_opt_str(data, "operationId"),
        status=status,
        registration_id=_opt_str(state, "registrationId"),
        assigned_hub=_opt_str(state, "assignedHub"),
        device_id=_opt_str(state, "deviceId"),
        substatus=_opt_str(state, "substatus"),
        payload=state.get("payload"),
        error_code=error_code,
        error_message=_opt_str(state, "errorMessage"),
        issued_certificate_chain=ders,
        etag=_opt_str(state, "etag"),
        last_updated=_opt_str(state, "lastUpdatedDateTimeUtc"),
        raw=data,
    )


_STATUS_ADVICE = {
    400: "DPS refused the request as malformed",
    401: ("DPS could not authenticate the device: the registration id must equal the certificate's "
          "subject CN, and the certificate (individual enrollment) or its CA (group enrollment) must be "
          "enrolled and verified"),
    403: "DPS refused the device: check the enrollment and its allocation policy",
    404: "DPS does not know this ID scope or registration: check the ID scope and that an enrollment exists",
    409: "DPS reports a conflicting operation for this registration",
    412: "DPS refused the request (precondition failed)",
    429: "DPS is throttling this device",
}


def error_from_response(status: int, body: bytes, headers: Mapping[str, str],
                        registration_id: Optional[str] = None) -> ProvisioningError:
    """A :class:`ProvisioningError` for a non-2xx answer, with DPS's own code and message if sent."""
    code = tracking = message = None
    try:
        data = json.loads(body) if body else {}
        if isinstance(data, dict):
            code = data.get("errorCode")
            message = data.get("message")
            tracking = data.get("trackingId")
    except (ValueError, UnicodeDecodeError):
        pass
    if code is None:
        code = headers.get("x-ms-error-code")
    try:
        code = int(code) if code is not None else None
    except (TypeError, ValueError):
        code = None
    advice = _STATUS_ADVICE.get(status) or (f"DPS failed with {status}" if status >= 500 else f"DPS answered {status}")
    if status == 401 and registration_id:
        advice += f" (registration id sent: {registration_id!r})"
    text = f"{advice}. HTTP {status}" + (f", errorCode {code}" if code else "")
    if message:
        text += f": {message}"
    if tracking:
        text += f" (trackingId {tracking})"
    return ProvisioningError(text, status=status, error_code=code, tracking_id=tracking)


# ------------------------------------------------------------------------------------------ provision


def provision(id_scope: str, registration_id: str, *, ssl_context: Optional[ssl.SSLContext] = None,
              session=None, endpoint: str = DEFAULT_ENDPOINT, payload: Any = None,
              csr: Union[bytes, str, None] = None, api_version: Optional[str] = None,
              timeout: float = 120.0, request_timeout: float = 30.0,
              poll_interval: Tuple[float, float] = (1.0, 60.0), cert_out: Optional[str] = None,
              sleep: Callable[[float], None] = time.sleep, proxy: Any = None,
              sas: Any = None) -> RegistrationResult:
    """Register with DPS and wait for the outcome; returns the assigned :class:`RegistrationResult`.

    Symmetric-key enrollments: give ``sas`` (a :class:`lightclient.symkey.SasCredential` from
    ``SasCredential.for_dps``) and an ``ssl_context`` without client certificate
    (``tls.server_context(alpn=["http/1.1"])``); every request then carries ``Authorization: SharedAccessSignature
    sr={idScope}%2Fregistrations%2F{regId}&sig=…&se=…&skn=registration``.

    Give ``ssl_context`` (from :func:`lightclient.tls.https_context`) or a ready ``session``
    (:func:`lightclient.tls.https_session`). ``Retry-After`` is honoured within ``poll_interval``
    (2 s when absent); 429 and 5xx are retried with back-off and jitter until ``timeout``; other
    errors, a redirect (never followed), and the ``failed``/``disabled`` outcomes raise
    :class:`ProvisioningError`. With ``csr``, the issued chain is written to ``cert_out`` (PEM, leaf
    first) when given.

    ``proxy``: ``"http://[user:pass@]host:port"`` (HTTP CONNECT) or ``"socks5://…"`` to reach DPS through
    (the TLS handshake with the device key runs end to end inside the tunnel); a proxy failure raises
    :class:`~lightclient.exceptions.ProxyError` naming the proxy. The environment is never read: pass
    the proxy explicitly (the CLI honours ``HTTPS_PROXY``/``NO_PROXY``).
    """
    lo, hi = _check_poll_interval(poll_interval)
    from ._transport import check_proxy

    checked_proxy = check_proxy(proxy)
    version = api_version or (CSR_API_VERSION if csr is not None else API_VERSION)
    request = authorized(register_request(id_scope, registration_id, endpoint=endpoint, payload=payload, csr=csr,
                                           api_version=version), sas)
    if session is None:
        if ssl_context is None:
            raise ConfigError("provision() needs ssl_context= (lightclient.tls.https_context) or session=")
        from ._https import new_session
        from .tls import context_adapter

        session = new_session(context_adapter(ssl_context), proxy=checked_proxy)
        own_session = True
    else:
        if checked_proxy is not None:
            raise ConfigError("give proxy= with ssl_context=, not with session= (a ready session already "
                              "decides how it connects)")
        own_session = False
    initial = max(lo, 0.05)
    exchange = Exchange(
        session, service="DPS", error=ProvisioningError, timeout=timeout, request_timeout=request_timeout,
        backoff=Backoff(initial=initial, maximum=max(hi, initial)), retry_bounds=(lo, hi), sleep=sleep,
        timeout_text=lambda status: (f"DPS did not finish registering {registration_id!r} within {timeout:g} s "
                                     f"(last HTTP status {status})"))
    try:
        while True:
            response = exchange.send_retrying(request)
            if response.status not in (200, 201, 202):
                raise error_from_response(response.status, response.body, response.headers, registration_id)
            result = parse_operation(response.body)
            if result.done:
                return _finish(result, registration_id, cert_out)
            if not result.operation_id:
                raise ProtocolError(f"DPS said {result.status!r} without an operationId to poll")
            request = authorized(operation_status_request(id_scope, registration_id, result.operation_id,
                                                           endpoint=endpoint, api_version=version), sas)
            exchange.pause(retry_after(response.headers, minimum=lo, maximum=hi), response.status)
    finally:
        if own_session:
            session.close()


def _check_poll_interval(poll_interval: object) -> Tuple[float, float]:
    try:
        lo, hi = poll_interval  # type: ignore[misc]
        ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v < float("inf")
                 for v in (lo, hi)) and lo <= hi
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"poll_interval must be (minimum, maximum) seconds with 0 <= minimum <= maximum, "
                          f"e.g. (1.0, 60.0), not {poll_interval!r}")
    return float(lo), float(hi)


def _finish(result: RegistrationResult, registration_id: str, cert_out: Optional[str]) -> RegistrationResult:
    if result.status == "assigned":
        if not result.assigned_hub or not result.device_id:
            raise ProtocolError("DPS reported 'assigned' without assignedHub and deviceId")
        if cert_out and result.issued_certificate_chain:
            _atomic_write(cert_out, result.chain_pem(), mode=0o644)
        return result
    detail = f": {result.error_message}" if result.error_message else ""
    code = f" (errorCode {result.error_code})" if result.error_code else ""
    if result.status == "disabled":
        raise ProvisioningError(f"the enrollment for {registration_id!r} is disabled in DPS{code}{detail}",
                                status=None, error_code=result.error_code)
    raise ProvisioningError(f"DPS failed to assign {registration_id!r}{code}{detail}", status=None,
                            error_code=result.error_code)


# ------------------------------------------------------------------------------------------ cache


class _CacheUnreadable(LightClientError):
    """The cache file is missing or unreadable (not an error: provision again)."""


# An assignment plus an issued chain in base64 (4/3 of the chain) and a little JSON.
_CACHE_LIMIT = 2 * CHAIN_LIMIT


class ProvisioningCache:
    """The last assignment on disk (owner-only file), so a reboot does not mean a new registration.

    Reuse it until the hub rejects the device, then :meth:`clear` it and provision again
    (:func:`provision_cached` does both halves).
    """

    def __init__(self, path: str):
        self.path = path

    def load(self, id_scope: str, registration_id: str, endpoint: str = DEFAULT_ENDPOINT) -> Optional[RegistrationResult]:
        # A FIFO, device or oversized file is the caller's mistake (ConfigError); a missing, unreadable
        # or damaged cache is as good as none: provision again.
        try:
            raw = read_user_file(self.path, what=f"the provisioning cache {self.path!r}", limit=_CACHE_LIMIT,
                                 unreadable=_CacheUnreadable)
        except _CacheUnreadable:
            return None
        try:
            data = json.loads(raw)
        except ValueError:
            return None
        if not isinstance(data, dict) or data.get("key") != [id_scope, registration_id, endpoint]:
            return None
        hub, dev = data.get("assigned_hub"), data.get("device_id")
        if not isinstance(hub, str) or not isinstance(dev, str):
            return None
        try:
            chain = tuple(base64.b64decode(c, validate=True) for c in data.get("issued_certificate_chain") or ())
        except (TypeError, ValueError):
            return None  # a damaged cache is as good as none: provision again
        return RegistrationResult(operation_id=None, status="assigned", registration_id=registration_id,
                                  assigned_hub=hub, device_id=dev, payload=data.get("payload"),
                                  issued_certificate_chain=chain)

    def save(self, id_scope: str, registration_id: str, result: RegistrationResult,
             endpoint: str = DEFAULT_ENDPOINT) -> None:
        # The issued chain (certificate issuance) is kept too: it is public, and the device needs it
        # to connect after a reboot without registering again.
        record = {"key": [id_scope, registration_id, endpoint], "assigned_hub": result.assigned_hub,
                  "device_id": result.device_id, "payload": result.payload, "saved_at": int(time.time()),
                  "issued_certificate_chain": [base64.b64encode(d).decode() for d in result.issued_certificate_chain]}
        _atomic_write(self.path, json.dumps(record).encode(), mode=0o600)

    def clear(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def provision_cached(cache: ProvisioningCache, id_scope: str, registration_id: str, *, force: bool = False,
                     endpoint: str = DEFAULT_ENDPOINT, **kwargs) -> Tuple[RegistrationResult, bool]:
    """The cached assignment if there is one (and not ``force``), else :func:`provision` and save.

    Returns ``(result, from_cache)``. Call again with ``force=True`` when the hub rejects the
    cached assignment (CONNACK not authorised, or an unknown hub host).
    """
    if not force:
        cached = cache.load(id_scope, registration_id, endpoint)
        if cached is not None:
            return cached, True
    result = provision(id_scope, registration_id, endpoint=endpoint, **kwargs)
    cache.save(id_scope, registration_id, result, endpoint)
    return result, False
