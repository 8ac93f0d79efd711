"""The only importer of the compiled shim (``lightclient._shim``).

Everything that crosses into C goes through here: arguments are checked before the call, every
result is checked after it, and a failure drains OpenSSL's error queue into a typed exception
whose message says in plain words what is wrong and how to fix it. PINs cross into C as bytes and
never appear in any message built here.
"""
from __future__ import annotations

import datetime
import os
import ssl
import threading
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple

from .exceptions import (
    BackendUnavailableError,
    CertificateError,
    ConfigError,
    KeyLoadError,
    KeyMismatchError,
    KeyNotFoundError,
    ModuleLoadError,
    NativeError,
    OpenSSLMismatchError,
    PinError,
    TokenNotFoundError,
)

# The compiled shim is imported on first use, not here: importing lightclient (and paho, for a
# file-key context) then costs neither the cffi runtime nor libssl symbol binding.
_shim = None
_SHIM_IMPORT_ERROR: Optional[ImportError] = None

ENGINE_PACKAGE_HINT = (
    "install the libp11 engine (Debian/Raspberry Pi OS: apt install libengine-pkcs11-openssl)"
)

# ---------------------------------------------------------------------------------------------
# Same OpenSSL copy check (pure logic, unit-tested; the facts come from _openssl_facts()).


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


def _origin(path: Optional[str], symbol: str) -> Optional[str]:
    ffi, lib = _shim_lib()
    buf = ffi.new("char[]", 4096)
    rc = lib.lc_symbol_origin(path.encode() if path else ffi.NULL, symbol.encode(), buf, 4096)
    return ffi.string(buf).decode(errors="replace") if rc == 1 else None


def openssl_facts() -> OpenSSLFacts:
    """Collect the linkage facts from this process (used by the check and by ``doctor``)."""
    import _ssl

    ffi, lib = _shim_lib()
    ssl_path = getattr(_ssl, "__file__", None)  # None: _ssl is built into the interpreter
    shim_path = _shim.__file__  # set: _shim_lib() above imported it
    return OpenSSLFacts(
        python_ssl_origin=_origin(ssl_path, "SSL_CTX_new"),
        python_crypto_origin=_origin(ssl_path, "ERR_get_error"),
        shim_ssl_origin=_origin(shim_path, "SSL_CTX_new"),
        shim_crypto_origin=_origin(shim_path, "ERR_get_error"),
        python_version_number=ssl.OPENSSL_VERSION_NUMBER,
        python_version_text=ssl.OPENSSL_VERSION,
        shim_version_number=lib.lc_openssl_version_num(),
        shim_version_text=ffi.string(lib.lc_openssl_version_text()).decode(errors="replace"),
    )


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


def _redact(errors: Iterable[str], secrets: Sequence[Optional[str]]) -> Tuple[str, ...]:
    """Engines can echo their input (a URI with pin-value, a ctrl argument) into error data."""
    cleaned = []
    for line in errors:
        for secret in secrets:
            if secret:
                line = line.replace(secret, "***")
        cleaned.append(line)
    return tuple(cleaned)


# Substrings of OpenSSL / libp11 / provider error text, lower-cased, mapped to the cause.
_PIN_MARKERS = ("pin incorrect", "pin_incorrect", "login failed", "pin len range", "pin locked",
                "pin_locked", "bad decrypt", "interrupted or cancelled", "wrong password",
                "pin expired", "ckr_pin")
_TOKEN_MARKERS = ("no matching token", "token not found", "no token", "slot not found",
                  "no slot", "could not find token")
_MODULE_MARKERS = ("unable to load module", "unable to load pkcs#11 module", "pkcs11_ctx_load",
                   "dlopen", "cannot open shared object", "c_getfunctionlist", "module_path")
_KEY_MARKERS = ("object not found", "no private keys found", "could not load private key",
                "no private key", "key not found", "object_not_found", "no matching key",
                "unsupported")


def _has(errors: Sequence[str], markers: Sequence[str]) -> bool:
    joined = "\n".join(errors).lower()
    return any(m in joined for m in markers)


@dataclass(frozen=True)
class LoadContext:
    """What a loader was asked to do, for error messages (never holds the PIN)."""

    backend: str                 # "engine", "store", "file"
    reference: str               # redacted key reference
    module_path: Optional[str] = None
    engine_id: Optional[str] = None
    providers: Optional[str] = None


_RC = {}


def _rc_names() -> dict:
    if not _RC:
        _, lib = _shim_lib()
        for name in dir(lib):
            if name.startswith("LC_E_") or name == "LC_OK":
                _RC[getattr(lib, name)] = name
    return _RC


