"""Authorization at CONNECT for any client certificate, as IoT Hub does it (reference §1: "authorization
happens at CONNECT"): the TLS handshake accepts every certificate, and the chain's verification result is
read at CONNECT, where an untrusted certificate gets CONNACK 5 and a diagnostic naming the X.509 error.

Python's ``ssl`` has no server-side verify callback, and a server context that requests a certificate
(``CERT_OPTIONAL``/``CERT_REQUIRED``) fails the handshake on any chain error. So this uses lightclient's
native shim when it is built: ``lc_ctx_accept_any_peer`` installs an accept-all verify callback in the
context's ``SSL_CTX`` (OpenSSL still verifies and records the result), and ``lc_peer_verify_result``
reads that result for one connection. The shim is loaded by name at run time only
(``importlib.import_module``), so the emulator stays importable, and runs, with the standard library
alone; tests/unit/test_boundaries.py allows exactly this one import, here.

Without the shim (not built, an older build, or ``authorize_at_connect=False``) the handshake refuses
untrusted certificates as before, and the TLS diagnostic says why the hub's behaviour differs.
"""
from __future__ import annotations

import importlib
import ssl
from typing import Optional, Tuple

X509_V_OK = 0


class PeerTrust:
    """Reads, per connection, whether the client's chain verified (the handshake let it through)."""

    def __init__(self, context: ssl.SSLContext, shim) -> None:
        self._context = context
        self._ffi, self._lib = shim.ffi, shim.lib

    def verify_result(self, ssl_object: ssl.SSLObject) -> Tuple[int, str]:
        """(X509 verify result, its text); (0, "ok") when the chain verified."""
        text = self._ffi.new("char[]", 256)
        code = self._lib.lc_peer_verify_result(self._ffi.cast("void *", id(ssl_object._sslobj)),
                                               self._ffi.cast("void *", id(self._context)),
                                               int(self._context.options), text, 256)
        if code < 0:  # the shim could not prove the pointers: treat as unverified, and say so
            return code, f"the native shim could not read this connection's verification result (code {-code})"
        return code, self._ffi.string(text).decode(errors="replace")


def enable(context: ssl.SSLContext, wanted: bool = True) -> Tuple[Optional[PeerTrust], str]:
    """Make ``context`` accept every client certificate at TLS; (PeerTrust, "") or (None, why not)."""
    if not wanted:
        return None, "authorization at CONNECT is turned off (authorize_at_connect=False)"
    try:
        shim = importlib.import_module("lightclient._shim")   # the one allowed load (test_boundaries rule 1)
    except ImportError as exc:
        return None, f"lightclient's native shim is not built ({exc})"
    if not hasattr(shim.lib, "lc_ctx_accept_any_peer"):
        return None, "lightclient's native shim is older than this emulator (rebuild it: pip install .)"
    rc = shim.lib.lc_ctx_accept_any_peer(shim.ffi.cast("void *", id(context)), int(context.options))
    if rc != 0:
        return None, f"the native shim could not reach the server's SSL_CTX (code {rc})"
    return PeerTrust(context, shim), ""
