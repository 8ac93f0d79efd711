"""Symmetric keys: where SAS signatures come from, and the credential that keeps a token fresh.

Two kinds of key, one interface (``sign(message) -> bytes``, HMAC-SHA256)::

    TokenKey("pkcs11:token=lab;object=sas?module-path=/usr/lib/softhsm/libsofthsm2.so", pin_file="pin")
        the key is a CKK_GENERIC_SECRET object in a PKCS#11 token, sensitive and non-extractable;
        every signature is C_Sign(CKM_SHA256_HMAC) in the token. Nothing ever reads CKA_VALUE.
    SoftwareKey("base64 key")          development only: the key is in this process's memory.

and :class:`SasCredential` turns a key and a resource URI into fresh :class:`~lightclient.sas.SasToken`
values (default lifetime 1 h, renewed after 80 % of it)::

    cred = SasCredential.for_identity(identity, TokenKey(ref, pin_file="pin"))
    Device(identity, tls.server_context(), sas=cred)

Why the token signs in a child process (``python -m lightclient.token hmac-sign``, PIN on stdin) rather
than through python-pkcs11 in this process: a PKCS#11 module keeps per-process state, and a process that
also loads keys through libp11 (an X.509 device, the doctor) must be the only one initialising it; the
child costs a fraction of a second once per token (once an hour by default), while the MQTT traffic
itself carries no signature at all. Measured on SoftHSM 2.6 (a loaded 2-core machine): ~0.1 ms per
C_Sign in-process, ~320 ms per signature through the child (interpreter start, C_Initialize, login).
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Dict, Optional, Tuple, Union

from . import sas
from .exceptions import ConfigError, PinError
from .identity import Identity
from .keys import KeyRef, PinCallback, parse_secret_key_ref

log = logging.getLogger("lightclient.symkey")


class TokenKey:
    """An HMAC key in a PKCS#11 token (see module docstring). The PIN is resolved once, here, and kept
    private (never in ``repr``); ``env`` is the signing child's environment (default: this process's)."""

    def __init__(self, ref: Union[str, KeyRef], *, pin: Optional[str] = None, pin_file: Optional[str] = None,
                 pin_callback: Optional[PinCallback] = None, module_path: Optional[str] = None,
                 env: Optional[Dict[str, str]] = None, timeout: float = 30.0):
        self.ref = parse_secret_key_ref(ref).with_options(module_path=module_path)
        if not self.ref.module_path:
            raise ConfigError(f"no PKCS#11 module given for {self.ref}: add ?module-path=/path/to/module.so to "
                              "the URI or pass module_path=")
        if not self.ref.attribute("token"):
            raise ConfigError(f"the SAS key reference {self.ref} names no token: add token=<label>")
        self._pin = self.ref.resolve_pin(pin, pin_file, pin_callback)
        if self._pin is None:
            raise PinError(f"the SAS key {self.ref} needs the token's user PIN: pass pin_file= (or pin=, "
                           "pin_callback=), or add pin-source=<file> to the URI")
        self._env = env
        self._timeout = timeout

    def __repr__(self) -> str:
        return f"TokenKey({str(self.ref)!r})"

    def sign(self, message: bytes) -> bytes:
        """HMAC-SHA256 of ``message`` computed in the token."""
        import base64

        from .token import run_in_child

        key_id = self.ref.attribute_bytes("id")
        answer = run_in_child("hmac-sign", module_path=self.ref.module_path, token_label=self.ref.attribute("token"),
                              key_label=self.ref.attribute("object"), key_id_hex=key_id.hex() if key_id else None,
                              message=message.decode("utf-8"), pin=self._pin, env=self._env, timeout=self._timeout)
        return base64.b64decode(answer)


class SoftwareKey:
    """An HMAC key in this process's memory (a connection string's SharedAccessKey): development only."""

    def __init__(self, key_b64: str):
        self._key = sas.decode_key(key_b64, "the SharedAccessKey")

    def __repr__(self) -> str:
        return "SoftwareKey(<secret>)"

    def sign(self, message: bytes) -> bytes:
        return sas.hmac_sha256(self._key, message)

    def wipe(self) -> None:
        sas.wipe(self._key)


Key = Union[TokenKey, SoftwareKey]


class SasCredential:
    """Fresh SAS tokens for one resource URI, signed by ``key``.

    :meth:`current` returns the token in use, signing a new one when there is none or when 80 % of its
    lifetime has passed; :meth:`renew` always signs a new one. Thread-safe. ``clock`` (Unix seconds) is
    for tests; SAS tokens depend on a correct clock, so sync time before connecting.
    """

    def __init__(self, key: Key, uri: str, *, lifetime: int = sas.DEFAULT_LIFETIME, policy: Optional[str] = None,
                 clock: Callable[[], float] = time.time):
        if not callable(getattr(key, "sign", None)):
            raise ConfigError(f"key must be a lightclient.symkey.TokenKey or SoftwareKey, not {type(key).__name__}")
        self.key = key
        self.uri = uri
        self.lifetime = sas.check_lifetime(lifetime)
        self.policy = policy
        self._clock = clock
        self._lock = threading.Lock()
        self._token: Optional[sas.SasToken] = None

    @classmethod
    def for_identity(cls, identity: Identity, key: Key, **kwargs) -> "SasCredential":
        """For a device or module: resource ``{hostname}/devices/{id}[/modules/{id}]``, no policy."""
        if not isinstance(identity, Identity):
            raise ConfigError(f"identity must be a lightclient Identity, not {type(identity).__name__}")
        return cls(key, sas.resource_uri(identity.hostname, identity.device_id, identity.module_id), **kwargs)

    @classmethod
    def for_dps(cls, id_scope: str, registration_id: str, key: Key, **kwargs) -> "SasCredential":
        """For DPS registration: resource ``{id_scope}/registrations/{registration_id}``, ``skn=registration``."""
        return cls(key, sas.dps_resource_uri(id_scope, registration_id), policy=sas.DPS_POLICY, **kwargs)

    def __repr__(self) -> str:
        return f"SasCredential({self.uri!r}, {self.key!r}, lifetime={self.lifetime})"

    def renew(self) -> sas.SasToken:
        """Sign a new token now (in the token, for a TokenKey) and make it current."""
        now = self._clock()
        expiry = sas.expiry_for(now, self.lifetime)
        signature = self.key.sign(sas.string_to_sign(self.uri, expiry))
        fresh = sas.token(self.uri, signature, expiry, self.policy, issued=now)
        with self._lock:
            self._token = fresh
        log.debug("signed a SAS token for %s, valid until %d", self.uri, expiry)
        return fresh

    def current(self) -> sas.SasToken:
        """The current token, renewed first if it is due (see :func:`lightclient.sas.renew_at`)."""
        with self._lock:
            tok = self._token
        if tok is None or self._clock() >= tok.renew_at:
            tok = self.renew()
        return tok

    def seconds_to_renewal(self) -> float:
        """Seconds until the current token is due for renewal (0 if there is none or it is due)."""
        with self._lock:
            tok = self._token
        return 0.0 if tok is None else max(0.0, tok.renew_at - self._clock())


def from_connection_string(text: str, **kwargs) -> Tuple[Identity, SasCredential]:
    """The identity and a credential from ``HostName=…;DeviceId=…[;ModuleId=…];SharedAccessKey=…``.

    For development: the key lives in this process's memory (a warning is logged saying so); put it in a
    token with ``lightclient import-key`` for devices in the field.
    """
    cs = sas.parse_connection_string(text)
    identity = Identity(cs.hostname, cs.device_id, cs.module_id)
    log.warning("the SAS key of %s comes from a connection string and is held in software; for devices in "
                "the field import it into a token (lightclient import-key) and use a pkcs11: key reference",
                identity.client_id)
    return identity, SasCredential.for_identity(identity, SoftwareKey(cs.shared_access_key), **kwargs)


__all__ = ["SasCredential", "SoftwareKey", "TokenKey", "from_connection_string"]
