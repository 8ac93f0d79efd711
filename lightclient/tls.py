"""``ssl.SSLContext`` objects whose client key lives in a hardware token.

``client_context()`` is for MQTT (hand it to paho's ``tls_set_context``); ``https_context()`` and
``https_session()`` are for DPS over HTTPS with requests. Both verify the server: TLS 1.2 at
least, ``CERT_REQUIRED``, hostname checking, and by default trust only the roots that Azure IoT
Hub and DPS chain to (DigiCert Global Root G2 and G3, Microsoft RSA and ECC Root CA 2017), shipped
with the package. There is deliberately no switch that turns server verification off.
"""
from __future__ import annotations

import os
import ssl
from typing import Optional, Sequence, Union

from . import _native
from ._files import CA_BUNDLE_LIMIT, CHAIN_LIMIT, KEY_LIMIT, check_user_file, prepare_private_file, read_user_file
from .exceptions import CertificateError, ConfigError, KeyMismatchError, LightClientError, PinError, wording
from .keys import TSS2_PEM_HEADER, KeyRef, PinCallback, load_key, parse_key_ref

PathOrPem = Union[str, bytes, os.PathLike]

#: The bundled IoT Hub / DPS trust roots, as one PEM file path.
def iothub_roots_path() -> str:
    # Beside this module (package data); importlib.resources would cost start-up time for nothing.
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "roots", "iothub-roots.pem")


_PEM_CERT = b"-----BEGIN CERTIFICATE-----"


def _read_chain(cert: PathOrPem) -> "tuple[bytes, str]":
    """Certificate chain PEM bytes and a name for messages; accepts a path or PEM text."""
    if isinstance(cert, bytes) or (isinstance(cert, str) and _PEM_CERT.decode() in cert):
        data = cert if isinstance(cert, bytes) else cert.encode()
        name = "the certificate PEM data"
    elif isinstance(cert, (str, os.PathLike)):
        path = os.fspath(cert)
        name = f"the certificate file {path!r}"
        data = read_user_file(path, what=name, limit=CHAIN_LIMIT, unreadable=CertificateError,
                              hint=". Give the PEM certificate (chain) issued for this device's key.")
    else:
        raise ConfigError(f"cert must be a file path or PEM data, got {type(cert).__name__}")
    if _PEM_CERT not in data:
        raise CertificateError(
            f"{name} holds no PEM certificate (expected \"-----BEGIN CERTIFICATE-----\"); "
            "convert a DER file with `openssl x509 -inform der -in cert.der -out cert.pem`.")
    return data, name


def _load_trust(ctx: ssl.SSLContext, ca: Optional[PathOrPem]) -> None:
    try:
        if ca is None:
            ctx.load_verify_locations(cafile=iothub_roots_path())
        elif isinstance(ca, bytes) or (isinstance(ca, str) and _PEM_CERT.decode() in ca):
            ctx.load_verify_locations(cadata=ca.decode() if isinstance(ca, bytes) else ca)
        else:
            path = os.fspath(ca)
            if os.path.isdir(path):
                ctx.load_verify_locations(capath=path)
            else:
                # OpenSSL reads the file itself; make sure it is a regular file of a sane size first.
                check_user_file(path, what=f"the CA file {path!r}", limit=CA_BUNDLE_LIMIT,
                                unreadable=CertificateError)
                ctx.load_verify_locations(cafile=path)
    except (OSError, ssl.SSLError) as exc:
        raise CertificateError(f"cannot load the trusted CA certificates from {ca!r}: {exc}") from None


def private_keylog(path: Union[str, os.PathLike]) -> str:
    """``path`` made ready as an owner-only (0600) key log file; set the result as ``ctx.keylog_filename``.

    Python's ssl would create the file with the default mode (0644 under umask 022) although it holds
    the session secrets; this creates it 0600 first and refuses an existing file others can read.
    """
    path = os.fspath(path)
    prepare_private_file(path, what=f"the key log file {path!r}")
    return path


