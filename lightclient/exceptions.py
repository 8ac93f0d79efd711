"""The exceptions lightclient raises.

Every error is a :class:`LightClientError`; where the meaning matches a built-in, the class inherits it
too, so ``except ValueError`` keeps working for callers who do not know lightclient::

    LightClientError
    ├── ConfigError (ValueError)            the caller passed something unusable
    │   ├── MessageTooLargeError            a message the hub would refuse for its size
    │   ├── ServerCertificateError          the server's certificate failed verification (says why)
    │   └── TlsVersionError                 the server offers no TLS version this client allows (1.2+)
    ├── ProtocolError (ValueError)          the hub (or a broker) sent something malformed
    ├── CertificateError (ValueError)       a certificate file is missing, unreadable or unusable
    │   └── KeyMismatchError                the certificate does not belong to the private key
    ├── KeyLoadError                        the private key could not be loaded (carries OpenSSL's errors)
    │   ├── PinError                        the PIN was wrong, missing or locked
    │   ├── TokenNotFoundError (LookupError) no token matches the key reference
    │   ├── KeyNotFoundError (LookupError)   the token (or store) holds no such private key
    │   ├── ModuleLoadError                 the PKCS#11 module could not be loaded
    │   ├── BackendUnavailableError (ImportError) the ENGINE or provider is not installed
    │   └── KeyConfigError (ConfigError)    OpenSSL refused a key reference, key setting or CSR field
    ├── OpenSSLMismatchError (ImportError)  Python's ssl module and the shim use different OpenSSL copies
    ├── NativeError                         any other failure inside OpenSSL (carries OpenSSL's errors)
    ├── QueueFullError                      the offline queue or outbox is full; the message was refused
    ├── MessageDroppedError                 a queued message was dropped for a newer one (drop_oldest)
    ├── OutboxError                         the durable outbox file cannot be used
    ├── ServiceError                        the hub answered a request with an error status
    │   ├── ProvisioningError               DPS refused or failed a registration
    │   ├── UploadError                     a file upload failed at the hub or at storage
    │   └── ConnectRefusedError             the hub refused the MQTT CONNECT (CONNACK 1-5)
    ├── OperationTimeout (TimeoutError)     a request got no answer in time
    └── ProxyError (ConnectionError)        the proxy could not be reached, refused, or could not reach the hub

Exceptions carrying OpenSSL errors expose them as ``openssl_errors`` (a tuple of strings, oldest first).
No exception text ever contains a PIN.

Advice that names a setting is written once, with the setting as a parameter (:func:`wording`):
``str(exc)`` names the library's keyword argument (``ca=``), and a front end such as the CLI renders
the same message with its own names (``--ca``) through :func:`in_terms`::

    raise ConfigError(wording("… check the CA given as {ca}", ca="ca= of tls.client_context()"))
    in_terms(exc, {"ca": "--ca"})          # '… check the CA given as --ca'
"""
from __future__ import annotations

import re
from typing import Iterable, Mapping, Optional, Tuple


class Wording(str):
    """A message whose advice names settings: the text in the library's terms, plus ``template`` and
    ``params`` (setting name -> library wording) so that :meth:`render` can name them another way."""

    template: str
    params: Mapping[str, str]

    def __new__(cls, template: str, params: Mapping[str, str]) -> "Wording":
        obj = super().__new__(cls, _fill(template, params))
        obj.template, obj.params = template, dict(params)
        return obj

    def render(self, names: Mapping[str, str]) -> str:
        """The message with each setting named by ``names`` where it has an entry, else as the library does."""
        return _fill(self.template, {k: names.get(k, v) for k, v in self.params.items()})

    def __reduce__(self):
        return (Wording, (self.template, self.params))


