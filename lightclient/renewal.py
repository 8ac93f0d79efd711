"""Certificates that renew themselves: expiry, a renewal policy, a crash-safe state file, and the renewal.

Lifecycle (protocol reference section 7)::

    provision (DPS + CSR) --> issued chain --> connect --> ... renew_at (policy) ...
        --> [new key in the token] --> CSR --> DPS re-registration or $iothub/credentials
        --> chain written to CERT.new --> reconnect with it --> commit (CERT, state) --> retire old key

Two layers, like :mod:`lightclient.dps`:

* pure: :class:`Validity`, :class:`RenewalPolicy` (a fraction of the lifetime or N days before expiry,
  whichever is earlier, minus a random jitter so a fleet does not renew at once), :class:`RenewalState`
  and :func:`recovery_action` (what a restart does with a renewal a crash interrupted);
* :class:`Renewer`, the orchestration (token, DPS, hub, files).

Crash safety: the state file (JSON, mode 0600, written atomically) names the credential in use
(``current``: certificate path and key URI, never a PIN) and a renewal in progress (``pending``: its
step). The old certificate and key stay untouched until the new certificate has connected once; the
commit is one atomic write of the state file, then an atomic rewrite of the certificate file. So at
every instant the disk holds a working credential, and :meth:`Renewer.recover` (run by
:meth:`Renewer.credential`) finishes or rolls back whatever a crash left.
"""
from __future__ import annotations

import json
import logging
import os
import random
import ssl
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from ._files import CHAIN_LIMIT, atomic_write, prepare_private_file, read_user_file
from .backoff import Backoff
from .exceptions import (CertificateExpiredError, ConfigError, LightClientError, OperationTimeout, RenewalError,
                         ServiceError)

log = logging.getLogger("lightclient.renewal")

#: Steps of a renewal in progress, in order (the state file records the last one reached).
STEPS = ("csr", "issued", "written", "connected")
ROUTES = ("hub", "dps")
STATE_VERSION = 1
#: Everything a policy issues is ECDSA P-384 (section 7.1); P-256 was seen accepted too (UNCERTAIN).
DEFAULT_KEY_TYPE = "ec-p384"


# ------------------------------------------------------------------------------------------ pure


@dataclass(frozen=True)
class Validity:
    """The leaf certificate's names and validity period (epoch seconds, UTC)."""

    subject: str
    issuer: str
    not_before: float
    not_after: float

    @property
    def lifetime(self) -> float:
        return max(0.0, self.not_after - self.not_before)

    def remaining(self, now: float) -> float:
        return self.not_after - now

    def expired(self, now: float) -> bool:
        return now >= self.not_after

    def not_yet_valid(self, now: float) -> bool:
        return now < self.not_before

    def elapsed_fraction(self, now: float) -> float:
        return 1.0 if self.lifetime == 0 else min(1.0, max(0.0, (now - self.not_before) / self.lifetime))


def validity_of(chain_pem: bytes) -> Validity:
    """The :class:`Validity` of the first certificate in ``chain_pem`` (OpenSSL parses it)."""
    from . import _native

    info = _native.certificate_info(chain_pem)
    return Validity(info.subject_cn, info.issuer_cn, info.not_before.timestamp(), info.not_after.timestamp())


def certificate_validity(path: str) -> Validity:
    """The :class:`Validity` of the certificate (chain) file ``path`` (a bounded read)."""
    return validity_of(read_user_file(path, what=f"the certificate {path!r}", limit=CHAIN_LIMIT))


def load_state(path: str) -> "Optional[RenewalState]":
    """The renewal state file at ``path``, or None if there is none."""
    if not os.path.exists(path):
        return None
    return RenewalState.from_json(read_user_file(path, what=f"the renewal state file {path!r}", limit=CHAIN_LIMIT),
                                  path)


def format_duration(seconds: float) -> str:
    """``3d 4h``, ``5h 10m``, ``12m 3s``, ``42s``; negative values as ``-…``."""
    sign, s = ("-" if seconds < 0 else ""), int(abs(seconds))
    d, h, m = s // 86400, s % 86400 // 3600, s % 3600 // 60
    if d:
        return f"{sign}{d}d {h}h"
    if h:
        return f"{sign}{h}h {m}m"
    if m:
        return f"{sign}{m}m {s % 60}s"
    return f"{sign}{s}s"


