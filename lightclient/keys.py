"""Key references: one syntax for where a private key lives, shared by the library and the CLI.

Accepted forms::

    pkcs11:token=lab;object=devkey;type=private?module-path=/usr/lib/softhsm/libsofthsm2.so
        RFC 7512 URI, loaded through the libp11 ``pkcs11`` ENGINE. Query attributes ``pin-value``,
        ``pin-source`` (a file holding the PIN) and ``module-path`` are honoured and stripped
        before the URI reaches OpenSSL. ``type=private`` is added when absent.
    engine:<engine-id>:<key-id>          any ENGINE, e.g. ``engine:pkcs11:pkcs11:token=lab;object=k``
    store:<uri>                          OSSL_STORE (OpenSSL 3), e.g. ``store:file:/path/key.pem``
    provider:<p1>[,<p2>...]:<uri>        OSSL_STORE after loading the named providers first
    handle:0x81000011                    a persistent TPM key through the tpm2-openssl provider
    /path/to/key.pem                     a PEM file (development only: the key is in memory);
                                         a TSS2 PEM file ("BEGIN TSS2 PRIVATE KEY") goes through
                                         the tpm2 provider instead, so the key stays in the TPM.

The PIN comes from (first match wins) the ``pin`` argument, ``pin_file``, ``pin_callback``, the
URI's ``pin-value`` or ``pin-source``. ``repr()``/``str()`` of a :class:`KeyRef` never show it.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Sequence, Tuple, Union
from urllib.parse import unquote

from .exceptions import ConfigError, KeyLoadError, KeyNotFoundError, PinError, TokenNotFoundError

PinCallback = Callable[[], str]

TSS2_PEM_HEADER = b"-----BEGIN TSS2 PRIVATE KEY-----"
_PIN_QUERY_KEYS = ("pin-value", "pin-source")
_HANDLE_RE = re.compile(r"^handle:0x[0-9a-fA-F]{1,8}$")


@dataclass(frozen=True)
class KeyRef:
    """A parsed key reference. ``backend`` is ``engine``, ``store`` or ``file``."""

    backend: str
    target: str                          # engine key id, store URI, or file path (never holds a PIN)
    engine_id: Optional[str] = None
    module_path: Optional[str] = None
    providers: Tuple[str, ...] = ()
    propq: Optional[str] = None
    original: str = field(default="", compare=False)   # redacted form of what the user wrote
    _pin_value: Optional[str] = field(default=None, repr=False, compare=False)
    _pin_source: Optional[str] = field(default=None, repr=False, compare=False)

    def __repr__(self) -> str:
        extra = f", module_path={self.module_path!r}" if self.module_path else ""
        if self.providers:
            extra += f", providers={self.providers!r}"
        pin = ", pin=<set>" if (self._pin_value or self._pin_source) else ""
        return f"KeyRef({self.backend}: {self.target!r}{extra}{pin})"

    def __str__(self) -> str:
        return self.original or self.target

    def with_options(self, *, module_path: Optional[str] = None, providers: Optional[Sequence[str]] = None,
                     propq: Optional[str] = None) -> "KeyRef":
        """Fill in settings that the reference itself did not carry."""
        return replace(
            self,
            module_path=self.module_path or module_path,
            providers=self.providers or tuple(providers or ()),
            propq=self.propq or propq,
        )

    def resolve_pin(self, pin: Optional[str] = None, pin_file: Optional[str] = None,
                    pin_callback: Optional[PinCallback] = None) -> Optional[str]:
        """The PIN to use, from the first source that has one (see module docstring)."""
        if pin is not None:
            return _check_pin(pin, "the pin argument")
        if pin_file is not None:
            return read_pin_file(pin_file)
        if pin_callback is not None:
            value = pin_callback()
            if not isinstance(value, str):
                raise ConfigError("pin_callback must return the PIN as a str")
            return _check_pin(value, "pin_callback")
        if self._pin_value is not None:
            return self._pin_value
        if self._pin_source is not None:
            return read_pin_file(self._pin_source)
        return None


def _check_pin(pin: str, where: str) -> str:
    if "\x00" in pin:
        raise ConfigError(f"the PIN from {where} contains a NUL character")
    return pin


def read_pin_file(path: str) -> str:
    """The PIN stored in a file (``file:`` URIs too); one trailing newline is not part of it."""
    if path.startswith("file:"):
        path = unquote(path[5:])
        if path.startswith("//"):
            path = path[2:]
    try:
        with open(path, encoding="utf-8") as fh:
            value = fh.read()
    except OSError as exc:
        raise PinError(f"cannot read the PIN file {path!r}: {exc.strerror}") from None
    # A trailing newline is how editors and `echo` save files, never part of a PIN.
    value = value.rstrip("\r\n")
    if not value:
        raise PinError(f"the PIN file {path!r} is empty")
    return _check_pin(value, f"the PIN file {path!r}")


def redact(text: str) -> str:
    """Hide ``pin-value=...`` in any pkcs11: URI inside ``text``."""
    return re.sub(r"(pin-value=)[^;&?\s]*", r"\1***", text)


def _parse_pkcs11(uri: str) -> KeyRef:
    body = uri[len("pkcs11:"):]
    path, _, query = body.partition("?")
    pin_value = pin_source = module_path = None
    kept_query = []
    for item in filter(None, query.split("&")):
        name, eq, value = item.partition("=")
        if not eq:
            raise ConfigError(f"malformed pkcs11: URI query attribute {name!r}: expected name=value")
        if name == "pin-value":
            pin_value = unquote(value)
        elif name == "pin-source":
            pin_source = unquote(value)
        elif name == "module-path":
            module_path = unquote(value)
        else:
            kept_query.append(item)
    attrs = []
    for item in filter(None, path.split(";")):
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise ConfigError(
                f"malformed pkcs11: URI path attribute {redact(item)!r}: expected name=value, "
                "e.g. pkcs11:token=lab;object=devkey;type=private")
        if name == "pin-value":  # misplaced in the path; still never forwarded or shown
            pin_value = unquote(value)
            continue
        attrs.append((name, value))
    names = [n for n, _ in attrs]
    if not any(n in ("object", "id") for n in names):
        raise ConfigError(
            f"the pkcs11: URI {redact(uri)!r} names no key: add object=<label> or id=<hex id>")
    types = [v for n, v in attrs if n == "type"]
    if types and types != ["private"]:
        raise ConfigError(f"the pkcs11: URI {redact(uri)!r} must name a private key (type=private)")
    if not types:
        attrs.append(("type", "private"))
    target = "pkcs11:" + ";".join(f"{n}={v}" for n, v in attrs)
    if kept_query:
        target += "?" + "&".join(kept_query)
    return KeyRef("engine", target, engine_id="pkcs11", module_path=module_path, original=redact(uri),
                  _pin_value=pin_value, _pin_source=pin_source)


def parse_key_ref(ref: Union[str, os.PathLike, KeyRef]) -> KeyRef:
    """Parse a key reference string (see the module docstring) into a :class:`KeyRef`."""
    if isinstance(ref, KeyRef):
        return ref
    if isinstance(ref, os.PathLike):
        ref = os.fspath(ref)
    if not isinstance(ref, str):
        raise ConfigError(f"a key reference must be a str, got {type(ref).__name__}")
    ref = ref.strip()
    if not ref:
        raise ConfigError("the key reference is empty: give a pkcs11: URI, engine:, store:, handle: or a file path")
    if "\x00" in ref:
        raise ConfigError("the key reference contains a NUL character")
    if ref.startswith("pkcs11:"):
        return _parse_pkcs11(ref)
    if ref.startswith("engine:"):
        engine_id, sep, key_id = ref[len("engine:"):].partition(":")
        if not sep or not engine_id or not key_id:
            raise ConfigError(f"malformed engine key reference {redact(ref)!r}: expected engine:<engine-id>:<key-id>")
        if key_id.startswith("pkcs11:"):
            inner = _parse_pkcs11(key_id)
            return replace(inner, engine_id=engine_id, original=redact(ref))
        return KeyRef("engine", key_id, engine_id=engine_id, original=redact(ref))
    if ref.startswith("store:"):
        uri = ref[len("store:"):]
        if not uri:
            raise ConfigError("malformed store key reference: expected store:<uri>, e.g. store:file:/path/key.pem")
        return KeyRef("store", uri, original=ref)
    if ref.startswith("provider:"):
        names, sep, uri = ref[len("provider:"):].partition(":")
        providers = tuple(n for n in names.split(",") if n)
        if not sep or not providers or not uri:
            raise ConfigError(f"malformed provider key reference {ref!r}: expected provider:<name>[,<name>]:<uri>")
        return KeyRef("store", uri, providers=providers, original=ref)
    if ref.startswith("handle:"):
        if not _HANDLE_RE.match(ref):
            raise ConfigError(f"malformed TPM handle {ref!r}: expected handle:0x81xxxxxx")
        return KeyRef("store", ref, providers=("tpm2",), original=ref)
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", ref) and not ref.startswith("file:"):
        scheme = ref.split(":", 1)[0]
        raise ConfigError(
            f"unknown key reference scheme {scheme!r}: use pkcs11:, engine:, store:, provider:, handle: "
            "or a file path")
    path = unquote(ref[5:]) if ref.startswith("file:") else ref
    if path.startswith("//"):
        path = path[2:]
    return KeyRef("file", path, original=ref)


def _uri_attr(uri: str, name: str) -> Optional[str]:
    path = uri.partition(":")[2].partition("?")[0]
    for item in path.split(";"):
        key, eq, value = item.partition("=")
        if eq and key == name:
            return unquote(value)
    return None


def _raise_if_token_missing(kr: KeyRef, exc: KeyNotFoundError) -> None:
    if not kr.module_path or not kr.target.startswith("pkcs11:"):
        return
    from .token import token_label_problem

    problem = token_label_problem(kr.module_path, _uri_attr(kr.target, "token"))
    if problem is not None:
        raise TokenNotFoundError(
            f"cannot load {kr}: {problem[0]}. Check the token= attribute, or create the token "
            "(softhsm2-util --init-token, tpm2_ptool addtoken).", exc.openssl_errors) from None


def load_key(ref: Union[str, os.PathLike, KeyRef], *, pin: Optional[str] = None, pin_file: Optional[str] = None,
             pin_callback: Optional[PinCallback] = None, module_path: Optional[str] = None,
             providers: Sequence[str] = (), propq: Optional[str] = None):
    """Load the private key named by ``ref`` into OpenSSL and return a ``NativeKey``.

    The key material stays in its token (for engine and provider keys); the returned object is a
    handle that :func:`lightclient.tls.client_context` installs into an ``ssl.SSLContext``.
    """
    from . import _native

    kr = parse_key_ref(ref).with_options(module_path=module_path, providers=providers, propq=propq)
    secret = kr.resolve_pin(pin, pin_file, pin_callback)
    if kr.backend == "engine":
        if kr.original.startswith("pkcs11:") and not kr.module_path:
            raise ConfigError(
                f"no PKCS#11 module given for {kr}: add ?module-path=/path/to/module.so to the URI or "
                "pass module_path= (SoftHSM: /usr/lib/softhsm/libsofthsm2.so; TPM: "
                "/usr/lib/<arch>/pkcs11/libtpm2_pkcs11.so). To use the engine as configured in "
                "OPENSSL_CONF instead, write engine:pkcs11:<pkcs11-uri>.")
        try:
            return _native.load_engine_key(kr.target, engine_id=kr.engine_id or "pkcs11",
                                           module_path=kr.module_path, pin=secret, description=str(kr))
        except KeyNotFoundError as exc:
            # libp11 says "object not found" whether the token or the key is missing; look at
            # the module's token list to tell the user which.
            _raise_if_token_missing(kr, exc)
            raise
    if kr.backend == "store":
        return _native.load_store_key(kr.target, providers=kr.providers, propq=kr.propq, pin=secret,
                                      description=str(kr))
    try:
        with open(kr.target, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise KeyLoadError(f"cannot read the key file {kr.target!r}: {exc.strerror}") from None
    if TSS2_PEM_HEADER in data:
        # A TPM-wrapped key: only the tpm2 provider can use it, and the key stays in the TPM.
        return _native.load_store_key(os.path.abspath(kr.target), providers=kr.providers or ("tpm2",),
                                      propq=kr.propq, pin=secret, description=str(kr))
    return _native.load_pem_key(data, pin=secret, description=f"the key file {kr.target!r}")


def sign_csr(key, subject, *, san: Optional[str] = None, digest: str = "sha256") -> bytes:
    """A PKCS#10 certificate signing request signed by ``key`` (a loaded key), as DER.

    ``subject`` is a common name (``"dev-1"``) or (field, value) pairs (``[("CN", "dev-1"), ("O", "Contoso")]``);
    ``san`` uses OpenSSL's syntax (``"DNS:dev-1,IP:127.0.0.1"``). Use :func:`csr_pem` for PEM text.
    """
    from . import _native

    pairs = [("CN", subject)] if isinstance(subject, str) else list(subject)
    if not pairs:
        raise ConfigError("a CSR needs a subject: give at least a common name")
    return _native.sign_csr(key, pairs, san=san, digest=digest)


def csr_pem(der: bytes) -> bytes:
    """PEM armour for a DER certificate signing request."""
    import base64

    b64 = base64.b64encode(der)
    lines = b"\n".join(b64[i:i + 64] for i in range(0, len(b64), 64))
    return b"-----BEGIN CERTIFICATE REQUEST-----\n" + lines + b"\n-----END CERTIFICATE REQUEST-----\n"
