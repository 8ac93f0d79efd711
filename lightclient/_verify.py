"""Server certificate verification failures in plain words: which of untrusted, expired, wrong host;
and the other TLS failures that no retry can cure (no TLS version in common).

``ssl.SSLCertVerificationError`` carries OpenSSL's X509_V_ERR code (``verify_code``) and text
(``verify_message``); :func:`server_certificate_error` turns it into a
:class:`~lightclient.exceptions.ServerCertificateError` whose ``reason`` a program can branch on and
whose message says what to check. Pure; no I/O.
"""
from __future__ import annotations

import ssl
from typing import Dict, Optional, Tuple

from .exceptions import ConfigError, ServerCertificateError, TlsVersionError, wording

# X509_V_ERR_* codes (openssl/x509_vfy.h) -> (reason, advice)
_UNTRUSTED = ("untrusted", "the server's certificate chain does not lead to a CA this device trusts; "
              "check {host} (is it the hub?) and the trusted CA ({ca})")
_CODES: Dict[int, Tuple[str, str]] = {
    2: _UNTRUSTED,     # unable to get issuer certificate
    18: _UNTRUSTED,    # self-signed certificate
    19: _UNTRUSTED,    # self-signed certificate in certificate chain
    20: _UNTRUSTED,    # unable to get local issuer certificate
    21: _UNTRUSTED,    # unable to verify the first certificate
    27: _UNTRUSTED,    # certificate not trusted
    28: _UNTRUSTED,    # certificate rejected
    10: ("expired", "the server's certificate (or one in its chain) has expired; check the device clock, "
                    "then the server"),
    12: ("expired", "the server's CRL has expired"),
    9: ("not_yet_valid", "the server's certificate is not valid yet; the device clock is probably wrong"),
    62: ("hostname", "the server's certificate is for another host name; connect with the hub's own host "
                     "name ({host} must match the certificate)"),
    64: ("hostname", "the server's certificate does not cover this IP address; connect by host name"),
    23: ("revoked", "the server's certificate has been revoked"),
}


def server_certificate_error(exc: ssl.SSLCertVerificationError, host: str, port: int) -> ServerCertificateError:
    """The typed error for a failed server certificate check of ``host:port``."""
    code = getattr(exc, "verify_code", None)
    text = getattr(exc, "verify_message", None) or str(exc)
    reason, advice = _CODES.get(code, ("other", "check {host} and the trusted CA ({ca})"))  # type: ignore[arg-type]
    # The advice names settings as parameters: the CLI shows its flags, the library its keyword arguments.
    message = wording(f"the server certificate of {host}:{port} failed verification: {reason.replace('_', ' ')} "
                      f"({text}); {advice}", host="host=", ca="ca= of tls.client_context()/https_context()")
    error = ServerCertificateError(message, reason, code, text)
    return error


def find_verify_error(exc: BaseException) -> Optional[ssl.SSLCertVerificationError]:
    """The ``ssl.SSLCertVerificationError`` somewhere behind ``exc``, if that is what failed.

    requests and urllib3 wrap it two or three levels deep (``__cause__``, ``__context__``, ``args``
    and urllib3's ``reason``), so the chain is searched rather than assumed.
    """
    seen = set()
    stack = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return current
        stack.extend([current.__cause__, current.__context__,
                      *[a for a in getattr(current, "args", ()) if isinstance(a, BaseException)]])
        reason = getattr(current, "reason", None)
        if isinstance(reason, BaseException):
            stack.append(reason)
    return None



# OpenSSL reasons for "no TLS version in common": the server's alert, or its choice of a version we refuse.
_VERSION_REASONS = frozenset({"TLSV1_ALERT_PROTOCOL_VERSION", "UNSUPPORTED_PROTOCOL", "WRONG_SSL_VERSION",
                              "VERSION_TOO_LOW", "NO_PROTOCOLS_AVAILABLE"})


def tls_version_error(exc: ssl.SSLError, host: str, port: int, context: ssl.SSLContext) -> Optional[TlsVersionError]:
    """The typed error if ``exc`` says the server and ``context`` share no TLS version, else None."""
    if getattr(exc, "reason", None) not in _VERSION_REASONS:
        return None
    newest = context.maximum_version
    if newest in (ssl.TLSVersion.MAXIMUM_SUPPORTED, ssl.TLSVersion.TLSv1_3):
        why = ("the server only offers TLS 1.0/1.1; IoT Hub requires 1.2+ (is host= an IoT Hub endpoint, or is "
               "a TLS-terminating proxy in the way?)")
    else:
        why = (f"the server offers no TLS version this device allows ({context.minimum_version.name} to "
               f"{newest.name}): either it only offers TLS 1.0/1.1 (IoT Hub requires 1.2+) or it requires a "
               "newer version than maximum_version allows")
    return TlsVersionError(f"TLS handshake with {host}:{port} failed: {why} (OpenSSL: {exc.reason})")


def permanent_tls_error(exc: OSError, host: str, port: int, context: ssl.SSLContext) -> Optional[ConfigError]:
    """The typed error for a connect failure that retrying cannot fix (certificate, TLS version), else None."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return server_certificate_error(exc, host, port)
    if isinstance(exc, ssl.SSLError):
        return tls_version_error(exc, host, port, context)
    return None


__all__ = ["find_verify_error", "permanent_tls_error", "server_certificate_error", "tls_version_error"]
