"""The only importer of the compiled shim (``lightclient._shim``): the binding calls.

Everything that crosses into C goes through here: arguments are checked before the call, every
result is checked after it, and a failure drains OpenSSL's error queue into a typed exception.
What the errors mean is decided in :mod:`lightclient._native_errors`; whether Python's ssl module
and the shim share one OpenSSL is :mod:`lightclient._openssl_copy`. PINs cross into C as bytes and
never appear in any message built here.
"""
from __future__ import annotations

import datetime
import os
import ssl
import threading
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

from ._native_errors import ENGINE_PACKAGE_HINT, LoadContext, _redact, key_load_error, rc_name
from ._openssl_copy import WORKING_PYTHONS, check_same_openssl, openssl_facts
from .exceptions import (
    BackendUnavailableError,
    CertificateError,
    ConfigError,
    KeyConfigError,
    KeyLoadError,
    KeyMismatchError,
    ModuleLoadError,
    NativeError,
    PinError,
    TokenNotFoundError,
)

# The compiled shim is imported on first use, not here: importing lightclient (and paho, for a
# file-key context) then costs neither the cffi runtime nor libssl symbol binding.
_shim = None
_SHIM_IMPORT_ERROR: Optional[ImportError] = None


def _shim_lib():
    global _shim, _SHIM_IMPORT_ERROR
    if _shim is None and _SHIM_IMPORT_ERROR is None:
        try:
            from . import _shim as shim
        except ImportError as exc:  # exercised only on broken installs
            _SHIM_IMPORT_ERROR = exc
        else:
            _shim = shim
    if _shim is None:
        raise BackendUnavailableError(
            "lightclient's native shim is not built (lightclient._shim is missing): reinstall with "
            "`pip install .` on a machine with a C compiler and the OpenSSL headers "
            f"(Debian: apt install gcc libssl-dev). Import error: {_SHIM_IMPORT_ERROR}"
        )
    return _shim.ffi, _shim.lib


def shim_path() -> str:
    """The file of the compiled shim this process uses (loading it if needed)."""
    _shim_lib()
    return _shim.__file__


def symbol_origin(path: Optional[str], symbol: str) -> Optional[str]:
    """The shared object that provides ``symbol`` to the library at ``path`` (None if not visible)."""
    ffi, lib = _shim_lib()
    buf = ffi.new("char[]", 4096)
    rc = lib.lc_symbol_origin(path.encode() if path else ffi.NULL, symbol.encode(), buf, 4096)
    return ffi.string(buf).decode(errors="replace") if rc == 1 else None


def shim_openssl_version() -> "tuple[int, str]":
    """OpenSSL_version_num() and the version text, as the shim sees them."""
    ffi, lib = _shim_lib()
    return lib.lc_openssl_version_num(), ffi.string(lib.lc_openssl_version_text()).decode(errors="replace")


_checked = False
_check_lock = threading.Lock()


def ensure_compatible() -> None:
    """Run the same-OpenSSL check once per process; every entry point below calls it first."""
    global _checked
    if _checked:
        return
    with _check_lock:
        if not _checked:
            check_same_openssl(openssl_facts())
            _checked = True


def engine_support() -> bool:
    return bool(_shim_lib()[1].lc_engine_support())


def provider_support() -> bool:
    return bool(_shim_lib()[1].lc_provider_support())


# ---------------------------------------------------------------------------------------------
# Errors


def drain_errors() -> Tuple[str, ...]:
    """Pop OpenSSL's (thread-local) error queue, oldest first."""
    ffi, lib = _shim_lib()
    buf = ffi.new("char[]", 1024)
    out = []
    while lib.lc_err_next(buf, 1024):
        out.append(ffi.string(buf).decode(errors="replace"))
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# Keys


class NativeKey:
    """A private key held by OpenSSL (its secret stays in the token). Freed when garbage-collected."""

    __slots__ = ("_ptr", "description", "__weakref__")

    def __init__(self, ptr, description: str):
        ffi, lib = _shim_lib()
        self._ptr = ffi.gc(ptr, lib.lc_key_free)
        self.description = description

    @property
    def key_type(self) -> str:
        ffi, lib = _shim_lib()
        return ffi.string(lib.lc_key_type(self._ptr)).decode()

    @property
    def bits(self) -> int:
        return _shim_lib()[1].lc_key_bits(self._ptr)

    def __repr__(self) -> str:
        return f"<NativeKey {self.key_type}-{self.bits} from {self.description}>"