@dataclass(frozen=True)
class RenewalPolicy:
    """When to renew: once ``fraction`` of the lifetime has passed (Learn suggests about 80 %), or
    ``days_before`` days before notAfter if that is earlier, then up to ``jitter`` x lifetime earlier at
    random (never later). ``grace`` seconds after a switch the old key is retired."""

    fraction: float = 0.8
    days_before: Optional[float] = None
    jitter: float = 0.05
    grace: float = 24 * 3600.0

    def __post_init__(self) -> None:
        def number(name: str, value: Any, low: float, high: float) -> None:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise ConfigError(f"{name} must be a number from {low:g} to {high:g}, not {value!r}")

        number("fraction", self.fraction, 0.01, 1.0)
        number("jitter", self.jitter, 0.0, 0.5)
        number("grace", self.grace, 0.0, 365 * 86400.0)
        if self.days_before is not None:
            number("days_before", self.days_before, 0.0, 3650.0)

    def renew_at(self, validity: Validity, rand: float) -> float:
        """Epoch seconds at which to renew; ``rand`` in [0, 1) picks the jitter (pass random.random())."""
        at = validity.not_before + self.fraction * validity.lifetime
        if self.days_before is not None:
            at = min(at, validity.not_after - self.days_before * 86400.0)
        at -= self.jitter * validity.lifetime * min(max(rand, 0.0), 1.0)
        return max(validity.not_before, at)

    def due(self, validity: Validity, now: float, rand: float) -> bool:
        return now >= self.renew_at(validity, rand)


@dataclass
class Pending:
    """A renewal in progress: the last step reached, the route, the new key (if rotating) and chain file."""

    step: str
    route: str
    new_cert: str
    new_key: Optional[str] = None            # pkcs11: URI without PIN; None = same key
    new_key_label: Optional[str] = None
    new_key_id: Optional[str] = None         # hex CKA_ID
    started: float = 0.0


@dataclass
class Retirement:
    """An old key to delete from the token once ``after`` (epoch seconds) has passed."""

    key: str
    label: str
    key_id: Optional[str]
    after: float
    attempts: int = 0           # failed deletions so far (the next waits longer: back-off)


@dataclass
class RenewalState:
    """The state file's content (see the module docstring)."""

    cert: str
    key: str
    pending: Optional[Pending] = None
    retire: List[Retirement] = field(default_factory=list)
    failures: int = 0
    next_attempt: float = 0.0
    renewals: int = 0

    def to_json(self) -> bytes:
        return json.dumps({"version": STATE_VERSION, **asdict(self)}, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, source: str) -> "RenewalState":
        try:
            raw = json.loads(data)
            if not isinstance(raw, dict) or raw.get("version") != STATE_VERSION:
                raise ValueError("unknown version")
            pending = raw.get("pending")
            state = cls(cert=str(raw["cert"]), key=str(raw["key"]),
                        pending=Pending(**pending) if pending else None,
                        retire=[Retirement(**r) for r in raw.get("retire") or ()],
                        failures=int(raw.get("failures", 0)), next_attempt=float(raw.get("next_attempt", 0.0)),
                        renewals=int(raw.get("renewals", 0)))
        except (ValueError, TypeError, KeyError) as exc:
            raise ConfigError(f"the renewal state file {source} is damaged ({exc}); move it away to start over "
                              "from the certificate and key given") from None
        if state.pending is not None and (state.pending.step not in STEPS or state.pending.route not in ROUTES):
            raise ConfigError(f"the renewal state file {source} names an unknown step; move it away")
        return state


def recovery_action(pending: Optional[Pending], new_chain_matches: bool) -> str:
    """What a (re)start does with an interrupted renewal: ``"none"``; ``"rollback"`` (nothing usable was
    written yet: delete the new key and chain); ``"try"`` (the chain was written: connect with it first,
    commit if that works, else roll back); ``"commit"`` (it already connected once)."""
    if pending is None:
        return "none"
    if not new_chain_matches or pending.step in ("csr", "issued"):
        return "rollback"
    return "commit" if pending.step == "connected" else "try"


def failure_delay(backoff: Backoff, failures: int, retry_after: Optional[float], remaining: float) -> float:
    """Seconds until the next attempt after ``failures`` failures in a row: the back-off (or the service's
    ``retry_after`` if longer), but never past a quarter of the certificate's ``remaining`` life, so a
    failing renewal is retried several times before expiry."""
    delay = backoff.delay(max(0, failures - 1))
    if retry_after is not None:
        delay = max(delay, retry_after)
    if remaining > 0:
        delay = min(delay, max(1.0, remaining / 4))
    return delay


