"""Server certificate verification failures in plain words: which of untrusted, expired, wrong host.

``ssl.SSLCertVerificationError`` carries OpenSSL's X509_V_ERR code (``verify_code``) and text
(``verify_message``); :func:`server_certificate_error` turns it into a
:class:`~lightclient.exceptions.ServerCertificateError` whose ``reason`` a program can branch on and
whose message says what to check. Pure; no I/O.
"""
from __future__ import annotations

import ssl
from typing import Dict, Optional, Tuple

from .exceptions import ServerCertificateError

# X509_V_ERR_* codes (openssl/x509_vfy.h) -> (reason, advice)
_UNTRUSTED = ("untrusted", "the server's certificate chain does not lead to a CA this device trusts; "
              "check host= (is it the hub?) and the CA given to tls.client_context(ca=…)")
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
                     "name (host= must match the certificate)"),
    64: ("hostname", "the server's certificate does not cover this IP address; connect by host name"),
    23: ("revoked", "the server's certificate has been revoked"),
}


def server_certificate_error(exc: ssl.SSLCertVerificationError, host: str, port: int) -> ServerCertificateError:
    """The typed error for a failed server certificate check of ``host:port``."""
    code = getattr(exc, "verify_code", None)
    text = getattr(exc, "verify_message", None) or str(exc)
    reason, advice = _CODES.get(code, ("other", "check host= and the trusted CA"))  # type: ignore[arg-type]
    error = ServerCertificateError(
        f"the server certificate of {host}:{port} failed verification: {reason.replace('_', ' ')} "
        f"({text}); {advice}", reason, code, text)
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


__all__ = ["find_verify_error", "server_certificate_error"]