def _b(value: Optional[str]):
    ffi, _ = _shim_lib()
    return value.encode() if value is not None else ffi.NULL


def _finish_load(rc: int, out, pin_status, pin: Optional[str], ctx: LoadContext, secrets=()) -> NativeKey:
    _, lib = _shim_lib()
    errors = _redact(drain_errors(), (pin,) + tuple(secrets))
    if rc != lib.LC_OK:
        raise key_load_error(rc, pin_status[0], errors, ctx)
    return NativeKey(out[0], ctx.reference)


def load_engine_key(key_id: str, *, engine_id: str = "pkcs11", so_path: Optional[str] = None,
                    module_path: Optional[str] = None, pin: Optional[str] = None,
                    description: Optional[str] = None, secrets: Sequence[str] = ()) -> NativeKey:
    """Load a private key through an OpenSSL ENGINE (``ENGINE_load_private_key``).

    ``secrets`` (besides ``pin``) are scrubbed from OpenSSL's error text, e.g. a URI's pin-value.
    """
    ensure_compatible()
    ffi, lib = _shim_lib()
    if module_path is not None and not os.path.isfile(module_path):
        raise ModuleLoadError(
            f"the PKCS#11 module {module_path!r} does not exist: install it (SoftHSM: apt install "
            "softhsm2; TPM: apt install libtpm2-pkcs11-1) or fix the path.")
    if so_path is not None and not os.path.isfile(so_path):
        raise BackendUnavailableError(f"the engine shared object {so_path!r} does not exist: {ENGINE_PACKAGE_HINT}.")
    out = ffi.new("lc_key **")
    pin_status = ffi.new("int *")
    ctx = LoadContext("engine", description or key_id, module_path=module_path, engine_id=engine_id)
    bound = ffi.new("char[]", 4096)
    rc = lib.lc_key_from_engine(engine_id.encode(), _b(so_path), _b(module_path), _b(pin),
                                key_id.encode(), out, pin_status, bound, 4096)
    if rc == lib.LC_E_ENGINE_MODULE:
        raise ModuleLoadError(
            f"cannot load {ctx.reference} from the PKCS#11 module {module_path!r}: the {engine_id!r} engine "
            f"in this process already serves {ffi.string(bound).decode(errors='replace')!r}, and OpenSSL "
            "allows one instance of an engine per process. Use one PKCS#11 module per process, or load "
            "the second key through an OpenSSL 3 provider (store: or provider: key reference).",
            _redact(drain_errors(), (pin,) + tuple(secrets)))
    return _finish_load(rc, out, pin_status, pin, ctx, secrets)


#: The default property query applied when a key comes through the tpm2 provider (pass
#: ``propq=""`` to leave the process's properties alone, or another query to override it).
#: It prefers tpm2 only for *signatures* (its algorithms there carry ``tpm2.signature``): a key
#: that lives in the TPM must be signed with by the TPM, and nothing else changes. Hashing,
#: random numbers, AES, key management and ECDH stay with the "default" provider (the shim
#: makes "default" win every tie), so a handshake costs ~30 ms instead of the 190-330 ms that
#: ``?provider=tpm2`` costs here, and EC keys keep the NIST curves for TLS 1.2. Its price:
#: verifying the server's signatures also runs through the tpm2 provider, and in such a
#: process a *software* private key can no longer sign.
TPM2_PROPQ = "?tpm2.signature"


def tls_prepare() -> None:
    """Call before creating an SSL context: keeps its TLS group list on the default provider."""
    if _shim is not None:  # never loaded: no provider was loaded through it either
        _shim.lib.lc_tls_prepare()