def next_key_label(label: str, now: float) -> str:
    """``devkey`` -> ``devkey-r{time in ms}``; an earlier ``-r{time}`` suffix is replaced, not stacked.
    Milliseconds, so the second route tried in the same renewal gets a label of its own: a module such
    as tpm2-pkcs11 keeps showing this process a key that was deleted (by a child) a moment ago."""
    base = label
    head, sep, tail = label.rpartition("-r")
    if sep and tail.isdigit():
        base = head
    return f"{base}-r{int(now * 1000)}"


# ------------------------------------------------------------------------------------------ I/O


def _replace_keeping_owner(path: str, data: bytes, mode: int) -> None:
    """:func:`atomic_write`, and when root replaces another user's file, that user keeps owning it."""
    try:
        before = os.stat(path)
    except OSError:
        before = None
    atomic_write(path, data, mode)
    if before is not None and hasattr(os, "geteuid") and os.geteuid() == 0 and \
            (before.st_uid, before.st_gid) != (os.getuid(), os.getgid()):
        os.chown(path, before.st_uid, before.st_gid)


@dataclass
class DpsRoute:
    """Renewal by DPS re-registration with a CSR (section 7.2). Authenticates with ``onboarding_cert``
    (+ ``onboarding_key``) when given, else with the current certificate and key."""

    id_scope: str
    registration_id: str
    endpoint: str
    ca: Optional[str] = None
    onboarding_cert: Optional[str] = None
    onboarding_key: Optional[str] = None
    timeout: float = 60.0
    poll_interval: Tuple[float, float] = (0.2, 5.0)


