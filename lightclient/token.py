"""PKCS#11 token tooling with python-pkcs11: list tokens and keys, create device key pairs.

This module talks to the PKCS#11 module directly (not through OpenSSL). Keys it creates are
private, sensitive and non-extractable: they can sign, and can never be read out.

Because a PKCS#11 module keeps per-process state (``C_Initialize``/``C_Finalize``; libp11 and
python-pkcs11 load a module once per process and keep its slots logged in), whatever runs beside a
key that OpenSSL's engine has loaded, or before it, runs in a child process: :func:`run_in_child`
starts ``python -m lightclient.token OP`` with the arguments and PINs as JSON on stdin and reads a
JSON answer from stdout, re-raising the child's typed error here. The key loader's diagnostics
(:func:`describe_module`), the doctor's token probe (:func:`probe`) and the test lab use it. The one
exception is :func:`generate_keypair_in_process`, for a key the running process must load next.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from . import exceptions
from .exceptions import (BackendUnavailableError, ConfigError, KeyConfigError, KeyLoadError, KeyNotFoundError,
                         LightClientError, ModuleLoadError, OperationTimeout, PinError, TokenNotFoundError)

KEY_TYPES = ("ec-p256", "ec-p384", "rsa-2048", "rsa-3072")
#: Symmetric key type (keygen --type hmac): a CKK_GENERIC_SECRET key for CKM_SHA256_HMAC signing only.
SECRET_KEY_TYPE = "hmac"
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
    key_type: str          # "RSA", "EC" or "HMAC" (a secret key)
    token_label: str

    def uri(self, module_path: Optional[str] = None) -> str:
        """The pkcs11: URI that names this key (without any PIN): type=private, or type=secret-key for HMAC."""
        from urllib.parse import quote

        parts = [f"token={quote(self.token_label, safe='')}"]
        if self.label:
            parts.append(f"object={quote(self.label, safe='')}")
        if self.id_hex:
            parts.append("id=" + "".join(f"%{self.id_hex[i:i + 2]}" for i in range(0, len(self.id_hex), 2)))
        parts.append("type=secret-key" if self.key_type == "HMAC" else "type=private")
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
        for obj in session.get_objects({pkcs11.Attribute.CLASS: pkcs11.ObjectClass.SECRET_KEY}):
            out.append(KeyInfo(_text(obj.label or ""), (obj.id or b"").hex(), "HMAC", token_label))
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
        try:
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
        except (pkcs11.exceptions.DeviceMemory, pkcs11.exceptions.HostMemory):
            raise KeyLoadError(f"token {token_label!r} has no room for another key (CKR_DEVICE_MEMORY): retire "
                               "keys no longer used, or renew without key rotation") from None
        if priv[Attribute.EXTRACTABLE] or not priv[Attribute.SENSITIVE]:
            raise KeyLoadError(f"the token created {key_label!r} but did not make it sensitive and non-extractable")
    return KeyInfo(key_label, key_id.hex(), "EC" if key_type.startswith("ec-") else "RSA", token_label)


def generate_keypair_in_process(module_path: str, token_label: str, pin: str, key_label: str,
                                key_type: str = "ec-p256", key_id: Optional[bytes] = None) -> KeyInfo:
    """:func:`generate_keypair` through THIS process's instance of the module, the one OpenSSL's libp11
    engine loads keys from, for a key this very process must load next (key rotation during renewal).

    Why not a child (:func:`run_in_child`): tpm2-pkcs11 reads the token's objects from its store when
    the module is initialised, so libp11 in a running process never finds a key another process made
    ("object not found"). libp11 0.4.12 searches the token (C_FindObjects) on every key load and adds new
    handles to its list, so a key made through its own module instance is found. The module is
    initialised if needed and never finalised, the user is logged in on a session of our own and never
    logged out (both belong to libp11 as well); same attributes as :func:`generate_keypair`. Deleting keys
    stays in a child (:func:`destroy_key`): see :meth:`lightclient.renewal.Renewer` for why.
    """
    from . import _native

    if key_type not in KEY_TYPES:
        raise ConfigError(f"unknown key type {key_type!r}: choose one of {', '.join(KEY_TYPES)}")
    if not key_label:
        raise ConfigError("key_label must not be empty: it is how the key is found again")
    if pin is None:
        raise PinError(f"creating a key on token {token_label!r} needs its user PIN")
    if key_id is None:
        import os

        key_id = os.urandom(8)
    _native.p11_generate_keypair(module_path, token_label, pin, key_label, key_type, key_id)
    return KeyInfo(key_label, key_id.hex(), "EC" if key_type.startswith("ec-") else "RSA", token_label)


# ------------------------------------------------------------------------------ symmetric (HMAC) keys
#
# A device's SAS key as a CKK_GENERIC_SECRET object that can do one thing: C_Sign with CKM_SHA256_HMAC.
# CKA_SENSITIVE and not CKA_EXTRACTABLE, so C_GetAttributeValue(CKA_VALUE) is refused and it cannot be
# wrapped out; no encrypt/decrypt/wrap/derive usage. Nothing here ever asks for CKA_VALUE.


def _secret_template(key_label: str, key_id: bytes) -> dict:
    from pkcs11 import Attribute

    return {Attribute.TOKEN: True, Attribute.PRIVATE: True, Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False, Attribute.SIGN: True, Attribute.VERIFY: False,
            Attribute.ENCRYPT: False, Attribute.DECRYPT: False, Attribute.WRAP: False, Attribute.UNWRAP: False,
            Attribute.DERIVE: False, Attribute.LABEL: key_label, Attribute.ID: key_id}


def _check_new_secret(session, token_label: str, key_label: str) -> None:
    pkcs11 = _pkcs11()
    if not key_label:
        raise ConfigError("key_label must not be empty: it is how the key is found again")
    if list(session.get_objects({pkcs11.Attribute.CLASS: pkcs11.ObjectClass.SECRET_KEY,
                                 pkcs11.Attribute.LABEL: key_label})):
        raise ConfigError(f"token {token_label!r} already holds a secret key labelled {key_label!r}")


def _verify_secret(key, token_label: str, key_label: str) -> None:
    from pkcs11 import Attribute

    if key[Attribute.EXTRACTABLE] or not key[Attribute.SENSITIVE]:
        key.destroy()
        raise KeyLoadError(f"token {token_label!r} did not keep {key_label!r} sensitive and non-extractable; "
                           "the key was deleted again")


def _store_secret(session, token_label: str, key_label: str, value: bytearray, key_id: Optional[bytes]):
    """C_CreateObject for ``value``; the caller wipes ``value``."""
    pkcs11 = _pkcs11()
    from pkcs11 import Attribute, KeyType, ObjectClass

    import os

    key_id = key_id or os.urandom(8)
    template = {**_secret_template(key_label, key_id), Attribute.CLASS: ObjectClass.SECRET_KEY,
                Attribute.KEY_TYPE: KeyType.GENERIC_SECRET, Attribute.VALUE: bytes(value)}
    try:
        key = session.create_object(template)
    except (pkcs11.exceptions.DeviceMemory, pkcs11.exceptions.HostMemory):
        raise KeyLoadError(f"token {token_label!r} has no room for another key (CKR_DEVICE_MEMORY)") from None
    except pkcs11.exceptions.PKCS11Error as exc:
        raise KeyLoadError(f"token {token_label!r} refused to import an HMAC key ({type(exc).__name__}); "
                           "it may not support CKK_GENERIC_SECRET keys") from None
    finally:
        template.clear()
    _verify_secret(key, token_label, key_label)
    return KeyInfo(key_label, key_id.hex(), "HMAC", token_label)


def import_secret_key(module_path: str, token_label: str, pin: str, key_label: str, key_b64: str,
                      key_id: Optional[bytes] = None) -> KeyInfo:
    """Import a base64 device key (IoT Hub / DPS primary or secondary key) as a sign-only HMAC key.

    The decoded key is wiped from this process's buffer once the token holds it; errors never show it.
    """
    from .sas import decode_key, wipe

    value = decode_key(key_b64, "the device key to import")
    try:
        lib = _open_lib(module_path)
        tok = _get_token(lib, module_path, token_label)
        with _login(tok, pin, rw=True) as session:
            _check_new_secret(session, token_label, key_label)
            return _store_secret(session, token_label, key_label, value, key_id)
    finally:
        wipe(value)


def generate_secret_key(module_path: str, token_label: str, pin: str, key_label: str,
                        size: int = 32, key_id: Optional[bytes] = None) -> KeyInfo:
    """Create a random HMAC key of ``size`` bytes in the token (C_GenerateKey, CKM_GENERIC_SECRET_KEY_GEN).

    Its value never exists outside the token, so IoT Hub cannot be told it: use it where the service side
    gets the key another way, or import the hub's key with :func:`import_secret_key`.
    """
    if not isinstance(size, int) or not 16 <= size <= 64:
        raise ConfigError(f"an HMAC key is 16 to 64 bytes, not {size!r}")
    pkcs11 = _pkcs11()
    from pkcs11 import KeyType

    import os

    lib = _open_lib(module_path)
    tok = _get_token(lib, module_path, token_label)
    key_id = key_id or os.urandom(8)
    with _login(tok, pin, rw=True) as session:
        _check_new_secret(session, token_label, key_label)
        template = _secret_template(key_label, key_id)
        try:
            key = session.generate_key(KeyType.GENERIC_SECRET, size * 8, store=True, label=key_label, id=key_id,
                                       template=template)
        except pkcs11.exceptions.PKCS11Error as exc:
            raise KeyLoadError(f"token {token_label!r} cannot generate an HMAC key ({type(exc).__name__})") from None
        _verify_secret(key, token_label, key_label)
    return KeyInfo(key_label, key_id.hex(), "HMAC", token_label)


def _find_secret(session, token_label: str, key_label: Optional[str], key_id: Optional[bytes]):
    pkcs11 = _pkcs11()
    from pkcs11 import Attribute

    template = {Attribute.CLASS: pkcs11.ObjectClass.SECRET_KEY}
    if key_label:
        template[Attribute.LABEL] = key_label
    if key_id:
        template[Attribute.ID] = key_id
    if len(template) == 1:
        raise ConfigError("name the secret key with object=<label> or id=<hex id>")
    found = list(session.get_objects(template))
    shown = " ".join(p for p in (f"object={key_label}" if key_label else "",
                                 f"id={key_id.hex()}" if key_id else "") if p)
    if not found:
        raise KeyNotFoundError(f"token {token_label!r} holds no secret key with {shown}: import one with "
                               "`lightclient import-key` or create one with `lightclient keygen --type hmac`")
    if len(found) > 1:
        raise KeyConfigError(f"token {token_label!r} holds {len(found)} secret keys with {shown}: add id= to "
                             "the key reference")
    return found[0]


def hmac_sign(module_path: str, token_label: str, pin: Optional[str], message: bytes,
              key_label: Optional[str] = None, key_id: Optional[bytes] = None) -> bytes:
    """HMAC-SHA256 of ``message`` computed in the token (C_Sign, CKM_SHA256_HMAC)."""
    pkcs11 = _pkcs11()
    from pkcs11 import Mechanism

    if pin is None:
        raise PinError(f"signing with a secret key on token {token_label!r} needs its user PIN")
    lib = _open_lib(module_path)
    tok = _get_token(lib, module_path, token_label)
    with _login(tok, pin, rw=False) as session:
        key = _find_secret(session, token_label, key_label, key_id)
        try:
            return bytes(key.sign(message, mechanism=Mechanism.SHA256_HMAC))
        except (pkcs11.exceptions.MechanismInvalid, pkcs11.exceptions.KeyFunctionNotPermitted,
                pkcs11.exceptions.KeyTypeInconsistent, pkcs11.exceptions.FunctionNotSupported) as exc:
            raise KeyLoadError(f"the secret key on token {token_label!r} cannot sign with CKM_SHA256_HMAC "
                               f"({type(exc).__name__})") from None


def derive_secret_key(module_path: str, token_label: str, pin: str, registration_id: str, new_label: str,
                      group_label: Optional[str] = None, group_id: Optional[bytes] = None,
                      key_id: Optional[bytes] = None) -> KeyInfo:
    """A group enrollment's device key, derived in the token and stored there as a new HMAC key.

    derived = HMAC-SHA256(group key, registration id) is computed by C_Sign inside the token. PKCS#11 has
    no mechanism that turns an HMAC output into a key object in place (SoftHSM and tpm2-pkcs11 implement
    no SP 800-108 KDF), so the 32 derived bytes pass through this process once, from C_Sign to
    C_CreateObject, and are wiped right after. The group key never leaves the token.
    """
    from .sas import check_group_registration_id, wipe

    check_group_registration_id(registration_id)
    _pkcs11()
    from pkcs11 import Mechanism

    lib = _open_lib(module_path)
    tok = _get_token(lib, module_path, token_label)
    with _login(tok, pin, rw=True) as session:
        _check_new_secret(session, token_label, new_label)
        group = _find_secret(session, token_label, group_label, group_id)
        derived = bytearray(group.sign(registration_id.encode("utf-8"), mechanism=Mechanism.SHA256_HMAC))
        try:
            return _store_secret(session, token_label, new_label, derived, key_id)
        finally:
            wipe(derived)


def destroy_key(module_path: str, token_label: str, pin: str, key_label: str,
                key_id: Optional[bytes] = None) -> int:
    """Delete the key pair labelled ``key_label`` (and, if given, with CKA_ID ``key_id``) from the token:
    the private key, its public key and any certificate object with the same id. Returns how many objects
    were deleted (0 if the key is already gone, so retiring a key twice is harmless)."""
    if not key_label:
        raise ConfigError("key_label must not be empty: it names the key to retire")
    pkcs11 = _pkcs11()
    from pkcs11 import Attribute

    lib = _open_lib(module_path)
    tok = _get_token(lib, module_path, token_label)
    deleted = 0
    with _login(tok, pin, rw=True) as session:
        privs = list(session.get_objects({Attribute.CLASS: pkcs11.ObjectClass.PRIVATE_KEY,
                                          Attribute.LABEL: key_label}))
        privs += list(session.get_objects({Attribute.CLASS: pkcs11.ObjectClass.SECRET_KEY,
                                           Attribute.LABEL: key_label}))
        ids = set()
        for priv in privs:
            kid = priv.id or b""
            if key_id is not None and kid != key_id:
                continue
            ids.add(kid)
            priv.destroy()
            deleted += 1
        for kid in ids:
            for cls in (pkcs11.ObjectClass.PUBLIC_KEY, pkcs11.ObjectClass.CERTIFICATE):
                template = {Attribute.CLASS: cls, Attribute.ID: kid} if kid else {Attribute.CLASS: cls,
                                                                                   Attribute.LABEL: key_label}
                for obj in session.get_objects(template):
                    obj.destroy()
                    deleted += 1
    return deleted


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


def probe(module_path: str, token_label: Optional[str] = None, pin: Optional[str] = None) -> dict:
    """Module, token, login and keys as python-pkcs11 sees them, as a dict the doctor renders:
    ``module`` (why it did not load, or None), ``tokens`` (labels), ``login`` (why the login failed,
    "no PIN", or None) and ``keys`` (label, id, type of each private key, or None). Run it in a child:
    ``run_in_child("probe", ...)``."""
    out: dict = {"module": None, "tokens": [], "login": None, "keys": None}
    try:
        out["tokens"] = [t.label for t in list_tokens(module_path) if t.label]
    except LightClientError as exc:
        out["module"] = str(exc)
        return out
    if token_label is None or token_label not in out["tokens"]:
        return out
    if pin is None:
        out["login"] = "no PIN"
        return out
    try:
        keys = list_keys(module_path, token_label, pin)
    except PinError as exc:
        out["login"] = str(exc)
        return out
    out["keys"] = [{"label": k.label, "id": k.id_hex, "type": k.key_type} for k in keys]
    return out


def describe_module(module_path: str, timeout: float = 15.0) -> Optional[List[TokenInfo]]:
    """List tokens from a child process (see module docstring); ``None`` if that is not possible."""
    try:
        return [TokenInfo(**t) for t in run_in_child("tokens", module_path=module_path, timeout=timeout)]
    except (LightClientError, TypeError):
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


# ------------------------------------------------------------------------------------- child runner


def _keygen_op(module_path: str, token_label: str, key_label: str, key_type: str = "ec-p256",
               key_id_hex: Optional[str] = None, pin: Optional[str] = None) -> dict:
    if pin is None:
        raise PinError(f"creating a key on token {token_label!r} needs its user PIN")
    info = generate_keypair(module_path, token_label, pin, key_label, key_type,
                            key_id=bytes.fromhex(key_id_hex) if key_id_hex else None)
    return {**asdict(info), "uri": info.uri()}


def _need_pin(pin: Optional[str], token_label: str) -> str:
    if pin is None:
        raise PinError(f"changing keys on token {token_label!r} needs its user PIN")
    return pin


def _hmac_sign_op(module_path: str, token_label: str, message: str, key_label: Optional[str] = None,
                  key_id_hex: Optional[str] = None, pin: Optional[str] = None) -> str:
    import base64

    signature = hmac_sign(module_path, token_label, pin, message.encode("utf-8"), key_label,
                          bytes.fromhex(key_id_hex) if key_id_hex else None)
    return base64.b64encode(signature).decode("ascii")


def _derive_secret_op(module_path: str, token_label: str, registration_id: str, new_label: str,
                      group_label: Optional[str] = None, group_id_hex: Optional[str] = None,
                      pin: Optional[str] = None) -> dict:
    return asdict(derive_secret_key(module_path, token_label, _need_pin(pin, token_label), registration_id,
                                    new_label, group_label, bytes.fromhex(group_id_hex) if group_id_hex else None))


# What a child can run: JSON-able arguments in, a JSON-able result out. PINs arrive as ``pin``/``so_pin``.
CHILD_OPS: Dict[str, Callable[..., Any]] = {
    "tokens": lambda module_path: [asdict(t) for t in list_tokens(module_path)],
    "keys": lambda module_path, token_label, pin=None: [asdict(k) for k in list_keys(module_path, token_label, pin)],
    "keygen": _keygen_op,
    "destroy-key": lambda module_path, token_label, key_label, key_id_hex=None, pin=None: destroy_key(
        module_path, token_label, _need_pin(pin, token_label), key_label,
        bytes.fromhex(key_id_hex) if key_id_hex else None),
    "init-token": lambda module_path, label, so_pin, pin: asdict(init_token(module_path, label, so_pin, pin)),
    "probe": probe,
    # Symmetric keys. The base64 key to import, like a PIN, travels only on the child's stdin.
    "import-secret": lambda module_path, token_label, key_label, key_b64, key_id_hex=None, pin=None: asdict(
        import_secret_key(module_path, token_label, _need_pin(pin, token_label), key_label, key_b64,
                          bytes.fromhex(key_id_hex) if key_id_hex else None)),
    "keygen-secret": lambda module_path, token_label, key_label, size=32, pin=None: asdict(
        generate_secret_key(module_path, token_label, _need_pin(pin, token_label), key_label, size)),
    "hmac-sign": _hmac_sign_op,
    "derive-secret": _derive_secret_op,
}


def run_in_child(op: str, *, pin: Optional[str] = None, so_pin: Optional[str] = None,
                 env: Optional[Dict[str, str]] = None, timeout: float = 60.0, **args: Any) -> Any:
    """Run the token operation ``op`` (one of :data:`CHILD_OPS`) in ``python -m lightclient.token`` and
    return its JSON result.

    ``args`` (JSON-able) and the PINs go to the child as JSON on stdin, never in its arguments or
    environment; ``env`` is the child's whole environment (default: this process's), e.g. to point it at
    a SoftHSM config. A :class:`LightClientError` raised in the child is raised here with its class and
    message; any other failure in the child raises :class:`KeyLoadError`, a crash :class:`ModuleLoadError`,
    and no answer within ``timeout`` seconds :class:`OperationTimeout`.
    """
    if op not in CHILD_OPS:
        raise ConfigError(f"unknown token operation {op!r}: choose one of {', '.join(CHILD_OPS)}")
    request: Dict[str, Any] = {"args": args}
    if pin is not None:
        request["pin"] = pin
    if so_pin is not None:
        request["so_pin"] = so_pin
    module = args.get("module_path", "the PKCS#11 module")
    try:
        proc = subprocess.run([sys.executable, "-m", "lightclient.token", op], input=json.dumps(request),
                              capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise OperationTimeout(f"the token operation {op!r} on {module} did not finish within {timeout:g} s") from None
    except OSError as exc:
        raise KeyLoadError(f"cannot start a child process for the token operation {op!r}: {exc}") from None
    try:
        answer = json.loads(proc.stdout)
    except ValueError:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ModuleLoadError(f"{module} crashed the child process running {op!r} (exit {proc.returncode}): "
                              f"{last}") from None
    if "error" in answer:
        raise _rebuild_error(answer["error"])
    return answer["result"]


def _rebuild_error(error: dict) -> LightClientError:
    cls = getattr(exceptions, str(error.get("type")), None)
    message = str(error.get("message", ""))
    if not (isinstance(cls, type) and issubclass(cls, LightClientError)):
        return KeyLoadError(f"the token operation failed: {error.get('type')}: {message}")
    try:
        if error.get("openssl_errors"):
            return cls(message, error["openssl_errors"])
        return cls(message)
    except TypeError:  # a class with another constructor: keep the meaning, if not the class
        return KeyLoadError(message)


def _child_main(argv: List[str]) -> int:
    """``python -m lightclient.token OP`` (request JSON on stdin): one JSON line on stdout, always."""
    import os

    # A PKCS#11 module may print on stdout; keep that off the answer channel.
    answer_fd = os.dup(1)
    os.dup2(2, 1)
    try:
        if len(argv) != 1 or argv[0] not in CHILD_OPS:
            raise ConfigError(f"usage: python -m lightclient.token {{{'|'.join(CHILD_OPS)}}} (request JSON on stdin)")
        request = json.loads(sys.stdin.read() or "{}")
        kwargs = dict(request.get("args", {}))
        for secret in ("pin", "so_pin"):
            if secret in request:
                kwargs[secret] = request[secret]
        answer: dict = {"result": CHILD_OPS[argv[0]](**kwargs)}
    except Exception as exc:  # reported to the parent, which raises it; never a traceback
        answer = {"error": {"type": type(exc).__name__, "message": getattr(exc, "message", None) or str(exc),
                            "openssl_errors": list(getattr(exc, "openssl_errors", ()))}}
    with os.fdopen(answer_fd, "w") as out:
        out.write(json.dumps(answer) + "\n")
    return 1 if "error" in answer else 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