def load_store_key(uri: str, *, providers: Sequence[str] = (), propq: Optional[str] = None,
                   pin: Optional[str] = None, description: Optional[str] = None,
                   secrets: Sequence[str] = ()) -> NativeKey:
    """Load exactly one private key through ``OSSL_STORE`` (OpenSSL 3 providers); see load_engine_key for ``secrets``."""
    ensure_compatible()
    ffi, lib = _shim_lib()
    for name in providers:
        if not name or "," in name:
            raise ConfigError(f"invalid provider name {name!r}: give names like 'tpm2' or 'default'.")
    if propq is None and "tpm2" in providers:
        propq = TPM2_PROPQ
    out = ffi.new("lc_key **")
    pin_status = ffi.new("int *")
    plist = ",".join(providers) if providers else None
    ctx = LoadContext("store", description or uri, providers=plist)
    shared = uri.startswith("handle:")
    if shared:
        # tpm2-openssl gives every load of one persistent handle the same ESYS handle and closes
        # it when any of those keys is freed, which breaks the others ("Esys handle does not
        # exist", then "EVP lib" in the handshake). So a persistent key is loaded once per process
        # and shared; it stays loaded, like the provider that serves it.
        import hashlib

        cache_key = (uri, plist, propq, hashlib.sha256((pin or "").encode()).hexdigest() if pin else None)
        with _handle_keys_lock:
            cached = _handle_keys.get(cache_key)
            if cached is not None:
                # Still apply the providers and properties, as a fresh load would.
                rc = lib.lc_providers_apply(_b(plist), _b(propq))
                if rc != lib.LC_OK:
                    raise key_load_error(rc, lib.LC_PIN_NOT_ASKED,
                                         _redact(drain_errors(), (pin,) + tuple(secrets)), ctx)
                return cached
            rc = lib.lc_key_from_store(uri.encode(), _b(plist), _b(propq), _b(pin), out, pin_status)
            key = _finish_load(rc, out, pin_status, pin, ctx, secrets)
            _handle_keys[cache_key] = key
            return key
    rc = lib.lc_key_from_store(uri.encode(), _b(plist), _b(propq), _b(pin), out, pin_status)
    return _finish_load(rc, out, pin_status, pin, ctx, secrets)


_handle_keys: dict = {}
_handle_keys_lock = threading.Lock()


def load_pem_key(pem: bytes, *, pin: Optional[str] = None, description: str = "PEM data") -> NativeKey:
    """Load a PEM private key (development only: this key is in process memory)."""
    ensure_compatible()
    ffi, lib = _shim_lib()
    if not pem:
        raise KeyLoadError(f"{description} is empty: it must hold a PEM private key.")
    out = ffi.new("lc_key **")
    pin_status = ffi.new("int *")
    rc = lib.lc_key_from_pem(pem, len(pem), _b(pin), out, pin_status)
    return _finish_load(rc, out, pin_status, pin, LoadContext("file", description))


# ---------------------------------------------------------------------------------------------
# Contexts


def _require_sslcontext(ctx) -> None:
    import _ssl

    if not isinstance(ctx, _ssl._SSLContext):
        raise TypeError(
            f"expected an ssl.SSLContext, got {type(ctx).__module__}.{type(ctx).__qualname__}")


def check_context(ctx: ssl.SSLContext) -> None:
    """Verify that the shim can reach and trust the SSL_CTX inside ``ctx`` (raises otherwise)."""
    _require_sslcontext(ctx)
    ensure_compatible()
    ffi, lib = _shim_lib()
    rc = lib.lc_ctx_check(ffi.cast("void *", id(ctx)), int(ctx.options))
    _raise_ctx_rc(rc, ctx)


def _raise_ctx_rc(rc: int, ctx) -> None:
    _, lib = _shim_lib()
    if rc == lib.LC_OK:
        return
    if rc == lib.LC_E_TYPE:
        raise TypeError(f"expected an ssl.SSLContext, got {type(ctx).__qualname__}")
    if rc == lib.LC_E_CTX_CHECK:
        raise NativeError(
            "the OpenSSL context inside this ssl.SSLContext failed verification (its options do not "
            "match what Python reports); refusing to touch it. " + WORKING_PYTHONS, drain_errors())


@dataclass(frozen=True)
class CertificateInfo:
    """What ``doctor`` and friends need to know about a certificate (the first one in a PEM chain)."""

    subject_cn: str
    issuer_cn: str
    not_before: datetime.datetime   # aware, UTC
    not_after: datetime.datetime


