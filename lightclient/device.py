"""Level 3: :class:`Device`, an IoT Hub device or module client that owns a private paho client.

Built only on the public API of level 2 (:mod:`lightclient.paho`) and level 1 (:mod:`lightclient.topics`,
:mod:`lightclient.identity`): everything it does, an application with its own paho client can do too.

Threads (all named ``lightclient-{client id}-…``):

* paho's network thread reads and writes the socket and runs only lightclient's short callbacks; no user
  code ever runs on it, so a slow handler cannot stall keep-alives, acknowledgements or other messages.
* ``events``: one thread, in arrival order: cloud-to-device / input message handlers and
  connection-state callbacks.
* ``twin``: one thread, in ``$version`` order: desired-property callbacks and the twin re-read after
  every (re)connect.
* ``methods``: a pool of ``method_workers`` threads running direct-method handlers.
"""
from __future__ import annotations

import json
import logging
import ssl
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

import paho.mqtt.client as mqtt

from . import paho as glue
from . import topics
from ._twin import DesiredState
from .backoff import Backoff
from .exceptions import ConfigError, ConnectRefusedError, LightClientError, OperationTimeout, ServiceError
from .identity import API_VERSION, Identity
from .topics import C2DMessage, DesiredPatch, InputMessage, MethodRequest, TwinResponse

log = logging.getLogger("lightclient.device")


class _QuietReconnects(logging.Filter):
    # paho logs "Client is not connected" at ERROR on every loop pass between a failed reconnect attempt
    # and the next one; Device already reports each attempt (at INFO), so this only alarms people.
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Client is not connected")


#: paho's own log lines (callback errors, packet traces at DEBUG) for Device connections.
paho_log = logging.getLogger("lightclient.device.paho")
paho_log.addFilter(_QuietReconnects())

#: IoT Hub closes a connection idle for 1.5 x keep-alive, but never later than 1767 s (the Azure load
#: balancer's idle timeout), so a keep-alive above 1767 / 1.5 = 1177 s would be cut off anyway.
MAX_KEEPALIVE = 1177

# paho 2 reports MQTT 3.1.1 CONNACK return codes as MQTT 5 reason codes; map them back.
_CONNACK_RC = {132: 1, 133: 2, 136: 3, 134: 4, 135: 5}
_CONNACK_TEXT = {
    1: "unacceptable protocol version", 2: "client id rejected", 3: "server unavailable",
    4: "bad user name or password", 5: "not authorized",
}
_NOT_AUTHORIZED = (4, 5)
_TOPIC_CACHE_SIZE = 256


@dataclass(frozen=True)
class MethodResponse:
    """Return this from a method handler to choose the status: ``MethodResponse(400, {"error": "…"})``.

    Any other return value is sent with status 200.
    """

    status: int
    payload: Any = None


class _AckBook:
    """PUBACK bookkeeping for :meth:`Device.send` (one per Device).

    A PUBACK can be handled on the network thread before ``publish()`` has returned the mid to the
    sending thread. Such an ack is parked in ``early`` with the send sequence number of that moment, and
    :meth:`register` accepts it only if it is not older than its own send: a parked ack for a reused mid
    (from a twin request or method answer, which are not tracked) is older and is ignored.
    A plain Lock, not Condition.__enter__, guards the hot path: it runs twice per message.
    """

    __slots__ = ("lock", "cond", "waiting", "unacked", "early", "seq", "sending")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.waiting = 0
        self.unacked: Dict[int, SendHandle] = {}
        self.early: Dict[int, int] = {}
        self.seq = 0
        self.sending = 0

    def begin(self) -> int:
        with self.lock:
            self.sending += 1
            self.seq += 1
            return self.seq

    def abort(self) -> None:
        with self.lock:
            self.sending -= 1

    def register(self, mid: int, started: int) -> "SendHandle":
        handle = SendHandle(self, mid)
        with self.lock:
            self.sending -= 1
            acked_at = self.early.pop(mid, None)
            if acked_at is not None and acked_at >= started:
                handle._done = True
            else:
                self.unacked[mid] = handle
            if not self.sending and self.early:
                self.early.clear()  # what is left belongs to publishes that were not send()s
        return handle

    def acked(self, mid: int) -> None:
        with self.lock:
            handle = self.unacked.pop(mid, None)
            if handle is not None:
                handle._done = True
                if handle._event is not None:
                    handle._event.set()
                if self.waiting and not self.unacked:
                    self.cond.notify_all()  # only disconnect()'s flush waits here
            elif self.sending:
                self.early[mid] = self.seq

    def drained(self, timeout: Optional[float]) -> bool:
        """Wait until every send() is acknowledged."""
        predicate = lambda: not self.unacked  # noqa: E731
        with self.cond:
            self.waiting += 1
            try:
                return self.cond.wait_for(predicate, timeout)
            finally:
                self.waiting -= 1


