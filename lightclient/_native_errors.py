"""OpenSSL's error queue turned into the most specific lightclient exception, in plain words.

A loader in :mod:`lightclient._native` hands over its return code, the PIN status the shim recorded and
the drained error queue; :func:`key_load_error` decides what went wrong (module, PIN, token, key …) and
says how to fix it. Engines can echo their input into error data, so lines are scrubbed of secrets first.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Tuple

from . import _pkcs11_uri
from .exceptions import (wording, BackendUnavailableError, KeyConfigError, KeyLoadError, KeyNotFoundError, ModuleLoadError,
                         PinError, TokenNotFoundError)

ENGINE_PACKAGE_HINT = (
    "install the libp11 engine (Debian/Raspberry Pi OS: apt install libengine-pkcs11-openssl)"
)


def _redact(errors: Iterable[str], secrets: Sequence[Optional[str]]) -> Tuple[str, ...]:
    """Engines can echo their input (a URI with pin-value, a ctrl argument) into error data."""
    cleaned = []
    # Longest first: a secret that contains another must go whole.
    ordered = sorted({s for s in secrets if s}, key=len, reverse=True)
    for line in errors:
        for secret in ordered:
            line = line.replace(secret, "***")
        cleaned.append(_pkcs11_uri.redact(line))
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


_RC: dict = {}


def _lib():
    from ._native import _shim_lib

    return _shim_lib()



def rc_name(rc: int):
    """The LC_* name of a shim return code, for messages."""
    return _rc_names().get(rc, rc)


def _rc_names() -> dict:
    if not _RC:
        _, lib = _lib()
        for name in dir(lib):
            if name.startswith("LC_E_") or name == "LC_OK":
                _RC[getattr(lib, name)] = name
    return _RC


def key_load_error(rc: int, pin_status: int, errors: Tuple[str, ...], ctx: LoadContext) -> KeyLoadError:
    """Turn a loader's return code, PIN status and OpenSSL errors into the most specific error."""
    _, lib = _lib()
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
        return KeyConfigError(
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
        return KeyConfigError(f"the key reference {ref} is incomplete.", errors)

    # Load failures: decide from the PIN status and the error text, most specific first.
    if _has(errors, _MODULE_MARKERS) or rc == lib.LC_E_ENGINE_INIT:
        where = f" {ctx.module_path!r}" if ctx.module_path else ""
        return ModuleLoadError(
            f"the PKCS#11 module{where} could not be loaded for {ref}: check the module path "
            "(SoftHSM: /usr/lib/softhsm/libsofthsm2.so; tpm2-pkcs11: "
            "/usr/lib/<arch>/pkcs11/libtpm2_pkcs11.so) and that it is a PKCS#11 module.", errors)
    if pin_status == lib.LC_PIN_MISSING:
        return PinError(wording(
            f"{ref} needs a PIN (or pass phrase) but none was given: give {{pin}}, or pin-source in the "
            "pkcs11: URI.", pin="pin=, pin_file= or pin_callback="), errors)
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
    return KeyLoadError(f"could not load the private key {ref} ({rc_name(rc)}).", errors)

