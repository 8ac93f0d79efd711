"""What a health check (``lightclient doctor``) may ask of the native layer, as public API.

The OpenSSL linkage facts and the same-copy check, which OpenSSL features this build has, and a look
at certificate files; everything else about keys is :mod:`lightclient.keys` and :mod:`lightclient.tls`.
"""
from __future__ import annotations

from ._files import CA_BUNDLE_LIMIT, CHAIN_LIMIT, check_user_file, read_user_file
from ._native import CertificateInfo, cert_matches_key, certificate_info, engine_support, provider_support
from ._openssl_copy import WORKING_PYTHONS, OpenSSLFacts, check_same_openssl, openssl_facts
from .exceptions import CertificateError

__all__ = ["CertificateInfo", "OpenSSLFacts", "WORKING_PYTHONS", "cert_matches_key", "certificate_info",
           "check_ca_file", "check_same_openssl", "engine_support", "openssl_facts", "provider_support",
           "read_certificate_file", "network_reason", "tls_failure"]


def read_certificate_file(path: str) -> bytes:
    """The bytes of a certificate (chain) file, read bounded; CertificateError or ConfigError otherwise."""
    return read_user_file(path, what=f"the certificate file {path!r}", limit=CHAIN_LIMIT,
                          unreadable=CertificateError)


def check_ca_file(path: str) -> None:
    """Raise unless ``path`` is a regular file of a size a CA bundle can have (OpenSSL then reads it)."""
    check_user_file(path, what=f"the CA file {path!r}", limit=CA_BUNDLE_LIMIT, unreadable=CertificateError)


def network_reason(exc: BaseException) -> str:
    """Why a connection failed, in a few words (``the host name does not resolve (…)``, ``connection
    refused``), also from inside requests'/urllib3's wrappers."""
    from ._https import network_reason as reason

    return reason(exc)


def tls_failure(exc: OSError, host: str, port: int, context):
    """The typed error for a TLS failure no retry cures, in plain words, or None: a
    :class:`~lightclient.exceptions.ServerCertificateError` (untrusted, expired, wrong host name, …) or a
    :class:`~lightclient.exceptions.TlsVersionError`."""
    from ._verify import permanent_tls_error

    return permanent_tls_error(exc, host, port, context)