class SendHandle:
    """A telemetry message on its way; :meth:`wait` blocks until the hub acknowledged it (PUBACK)."""

    __slots__ = ("mid", "_done", "_book", "_event")

    def __init__(self, book: _AckBook, mid: int):
        self.mid = mid
        self._done = False
        self._book = book
        # Made only when someone waits: one Event per waited-for message, so an ack wakes only the
        # thread waiting for that message (a shared Condition would wake every waiter on every ack).
        self._event: Optional[threading.Event] = None

    def done(self) -> bool:
        """True once the hub has acknowledged the message."""
        return self._done

    def wait(self, timeout: Optional[float] = None) -> None:
        """Block until acknowledged; raise :class:`OperationTimeout` after ``timeout`` seconds.

        A message not yet acknowledged stays queued: it is resent after a reconnect, so waiting again
        later is fine.
        """
        if self._done:
            return
        with self._book.lock:
            if self._done:
                return
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        if not event.wait(timeout):
            raise OperationTimeout(
                f"message (MQTT id {self.mid}) was not acknowledged within {timeout} s; it stays queued "
                "and is sent again after a reconnect, so wait again or check the connection")

    def __repr__(self) -> str:
        return f"<SendHandle mid={self.mid} {'done' if self._done else 'pending'}>"


class _Pending:
    """A twin request waiting for its ``$iothub/twin/res/{status}/?$rid=…`` answer."""

    __slots__ = ("event", "record", "payload", "error")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.record: Optional[TwinResponse] = None
        self.payload = b""
        self.error: Optional[LightClientError] = None


MethodHandler = Callable[[Any], Any]