def _base_context(ca: Optional[PathOrPem], minimum_version: ssl.TLSVersion,
                  maximum_version: Optional[ssl.TLSVersion]) -> ssl.SSLContext:
    if minimum_version < ssl.TLSVersion.TLSv1_2:
        raise ConfigError("IoT Hub and DPS require TLS 1.2 or newer; minimum_version cannot be lower")
    # libssl builds the context's TLS group list now, from the key management the current
    # property query selects; make sure that is the default provider's even after a tpm2 key
    # was used (otherwise EC keys fail TLS 1.2 with "wrong curve").
    _native.tls_prepare()
    # PROTOCOL_TLS_CLIENT turns on CERT_REQUIRED and check_hostname.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = minimum_version
    if maximum_version is not None:
        ctx.maximum_version = maximum_version
    _load_trust(ctx, ca)
    return ctx


def attach_key(ctx: ssl.SSLContext, *, cert: PathOrPem, key: Union[str, os.PathLike, KeyRef, "_native.NativeKey"],
               pin: Optional[str] = None, pin_file: Optional[str] = None,
               pin_callback: Optional[PinCallback] = None, module_path: Optional[str] = None,
               providers: Sequence[str] = (), propq: Optional[str] = None) -> "Optional[_native.NativeKey]":
    """Install ``cert`` and the hardware-backed ``key`` into an existing ``ssl.SSLContext``.

    For people who build their own context: everything else about ``ctx`` is left as it is.
    Returns the loaded key (keep it if you will sign CSRs with it), or None for a plain PEM key file,
    which Python's own ``ssl`` loads (development keys; use :func:`lightclient.keys.load_key` to sign).
    """
    _native._require_sslcontext(ctx)
    chain, name = _read_chain(cert)
    if not isinstance(key, _native.NativeKey):
        ref = parse_key_ref(key)
        if ref.backend == "file" and isinstance(cert, (str, os.PathLike)) and _plain_pem_key(ref.target):
            # A development key file: Python's own ssl loads it, no native shim needed (so file keys
            # work even where the shim cannot, e.g. a Python with a statically linked OpenSSL).
            if _load_file_pair(ctx, os.fspath(cert), name, ref, ref.resolve_pin(pin, pin_file, pin_callback)):
                return None
    native_key = key if isinstance(key, _native.NativeKey) else load_key(
        key, pin=pin, pin_file=pin_file, pin_callback=pin_callback, module_path=module_path,
        providers=providers, propq=propq)
    _native.install(ctx, native_key, chain, name)
    return native_key


def _plain_pem_key(path: str) -> bool:
    """A readable PEM key file that is not TPM-wrapped (TSS2 keys need the tpm2 provider)."""
    try:
        head = read_user_file(path, what=f"the key file {path!r}", limit=KEY_LIMIT)
    except LightClientError:
        return False  # load_key reports the problem with the usual message
    return b"-----BEGIN" in head and TSS2_PEM_HEADER not in head


def _load_file_pair(ctx: ssl.SSLContext, cert_path: str, cert_name: str, ref: KeyRef, pin: Optional[str]) -> bool:
    """Load a PEM certificate + key file pair with Python's ssl; False when the shim should explain why not."""
    asked = []

    def password() -> str:
        asked.append(True)
        # Never None: OpenSSL would then prompt on the terminal, and a device must not block there.
        return pin if pin is not None else ""

    try:
        ctx.load_cert_chain(cert_path, ref.target, password=password)
        return True
    except ssl.SSLError as exc:
        text = f"{exc.reason or ''} {exc}".lower()
        if "key values mismatch" in text or "key_values_mismatch" in text:
            raise KeyMismatchError(
                f"{cert_name} does not belong to the private key in {ref.target!r}: the certificate's public key "
                "differs from the key's. Use the certificate issued for this key.") from None
        if asked:
            if pin is None:
                raise PinError(wording(f"the key file {ref.target!r} is encrypted: give its pass phrase ({{pin}})",
                                     pin="pin=, pin_file=")) from None
            raise PinError(f"the pass phrase for the key file {ref.target!r} was refused") from None
        # Python's ssl reports only "PEM lib": let the shim load the pair and name the actual problem.
        return False