def _fill(template: str, params: Mapping[str, str]) -> str:
    # Only the named placeholders are replaced: other braces (JSON, URIs) in the text stay as they are.
    if not params:
        return template
    pattern = re.compile(r"\{(" + "|".join(map(re.escape, params)) + r")\}")
    return pattern.sub(lambda m: params[m.group(1)], template)


def wording(template: str, **params: str) -> Wording:
    """A message naming settings as ``{name}`` placeholders; ``params`` give the library's words for each."""
    return Wording(template, params)


def in_terms(exc: BaseException, names: Mapping[str, str]) -> str:
    """The one-line message of ``exc`` with its settings named by ``names`` (e.g. CLI flags).

    For errors carrying OpenSSL's queue this is the plain-words message without the queue."""
    message = getattr(exc, "message", None)
    if not isinstance(message, str):
        message = exc.args[0] if len(exc.args) == 1 and isinstance(exc.args[0], str) else str(exc)
    return message.render(names) if isinstance(message, Wording) else message


class LightClientError(Exception):
    """Root of every error lightclient raises."""


class ConfigError(LightClientError, ValueError):
    """An argument or setting is unusable; the message says which and how to fix it."""


class MessageTooLargeError(ConfigError):
    """A message is larger than IoT Hub accepts (counted the way the hub counts it)."""


class ServerCertificateError(ConfigError):
    """The server certificate failed verification: ``reason`` is untrusted, expired, not_yet_valid, hostname, revoked or other."""

    def __init__(self, message: str, reason: str = "other", verify_code: Optional[int] = None,
                 verify_message: str = ""):
        super().__init__(message)
        self.reason = reason
        self.verify_code = verify_code
        self.verify_message = verify_message


class TlsVersionError(ConfigError):
    """The server and this client share no TLS version (a TLS 1.0/1.1-only server: IoT Hub requires 1.2+)."""


class QueueFullError(LightClientError):
    """The offline queue or outbox is full (``full_policy="reject_new"``): the message was not accepted."""


class MessageDroppedError(LightClientError):
    """A queued message was dropped unsent to make room for a newer one (``full_policy="drop_oldest"``)."""


class OutboxError(LightClientError):
    """The durable outbox file cannot be opened, read or written (the sqlite3 error is chained)."""


class ProtocolError(LightClientError, ValueError):
    """The hub (or a broker playing it) sent a topic or payload that breaks the IoT Hub protocol."""


class _WithOpenSSLErrors(LightClientError):
    """Mixin base: keeps the drained OpenSSL error queue beside a plain-words message."""

    def __init__(self, message: str, openssl_errors: Iterable[str] = ()):
        self.openssl_errors: Tuple[str, ...] = tuple(openssl_errors)
        self.message = message
        text = message
        if self.openssl_errors:
            text += "\n  OpenSSL said: " + "\n  OpenSSL said: ".join(self.openssl_errors)
        super().__init__(text)


class CertificateError(_WithOpenSSLErrors, ValueError):
    """A certificate (chain) file is missing, unreadable, not PEM, or unusable."""


class CertificateExpiredError(CertificateError):
    """The device certificate is past its notAfter (or before its notBefore): the hub refuses it."""


class KeyMismatchError(CertificateError):
    """The certificate's public key does not match the private key it was paired with."""


class KeyLoadError(_WithOpenSSLErrors):
    """The private key could not be loaded from its token, store or file."""


class PinError(KeyLoadError):
    """The PIN (or pass phrase) was wrong, missing, or the token refused the login."""


class TokenNotFoundError(KeyLoadError, LookupError):
    """No PKCS#11 token matches the key reference (check the token label or serial)."""


class KeyNotFoundError(KeyLoadError, LookupError):
    """The token or store holds no private key matching the reference (or several)."""


class ModuleLoadError(KeyLoadError):
    """The PKCS#11 module named by the key reference could not be loaded."""


class BackendUnavailableError(KeyLoadError, ImportError):
    """The OpenSSL ENGINE or provider the key reference needs is not installed or not usable."""


