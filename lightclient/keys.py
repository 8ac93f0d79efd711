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
URI's ``pin-value`` or ``pin-source``. ``repr()``/``str()`` of a :class:`KeyRef` never show it, and
:func:`redact` hides the whole ``pin-value`` of any text (``pin-value=12;34`` included).

:class:`KeyRef` is the one place that knows what a reference needs (its ``kind``, ``needs_pin``,
``needs_engine``, ``needs_provider``, pkcs11 attributes); the CLI and ``doctor`` ask it rather than
looking at prefixes. A new backend is a kind here, one loader in :func:`load_key`, and the shim.
Files named here (key files, PIN files) are read bounded: regular files only, PIN files up to 4 KiB,
key files up to 64 KiB.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Sequence, Tuple, Union
from urllib.parse import unquote

from . import _pkcs11_uri
from ._files import KEY_LIMIT, PIN_LIMIT, read_user_file
from .exceptions import ConfigError, KeyLoadError, KeyNotFoundError, PinError, TokenNotFoundError, wording

PinCallback = Callable[[], str]

TSS2_PEM_HEADER = b"-----BEGIN TSS2 PRIVATE KEY-----"
_HANDLE_RE = re.compile(r"^handle:0x[0-9a-fA-F]{1,8}$")
_ENGINE_ID_RE = re.compile(r"^[A-Za-z0-9/][A-Za-z0-9/_.-]*$")

#: The kinds of key reference, one per syntax in the module docstring.
KINDS = ("pkcs11", "engine", "store", "provider", "handle", "file")
_LOADER = {"pkcs11": "engine", "engine": "engine", "store": "store", "provider": "store", "handle": "store",
           "file": "file"}