class Renewer:
    """Keeps a device certificate (and optionally its key) fresh. ::

        renewer = Renewer(cert="device.pem", key="pkcs11:token=t;object=k?module-path=…", pin=pin,
                          state="device.renewal.json", device_id="dev1", ca="roots.pem",
                          dps=DpsRoute(scope, "dev1", endpoint), rotate_keys=True)
        cert, key = renewer.credential()          # finishes or rolls back an interrupted renewal
        device = Device(identity, renewer.context())
        renewer.attach(device); device.connect()
        renewer.start()                            # renews in the background, hot-swaps the Device

    With :mod:`lightclient.aio`: ``device = await renewer.connect_device_async(lambda ctx: aio.Device(identity,
    ctx))``, then ``renewer.start()``; the renewal runs on the Renewer's thread and swaps the Device on its loop.

    ``routes`` is the order in which renewal paths are tried (``"hub"``: the credentials API over the
    Device's connection; ``"dps"``: re-registration); the next one is tried when one fails. Each failure
    keeps the old credential, is reported to ``on_failure(error)`` and delays the next try (back-off).
    ``on_step(step)`` is called after each durable step ("csr", "issued", "written", "connected",
    "committed").
    """

    def __init__(self, *, cert: str, key: str, device_id: str, state: Optional[str] = None,
                 pin: Optional[str] = None, ca: Optional[str] = None, policy: Optional[RenewalPolicy] = None,
                 dps: Optional[DpsRoute] = None, routes: Sequence[str] = ("hub", "dps"),
                 rotate_keys: bool = False, key_type: str = DEFAULT_KEY_TYPE, backoff: Optional[Backoff] = None,
                 child_env: Optional[Dict[str, str]] = None, hub_timeout: float = 60.0,
                 clock: Callable[[], float] = time.time, rand: Callable[[], float] = random.random,
                 on_step: Optional[Callable[[str], None]] = None,
                 on_failure: Optional[Callable[[LightClientError], None]] = None):
        from .keys import parse_key_ref

        for route in routes:
            if route not in ROUTES:
                raise ConfigError(f"unknown renewal route {route!r}: choose from {', '.join(ROUTES)}")
        if "dps" in routes and dps is None and list(routes) == ["dps"]:
            raise ConfigError("renewal over DPS needs dps=DpsRoute(id_scope, registration_id, endpoint)")
        if not isinstance(key, str):
            raise ConfigError("key must be the key reference as a str (a pkcs11: URI or a file path), so the state "
                              "file can record it")
        ref = parse_key_ref(key)
        if ref.has_pin_value:
            raise ConfigError("the key reference holds pin-value=…; give the PIN as pin= so it never reaches the "
                              "renewal state file")
        if rotate_keys and not (ref.pkcs11_uri and ref.attribute("token") and ref.module_path):
            raise ConfigError("rotate_keys needs a pkcs11: key with token= and module-path (the new key is made "
                              "in the same token)")
        self.cert_path = os.path.abspath(cert)
        self.state_path = os.path.abspath(state or self.cert_path + ".renewal.json")
        self.device_id = device_id
        self.pin = pin
        self.ca = ca
        self.policy = policy or RenewalPolicy()
        self.dps = dps
        self.routes = tuple(r for r in routes if r != "dps" or dps is not None)
        self.rotate_keys = rotate_keys
        self.key_type = key_type
        self.backoff = backoff or Backoff(initial=2.0, maximum=3600.0)
        self.child_env = child_env
        self.hub_timeout = hub_timeout
        self.clock = clock
        self._rand = rand()
        self.on_step = on_step
        self.on_failure = on_failure
        self.device: Any = None
        self._initial_key = key
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._state: Optional[RenewalState] = None

    # ----------------------------------------------------------------------------- state file

    def _load_state(self) -> RenewalState:
        if self._state is not None:
            return self._state
        if os.path.exists(self.state_path):
            data = read_user_file(self.state_path, what=f"the renewal state file {self.state_path!r}",
                                  limit=CHAIN_LIMIT)
            self._state = RenewalState.from_json(data, self.state_path)
        else:
            self._state = RenewalState(cert=self.cert_path, key=self._initial_key)
        return self._state

    def _save(self, state: RenewalState) -> None:
        prepare_private_file(self.state_path, what=f"the renewal state file {self.state_path!r}")
        atomic_write(self.state_path, state.to_json(), 0o600)
        self._state = state

    def _step(self, state: RenewalState, step: str) -> None:
        if state.pending is not None and step in STEPS:
            state.pending.step = step
        self._save(state)
        if self.on_step is not None:
            self.on_step(step)

    @property
    def state(self) -> RenewalState:
        return self._load_state()

    # ----------------------------------------------------------------------------- credentials

    def _key_ref(self, uri: str):
        from .keys import parse_key_ref

        base = parse_key_ref(self._initial_key)
        ref = parse_key_ref(uri)
        if base.module_path and not ref.module_path:
            ref = ref.with_options(module_path=base.module_path)
        return ref

    def _load_key(self, uri: str):
        from .keys import load_key

        return load_key(self._key_ref(uri), pin=self.pin)

    def _read_chain(self, path: str) -> bytes:
        return read_user_file(path, what=f"the certificate {path!r}", limit=CHAIN_LIMIT)

    def _chain_matches(self, path: str, key_uri: str) -> bool:
        from . import _native

        try:
            return _native.cert_matches_key(self._read_chain(path), self._load_key(key_uri))
        except (LightClientError, OSError):
            return False

    def recover(self) -> str:
        """Finish or roll back an interrupted renewal and retire keys whose grace period is over; return the
        action taken (see :func:`recovery_action`). ``"try"`` is finished by :meth:`attach`/:meth:`context`."""
        with self._lock:
            state = self._load_state()
            pending = state.pending
            matches = pending is not None and os.path.exists(pending.new_cert) and self._chain_matches(
                pending.new_cert, pending.new_key or state.key)
            action = recovery_action(pending, matches)
            if action == "rollback":
                log.warning("rolling back a renewal interrupted at step %r", pending.step)
                self._rollback(state)
            elif action == "commit":
                log.info("completing a renewal interrupted after its first connect")
                self._commit(state)
            self.retire_due()
            return action

    def credential(self) -> Tuple[str, str]:
        """``(certificate path, key URI)`` in use now, after :meth:`recover`. Raises
        :class:`CertificateExpiredError` (naming the way out) if that certificate has expired and no
        renewal waits to be tried."""
        action = self.recover()
        state = self._load_state()
        if action != "try":
            validity = validity_of(self._read_chain(state.cert))
            now = self.clock()
            if validity.expired(now):
                raise CertificateExpiredError(
                    f"the device certificate {state.cert} expired on "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(validity.not_after))}; the hub refuses "
                    "it. Renew over DPS with the onboarding credential: `lightclient renew` with --id-scope "
                    "(and --onboarding-cert if the device has one), or `lightclient provision --new-csr "
                    "--cert-out …`")
        return state.cert, state.key

    def validity(self) -> Validity:
        state = self._load_state()
        return validity_of(self._read_chain(state.cert))

    def renew_at(self) -> float:
        """When the policy renews the certificate in use (epoch seconds), or the back-off's next try."""
        state = self._load_state()
        at = self.policy.renew_at(self.validity(), self._rand)
        return max(at, state.next_attempt)

    def context(self, cert: Optional[str] = None, key: Optional[str] = None) -> ssl.SSLContext:
        from . import tls

        state = self._load_state()
        return tls.client_context(cert=cert or state.cert, key=self._load_key(key or state.key), ca=self.ca)

    def connect_device(self, device_factory: Callable[[ssl.SSLContext], Any], timeout: float = 30.0) -> Any:
        """Recover, build the Device with the right context, connect it, attach it and return it. An
        interrupted renewal whose chain was written is tried first and committed once it connects."""
        action = self.recover()
        state = self._load_state()
        if action == "try" and state.pending is not None:
            pending = state.pending
            device = device_factory(self.context(pending.new_cert, pending.new_key or state.key))
            try:
                device.connect(timeout)
            except LightClientError as exc:
                log.warning("the renewed certificate did not connect (%s); rolling back", exc)
                device.close()
                self._rollback(state)
            else:
                self._step(state, "connected")
                self._commit(state)
                self.attach(device)
                return device
        self.credential()
        device = device_factory(self.context())
        device.connect(timeout)
        self.attach(device)
        return device

    async def connect_device_async(self, device_factory: Callable[[ssl.SSLContext], Any], timeout: float = 30.0) -> Any:
        """:meth:`connect_device` for a :class:`lightclient.aio.Device` (the factory makes one): the same
        steps, the token and file work on a worker thread, the connects on this event loop."""
        from . import aio

        return await aio.connect_for_renewer(self, device_factory, timeout)

    def attach(self, device: Any) -> None:
        """Renew through ``device`` and hot-swap it. A :class:`lightclient.aio.Device` is attached from a
        coroutine on its loop; this Renewer's thread then makes its calls there."""
        import sys

        aio = sys.modules.get("lightclient.aio")   # not imported: ``device`` cannot be an aio Device
        self.device = device if aio is None else aio.for_renewer(device)

    # ----------------------------------------------------------------------------- renewal

    def renew(self, route: Optional[str] = None) -> Validity:
        """Renew now over ``route`` (default: each of ``routes`` in turn until one works). Returns the new
        certificate's validity; raises :class:`RenewalError` (the old credential stays in use)."""
        routes = (route,) if route else self.routes
        if not routes:
            raise ConfigError("no renewal route: give dps=DpsRoute(…) or attach a connected Device for the hub")
        errors: List[str] = []
        last: Optional[LightClientError] = None
        for r in routes:
            if r == "hub" and (self.device is None or not self.device.is_connected):
                errors.append("hub: no connected Device")
                continue
            try:
                with self._lock:
                    validity = self._renew_once(r)
            except LightClientError as exc:
                errors.append(f"{r}: {exc}")
                last = exc
                log.warning("renewal over %s failed: %s", r, exc)
                continue
            return validity
        return self._failed("; ".join(errors), last)

    def _failed(self, text: str, cause: Optional[LightClientError]) -> Validity:
        state = self._load_state()
        state.failures += 1
        now = self.clock()
        try:
            remaining = self.validity().remaining(now)
        except LightClientError:
            remaining = 0.0
        retry_after = getattr(cause, "retry_after", None)
        delay = failure_delay(self.backoff, state.failures, retry_after, remaining)
        state.next_attempt = now + delay
        self._save(state)
        status = cause.status if isinstance(cause, ServiceError) else None
        error = RenewalError(f"certificate renewal failed ({text}); the current certificate stays in use, next "
                             f"try in {format_duration(delay)}", status, route=getattr(cause, "route", None),
                             retry_at=state.next_attempt, retry_after=retry_after)
        if self.on_failure is not None:
            try:
                self.on_failure(error)
            except Exception:
                log.exception("on_failure raised")
        raise error

    def _renew_once(self, route: str) -> Validity:
        from . import keys

        state = self._load_state()
        if state.pending is not None:
            self._rollback(state)
        now = self.clock()
        state.pending = Pending(step="csr", route=route, new_cert=self.cert_path + ".new", started=now)
        self._save(state)   # before the key exists: a crash after keygen still knows to delete it
        try:
            if self.rotate_keys:
                self._new_key(state, now)
            key_uri = state.pending.new_key or state.key
            key = self._load_key(key_uri)
            csr = keys.sign_csr(key, [("CN", self.device_id)], digest="sha384" if key.bits >= 384 and
                                key.key_type.upper().startswith("EC") else "sha256")
            self._step(state, "csr")
            chain_pem = self._issue(route, csr, state)
            self._step(state, "issued")
            from . import _native

            if not _native.cert_matches_key(chain_pem, key):
                raise RenewalError("the issued certificate is not for the key the CSR came from", route=route)
            validity = validity_of(chain_pem)
            atomic_write(state.pending.new_cert, chain_pem, self._chain_mode(state.cert))
            self._step(state, "written")
            if self.device is not None:
                from . import tls

                ctx = tls.client_context(cert=state.pending.new_cert, key=key, ca=self.ca)
                self.device.replace_context(ctx, certificate=validity)
            self._step(state, "connected")
            self._commit(state)
            return validity
        except BaseException:
            if state.pending is not None and state.pending.step != "connected":
                self._rollback(state)
            raise

    def _issue(self, route: str, csr_der: bytes, state: RenewalState) -> bytes:
        if route == "hub":
            answer = self.device.request_certificate(csr_der, timeout=self.hub_timeout)
            return "".join(ssl.DER_cert_to_PEM_cert(d) for d in answer.certificates).encode()
        from . import dps, tls

        route_ = self.dps
        assert route_ is not None
        cert = route_.onboarding_cert or state.cert
        key = self._load_key(route_.onboarding_key) if route_.onboarding_key else self._load_key(state.key)
        ctx = tls.https_context(cert=cert, key=key, ca=route_.ca or self.ca)
        try:
            result = dps.provision(route_.id_scope, route_.registration_id, ssl_context=ctx, endpoint=route_.endpoint,
                                   csr=csr_der, timeout=route_.timeout, poll_interval=route_.poll_interval)
        except ServiceError as exc:
            raise RenewalError(f"DPS: {exc}", exc.status, route="dps") from None
        except OperationTimeout as exc:
            raise RenewalError(f"DPS: {exc}", route="dps") from None
        if not result.issued_certificate_chain:
            raise RenewalError("DPS assigned the device but issued no certificate: the enrollment needs a "
                               "credential policy (certificate issuance)", route="dps")
        return result.chain_pem()

    def _new_key(self, state: RenewalState, now: float) -> None:
        from .token import generate_keypair_in_process

        ref = self._key_ref(state.key)
        old_label = ref.attribute("object") or self.device_id
        label = next_key_label(old_label, now)
        key_id = os.urandom(8).hex()
        assert state.pending is not None
        # Recorded before the key is made, so a crash during keygen still rolls it back.
        state.pending.new_key_label, state.pending.new_key_id = label, key_id
        self._save(state)
        # Made through this process's own instance of the module, the one the engine loads keys from:
        # tpm2-pkcs11 reads its objects once, at C_Initialize, so a key made by a child process would stay
        # invisible here ("object not found"). One code path for every token.
        info = generate_keypair_in_process(ref.module_path, ref.attribute("token"), self.pin, label,
                                           self.key_type, bytes.fromhex(key_id))
        state.pending.new_key = info.uri()
        self._save(state)

    def _destroy_key(self, uri: str, label: Optional[str], key_id: Optional[str]) -> None:
        # In a child, on purpose: it deletes the key from the token's store (tpm2-pkcs11: its sqlite
        # database), which is what retiring means. Through this process's module instance it would also
        # leave a gap in the module's object handles: tpm2-pkcs11 1.9 hands a freed handle to the next
        # object it makes (and can hand out a duplicate once the first one is freed), while libp11 0.4.12
        # keeps the objects it found keyed by handle, so it would take the next new key for the deleted
        # one. This process keeps its in-memory view of the deleted key, and never uses it again.
        from .token import run_in_child

        ref = self._key_ref(uri)
        run_in_child("destroy-key", pin=self.pin, env=self.child_env, module_path=ref.module_path,
                     token_label=ref.attribute("token"), key_label=label or ref.attribute("object"),
                     key_id_hex=key_id)

    @staticmethod
    def _chain_mode(path: str) -> int:
        """The renewed chain keeps the permissions of the one it replaces (0600 stays 0600)."""
        try:
            return os.stat(path).st_mode & 0o777
        except OSError:
            return 0o644

    def _sibling_uri(self, key: str, label: str, key_id: Optional[str]) -> str:
        """The pkcs11: URI (no module path, no PIN) of key ``label``/``key_id`` in the token of ``key``."""
        from .token import KeyInfo

        return KeyInfo(label, key_id or "", "", self._key_ref(key).attribute("token") or "").uri()

    def _rollback(self, state: RenewalState) -> None:
        pending = state.pending
        if pending is None:
            return
        try:
            os.unlink(pending.new_cert)
        except FileNotFoundError:
            pass
        if pending.new_key_label and pending.new_key != state.key:
            # Also when the key generation did not return (a crash, or the token refused): a key with this
            # label AND this (random) id can only be the one this renewal asked for.
            uri = pending.new_key or self._sibling_uri(state.key, pending.new_key_label, pending.new_key_id)
            try:
                self._destroy_key(uri, pending.new_key_label, pending.new_key_id)
            except LightClientError as exc:  # the key stays; retried as a retirement later
                log.warning("could not delete the unused new key %r: %s", pending.new_key_label, exc)
                state.retire.append(Retirement(uri, pending.new_key_label, pending.new_key_id, self.clock()))
        state.pending = None
        self._save(state)

    def _commit(self, state: RenewalState) -> None:
        pending = state.pending
        assert pending is not None
        chain = self._read_chain(pending.new_cert)
        onboarding = self.dps.onboarding_key if self.dps is not None else None
        if pending.new_key and pending.new_key != state.key and state.key != onboarding:
            old = self._key_ref(state.key)
            state.retire.append(Retirement(state.key, old.attribute("object") or "",
                                           (old.attribute_bytes("id") or b"").hex() or None,
                                           self.clock() + self.policy.grace))
        if pending.new_key:
            state.key = pending.new_key
        # The state file is the truth: once it says the new key, the certificate file may follow.
        new_cert = pending.new_cert
        state.pending = None
        state.failures = 0
        state.next_attempt = 0.0
        state.renewals += 1
        self._save(state)
        _replace_keeping_owner(state.cert, chain, self._chain_mode(state.cert))
        try:
            os.unlink(new_cert)
        except FileNotFoundError:
            pass
        self._rand = random.random()
        if self.on_step is not None:
            self.on_step("committed")
        log.info("renewed the device certificate (renewal %d)", state.renewals)

    def retire_due(self) -> List[str]:
        """Delete old keys whose grace period is over; return their labels."""
        state = self._load_state()
        now = self.clock()
        done, keep, failed = [], [], False
        for item in state.retire:
            if item.after > now or item.key == state.key:
                keep.append(item)
                continue
            try:
                self._destroy_key(item.key or self._sibling_uri(state.key, item.label, item.key_id), item.label,
                                  item.key_id)
                done.append(item.label)
            except LightClientError as exc:
                item.attempts += 1
                item.after = now + self.backoff.delay(item.attempts - 1)
                log.warning("could not retire the old key %r yet (next try in %s): %s", item.label,
                            format_duration(item.after - now), exc)
                keep.append(item)
                failed = True
        if done or failed:
            state.retire = keep
            self._save(state)
        return done

    # ----------------------------------------------------------------------------- background

    def start(self) -> None:
        """Renew in the background whenever the policy says so (and retire old keys)."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="lightclient-renewal", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                wait = self.renew_at() - self.clock()
                if self.rotate_keys and self._load_state().retire:
                    wait = min(wait, max(0.0, min(r.after for r in self._load_state().retire) - self.clock()))
            except LightClientError as exc:
                log.error("cannot read the certificate to schedule its renewal: %s", exc)
                wait = 60.0
            if wait > 0:
                if self._stop.wait(min(wait, 3600.0)):
                    return
                continue
            try:
                if self.renew_at() <= self.clock():
                    self.renew()
                self.retire_due()
            except LightClientError:
                pass   # reported through on_failure; renew_at() now follows the back-off
            except Exception:
                log.exception("the renewal thread hit an unexpected error; retrying in 60 s")
                self._stop.wait(60.0)


__all__ = ["DEFAULT_KEY_TYPE", "DpsRoute", "Pending", "RenewalPolicy", "RenewalState", "Renewer", "Retirement",
           "STEPS", "Validity", "certificate_validity", "failure_delay", "load_state", "format_duration", "next_key_label", "recovery_action",
           "validity_of"]