def key_load_error(rc: int, pin_status: int, errors: Tuple[str, ...], ctx: LoadContext) -> KeyLoadError:
    """Turn a loader's return code, PIN status and OpenSSL errors into the most specific error."""
    _, lib = _shim_lib()
    ref = ctx.reference
    if rc == lib.LC_E_NO_ENGINE_SUPPORT:
        return BackendUnavailableError(
            f"cannot load {ref}: this lightclient was built without ENGINE support (OpenSSL 4 or "
            "OPENSSL_NO_ENGINE). Use an OpenSSL 3 provider instead: a store: or handle: key "
            "reference, or a pkcs11: URI with the pkcs11 provider.", errors)
    if rc == lib.LC_E_NO_PROVIDER_SUPPORT:
        return BackendUnavailableError(
            f"cannot load {ref}: OpenSSL providers need OpenSSL 3.0 or newer; this process runs "
            "an older OpenSSL. Use an engine: or pkcs11: key reference.", errors)
    if rc == lib.LC_E_ENGINE_UNAVAILABLE:
        return BackendUnavailableError(
            f"the OpenSSL engine {ctx.engine_id!r} is not available, so {ref} cannot be loaded: "
            f"{ENGINE_PACKAGE_HINT}, or give the engine's shared object path.", errors)
    if rc == lib.LC_E_PROVIDER:
        return BackendUnavailableError(
            f"an OpenSSL provider in {ctx.providers!r} could not be loaded for {ref}: install it "
            "(Debian: apt install tpm2-openssl for 'tpm2', or libpkcs11-provider / pkcs11-provider for "
            "'pkcs11') or check OPENSSL_MODULES.", errors)
    if rc == lib.LC_E_PROPQ:
        return ConfigErrorWithErrors(
            f"the OpenSSL property query for {ref} was refused; check its syntax "
            "(for example '?provider=tpm2').", errors)
    if rc == lib.LC_E_ENGINE_CTRL:
        if ctx.module_path:
            return ModuleLoadError(
                f"the engine {ctx.engine_id!r} refused the PKCS#11 module {ctx.module_path!r} for {ref}: "
                "check that the path names a PKCS#11 module (.so).", errors)
        return KeyLoadError(f"the engine {ctx.engine_id!r} refused a setting for {ref}.", errors)
    if rc == lib.LC_E_STORE_MANY:
        return KeyNotFoundError(
            f"{ref} matches more than one private key; make the reference name exactly one "
            "(add object= or id= to a pkcs11: URI).", errors)
    if rc == lib.LC_E_ARG:
        return ConfigErrorWithErrors(f"the key reference {ref} is incomplete.", errors)

    # Load failures: decide from the PIN status and the error text, most specific first.
    if _has(errors, _MODULE_MARKERS) or rc == lib.LC_E_ENGINE_INIT:
        where = f" {ctx.module_path!r}" if ctx.module_path else ""
        return ModuleLoadError(
            f"the PKCS#11 module{where} could not be loaded for {ref}: check the module path "
            "(SoftHSM: /usr/lib/softhsm/libsofthsm2.so; tpm2-pkcs11: "
            "/usr/lib/<arch>/pkcs11/libtpm2_pkcs11.so) and that it is a PKCS#11 module.", errors)
    if pin_status == lib.LC_PIN_MISSING:
        return PinError(
            f"{ref} needs a PIN (or pass phrase) but none was given: pass pin=..., a pin_file, "
            "or pin-source in the pkcs11: URI.", errors)
    if _has(errors, _PIN_MARKERS) and pin_status != lib.LC_PIN_NOT_ASKED:
        return PinError(
            f"the PIN (or pass phrase) for {ref} was refused: check it; repeated wrong PINs can "
            "lock the token.", errors)
    if _has(errors, _TOKEN_MARKERS):
        return TokenNotFoundError(
            f"no token matches {ref}: check the token label (list tokens with "
            "`lightclient tokens` or `pkcs11-tool --module MODULE -L`).", errors)
    if rc == lib.LC_E_STORE_OPEN and ctx.backend == "store":
        return KeyNotFoundError(
            f"OpenSSL could not open the store {ref}: check the URI or path, and that the provider "
            "that serves it is loaded.", errors)
    if rc in (lib.LC_E_KEY_LOAD, lib.LC_E_STORE_NO_KEY):
        if ctx.backend == "file":
            return KeyLoadError(
                f"{ref} holds no readable private key: it must be a PEM private key "
                "(\"-----BEGIN PRIVATE KEY-----\" or an encrypted one with its pass phrase).", errors)
        return KeyNotFoundError(
            f"no private key matches {ref}: check the object label or id on the token "
            "(list them with `lightclient tokens` or `pkcs11-tool -O`).", errors)
    return KeyLoadError(f"could not load the private key {ref} ({_rc_names().get(rc, rc)}).", errors)


class ConfigErrorWithErrors(ConfigError, KeyLoadError):
    """A key reference or setting was refused by OpenSSL as malformed."""


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
                    description: Optional[str] = None) -> NativeKey:
    """Load a private key through an OpenSSL ENGINE (``ENGINE_load_private_key``)."""
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
            drain_errors())
    return _finish_load(rc, out, pin_status, pin, ctx)


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
                   pin: Optional[str] = None, description: Optional[str] = None) -> NativeKey:
    """Load exactly one private key through ``OSSL_STORE`` (OpenSSL 3 providers)."""
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
                    raise key_load_error(rc, lib.LC_PIN_NOT_ASKED, drain_errors(), ctx)
                return cached
            rc = lib.lc_key_from_store(uri.encode(), _b(plist), _b(propq), _b(pin), out, pin_status)
            key = _finish_load(rc, out, pin_status, pin, ctx)
            _handle_keys[cache_key] = key
            return key
    rc = lib.lc_key_from_store(uri.encode(), _b(plist), _b(propq), _b(pin), out, pin_status)
    return _finish_load(rc, out, pin_status, pin, ctx)


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
        raise NativeError(f"could not install the key and {chain_name} ({_rc_names().get(rc, rc)}).", errors)


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
        raise ConfigErrorWithErrors(f"the CSR subject {subject!r} was refused: use field names like CN, O, OU, C.", errors)
    if rc == lib.LC_E_CSR_SAN:
        raise ConfigErrorWithErrors(
            f"the subjectAltName {san!r} was refused: use OpenSSL's syntax, e.g. 'DNS:device1,IP:127.0.0.1'.", errors)
    if rc == lib.LC_E_CSR_DIGEST:
        raise ConfigErrorWithErrors(f"unknown digest {digest!r}: use sha256 or sha384.", errors)
    if rc != lib.LC_OK:
        raise NativeError(f"signing the CSR with {key.description} failed ({_rc_names().get(rc, rc)}).", errors)
    try:
        return bytes(ffi.buffer(der[0], der_len[0]))
    finally:
        lib.lc_free(der[0])