@dataclass(frozen=True)
class KeyRef:
    """A parsed key reference: everything lightclient knows about a reference lives here.

    ``kind`` is the syntax it was written in (:data:`KINDS`); ``backend`` is the loader that serves it
    (``engine``, ``store`` or ``file``). ``needs_engine``/``needs_provider`` say what OpenSSL must
    offer, ``needs_pin`` whether a PIN has to come from elsewhere, and :meth:`attribute` reads the
    pkcs11 URI's attributes. ``str()`` is the reference as written, with any pin-value hidden.
    """

    backend: str
    target: str      # what OpenSSL gets: engine key id, store URI or file path; never shown (see __str__)
    engine_id: Optional[str] = None
    module_path: Optional[str] = None
    providers: Tuple[str, ...] = ()
    propq: Optional[str] = None
    original: str = field(default="", compare=False)   # redacted form of what the user wrote
    _pin_value: Optional[str] = field(default=None, repr=False, compare=False)
    _pin_source: Optional[str] = field(default=None, repr=False, compare=False)
    kind: str = ""
    _uri: Optional[_pkcs11_uri.Pkcs11Uri] = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.kind:
            object.__setattr__(self, "kind", {"engine": "engine", "store": "store"}.get(self.backend, "file"))

    def __repr__(self) -> str:
        extra = f", module_path={self.module_path!r}" if self.module_path else ""
        if self.providers:
            extra += f", providers={self.providers!r}"
        pin = ", pin=<set>" if self.has_pin else ""
        return f"KeyRef({self.kind}: {str(self)!r}{extra}{pin})"

    def __str__(self) -> str:
        return self.original or self.target

    # -- what the reference needs ------------------------------------------------------------

    @property
    def needs_engine(self) -> bool:
        """Loaded through an OpenSSL ENGINE (pkcs11: URIs go through libp11's)."""
        return self.kind in ("pkcs11", "engine")

    @property
    def needs_provider(self) -> bool:
        """Loaded through OSSL_STORE and OpenSSL 3 providers (a TSS2 key file, too, once read)."""
        return self.kind in ("store", "provider", "handle")

    @property
    def has_pin(self) -> bool:
        """The reference itself carries a PIN (pin-value) or says where one is (pin-source)."""
        return self._pin_value is not None or self._pin_source is not None

    @property
    def has_pin_value(self) -> bool:
        """The reference holds the PIN itself (a pin-value, also inside a store URI); the CLI warns about it."""
        return self._pin_value is not None or bool(_pkcs11_uri.pin_values(self.target))

    @property
    def needs_pin(self) -> bool:
        """The key sits behind a token login and the reference brings no PIN of its own."""
        return self.needs_engine and not self.has_pin

    # -- pkcs11 attributes -------------------------------------------------------------------

    @property
    def pkcs11_uri(self) -> Optional[str]:
        """The pkcs11: URI handed to OpenSSL (no PIN, no module path), for pkcs11 and engine:…:pkcs11: keys."""
        return self._uri.uri() if self._uri is not None else None

    def attribute(self, name: str) -> Optional[str]:
        """The percent-decoded pkcs11 path attribute ``name`` (``token``, ``object``, ``id`` …), or None."""
        return self._uri.attribute(name) if self._uri is not None else None

    def attribute_bytes(self, name: str) -> Optional[bytes]:
        """Like :meth:`attribute` as bytes: ``attribute_bytes("id")`` is the CKA_ID."""
        return self._uri.attribute_bytes(name) if self._uri is not None else None

    @property
    def is_secret_key(self) -> bool:
        """A PKCS#11 secret (HMAC) key for SAS tokens (``type=secret-key``), not an X.509 private key."""
        return self._uri is not None and self.attribute("type") == "secret-key"

    @property
    def redacted(self) -> str:
        """The reference as written, with any pin-value replaced by ``***``."""
        return str(self)

    # -- options and PIN ---------------------------------------------------------------------

    def with_options(self, *, module_path: Optional[str] = None, providers: Optional[Sequence[str]] = None,
                     propq: Optional[str] = None) -> "KeyRef":
        """Fill in settings that the reference itself did not carry."""
        return replace(
            self,
            module_path=self.module_path or module_path,
            providers=self.providers or tuple(providers or ()),
            propq=self.propq or propq,
        )

    def resolve_pin(self, pin: Optional[str] = None, pin_file: Optional[Union[str, os.PathLike]] = None,
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
            return _check_pin(self._pin_value, "the pin-value of the key reference")
        if self._pin_source is not None:
            return read_pin_file(self._pin_source)
        return None

    def secrets(self) -> Tuple[str, ...]:
        """Every form of a PIN this reference carries, to scrub from OpenSSL's error text."""
        values = tuple(v for v in (self._pin_value,) if v)
        return values + _pkcs11_uri.pin_values(self.target)


def _check_pin(pin: str, where: str) -> str:
    if "\x00" in pin:
        raise ConfigError(f"the PIN from {where} contains a NUL character")
    return pin


def read_pin_file(path: Union[str, os.PathLike]) -> str:
    """The PIN stored in a file (``file:`` URIs too); one trailing newline is not part of it.

    The file must be a regular file of at most 4 KiB holding UTF-8 text; errors never show its content.
    """
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if not isinstance(path, str):
        raise ConfigError(f"pin_file must be a path (str or os.PathLike), got {type(path).__name__}")
    if path.startswith("file:"):
        path = unquote(path[5:])
        if path.startswith("//"):
            path = path[2:]
    what = f"the PIN file {path!r}"
    data = read_user_file(path, what=what, limit=PIN_LIMIT, unreadable=PinError)
    try:
        value = data.decode("utf-8")
    except UnicodeDecodeError:
        raise PinError(f"{what} is not UTF-8 text: save the PIN as plain UTF-8 text") from None
    # A trailing newline is how editors and `echo` save files, never part of a PIN.
    value = value.rstrip("\r\n")
    if not value:
        raise PinError(f"{what} is empty")
    return _check_pin(value, what)


def redact(text: str) -> str:
    """Hide the whole value of every ``pin-value=`` in ``text`` (see :mod:`lightclient._pkcs11_uri`)."""
    return _pkcs11_uri.redact(text)


def _parse_pkcs11(uri: str, original: str, default_type: str = "private") -> KeyRef:
    parsed = _pkcs11_uri.parse(uri)
    names = [n for n, _ in parsed.path]
    if not any(n in ("object", "id") for n in names):
        raise ConfigError(
            f"the pkcs11: URI {parsed.redacted!r} names no key: add object=<label> or id=<hex id>")
    types = [v for n, v in parsed.path if n == "type"]
    if types and types not in (["private"], ["secret-key"]):
        raise ConfigError(f"the pkcs11: URI {parsed.redacted!r} must name a private key (type=private) or, for "
                          "SAS tokens, a secret key (type=secret-key)")
    if not types:
        parsed = replace(parsed, path=parsed.path + (("type", default_type),))
    return KeyRef("engine", parsed.uri(), engine_id="pkcs11", module_path=parsed.module_path,
                  original=redact(original), _pin_value=parsed.pin_value, _pin_source=parsed.pin_source,
                  kind="pkcs11", _uri=parsed)


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
    shown = redact(ref)
    if ref.startswith("pkcs11:"):
        return _parse_pkcs11(ref, ref)
    if ref.startswith("engine:"):
        engine_id, sep, key_id = ref[len("engine:"):].partition(":")
        if not sep or not _ENGINE_ID_RE.match(engine_id) or not key_id:
            raise ConfigError(f"malformed engine key reference {shown!r}: expected engine:<engine-id>:<key-id>")
        if key_id.startswith("pkcs11:"):
            inner = _parse_pkcs11(key_id, ref)
            return replace(inner, engine_id=engine_id, kind="engine")
        return KeyRef("engine", key_id, engine_id=engine_id, original=shown, kind="engine")
    if ref.startswith("store:"):
        uri = ref[len("store:"):]
        if not uri:
            raise ConfigError("malformed store key reference: expected store:<uri>, e.g. store:file:/path/key.pem")
        return KeyRef("store", uri, original=shown, kind="store")
    if ref.startswith("provider:"):
        names, sep, uri = ref[len("provider:"):].partition(":")
        providers = tuple(n for n in names.split(",") if n)
        if not sep or not providers or not uri:
            raise ConfigError(f"malformed provider key reference {shown!r}: expected provider:<name>[,<name>]:<uri>")
        return KeyRef("store", uri, providers=providers, original=shown, kind="provider")
    if ref.startswith("handle:"):
        if not _HANDLE_RE.match(ref):
            raise ConfigError(f"malformed TPM handle {shown!r}: expected handle:0x81xxxxxx")
        return KeyRef("store", ref, providers=("tpm2",), original=shown, kind="handle")
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", ref) and not ref.startswith("file:"):
        scheme = ref.split(":", 1)[0]
        raise ConfigError(
            f"unknown key reference scheme {redact(scheme)!r}: use pkcs11:, engine:, store:, provider:, "
            "handle: or a file path")
    path = unquote(ref[5:]) if ref.startswith("file:") else ref
    if path.startswith("//"):
        path = path[2:]
    return KeyRef("file", path, original=shown, kind="file")


def parse_secret_key_ref(ref: Union[str, KeyRef]) -> KeyRef:
    """Parse the reference of a symmetric (SAS) key: a pkcs11: URI, ``type=secret-key`` added when absent.

    ``pkcs11:token=lab;object=sas?module-path=/usr/lib/softhsm/libsofthsm2.so`` names the
    CKK_GENERIC_SECRET key that signs SAS tokens with CKM_SHA256_HMAC inside the token.
    """
    if isinstance(ref, KeyRef):
        kr = ref
    elif isinstance(ref, str) and ref.strip().startswith("pkcs11:"):
        kr = _parse_pkcs11(ref.strip(), ref.strip(), default_type="secret-key")
    else:
        shown = redact(ref) if isinstance(ref, str) else type(ref).__name__
        raise ConfigError(f"a symmetric key reference must be a pkcs11: URI naming a secret key, e.g. "
                          f"pkcs11:token=lab;object=sas?module-path=/usr/lib/softhsm/libsofthsm2.so, not {shown!r}")
    if not kr.is_secret_key:
        raise ConfigError(f"{kr} names a private key; a SAS key is a secret key (type=secret-key)")
    return kr


def _raise_if_token_missing(kr: KeyRef, exc: KeyNotFoundError) -> None:
    if not kr.module_path or kr.pkcs11_uri is None:
        return
    from .token import token_label_problem

    problem = token_label_problem(kr.module_path, kr.attribute("token"))
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
    if kr.is_secret_key:
        raise ConfigError(f"{kr} is a secret (HMAC) key for SAS tokens, not an X.509 private key: use it as "
                          "the SAS key (lightclient.symkey.TokenKey, --sas-key)")
    secret = kr.resolve_pin(pin, pin_file, pin_callback)
    if kr.backend == "engine":
        if kr.kind == "pkcs11" and not kr.module_path:
            raise ConfigError(wording(
                f"no PKCS#11 module given for {kr}: add ?module-path=/path/to/module.so to the URI or "
                "pass {module_path} (SoftHSM: /usr/lib/softhsm/libsofthsm2.so; TPM: "
                "/usr/lib/<arch>/pkcs11/libtpm2_pkcs11.so). To use the engine as configured in "
                "OPENSSL_CONF instead, write engine:pkcs11:<pkcs11-uri>.", module_path="module_path="))
        try:
            return _native.load_engine_key(kr.target, engine_id=kr.engine_id or "pkcs11",
                                           module_path=kr.module_path, pin=secret, description=str(kr),
                                           secrets=kr.secrets())
        except KeyNotFoundError as exc:
            # libp11 says "object not found" whether the token or the key is missing; look at
            # the module's token list to tell the user which.
            _raise_if_token_missing(kr, exc)
            raise
    if kr.backend == "store":
        return _native.load_store_key(kr.target, providers=kr.providers, propq=kr.propq, pin=secret,
                                      description=str(kr), secrets=kr.secrets())
    data = read_user_file(kr.target, what=f"the key file {kr.target!r}", limit=KEY_LIMIT, unreadable=KeyLoadError)
    if TSS2_PEM_HEADER in data:
        # A TPM-wrapped key: only the tpm2 provider can use it, and the key stays in the TPM.
        return _native.load_store_key(os.path.abspath(kr.target), providers=kr.providers or ("tpm2",),
                                      propq=kr.propq, pin=secret, description=str(kr))
    return _native.load_pem_key(data, pin=secret, description=f"the key file {kr.target!r}")


#: The signature digests a CSR may use (what IoT Hub, DPS and common CAs accept).
CSR_DIGESTS = ("sha256", "sha384", "sha512")
_FIELD_NAME = re.compile(r"^(?:[A-Za-z][A-Za-z0-9]*|[0-9]+(?:\.[0-9]+)+)$")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")


def _csr_text(value, what: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{what} must be a str, got {type(value).__name__}")
    if not value:
        raise ConfigError(f"{what} is empty")
    bad = _CONTROL.search(value)
    if bad:
        # OpenSSL would cut the value at a NUL ("dev-1\x00admin" becomes CN=dev-1); refuse instead.
        raise ConfigError(f"{what} contains the control character {bad.group()!r}: "
                          "certificate names cannot hold NUL, newline or other control characters")
    return value


def _csr_subject(subject) -> "list[tuple[str, str]]":
    if isinstance(subject, str):
        return [("CN", _csr_text(subject, "the CSR common name"))]
    try:
        items = list(subject)
    except TypeError:
        raise ConfigError(f"the CSR subject must be a common name or (field, value) pairs, "
                          f"got {type(subject).__name__}") from None
    if not items:
        raise ConfigError("a CSR needs a subject: give at least a common name")
    pairs = []
    for item in items:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ConfigError(f"each CSR subject entry must be a (field, value) pair, e.g. ('CN', 'dev-1'), "
                              f"got {type(item).__name__}")
        name = _csr_text(item[0], "a CSR subject field name")
        if not _FIELD_NAME.match(name):
            raise ConfigError(f"the CSR subject field name {name!r} is not valid: use CN, O, OU, C, L, ST "
                              "or a dotted OID")
        pairs.append((name, _csr_text(item[1], f"the CSR subject value for {name}")))
    return pairs


def sign_csr(key, subject, *, san: Optional[str] = None, digest: str = "sha256") -> bytes:
    """A PKCS#10 certificate signing request signed by ``key`` (a loaded key), as DER.

    ``subject`` is a common name (``"dev-1"``) or (field, value) pairs (``[("CN", "dev-1"), ("O", "Contoso")]``);
    ``san`` uses OpenSSL's syntax (``"DNS:dev-1,IP:127.0.0.1"``); ``digest`` is one of :data:`CSR_DIGESTS`.
    Values with NUL or control characters are refused (ConfigError). Use :func:`csr_pem` for PEM text.
    """
    from . import _native

    if not isinstance(key, _native.NativeKey):
        raise ConfigError(f"key must be a loaded key (from lightclient.keys.load_key), got {type(key).__name__}")
    pairs = _csr_subject(subject)
    if san is not None:
        san = _csr_text(san, "the CSR subjectAltName")
    if not isinstance(digest, str) or digest.lower() not in CSR_DIGESTS:
        shown = digest if isinstance(digest, str) else type(digest).__name__
        raise ConfigError(f"the CSR digest {shown!r} is not allowed: use one of {', '.join(CSR_DIGESTS)}")
    return _native.sign_csr(key, pairs, san=san, digest=digest.lower())


def csr_pem(der: bytes) -> bytes:
    """PEM armour for a DER certificate signing request."""
    import base64

    b64 = base64.b64encode(der)
    lines = b"\n".join(b64[i:i + 64] for i in range(0, len(b64), 64))
    return b"-----BEGIN CERTIFICATE REQUEST-----\n" + lines + b"\n-----END CERTIFICATE REQUEST-----\n"