def certificate_info(chain_pem: bytes) -> CertificateInfo:
    """Subject and issuer common names and the validity period of the first certificate in ``chain_pem``."""
    ffi, lib = _shim_lib()
    subject, issuer = ffi.new("char[]", 1024), ffi.new("char[]", 1024)
    start, end = ffi.new("int64_t *"), ffi.new("int64_t *")
    rc = lib.lc_cert_info(chain_pem, len(chain_pem), subject, 1024, issuer, 1024, start, end)
    errors = drain_errors()
    if rc != lib.LC_OK:
        raise CertificateError("no readable PEM certificate found in the certificate data.", errors)

    def when(seconds: int) -> "datetime.datetime":
        return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)

    return CertificateInfo(ffi.string(subject).decode(errors="replace"), ffi.string(issuer).decode(errors="replace"),
                           when(start[0]), when(end[0]))


def cert_matches_key(chain_pem: bytes, key: NativeKey) -> bool:
    ensure_compatible()
    ffi, lib = _shim_lib()
    rc = lib.lc_cert_matches_key(chain_pem, len(chain_pem), key._ptr)
    errors = drain_errors()
    if rc < 0:
        raise CertificateError("no PEM certificate found in the certificate data.", errors)
    return rc == 1


def install(ctx: ssl.SSLContext, key: NativeKey, chain_pem: bytes, chain_name: str = "certificate") -> None:
    """Put ``chain_pem`` (leaf first) and ``key`` into the SSL_CTX of ``ctx``."""
    _require_sslcontext(ctx)
    ensure_compatible()
    ffi, lib = _shim_lib()
    if not isinstance(key, NativeKey):
        raise TypeError(f"expected a NativeKey, got {type(key).__qualname__}")
    if not chain_pem:
        raise CertificateError(f"{chain_name} is empty: it must hold a PEM certificate (chain).")
    rc = lib.lc_ctx_install(ffi.cast("void *", id(ctx)), int(ctx.options), key._ptr, chain_pem, len(chain_pem))
    errors = drain_errors()
    _raise_ctx_rc(rc, ctx)
    if rc == lib.LC_E_CERT_PARSE:
        raise CertificateError(
            f"{chain_name} holds no PEM certificate (expected \"-----BEGIN CERTIFICATE-----\").", errors)
    if rc == lib.LC_E_MISMATCH:
        raise KeyMismatchError(
            f"{chain_name} does not belong to the private key {key.description}: the certificate's "
            "public key differs from the key's. Use the certificate issued for this key (or sign a "
            "new CSR with `lightclient csr`).", errors)
    if rc == lib.LC_E_USE_CERT:
        raise CertificateError(f"OpenSSL refused {chain_name} (too weak a key or signature?).", errors)
    if rc != lib.LC_OK:
        raise NativeError(f"could not install the key and {chain_name} ({rc_name(rc)}).", errors)


# ---------------------------------------------------------------------------------------------
# CSR


def sign_csr(key: NativeKey, subject: Sequence[Tuple[str, str]], san: Optional[str] = None,
             digest: str = "sha256") -> bytes:
    """Return a DER PKCS#10 request for ``subject`` signed by ``key``."""
    ensure_compatible()
    ffi, lib = _shim_lib()
    keep = []
    fields = ffi.new("char *[]", max(1, len(subject)))
    values = ffi.new("char *[]", max(1, len(subject)))
    for i, (field, value) in enumerate(subject):
        f, v = ffi.new("char[]", field.encode()), ffi.new("char[]", value.encode())
        keep += [f, v]
        fields[i], values[i] = f, v
    der = ffi.new("unsigned char **")
    der_len = ffi.new("size_t *")
    rc = lib.lc_csr_sign(key._ptr, ffi.cast("const char **", fields), ffi.cast("const char **", values),
                         len(subject), _b(san), digest.encode(), der, der_len)
    errors = drain_errors()
    if rc == lib.LC_E_CSR_SUBJECT:
        raise KeyConfigError(f"the CSR subject {subject!r} was refused: use field names like CN, O, OU, C.", errors)
    if rc == lib.LC_E_CSR_SAN:
        raise KeyConfigError(
            f"the subjectAltName {san!r} was refused: use OpenSSL's syntax, e.g. 'DNS:device1,IP:127.0.0.1'.", errors)
    if rc == lib.LC_E_CSR_DIGEST:
        raise KeyConfigError(f"unknown digest {digest!r}: use sha256, sha384 or sha512.", errors)
    if rc != lib.LC_OK:
        raise NativeError(f"signing the CSR with {key.description} failed ({rc_name(rc)}).", errors)
    try:
        return bytes(ffi.buffer(der[0], der_len[0]))
    finally:
        lib.lc_free(der[0])