class KeyConfigError(KeyLoadError, ConfigError):
    """OpenSSL refused a key reference, property query or CSR field as malformed (carries OpenSSL's errors)."""


class OpenSSLMismatchError(LightClientError, ImportError):
    """Python's ssl module and lightclient's shim do not share one libssl/libcrypto copy."""


class NativeError(_WithOpenSSLErrors):
    """An OpenSSL operation in the shim failed for a reason not covered by a more specific class."""


class ServiceError(LightClientError):
    """The hub or DPS answered a request with an error status (``status``; ``retryable`` for 429/5xx)."""

    def __init__(self, message: str, status: Optional[int] = None):
        super().__init__(message)
        self.status = status

    @property
    def retryable(self) -> bool:
        return self.status is not None and (self.status == 429 or self.status >= 500)


class ProvisioningError(ServiceError):
    """DPS refused or failed a registration (``status``, ``error_code``, ``tracking_id`` when known)."""

    def __init__(self, message: str, status: Optional[int] = None, error_code: Optional[int] = None,
                 tracking_id: Optional[str] = None):
        super().__init__(message, status)
        self.error_code = error_code
        self.tracking_id = tracking_id


class UploadError(ServiceError):
    """A file upload failed at the hub or at storage (``stage``: "sas", "storage" or "notify"; ``notified``:
    whether the hub was told of the failure; ``correlation_id`` of the upload when the hub gave one)."""

    def __init__(self, message: str, status: Optional[int] = None, *, stage: Optional[str] = None,
                 error_code: Optional[str] = None, correlation_id: Optional[str] = None,
                 notified: Optional[bool] = None):
        super().__init__(message, status)
        self.stage = stage
        self.error_code = error_code
        self.correlation_id = correlation_id
        self.notified = notified


class ConnectRefusedError(ServiceError):
    """The hub refused the MQTT CONNECT (``return_code`` 1–5; IoT Hub mostly sends 5, not authorized)."""

    #: CONNACK 3 (server unavailable) is worth retrying soon; 1, 2, 4, 5 need a configuration change.
    RETRYABLE_CODES = frozenset({3})

    def __init__(self, message: str, return_code: int):
        super().__init__(message, status=None)
        self.return_code = return_code

    @property
    def retryable(self) -> bool:
        return self.return_code in self.RETRYABLE_CODES


class RenewalError(ServiceError):
    """A certificate renewal failed; the old credential stays in use. ``retry_at`` (epoch seconds) is when
    the renewal policy tries again (back-off), ``route`` the path that failed (``"dps"`` or ``"hub"``),
    ``retry_after`` the seconds the service asked to wait (if it did)."""

    def __init__(self, message: str, status: Optional[int] = None, route: Optional[str] = None,
                 retry_at: Optional[float] = None, retry_after: Optional[float] = None):
        super().__init__(message, status)
        self.route = route
        self.retry_at = retry_at
        self.retry_after = retry_after


class OperationTimeout(LightClientError, TimeoutError):
    """A request (connect, twin, method, provisioning) got no answer within its timeout."""


class ProxyError(LightClientError, ConnectionError):
    """The proxy failed: ``reason`` is unreachable, auth, forbidden, target, timeout or protocol; ``proxy``
    names it (never its credentials); ``status`` is the HTTP status or SOCKS5 reply when there was one."""

    #: Reasons a later attempt may get past; the others need a configuration change.
    RETRYABLE_REASONS = frozenset({"unreachable", "timeout", "target"})

    def __init__(self, message: str, *, proxy: str, reason: str, status: Optional[int] = None):
        super().__init__(message)
        self.proxy = proxy
        self.reason = reason
        self.status = status

    @property
    def retryable(self) -> bool:
        return self.reason in self.RETRYABLE_REASONS


__all__ = [name for name in dir() if name.endswith("Error")
           or name in ("OperationTimeout", "Wording", "wording", "in_terms")]