def client_context(*, cert: PathOrPem, key, ca: Optional[PathOrPem] = None, pin: Optional[str] = None,
                   pin_file: Optional[str] = None, pin_callback: Optional[PinCallback] = None,
                   module_path: Optional[str] = None, providers: Sequence[str] = (),
                   propq: Optional[str] = None, minimum_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2,
                   maximum_version: Optional[ssl.TLSVersion] = None) -> ssl.SSLContext:
    """An ``ssl.SSLContext`` for MQTT with IoT Hub whose client key stays in its token.

    ``key`` is a key reference (see :mod:`lightclient.keys`) or an already loaded key; ``cert``
    the device certificate chain (path or PEM), leaf first; ``ca`` overrides the bundled IoT Hub
    roots (a file, a directory or PEM data), e.g. for a local emulator or broker.
    """
    # The context is made before any provider is loaded: libssl takes its TLS group list from the
    # providers present at that moment, and the tpm2 provider declares none (EC over TLS 1.2).
    ctx = _base_context(ca, minimum_version, maximum_version)
    attach_key(ctx, cert=cert, key=key, pin=pin, pin_file=pin_file, pin_callback=pin_callback,
               module_path=module_path, providers=providers, propq=propq)
    return ctx


def server_context(*, ca: Optional[PathOrPem] = None, alpn: Optional[Sequence[str]] = None,
                   minimum_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2,
                   maximum_version: Optional[ssl.TLSVersion] = None) -> ssl.SSLContext:
    """TLS that verifies the server (bundled IoT Hub roots or ``ca``) and sends no client certificate:
    for SAS authentication, where the MQTT password or the HTTP Authorization header is the credential.
    ``alpn=["http/1.1"]`` for DPS over HTTPS."""
    ctx = _base_context(ca, minimum_version, maximum_version)
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def https_context(*, cert: PathOrPem, key, ca: Optional[PathOrPem] = None, **kwargs) -> ssl.SSLContext:
    """Like :func:`client_context`, for HTTPS (DPS): offers ALPN ``http/1.1``.

    Use it through :func:`https_session`, never by giving requests ``cert=``: urllib3 would load
    that certificate's key from a file and replace the hardware key.
    """
    ctx = client_context(cert=cert, key=key, ca=ca, **kwargs)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def https_session(ctx: ssl.SSLContext):
    """A ``requests.Session`` whose HTTPS connections all use ``ctx`` (and its hardware key).

    It never speaks plain HTTP (an ``http://`` URL raises ConfigError before any connection) and never
    follows a redirect: where requests would, it raises ServiceError naming the status and the Location.
    """
    from ._https import new_session

    return new_session(context_adapter(ctx))


def _adapter_class():
    from requests.adapters import HTTPAdapter

    class _ContextAdapter(HTTPAdapter):
        """Sends every request through one SSLContext; refuses settings that would undo it.

        requests >= 2.32.3 no longer loads CA certificates into a context it is given, so the
        context carries its own trust roots (``client_context`` loads them).
        """

        def __init__(self, ctx: ssl.SSLContext, **kwargs):
            _native._require_sslcontext(ctx)
            self._lc_ctx = ctx
            super().__init__(**kwargs)

        def init_poolmanager(self, *args, **kwargs):
            kwargs["ssl_context"] = self._lc_ctx
            return super().init_poolmanager(*args, **kwargs)

        def proxy_manager_for(self, proxy, **kwargs):
            kwargs["ssl_context"] = self._lc_ctx
            return super().proxy_manager_for(proxy, **kwargs)

        def send(self, request, stream=False, timeout=None, verify=True, cert=None, proxies=None):
            # A str is a CA bundle path, often from REQUESTS_CA_BUNDLE in the environment; the
            # context already carries its roots, and urllib3 would load that file into it.
            if verify is False:
                raise ConfigError(
                    "verify must stay True with a lightclient context: the context carries the trusted "
                    "roots (pass ca=... to https_context to trust another CA)")
            if cert is not None:
                raise ConfigError(
                    "do not pass cert= to requests with a lightclient context: urllib3 would load a key "
                    "file and replace the hardware key")
            return super().send(request, stream=stream, timeout=timeout, verify=True, cert=None,
                                proxies=proxies)

    return _ContextAdapter


def context_adapter(ctx: ssl.SSLContext, **kwargs):
    """A requests ``HTTPAdapter`` bound to ``ctx`` (built lazily so requests stays optional here)."""
    return _adapter_class()(ctx, **kwargs)
