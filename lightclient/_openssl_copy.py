"""Does Python's ssl module use the same libssl/libcrypto copy as lightclient's shim?

A key loaded into one OpenSSL copy cannot be used by an ``SSL_CTX`` of another, so every native entry
point runs :func:`check_same_openssl` once. The check itself is pure (unit-tested with made-up facts);
:func:`openssl_facts` collects the real ones from this process through the shim.
"""
from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from typing import List, Optional

from .exceptions import OpenSSLMismatchError



@dataclass(frozen=True)
class OpenSSLFacts:
    """Where Python's ssl module and the shim each get OpenSSL from, and which version each runs."""

    python_ssl_origin: Optional[str]   # file providing SSL_CTX_new to _ssl; None if not visible
    python_crypto_origin: Optional[str]
    shim_ssl_origin: Optional[str]
    shim_crypto_origin: Optional[str]
    python_version_number: int          # ssl.OPENSSL_VERSION_NUMBER
    python_version_text: str
    shim_version_number: int            # OpenSSL_version_num() as seen by the shim
    shim_version_text: str


WORKING_PYTHONS = (
    "Use a Python whose ssl module links the system's shared libssl/libcrypto: Debian/Ubuntu/"
    "Raspberry Pi OS python3, a pyenv or source build against the system OpenSSL, or the official "
    "Docker python images. Pythons with OpenSSL linked in statically (python-build-standalone, as "
    "installed by uv or rye) or carrying a second copy (some conda environments) cannot share a "
    "hardware key with the ssl module."
)


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return os.path.realpath(a) == os.path.realpath(b)


def check_same_openssl(facts: OpenSSLFacts) -> None:
    """Raise :class:`OpenSSLMismatchError` unless Python's ssl and the shim share one OpenSSL copy."""
    problems: List[str] = []
    for what, py, shim in (
        ("libssl", facts.python_ssl_origin, facts.shim_ssl_origin),
        ("libcrypto", facts.python_crypto_origin, facts.shim_crypto_origin),
    ):
        if shim is None:
            problems.append(f"the shim's {what} could not be located")
        elif py is None:
            problems.append(
                f"Python's ssl module does not take {what} from a shared library "
                f"(OpenSSL is linked into it statically); the shim uses {shim}"
            )
        elif not _same_file(py, shim):
            problems.append(f"Python's ssl module uses {py} but the shim uses {shim}")
    if facts.python_version_number != facts.shim_version_number:
        problems.append(
            f"Python's ssl module runs {facts.python_version_text} "
            f"(0x{facts.python_version_number:08x}) but the shim runs {facts.shim_version_text} "
            f"(0x{facts.shim_version_number:08x})"
        )
    if problems:
        raise OpenSSLMismatchError(
            "lightclient cannot put a hardware key into this Python's ssl module: "
            + "; ".join(problems)
            + ". A key loaded into one OpenSSL copy cannot be used by another. "
            + WORKING_PYTHONS
        )


def openssl_facts() -> OpenSSLFacts:
    """Collect the linkage facts from this process (used by the check and by ``doctor``)."""
    import _ssl

    from . import _native

    ssl_path = getattr(_ssl, "__file__", None)  # None: _ssl is built into the interpreter
    shim_path = _native.shim_path()
    version_number, version_text = _native.shim_openssl_version()
    return OpenSSLFacts(
        python_ssl_origin=_native.symbol_origin(ssl_path, "SSL_CTX_new"),
        python_crypto_origin=_native.symbol_origin(ssl_path, "ERR_get_error"),
        shim_ssl_origin=_native.symbol_origin(shim_path, "SSL_CTX_new"),
        shim_crypto_origin=_native.symbol_origin(shim_path, "ERR_get_error"),
        python_version_number=ssl.OPENSSL_VERSION_NUMBER,
        python_version_text=ssl.OPENSSL_VERSION,
        shim_version_number=version_number,
        shim_version_text=version_text,
    )
