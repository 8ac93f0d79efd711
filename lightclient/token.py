"""PKCS#11 token tooling with python-pkcs11: list tokens and keys, create device key pairs.

This module talks to the PKCS#11 module directly (not through OpenSSL). Keys it creates are
private, sensitive and non-extractable: they can sign, and can never be read out.

Because a PKCS#11 module keeps per-process state (``C_Initialize``/``C_Finalize``), the
diagnostics that the key loader runs after a failure call :func:`describe_module` in a child
process (``python -m lightclient.token``), so they never disturb the module that OpenSSL's
engine has loaded in this one.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import List, Optional, Tuple

from .exceptions import (BackendUnavailableError, ConfigError, KeyLoadError, ModuleLoadError, PinError,
                         TokenNotFoundError)

KEY_TYPES = ("ec-p256", "ec-p384", "rsa-2048", "rsa-3072")
_CURVES = {"ec-p256": "secp256r1", "ec-p384": "secp384r1"}


@dataclass(frozen=True)
class TokenInfo:
    label: str
    serial: str
    manufacturer: str
    model: str
    slot_id: int


@dataclass(frozen=True)
class KeyInfo:
    label: str
    id_hex: str
    key_type: str          # "RSA" or "EC"
    token_label: str

    def uri(self, module_path: Optional[str] = None) -> str:
        """The pkcs11: URI that names this private key (without any PIN)."""
        from urllib.parse import quote

        parts = [f"token={quote(self.token_label, safe='')}"]
        if self.label:
            parts.append(f"object={quote(self.label, safe='')}")
        if self.id_hex:
            parts.append("id=" + "".join(f"%{self.id_hex[i:i + 2]}" for i in range(0, len(self.id_hex), 2)))
        parts.append("type=private")
        uri = "pkcs11:" + ";".join(parts)
        if module_path:
            uri += "?module-path=" + quote(module_path, safe="/")
        return uri


def _pkcs11():
    try:
        import pkcs11  # noqa: F401
    except ImportError:
        raise BackendUnavailableError(
            "python-pkcs11 is not installed: pip install 'lightclient[token]'") from None
    return pkcs11


def _open_lib(module_path: str):
    pkcs11 = _pkcs11()
    try:
        return pkcs11.lib(module_path)
    except Exception as exc:  # python-pkcs11 raises RuntimeError / AlreadyInitialized / OSError
        raise ModuleLoadError(f"cannot load the PKCS#11 module {module_path!r}: {exc}") from None


def _text(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace").strip()
    return str(value).strip()


def list_tokens(module_path: str) -> List[TokenInfo]:
    """Every initialised token the module shows."""
    lib = _open_lib(module_path)
    out = []
    for slot in lib.get_slots(token_present=True):
        try:
            tok = slot.get_token()
        except Exception:
            continue
        out.append(TokenInfo(_text(tok.label), _text(tok.serial), _text(tok.manufacturer_id),
                             _text(getattr(tok, "model", "")), int(slot.slot_id)))
    return out


def _get_token(lib, module_path: str, token_label: str):
    pkcs11 = _pkcs11()
    try:
        return lib.get_token(token_label=token_label)
    except pkcs11.exceptions.NoSuchToken:
        labels = [t.label for t in lib.get_tokens()]
        raise TokenNotFoundError(
            f"no token labelled {token_label!r} in {module_path!r}; tokens present: "
            f"{', '.join(repr(lbl) for lbl in labels) or 'none'}") from None


def _login(tok, pin: Optional[str], rw: bool):
    pkcs11 = _pkcs11()
    try:
        return tok.open(user_pin=pin, rw=rw)
    except (pkcs11.exceptions.PinIncorrect, pkcs11.exceptions.PinInvalid, pkcs11.exceptions.PinLenRange):
        raise PinError(f"the PIN for token {tok.label!r} was refused") from None
    except pkcs11.exceptions.PinLocked:
        raise PinError(f"token {tok.label!r} is locked after too many wrong PINs; the SO must reset it") from None


def list_keys(module_path: str, token_label: str, pin: Optional[str]) -> List[KeyInfo]:
    """Private keys on the token (a PIN is needed to see private objects)."""
    pkcs11 = _pkcs11()
    lib = _open_lib(module_path)
    tok = _get_token(lib, module_path, token_label)
    out = []
    with _login(tok, pin, rw=False) as session:
        for obj in session.get_objects({pkcs11.Attribute.CLASS: pkcs11.ObjectClass.PRIVATE_KEY}):
            kt = obj.key_type
            out.append(KeyInfo(_text(obj.label or ""), (obj.id or b"").hex(),
                               "EC" if kt == pkcs11.KeyType.EC else "RSA" if kt == pkcs11.KeyType.RSA else str(kt),
                               token_label))
    return out


def generate_keypair(module_path: str, token_label: str, pin: str, key_label: str,
                     key_type: str = "ec-p256", key_id: Optional[bytes] = None) -> KeyInfo:
    """Create a key pair on the token; the private key is sensitive and non-extractable."""
    if key_type not in KEY_TYPES:
        raise ConfigError(f"unknown key type {key_type!r}: choose one of {', '.join(KEY_TYPES)}")
    if not key_label:
        raise ConfigError("key_label must not be empty: it is how the key is found again")
    pkcs11 = _pkcs11()
    from pkcs11 import DEFAULT, Attribute, KeyType, MechanismFlag

    lib = _open_lib(module_path)
    tok = _get_token(lib, module_path, token_label)
    priv_template = {Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False, Attribute.PRIVATE: True,
                     Attribute.SIGN: True}
    # EC: the public half's usage flags are left to the module. tpm2-pkcs11 derives them from the
    # TPM object and refuses a template that sets them otherwise ("User specified and TPM specified
    # attr mismatch: 0x10a" for CKA_VERIFY). RSA keeps python-pkcs11's defaults: tpm2-pkcs11 signs
    # PKCS#1 v1.5 with the TPM's raw RSA decryption, so the key must be able to decrypt.
    ec_public = {Attribute.VERIFY: DEFAULT, Attribute.ENCRYPT: DEFAULT, Attribute.WRAP: DEFAULT}
    ec_caps = MechanismFlag.SIGN | MechanismFlag.VERIFY
    with _login(tok, pin, rw=True) as session:
        existing = list(session.get_objects({Attribute.CLASS: pkcs11.ObjectClass.PRIVATE_KEY,
                                             Attribute.LABEL: key_label}))
        if existing:
            raise ConfigError(f"token {token_label!r} already holds a private key labelled {key_label!r}")
        if key_id is None:
            import os

            key_id = os.urandom(8)
        if key_type.startswith("ec-"):
            from pkcs11.util.ec import encode_named_curve_parameters

            params = session.create_domain_parameters(
                KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters(_CURVES[key_type])}, local=True)
            _, priv = params.generate_keypair(store=True, label=key_label, id=key_id, capabilities=ec_caps,
                                              public_template=ec_public, private_template=priv_template)
        else:
            bits = int(key_type.split("-")[1])
            _, priv = session.generate_keypair(KeyType.RSA, bits, store=True, label=key_label, id=key_id,
                                               private_template=priv_template)
        if priv[Attribute.EXTRACTABLE] or not priv[Attribute.SENSITIVE]:
            raise KeyLoadError(f"the token created {key_label!r} but did not make it sensitive and non-extractable")
    return KeyInfo(key_label, key_id.hex(), "EC" if key_type.startswith("ec-") else "RSA", token_label)


def init_token(module_path: str, label: str, so_pin: str, pin: str) -> TokenInfo:
    """Initialise the first free slot's token as ``label`` with an SO PIN and a user PIN.

    PKCS#11 ``C_InitToken`` + ``C_InitPIN`` through ctypes: python-pkcs11 has no token initialisation,
    and softhsm2-util / tpm2_ptool take PINs only on a terminal or in their arguments. Works for
    SoftHSM2 and tpm2-pkcs11 (run ``tpm2_ptool init`` first there). The module is initialised and
    finalised here, so call it before anything else in this process uses the module (or in a child).
    """
    import ctypes

    if not label or len(label.encode()) > 32:
        raise ConfigError("a token label must be 1 to 32 bytes long")
    try:
        lib = ctypes.CDLL(module_path)
    except OSError as exc:
        raise ModuleLoadError(f"cannot load the PKCS#11 module {module_path!r}: {exc}") from None
    if not all(hasattr(lib, f) for f in ("C_Initialize", "C_InitToken", "C_InitPIN")):
        raise ModuleLoadError(f"{module_path!r} is not a PKCS#11 module (no C_InitToken)")
    ulong = ctypes.c_ulong

    def ck(rv: int, what: str) -> None:
        if rv in (0xA0, 0xA1, 0xA2):  # CKR_PIN_INCORRECT / _INVALID / _LEN_RANGE
            raise PinError(f"{what}: the module refused the PIN (CKR 0x{rv:x}); check its length and characters")
        if rv != 0:
            raise ModuleLoadError(f"{what} failed in {module_path}: CKR 0x{rv:x}")

    ck(lib.C_Initialize(None), "C_Initialize")
    try:
        count = ulong(0)
        ck(lib.C_GetSlotList(ctypes.c_ubyte(0), None, ctypes.byref(count)), "C_GetSlotList")
        slots = (ulong * count.value)()
        ck(lib.C_GetSlotList(ctypes.c_ubyte(0), slots, ctypes.byref(count)), "C_GetSlotList")

        class CkTokenInfo(ctypes.Structure):  # CK_TOKEN_INFO, only the leading fields are read
            _fields_ = [("label", ctypes.c_char * 32), ("manufacturerID", ctypes.c_char * 32),
                        ("model", ctypes.c_char * 16), ("serialNumber", ctypes.c_char * 16),
                        ("flags", ulong), ("rest", ctypes.c_byte * 256)]

        CKF_TOKEN_INITIALIZED = 0x400
        free = None
        for slot in slots[:count.value]:
            info = CkTokenInfo()
            ck(lib.C_GetTokenInfo(ulong(slot), ctypes.byref(info)), "C_GetTokenInfo")
            if not info.flags & CKF_TOKEN_INITIALIZED:
                free = slot
                break
        if free is None:
            raise TokenNotFoundError(f"{module_path} has no free slot for a new token")
        so, upin = so_pin.encode(), pin.encode()
        ck(lib.C_InitToken(ulong(free), so, ulong(len(so)), label.encode().ljust(32, b" ")), "C_InitToken")
        # SoftHSM renumbers slots after initialising a token: find it again by label.
        ck(lib.C_GetSlotList(ctypes.c_ubyte(1), None, ctypes.byref(count)), "C_GetSlotList")
        slots = (ulong * count.value)()
        ck(lib.C_GetSlotList(ctypes.c_ubyte(1), slots, ctypes.byref(count)), "C_GetSlotList")
        target = None
        for slot in slots[:count.value]:
            info = CkTokenInfo()
            ck(lib.C_GetTokenInfo(ulong(slot), ctypes.byref(info)), "C_GetTokenInfo")
            if info.label.decode(errors="replace").rstrip() == label:
                target = slot
        if target is None:
            raise TokenNotFoundError(f"token {label!r} not found after C_InitToken")
        session = ulong(0)
        CKF_RW_SERIAL = 0x6
        ck(lib.C_OpenSession(ulong(target), ulong(CKF_RW_SERIAL), None, None, ctypes.byref(session)), "C_OpenSession")
        ck(lib.C_Login(session, ulong(0), so, ulong(len(so))), "C_Login(SO)")  # CKU_SO = 0
        ck(lib.C_InitPIN(session, upin, ulong(len(upin))), "C_InitPIN")
        lib.C_Logout(session)
        info = CkTokenInfo()
        ck(lib.C_GetTokenInfo(ulong(target), ctypes.byref(info)), "C_GetTokenInfo")
        lib.C_CloseSession(session)
        return TokenInfo(label, info.serialNumber.decode(errors="replace").strip(),
                         info.manufacturerID.decode(errors="replace").strip(),
                         info.model.decode(errors="replace").strip(), int(target))
    finally:
        lib.C_Finalize(None)


def describe_module(module_path: str, timeout: float = 15.0) -> Optional[List[TokenInfo]]:
    """List tokens from a child process (see module docstring); ``None`` if that is not possible."""
    try:
        proc = subprocess.run([sys.executable, "-m", "lightclient.token", "tokens-json", module_path],
                              capture_output=True, timeout=timeout, text=True, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:
        return None
    try:
        return [TokenInfo(**t) for t in json.loads(proc.stdout)]
    except (ValueError, TypeError):
        return None


def token_label_problem(module_path: str, token_label: Optional[str]) -> Optional[Tuple[str, List[TokenInfo]]]:
    """If no token has ``token_label``, a sentence saying so and what is there; else ``None``."""
    if not token_label:
        return None
    tokens = describe_module(module_path)
    if tokens is None or any(t.label == token_label for t in tokens):
        return None
    present = ", ".join(repr(t.label) for t in tokens if t.label) or "none"
    return f"no token labelled {token_label!r} in {module_path!r} (tokens present: {present})", tokens


def _main(argv: List[str]) -> int:
    if len(argv) == 2 and argv[0] == "tokens-json":
        try:
            print(json.dumps([asdict(t) for t in list_tokens(argv[1])]))
        except Exception as exc:  # report, never a traceback: this runs as a diagnostic helper
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return 0
    print("usage: python -m lightclient.token tokens-json MODULE_PATH", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