# ---------------------------------------------------------------------------------------------
# PKCS#11 key pairs through this process's instance of the module (see lc_shim.h)

#: key type -> (LC_P11_* kind, RSA modulus bits)
_P11_KINDS = {"ec-p256": (1, 0), "ec-p384": (2, 0), "rsa-2048": (3, 2048), "rsa-3072": (3, 3072)}
_CKR_PIN = {0xA0: "CKR_PIN_INCORRECT", 0xA1: "CKR_PIN_INVALID", 0xA2: "CKR_PIN_LEN_RANGE", 0xA4: "CKR_PIN_LOCKED"}
_CKR_FULL = {0x31: "CKR_DEVICE_MEMORY", 0x02: "CKR_HOST_MEMORY"}
_CKR_UNSUPPORTED = {0x70: "CKR_MECHANISM_INVALID", 0x13: "CKR_ATTRIBUTE_VALUE_INVALID",
                    0xD1: "CKR_TEMPLATE_INCONSISTENT", 0xD0: "CKR_TEMPLATE_INCOMPLETE",
                    0x130: "CKR_DOMAIN_PARAMS_INVALID", 0x12: "CKR_ATTRIBUTE_TYPE_INVALID"}


def p11_generate_keypair(module_path: str, token_label: str, pin: str, key_label: str, key_type: str,
                         key_id: bytes) -> None:
    """Make a sign-only, sensitive, non-extractable key pair on the token through the module instance
    this process shares with OpenSSL's libp11 engine, so that engine finds it. The PIN crosses into C
    as a buffer that is wiped afterwards."""
    ffi, lib = _shim_lib()
    if key_type not in _P11_KINDS:
        raise ConfigError(f"unknown key type {key_type!r}: choose one of {', '.join(_P11_KINDS)}")
    if not os.path.isfile(module_path):
        raise ModuleLoadError(f"the PKCS#11 module {module_path!r} does not exist: install it or fix the path.")
    kind, bits = _P11_KINDS[key_type]
    ckr = ffi.new("unsigned long *")
    where = ffi.new("char[]", 64)
    secret = bytearray(pin, "utf-8")
    try:
        rc = lib.lc_p11_generate_keypair(module_path.encode(), token_label.encode(),
                                         ffi.from_buffer("unsigned char[]", secret), len(secret), key_label.encode(),
                                         ffi.from_buffer("unsigned char[]", key_id), len(key_id), kind, bits,
                                         ckr, where, 64)
    finally:
        secret[:] = bytes(len(secret))
    if rc == lib.LC_OK:
        return
    code, function = ckr[0], ffi.string(where).decode(errors="replace")
    if rc == lib.LC_E_P11_MODULE:
        raise ModuleLoadError(f"cannot load the PKCS#11 module {module_path!r} (no C_GetFunctionList in it?)")
    if rc == lib.LC_E_P11_TOKEN:
        raise TokenNotFoundError(f"no token labelled {token_label!r} in {module_path!r}")
    if rc == lib.LC_E_P11_EXISTS:
        raise ConfigError(f"token {token_label!r} already holds a private key labelled {key_label!r}")
    if rc == lib.LC_E_P11_NOT_SENSITIVE:
        raise KeyLoadError(f"the token created {key_label!r} but did not make it sensitive and non-extractable")
    if rc == lib.LC_E_ARG:
        raise ConfigError("a key pair needs a module path, a token label, a PIN, a key label and an id")
    if rc == lib.LC_E_NOMEM:
        raise MemoryError("out of memory listing the PKCS#11 slots")
    if code in _CKR_PIN:
        raise PinError(f"the PIN for token {token_label!r} was refused ({_CKR_PIN[code]})")
    if code in _CKR_FULL:
        raise KeyLoadError(f"token {token_label!r} has no room for another key ({_CKR_FULL[code]}): retire keys no "
                           "longer used, or renew without key rotation")
    if code in _CKR_UNSUPPORTED:
        raise KeyLoadError(f"token {token_label!r} cannot make a {key_type} key ({function}: "
                           f"{_CKR_UNSUPPORTED[code]}); choose another key type")
    raise KeyLoadError(f"making the key {key_label!r} on token {token_label!r} failed: {function} returned "
                       f"CKR 0x{code:x}")