class Device:
    """An IoT Hub device (or module) connection with telemetry, direct methods, the twin and C2D.

    ::

        ctx = lightclient.tls.client_context(cert="device.pem", key="pkcs11:token=t;object=k")
        with Device(Identity("hub.azure-devices.net", "dev1"), ctx) as device:
            @device.method("reboot")
            def reboot(payload):
                return {"scheduled": True}          # status 200; MethodResponse(…) picks another
            device.on_desired = lambda patch, version: apply(patch)
            device.send(b'{"t": 21.5}', {"unit": "C"}, content_type="application/json").wait(10)
            device.patch_reported({"fw": "1.2"})

    Telemetry goes to ``devices/{id}/messages/events/{properties}`` with QoS 1; :meth:`send` returns at
    once and up to ``max_inflight`` messages are unacknowledged at a time (paho queues the rest, also
    while the connection is down, and sends them in order once connected).

    Callbacks (attributes; assign any time, or pass to the constructor):

    * ``on_c2d(message: C2DMessage, payload: bytes)`` (devices), ``on_input(message: InputMessage,
      payload: bytes)`` (modules): properties decoded, system properties by wire name.
    * ``on_desired(patch: dict, version: int)``: desired-property changes, never older than what was
      already delivered. After every connect the twin is read again and the changes missed while offline
      arrive as one synthesised patch (on the first connect: the whole desired document). The re-read
      happens only while ``on_desired`` is set.
    * ``on_connection_state(connected: bool, reason: str)``.

    Direct methods: :meth:`method` / :meth:`add_method_handler`. A handler gets the decoded JSON payload
    (None for an empty body) and returns a JSON-serialisable value (status 200) or a
    :class:`MethodResponse`. An exception becomes status 500 ``{"error": "handler raised ValueError"}``
    (the message stays in the local log: it may hold details the cloud should not see); a method with no
    handler gets 404 ``{"error": "no handler for method 'x' on this device"}``; a payload that is not
    JSON gets 400. The hub is never left waiting.

    Reconnect: after a drop the device reconnects by itself with :class:`~lightclient.backoff.Backoff`
    (exponential with jitter; a long pause after CONNACK 4/5 not authorized), subscribes again even with
    a persistent session (a hub fail-over may lose it), and re-reads the twin.

    Thread safety:

    * Every public method may be called from any thread, and from inside any callback or handler (they
      never run on paho's network thread). Exceptions: :meth:`connect` and :meth:`disconnect` must not
      race each other, and a handler that calls :meth:`disconnect` does not wait for itself to finish.
    * :meth:`send`, :meth:`get_twin` and :meth:`patch_reported` are safe to call concurrently from many
      threads; blocking calls block only their caller.
    * Message and connection-state callbacks run one at a time in arrival order; desired-property
      callbacks one at a time in version order; method handlers concurrently (``method_workers``), so a
      handler shared between method names must be thread-safe itself.
    """

    def __init__(self, identity: Identity, ssl_context: ssl.SSLContext, *, host: Optional[str] = None,
                 port: int = 8883, keepalive: int = 60, max_inflight: int = 20, clean_session: bool = False,
                 backoff: Optional[Backoff] = None, method_workers: int = 4, twin_timeout: float = 60.0,
                 api_version: str = API_VERSION, client_type: Optional[str] = None,
                 on_c2d: Optional[Callable[[C2DMessage, bytes], None]] = None,
                 on_input: Optional[Callable[[InputMessage, bytes], None]] = None,
                 on_desired: Optional[Callable[[Dict[str, Any], int], None]] = None,
                 on_connection_state: Optional[Callable[[bool, str], None]] = None):
        if not isinstance(identity, Identity):
            raise ConfigError(f"identity must be a lightclient Identity, not {type(identity).__name__}")
        if not isinstance(ssl_context, ssl.SSLContext):
            raise ConfigError("ssl_context must be an ssl.SSLContext with the device key, e.g. from "
                              f"lightclient.tls.client_context(), not {type(ssl_context).__name__}")
        _check_int("keepalive", keepalive, 1, MAX_KEEPALIVE,
                   f"IoT Hub drops a connection idle for more than 1767 s (1.5 x keep-alive), so at most "
                   f"{MAX_KEEPALIVE} s works; 60 is the default")
        _check_int("port", port, 1, 65535, "IoT Hub listens on 8883 (MQTT over TLS)")
        _check_int("max_inflight", max_inflight, 1, 65535, "paho needs at least one message in flight")
        _check_int("method_workers", method_workers, 1, 1024, "give the number of concurrent method handlers")
        if isinstance(twin_timeout, bool) or not isinstance(twin_timeout, (int, float)) or twin_timeout <= 0:
            raise ConfigError(f"twin_timeout must be a positive number of seconds, not {twin_timeout!r}")
        if backoff is not None and not isinstance(backoff, Backoff):
            raise ConfigError(f"backoff must be a lightclient.backoff.Backoff, not {type(backoff).__name__}")
        self.identity = identity
        self.host = identity.hostname if host is None else host
        self.port = port
        self.keepalive = keepalive
        self.on_c2d = on_c2d
        self.on_input = on_input
        self.on_desired = on_desired
        self.on_connection_state = on_connection_state
        self._backoff = backoff or Backoff()
        self._twin_timeout = float(twin_timeout)
        self._method_workers = method_workers
        self._methods: Dict[str, MethodHandler] = {}
        self._threads = f"lightclient-{identity.client_id}"

        client = glue.new_client(identity, ssl_context=ssl_context, clean_session=clean_session,
                                 api_version=api_version, client_type=client_type)
        client.max_inflight_messages_set(max_inflight)
        # A bug in a lightclient callback must not kill the network thread: log it and carry on.
        client.suppress_exceptions = True
        client.enable_logger(paho_log)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = self._on_connect_fail
        client.on_publish = self._on_publish
        glue.route(client, identity,
                   on_c2d=None if identity.is_module else self._got_message,
                   on_input=self._got_message if identity.is_module else None,
                   on_method=self._got_method, on_twin_response=self._got_twin_response,
                   on_desired=self._got_desired)
        self._client = client
        self._subscriptions = glue.subscriptions(identity)

        self._lock = threading.Lock()             # connection lifecycle and pending twin requests
        self._running = False
        self._stopping = threading.Event()
        self._connected = threading.Event()
        self._outcome = threading.Event()         # first connect: CONNACK+SUBACK, or a refusal
        self._first_error: Optional[LightClientError] = None
        self._sub_mid: Optional[int] = None
        self._attempt = 0                          # reconnect failures in a row
        self._refused: Optional[int] = None        # return code of the last refused CONNACK
        self._pending: Dict[str, _Pending] = {}
        self._desired_state = DesiredState()
        self._events: Optional[ThreadPoolExecutor] = None
        self._twin_worker: Optional[ThreadPoolExecutor] = None
        self._method_pool: Optional[ThreadPoolExecutor] = None

        self._acks = _AckBook()
        self._topics: Dict[Any, Tuple[str, int]] = {}

    # ---------------------------------------------------------------------------------- lifecycle

    def __enter__(self) -> "Device":
        self.connect()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.disconnect()

    def __repr__(self) -> str:
        state = "connected" if self.is_connected else ("connecting" if self._running else "disconnected")
        return f"<Device {self.identity.client_id!r} on {self.host}:{self.port} {state}>"

    @property
    def is_connected(self) -> bool:
        """True while the hub has accepted the connection and the subscriptions."""
        return self._connected.is_set()

    def connect(self, timeout: float = 30.0) -> None:
        """Connect, subscribe, and from then on stay connected (reconnecting by itself) until :meth:`disconnect`.

        Returns once the hub accepted the connection and the subscriptions. Transient failures (network,
        TLS, CONNACK 3) are retried with back-off until ``timeout``, then :class:`OperationTimeout` says
        what went wrong last. A CONNACK refusal raises :class:`ConnectRefusedError` at once; a server
        certificate that fails verification raises :class:`ConfigError`. Does nothing if already started.
        """
        with self._lock:
            if self._running:
                return
            self._running = True
            self._stopping.clear()
            self._outcome.clear()
            self._first_error = None
            self._attempt = 0
            self._refused = None
            self._start_workers()
        deadline = time.monotonic() + timeout
        try:
            self._first_connect(deadline, timeout)
            self._client.loop_start()
            if not self._outcome.wait(max(0.0, deadline - time.monotonic())):
                refused = self._refused
                why = (f"the last CONNACK was {refused} ({_CONNACK_TEXT.get(refused, '?')})" if refused
                       else "check that it is an IoT Hub (or MQTT broker) endpoint")
                raise OperationTimeout(
                    f"{self.host}:{self.port} accepted the TLS connection but MQTT CONNECT and SUBSCRIBE did "
                    f"not complete within {timeout} s; {why}")
            if self._first_error is not None:
                raise self._first_error
        except BaseException:
            self._teardown()
            raise

    def _first_connect(self, deadline: float, timeout: float) -> None:
        # The first TCP+TLS+CONNECT is made here rather than on paho's thread, because only here the
        # OSError saying *why* (refused, unreachable, handshake alert) is available to report.
        attempt = 0
        while True:
            try:
                self._client.connect(self.host, self.port, self.keepalive)
                return
            except ssl.SSLCertVerificationError as exc:
                raise ConfigError(
                    f"the server certificate of {self.host}:{self.port} failed verification "
                    f"({exc.verify_message}); check host= and the trusted CA given to tls.client_context(ca=…)"
                ) from exc
            except OSError as exc:
                delay = self._backoff.delay(attempt)
                attempt += 1
                if time.monotonic() + delay >= deadline:
                    raise OperationTimeout(
                        f"could not connect to {self.host}:{self.port} within {timeout} s "
                        f"({attempt} attempts); last error: {exc}") from exc
                log.info("connecting to %s:%d failed (%s); retrying in %.1f s", self.host, self.port, exc, delay)
                if self._stopping.wait(delay):
                    raise OperationTimeout("connect() was interrupted by disconnect()") from exc

    def disconnect(self, timeout: float = 5.0) -> None:
        """Wait up to ``timeout`` s for unacknowledged telemetry, then disconnect and stop all threads.

        Messages still unacknowledged stay queued in memory and are sent after the next :meth:`connect`.
        Pending twin requests fail with :class:`OperationTimeout`. Does nothing if not connected.
        """
        with self._lock:
            if not self._running:
                return
        if self._connected.is_set() and timeout > 0:
            self._acks.drained(timeout)
        self._teardown()

    def _teardown(self) -> None:
        self._stopping.set()
        self._client.disconnect()
        self._client.loop_stop()
        self._connected.clear()
        with self._lock:
            pending, self._pending = self._pending, {}
            self._running = False
            workers = (self._events, self._twin_worker, self._method_pool)
            self._events = self._twin_worker = self._method_pool = None
        for request in pending.values():
            request.error = OperationTimeout("the device was disconnected before the hub answered")
            request.event.set()
        # A handler calling disconnect() runs on one of these threads and cannot wait for itself.
        inside = threading.current_thread().name.startswith(self._threads)
        for worker in workers:
            if worker is not None:
                worker.shutdown(wait=not inside)

    def _start_workers(self) -> None:
        self._events = ThreadPoolExecutor(1, thread_name_prefix=f"{self._threads}-events")
        self._twin_worker = ThreadPoolExecutor(1, thread_name_prefix=f"{self._threads}-twin")
        self._method_pool = ThreadPoolExecutor(self._method_workers, thread_name_prefix=f"{self._threads}-methods")

    def _submit(self, worker: Optional[ThreadPoolExecutor], fn: Callable[..., None], *args: Any) -> None:
        if worker is None:
            return
        try:
            worker.submit(fn, *args)
        except RuntimeError:  # shut down by a concurrent disconnect(): nobody is listening any more
            pass

    # ------------------------------------------------------------------- paho callbacks (network thread)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            code = _CONNACK_RC.get(reason.value, reason.value)
            self._refused = code
            text = _CONNACK_TEXT.get(code, str(reason))
            log.warning("%s:%d refused the connection: CONNACK %s (%s)", self.host, self.port, code, text)
            if not self._outcome.is_set() and code not in ConnectRefusedError.RETRYABLE_CODES:
                hint = ("check that the device is registered and enabled in the hub, and that its certificate "
                        "(CN = device id) or CA is registered" if code in _NOT_AUTHORIZED
                        else "check the identity and api_version")
                self._first_error = ConnectRefusedError(
                    f"{self.host} refused {self.identity.client_id!r}: CONNACK {code} ({text}); {hint}", code)
                self._outcome.set()
            return
        self._refused = None
        self._attempt = 0
        # Subscribe on every connect, even when the hub says the session is present: after a hub
        # fail-over a "present" session can still lack subscriptions, and subscribing twice is harmless.
        _, self._sub_mid = client.subscribe(self._subscriptions)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        if mid != self._sub_mid:
            return
        refused = [sub for (sub, _), rc in zip(self._subscriptions, reason_codes) if rc.is_failure]
        if refused:
            log.error("the hub refused the subscriptions %s; those messages will not arrive", refused)
        self._connected.set()
        self._outcome.set()
        log.info("connected to %s:%d as %s", self.host, self.port, self.identity.client_id)
        self._submit(self._events, self._notify_state, True, "connected")
        if self.on_desired is not None:
            self._submit(self._twin_worker, self._resync_twin)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        if self._stopping.is_set():
            return
        delay = self._next_delay()
        log.warning("connection to %s:%d lost (%s); reconnecting in %.1f s", self.host, self.port, reason, delay)
        if was_connected:
            self._submit(self._events, self._notify_state, False, str(reason))

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        if not self._stopping.is_set():
            delay = self._next_delay()
            log.info("reconnecting to %s:%d failed; next attempt in %.1f s", self.host, self.port, delay)

    def _next_delay(self) -> float:
        # paho waits reconnect_delay_set()'s min_delay before its next attempt; setting min = max to our
        # own delay each time replaces its jitter-less doubling with Backoff.
        delay = self._backoff.delay(self._attempt, not_authorized=self._refused in _NOT_AUTHORIZED)
        self._attempt += 1
        self._client.reconnect_delay_set(delay, delay)  # type: ignore[arg-type]  # paho accepts floats
        return delay

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        self._acks.acked(mid)

    def _got_message(self, record: Any, payload: bytes) -> None:
        self._submit(self._events, self._deliver_message, record, payload)

    def _got_method(self, request: MethodRequest, payload: bytes) -> None:
        self._submit(self._method_pool, self._run_method, request, payload)

    def _got_desired(self, patch: DesiredPatch, payload: bytes) -> None:
        if self.on_desired is not None:
            self._submit(self._twin_worker, self._apply_desired, patch.version, payload)

    def _got_twin_response(self, response: TwinResponse, payload: bytes) -> None:
        with self._lock:
            pending = self._pending.pop(response.rid, None)
        if pending is None:
            log.debug("twin response for unknown $rid=%s (late, or not ours)", response.rid)
            return
        pending.record, pending.payload = response, payload
        pending.event.set()

    # ------------------------------------------------------------------------- workers (user code)

    def _call_user(self, what: str, fn: Optional[Callable[..., Any]], *args: Any) -> None:
        if fn is None:
            return
        try:
            fn(*args)
        except Exception:
            log.exception("the %s callback raised; carrying on", what)

    def _notify_state(self, connected: bool, reason: str) -> None:
        self._call_user("on_connection_state", self.on_connection_state, connected, reason)

    def _deliver_message(self, record: Any, payload: bytes) -> None:
        if isinstance(record, C2DMessage):
            self._call_user("on_c2d", self.on_c2d, record, payload)
        else:
            self._call_user("on_input", self.on_input, record, payload)

    def _run_method(self, request: MethodRequest, payload: bytes) -> None:
        status, body = self._method_result(request, payload)
        try:
            encoded = glue.json_body(body)
        except ConfigError:
            log.error("method %r returned a value that is not JSON-serialisable; answering 500", request.name)
            status, encoded = 500, glue.json_body({"error": "the method result is not JSON-serialisable"})
        glue.answer_method(self._client, request, status, encoded)

    def _method_result(self, request: MethodRequest, payload: bytes) -> Tuple[int, Any]:
        handler = self._methods.get(request.name)
        if handler is None:
            return 404, {"error": f"no handler for method {request.name!r} on this device"}
        try:
            argument = json.loads(payload) if payload.strip() else None
        except ValueError:
            return 400, {"error": "the method payload is not valid JSON"}
        try:
            result = handler(argument)
        except Exception as exc:
            log.exception("the handler of method %r raised", request.name)
            return 500, {"error": f"handler raised {type(exc).__name__}"}
        if isinstance(result, MethodResponse):
            return result.status, result.payload
        return 200, result

    def _apply_desired(self, version: int, payload: bytes) -> None:
        try:
            patch = json.loads(payload)
        except ValueError:
            log.warning("dropped desired patch $version=%d: the body is not JSON", version)
            return
        if not isinstance(patch, dict):
            log.warning("dropped desired patch $version=%d: the body is not a JSON object", version)
            return
        if not self._desired_state.apply(patch, version):
            log.debug("dropped desired patch $version=%d: already at %s", version, self._desired_state.version)
            return
        self._call_user("on_desired", self.on_desired, patch, version)

    def _resync_twin(self) -> None:
        # Runs on the twin thread, so desired patches that arrive meanwhile queue up behind it and are
        # then dropped if the twin read already covered their version.
        attempt = 0
        while self._connected.is_set() and not self._stopping.is_set():
            try:
                twin = self.get_twin(self._twin_timeout)
                break
            except (OperationTimeout, ServiceError) as exc:
                if isinstance(exc, ServiceError) and not exc.retryable:
                    log.error("re-reading the twin after connecting failed: %s", exc)
                    return
                delay = self._backoff.delay(attempt)
                attempt += 1
                log.warning("re-reading the twin after connecting failed (%s); retrying in %.1f s", exc, delay)
                if self._stopping.wait(delay):
                    return
        else:
            return
        desired = twin.get("desired") if isinstance(twin, dict) else None
        if not isinstance(desired, dict):
            log.warning("the twin has no desired section; nothing to reconcile")
            return
        missed = self._desired_state.reconcile(desired)
        if missed is not None:
            self._call_user("on_desired", self.on_desired, *missed)

    # ----------------------------------------------------------------------------------- telemetry

    def send(self, payload: Any, properties: Optional[topics.Properties] = None, **system_properties: Any) -> SendHandle:
        """Queue one telemetry message (QoS 1) and return at once with a :class:`SendHandle`.

        ``payload`` is bytes or str (sent as UTF-8); ``properties`` application properties (str values);
        keyword arguments are system properties: ``message_id``, ``correlation_id``, ``user_id``,
        ``content_type``, ``content_encoding``, ``absolute_expiry``, ``creation_time``, ``component``
        (IoT Plug and Play, ``$.sub``) and, for modules, ``output_name``. Wire format::

            devices/{id}/messages/events/%24.mid=m1&%24.ct=application%2Fjson&unit=C

        Raises :class:`ConfigError` for bad properties and :class:`MessageTooLargeError` above 256 KB.
        """
        if isinstance(payload, (bytearray, memoryview)):
            payload = bytes(payload)
        topic, overhead = self._topic(properties, system_properties)
        if not isinstance(payload, bytes) or len(payload) + overhead > topics.MAX_MESSAGE_SIZE:
            # Slow path: str bodies, wrong types and oversized messages get topics' own checks and messages.
            topics.check_message_size(payload, properties, topics.system_properties(**system_properties))
        started = self._acks.begin()
        try:
            info = self._client.publish(topic, payload, qos=1)
        except BaseException:
            self._acks.abort()
            raise
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:  # only with a bounded queue, which Device never sets
            self._acks.abort()
            raise LightClientError("paho's outgoing queue is full; wait for earlier messages")
        handle = self._acks.register(info.mid, started)
        return handle

    def _topic(self, properties: Optional[topics.Properties], system_properties: Dict[str, Any]) -> Tuple[str, int]:
        """The telemetry topic and the size its properties count against the 256 KB limit, cached.

        Most applications send the same few property sets over and over; building and validating the
        topic costs more than paho's whole publish(), and the sending thread shares the GIL with the
        network thread, so the cache is what keeps Device.send within 10 % of a raw paho publish.
        """
        try:
            key: Any = (tuple(properties.items()) if isinstance(properties, dict) else
                        None if properties is None else tuple(properties), tuple(system_properties.items()))
            cached = self._topics.get(key)
        except TypeError:  # unhashable values (lists as pairs, bad types): no caching, full checks below
            key, cached = None, None
        if cached is not None:
            return cached
        try:
            topic = topics.telemetry_topic(self.identity, properties, **system_properties)
            system = topics.system_properties(**system_properties)
        except TypeError as exc:
            raise ConfigError(f"{exc}; system properties are message_id, correlation_id, user_id, content_type, "
                              "content_encoding, absolute_expiry, creation_time, component, output_name") from None
        result = (topic, topics.message_size(None, properties, system))
        if key is not None:
            if len(self._topics) >= _TOPIC_CACHE_SIZE:
                self._topics.clear()  # unique message ids defeat any cache; keep memory bounded instead
            self._topics[key] = result
        return result

    def send_and_wait(self, payload: Any, properties: Optional[topics.Properties] = None, *,
                      timeout: Optional[float] = 30.0, **system_properties: Any) -> None:
        """:meth:`send`, then wait for the acknowledgement (:class:`OperationTimeout` after ``timeout`` s)."""
        self.send(payload, properties, **system_properties).wait(timeout)

    # ---------------------------------------------------------------------------------- methods

    def add_method_handler(self, name: str, handler: MethodHandler) -> None:
        """Answer direct method ``name`` with ``handler(payload)``; see the class docstring for statuses.

        IoT Plug and Play component commands arrive as ``"{component}*{command}"``.
        """
        if not isinstance(name, str) or not name:
            raise ConfigError(f"a method name must be a non-empty str, not {name!r}")
        if not callable(handler):
            raise ConfigError(f"the handler for method {name!r} must be callable, not {type(handler).__name__}")
        self._methods[name] = handler

    def remove_method_handler(self, name: str) -> None:
        """Stop handling ``name``; later calls get 404."""
        self._methods.pop(name, None)

    def method(self, name: str) -> Callable[[MethodHandler], MethodHandler]:
        """Decorator form of :meth:`add_method_handler`: ``@device.method("reboot")``."""
        def register(handler: MethodHandler) -> MethodHandler:
            self.add_method_handler(name, handler)
            return handler
        return register

    # ------------------------------------------------------------------------------------- twin

    def get_twin(self, timeout: Optional[float] = None) -> Dict[str, Any]:
        """The whole twin: ``{"desired": {…, "$version": n}, "reported": {…, "$version": m}}``.

        Publishes ``$iothub/twin/GET/?$rid={rid}`` and waits for ``$iothub/twin/res/200/?$rid={rid}``.
        Raises :class:`ServiceError` for an error status (``retryable`` for 429 and 5xx) and
        :class:`OperationTimeout` after ``timeout`` s (default ``twin_timeout``).
        """
        _, payload = self._twin_request("GET", lambda rid: glue.request_twin(self._client, rid=rid), timeout)
        try:
            twin = json.loads(payload)
        except ValueError:
            raise ServiceError("the hub answered the twin GET with a body that is not JSON", 200) from None
        if not isinstance(twin, dict):
            raise ServiceError("the hub answered the twin GET with JSON that is not an object", 200)
        return twin

    def patch_reported(self, patch: Dict[str, Any], timeout: Optional[float] = None) -> Optional[int]:
        """Update reported properties (``None`` deletes a key); return the new reported ``$version``.

        Publishes the JSON patch on ``$iothub/twin/PATCH/properties/reported/?$rid={rid}`` and waits for
        ``$iothub/twin/res/204/?$rid={rid}&$version={v}``. Errors as for :meth:`get_twin`.
        """
        if not isinstance(patch, dict):
            raise ConfigError(f"a reported patch is a dict (a JSON object), not {type(patch).__name__}")
        body = glue.json_body(patch)  # fail here, not on the network thread, if it is not JSON
        record, _ = self._twin_request(
            "reported PATCH", lambda rid: glue.patch_reported(self._client, body, rid=rid), timeout)
        return record.version

    def _twin_request(self, what: str, publish: Callable[[str], Any],
                      timeout: Optional[float]) -> Tuple[TwinResponse, bytes]:
        timeout = self._twin_timeout if timeout is None else timeout
        rid = glue.new_rid()
        pending = _Pending()
        with self._lock:
            self._pending[rid] = pending  # before publishing: the answer can beat publish()'s return
        try:
            publish(rid)
        except BaseException:
            with self._lock:
                self._pending.pop(rid, None)
            raise
        if not pending.event.wait(timeout):
            with self._lock:
                self._pending.pop(rid, None)
            state = "" if self._connected.is_set() else " (the device is not connected)"
            raise OperationTimeout(f"no answer to the twin {what} ($rid={rid}) within {timeout} s{state}")
        if pending.error is not None:
            raise pending.error
        record = pending.record
        assert record is not None
        if record.status >= 300:
            detail = pending.payload[:200].decode("utf-8", "replace").strip()
            advice = "; retry later" if record.status == 429 or record.status >= 500 else ""
            raise ServiceError(
                f"the hub answered the twin {what} with status {record.status}"
                f"{': ' + detail if detail else ''}{advice}", record.status)
        return record, pending.payload


def _check_int(name: str, value: Any, low: int, high: int, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{name} must be an int from {low} to {high}, not {value!r}: {hint}")


__all__ = ["ConnectRefusedError", "Device", "MAX_KEEPALIVE", "MethodResponse", "SendHandle"]
