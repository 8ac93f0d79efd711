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

import functools
import json
import logging
import os
import ssl
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import paho.mqtt.client as mqtt

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

from . import _transport
from . import paho as lcpaho
from . import _fastpath, _sas_session, topics
from ._pipeline import MessageMaker, Pipeline, SendHandle, queue_settings, wait_all
from ._twin import DesiredState, TwinRequests
from ._verify import permanent_tls_error
from .backoff import Backoff
from .exceptions import (ConfigError, ConnectRefusedError, LightClientError, MessageDroppedError, OperationTimeout,
                         ProxyError, QueueFullError, ServerCertificateError, ServiceError, TlsVersionError)
from .identity import API_VERSION, Identity
from .outbox import Outbox
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


@dataclass(frozen=True)
class MethodResponse:
    """Return this from a method handler to choose the status: ``MethodResponse(400, {"error": "…"})``.

    Any other return value is sent with status 200.
    """

    status: int
    payload: Any = None


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
    once and up to ``max_inflight`` messages are unacknowledged on the wire at a time. Delivery is
    at-least-once: a message counts as delivered only on the hub's PUBACK; until then it is kept (in
    memory, or in the durable ``outbox``) and resent after a reconnect, so the hub may see it twice. Every
    message carries a ``$.mid`` (a unique one unless you pass ``message_id=``) so duplicates can be dropped
    downstream. Accepted, unacknowledged messages are bounded by ``max_queue`` messages and
    ``max_queue_bytes`` bytes (topic + body); when full, ``full_policy="reject_new"`` makes :meth:`send`
    raise :class:`QueueFullError`, ``"drop_oldest"`` drops the oldest message not yet on the wire and its
    handle's :meth:`SendHandle.wait` raises :class:`MessageDroppedError`. ``outbox="file.db"`` (or an
    :class:`~lightclient.outbox.Outbox`) makes :meth:`send` commit each message to SQLite before it returns;
    messages left there by an earlier run are sent first, in order (see :mod:`lightclient.outbox`).

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

    Connecting from anywhere: ``transport="websockets"`` speaks MQTT over WebSockets on ``websocket_port``
    (443, ``wss://{host}/$iothub/websocket``) with the same key; ``transport="auto"`` tries ``port`` (8883)
    and falls back to WebSockets when 8883 is refused, reset or times out, logs which it uses, and
    remembers it (in memory, and in the file ``transport_cache`` if given) so the next start goes straight
    there. ``proxy="http://[user:pass@]host:port"`` (HTTP CONNECT) or ``"socks5://…"`` tunnels every
    connection; a proxy failure raises :class:`~lightclient.exceptions.ProxyError` naming the proxy (never
    its credentials). ``gateway_hostname="edge.local"`` connects to an IoT Edge gateway instead of the hub:
    the username and identity stay the hub's, TLS checks the gateway's name, and the gateway's CA must be
    in ``ssl_context`` (``ca=`` of :func:`lightclient.tls.client_context`).

    Reconnect: after a drop the device reconnects by itself with :class:`~lightclient.backoff.Backoff`
    (exponential with jitter; a long pause after CONNACK 4/5 not authorized), subscribes again even with
    a persistent session (a hub fail-over may lose it), and re-reads the twin. A connection that goes
    silent (black-holed) is noticed by keep-alive within about 2 x ``keepalive`` s and reconnected.
    Telemetry not yet acknowledged is resent (paho resends what was on the wire, the queue follows in
    order); twin requests waiting for an answer are sent again at once.

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
                 max_queue: Optional[int] = None, max_queue_bytes: Optional[int] = None,
                 full_policy: Optional[str] = None, outbox: Union[None, str, "os.PathLike[str]", Outbox] = None,
                 on_c2d: Optional[Callable[[C2DMessage, bytes], None]] = None,
                 on_input: Optional[Callable[[InputMessage, bytes], None]] = None,
                 on_desired: Optional[Callable[[Dict[str, Any], int], None]] = None,
                 on_connection_state: Optional[Callable[[bool, str], None]] = None,
                 transport: str = "tcp", websocket_port: int = _transport.WEBSOCKET_PORT, proxy: Any = None,
                 gateway_hostname: Optional[str] = None,
                 transport_cache: Union[None, str, "os.PathLike[str]"] = None, sas: Any = None):
        if not isinstance(identity, Identity):
            raise ConfigError(f"identity must be a lightclient Identity, not {type(identity).__name__}")
        if not isinstance(ssl_context, ssl.SSLContext):
            raise ConfigError("ssl_context must be an ssl.SSLContext with the device key, e.g. from "
                              f"lightclient.tls.client_context(), not {type(ssl_context).__name__}")
        _sas_session.check(sas)
        #: SAS authentication (a lightclient.symkey.SasCredential): the password of every CONNECT, renewed
        #: by reconnecting after 80 % of the token's lifetime (see lightclient._sas_session).
        self._sas = sas
        self._sas_renewal: Optional[_sas_session.Renewal] = None
        self._username = identity.username(api_version, client_type)
        _check_int("keepalive", keepalive, 1, MAX_KEEPALIVE,
                   f"IoT Hub drops a connection idle for more than 1767 s (1.5 x keep-alive), so at most "
                   f"{MAX_KEEPALIVE} s works; 60 is the default")
        _check_int("port", port, 1, 65535, "IoT Hub listens on 8883 (MQTT over TLS)")
        _check_int("websocket_port", websocket_port, 1, 65535, "IoT Hub serves MQTT over WebSockets on 443")
        transport = _transport.check_transport(transport)
        checked_proxy = _transport.check_proxy(proxy)
        if gateway_hostname is not None:
            if not isinstance(gateway_hostname, str) or not gateway_hostname.strip():
                raise ConfigError(f"gateway_hostname must be the gateway's host name, not {gateway_hostname!r}")
            if host is not None:
                raise ConfigError("give host= or gateway_hostname=, not both: both name the server to connect to")
            host = gateway_hostname.strip()
        memory = _transport.TransportMemory(transport_cache)
        _check_int("max_inflight", max_inflight, 1, 65535, "paho needs at least one message in flight")
        _check_int("method_workers", method_workers, 1, 1024, "give the number of concurrent method handlers")
        if isinstance(twin_timeout, bool) or not isinstance(twin_timeout, (int, float)) or twin_timeout <= 0:
            raise ConfigError(f"twin_timeout must be a positive number of seconds, not {twin_timeout!r}")
        if backoff is not None and not isinstance(backoff, Backoff):
            raise ConfigError(f"backoff must be a lightclient.backoff.Backoff, not {type(backoff).__name__}")
        outbox, self._own_outbox, max_queue, max_queue_bytes, full_policy = queue_settings(
            outbox, max_queue, max_queue_bytes, full_policy)
        self.outbox: Optional[Outbox] = outbox
        self.identity = identity
        self.host = identity.hostname if host is None else host
        #: The port of the current (or last) connection; ``port`` and ``websocket_port`` are the choices.
        self.port = websocket_port if transport == _transport.WEBSOCKETS else port
        self.transport = transport
        self.proxy = checked_proxy
        self.websocket_port = websocket_port
        self._tcp_port = port
        self._memory = memory
        self._transport_used: Optional[str] = None
        self.keepalive = keepalive
        self.on_c2d = on_c2d
        self.on_input = on_input
        self.on_desired = on_desired
        self.on_connection_state = on_connection_state
        #: ``on_certificate_renewed(certificate)``: after :meth:`replace_context` connected with a renewed
        #: certificate (``certificate`` is what the renewer passed, e.g. a lightclient.renewal.Validity).
        self.on_certificate_renewed: Optional[Callable[[Any], None]] = None
        self._credentials: Any = None              # lightclient._credentials.CredentialsChannel, on first use
        self._backoff = backoff or Backoff()
        self._twin_timeout = float(twin_timeout)
        self._method_workers = method_workers
        self._methods: Dict[str, MethodHandler] = {}
        self._threads = f"lightclient-{identity.client_id}"

        client = lcpaho.new_client(identity, ssl_context=ssl_context, clean_session=clean_session,
                                 api_version=api_version, client_type=client_type,
                                 transport=transport, proxy=checked_proxy)
        if checked_proxy is None:
            _transport.install_socket_factory(client, None)  # paho must not pick a proxy from the environment
        client.max_inflight_messages_set(max_inflight)
        # A bug in a lightclient callback must not kill the network thread: log it and carry on.
        client.suppress_exceptions = True
        client.enable_logger(paho_log)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_disconnect = self._on_disconnect
        client.on_connect_fail = self._on_connect_fail
        client.on_pre_connect = self._on_pre_connect
        client.on_publish = self._on_publish
        self._fast_acks = _fastpath.install(client)  # cheaper PUBACKs where this paho allows it
        lcpaho.route(client, identity,
                   on_c2d=None if identity.is_module else self._got_message,
                   on_input=self._got_message if identity.is_module else None,
                   on_method=self._got_method, on_twin_response=self._got_twin_response,
                   on_desired=self._got_desired)
        self._client = client
        self._ssl_context = ssl_context
        self._subscriptions = lcpaho.subscriptions(identity)

        self._lock = threading.Lock()             # connection lifecycle
        self._running = False
        self._stopping = threading.Event()
        self._connected = threading.Event()
        self._outcome = threading.Event()         # first connect: CONNACK+SUBACK, or a refusal
        self._first_error: Optional[LightClientError] = None
        self._sub_mid: Optional[int] = None
        self._attempt = 0                          # reconnect failures in a row
        self._attempt_failed = False               # this connection (attempt) already counted as a failure
        self._refused: Optional[int] = None        # return code of the last refused CONNACK
        self._twin_requests = TwinRequests(self._backoff, self._connected, self._stopping)
        self._desired_state = DesiredState()
        self._events: Optional["ThreadPoolExecutor"] = None
        self._twin_worker: Optional["ThreadPoolExecutor"] = None
        self._method_pool: Optional["ThreadPoolExecutor"] = None
        self._methods_idle = threading.Condition()
        self._methods_active = 0

        self._acks = Pipeline(client, max_inflight, max_queue, max_queue_bytes, full_policy, outbox)
        self._maker = MessageMaker(identity, self._acks)
        #: Handles of the messages an earlier run left in the outbox (sent first, in order, once connected).
        try:
            self.recovered: List[SendHandle] = self._acks.load(outbox.pending()) if outbox is not None else []
        except BaseException:
            if self._own_outbox and outbox is not None:
                outbox.close()
            raise

    # ---------------------------------------------------------------------------------- lifecycle

    def __enter__(self) -> "Device":
        self.connect()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.disconnect()

    def __repr__(self) -> str:
        state = "connected" if self.is_connected else ("connecting" if self._running else "disconnected")
        via = f" via {self.proxy.scheme}://{self.proxy.address}" if self.proxy is not None else ""
        return f"<Device {self.identity.client_id!r} on {self.host}:{self.port} {self.transport}{via} {state}>"

    @property
    def queued(self) -> int:
        """Telemetry messages accepted by :meth:`send` (or recovered from the outbox) and not yet acknowledged."""
        with self._acks.lock:
            return self._acks.count

    def close(self, timeout: float = 5.0) -> None:
        """:meth:`disconnect`, then close the outbox if the Device opened it from a path.

        Unacknowledged messages stay in the outbox file for the next run.
        """
        self.disconnect(timeout)
        if self._own_outbox and self.outbox is not None:
            self.outbox.close()

    @property
    def is_connected(self) -> bool:
        """True while the hub has accepted the connection and the subscriptions."""
        return self._connected.is_set()

    def connect(self, timeout: float = 30.0) -> None:
        """Connect, subscribe, and from then on stay connected (reconnecting by itself) until :meth:`disconnect`.

        Returns once the hub accepted the connection and the subscriptions. Transient failures (network,
        TLS, CONNACK 3) are retried with back-off until ``timeout``, then :class:`OperationTimeout` says
        what went wrong last. A CONNACK refusal raises :class:`ConnectRefusedError` at once; a server
        certificate that fails verification raises :class:`ServerCertificateError` (a :class:`ConfigError`
        whose ``reason`` is ``untrusted``, ``expired``, ``not_yet_valid``, ``hostname``, ``revoked`` or ``other``),
        a server that offers no TLS version from 1.2 up :class:`~lightclient.exceptions.TlsVersionError`, both at
        once. After the first connect every failure is retried (and logged with its reason). Does nothing if
        already started.
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
            if self._sas is not None and self._sas_renewal is None:
                self._sas_renewal = _sas_session.Renewal(self._sas, self._renew_sas,
                                                         f"lightclient-sas-{self.identity.client_id}")
                self._sas_renewal.start()
        except BaseException:
            self._teardown()
            raise

    def _first_connect(self, deadline: float, timeout: float) -> None:
        # The first TCP+TLS+CONNECT is made here rather than on paho's thread, because only here the
        # OSError saying *why* (refused, unreachable, handshake alert) is available to report.
        attempt = 0
        while True:
            try:
                used = lcpaho.connect(self._client, self.host, transport=self.transport, port=self._tcp_port,
                                      websocket_port=self.websocket_port, keepalive=self.keepalive,
                                      memory=self._memory)
                self._transport_used = used
                self.port = self.websocket_port if used == _transport.WEBSOCKETS else self._tcp_port
                return
            except OSError as exc:
                self.port = self._client.port or self.port
                delay = first_connect_retry(exc, self.host, self.port, self._ssl_context, self._backoff, attempt,
                                            deadline, timeout)
                attempt += 1
                if self._stopping.wait(delay):
                    raise OperationTimeout("connect() was interrupted by disconnect()") from exc

    def disconnect(self, timeout: float = 5.0) -> None:
        """Wait up to ``timeout`` s for unacknowledged telemetry, then disconnect and stop all threads.

        Messages still unacknowledged stay queued in memory and are sent after the next :meth:`connect`.
        Pending twin requests fail with :class:`OperationTimeout`. Does nothing if not connected.
        """
        if self._sas_renewal is not None and not self._sas_renewal.is_current():
            self._sas_renewal.stop()
            self._sas_renewal = None
        with self._lock:
            if not self._running:
                return
        deadline = time.monotonic() + max(0.0, timeout)
        if self._connected.is_set() and timeout > 0:
            self._acks.drained(timeout)
            # Method handlers still running get the rest of the time to answer: their response
            # must leave before DISCONNECT, or the hub waits for it until its own timeout.
            self._wait_for_methods(deadline - time.monotonic())
        self._teardown()

    def _wait_for_methods(self, timeout: float) -> None:
        if timeout <= 0 or threading.current_thread().name.startswith(self._threads):
            return  # a handler calling disconnect() cannot wait for itself
        with self._methods_idle:
            self._methods_idle.wait_for(lambda: self._methods_active == 0, timeout=timeout)

    def _teardown(self) -> None:
        self._stopping.set()
        self._acks.set_online(False)
        self._client.disconnect()
        self._client.loop_stop()
        self._connected.clear()
        if self.outbox is not None:
            try:
                self.outbox.flush()
            except Exception:  # the rows are deleted on the next write, or sent again: never lost
                log.warning("could not delete acknowledged messages from the outbox yet", exc_info=True)
        with self._lock:
            self._running = False
            workers = (self._events, self._twin_worker, self._method_pool)
            self._events = self._twin_worker = self._method_pool = None
        self._twin_requests.fail_all(OperationTimeout("the device was disconnected before the hub answered"))
        # A handler calling disconnect() runs on one of these threads and cannot wait for itself.
        inside = threading.current_thread().name.startswith(self._threads)
        for worker in workers:
            if worker is not None:
                worker.shutdown(wait=not inside)

    def _start_workers(self) -> None:
        from concurrent.futures import ThreadPoolExecutor  # here: only a connecting Device needs it

        self._events = ThreadPoolExecutor(1, thread_name_prefix=f"{self._threads}-events")
        self._twin_worker = ThreadPoolExecutor(1, thread_name_prefix=f"{self._threads}-twin")
        self._method_pool = ThreadPoolExecutor(self._method_workers, thread_name_prefix=f"{self._threads}-methods")

    def _submit(self, worker: Optional["ThreadPoolExecutor"], fn: Callable[..., None], *args: Any) -> None:
        if worker is None:
            return
        counted = worker is self._method_pool
        if counted:
            # Counted before the handler can start, so disconnect() never misses one that is running.
            with self._methods_idle:
                self._methods_active += 1
            fn = functools.partial(self._counted, fn)
        try:
            worker.submit(fn, *args)
        except RuntimeError:  # shut down by a concurrent disconnect(): nobody is listening any more
            if counted:
                self._method_finished()

    def _counted(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        finally:
            self._method_finished()

    def _method_finished(self) -> None:
        with self._methods_idle:
            self._methods_active -= 1
            self._methods_idle.notify_all()

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
                if self._sas is not None and code in _NOT_AUTHORIZED:
                    hint = ("check that the device is registered with this symmetric key, and the clock "
                            "(SAS tokens carry their expiry)")
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
            if self._credentials is not None:
                self._credentials.suback(mid)
            return
        refused = [sub for (sub, _), rc in zip(self._subscriptions, reason_codes) if rc.is_failure]
        if refused:
            log.error("the hub refused the subscriptions %s; those messages will not arrive", refused)
        # Twin requests sent on the old connection lost their answers (QoS 0): wake them to ask again.
        # This must happen before connect() can return (_outcome), or a request the caller makes right
        # after connect() would be taken for an old one and sent twice.
        self._twin_requests.resend_all()
        self._connected.set()
        self._outcome.set()
        log.info("connected to %s:%d (%s) as %s", self.host, self.port,
                 self._transport_used or self.transport, self.identity.client_id)
        self._acks.set_online(True)
        self._submit(self._events, self._notify_state, True, "connected")
        if self.on_desired is not None:
            self._submit(self._twin_worker, self._resync_twin)

    def _on_pre_connect(self, client: mqtt.Client, userdata: Any) -> None:
        self._attempt_failed = False
        if self._sas is not None:
            _sas_session.apply(client, self._username, self._sas)

    def _renew_sas(self) -> None:
        if not self._running:
            return
        self.disconnect(5.0)   # waits for in-flight telemetry; the rest stays queued for the new connection
        self._sas.renew()
        self.connect()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        self._acks.set_online(False)
        # paho 2 reports a keep-alive timeout twice (its PINGREQ check and its PINGRESP check both close
        # the socket and call on_disconnect): one lost connection is one log line and one back-off step.
        if self._stopping.is_set() or self._attempt_failed:
            return
        self._attempt_failed = True
        delay = self._next_delay()
        log.warning("connection to %s:%d lost (%s); reconnecting in %.1f s", self.host, self.port, reason, delay)
        if was_connected:
            self._submit(self._events, self._notify_state, False, str(reason))

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        if self._stopping.is_set() or self._attempt_failed:
            return
        self._attempt_failed = True
        # paho calls this from inside its `except OSError:` around reconnect(), so the error is at hand.
        error = sys.exc_info()[1]
        delay = self._next_delay()
        if isinstance(error, OSError):
            permanent = permanent_tls_error(error, self.host, self.port, self._ssl_context)
            if permanent is not None:  # retried all the same: the server side may be fixed meanwhile
                log.error("reconnecting to %s:%d failed: %s; next attempt in %.1f s", self.host, self.port,
                          permanent, delay)
                return
            log.info("reconnecting to %s:%d failed (%s); next attempt in %.1f s", self.host, self.port, error, delay)
        else:
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
        self._twin_requests.answered(response, payload)

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
            encoded = lcpaho.json_body(body)
        except ConfigError:
            log.error("method %r returned a value that is not JSON-serialisable; answering 500", request.name)
            status, encoded = 500, lcpaho.json_body({"error": "the method result is not JSON-serialisable"})
        lcpaho.answer_method(self._client, request, status, encoded)

    def _method_result(self, request: MethodRequest, payload: bytes) -> Tuple[int, Any]:
        handler = self._methods.get(request.name)
        if handler is None:
            return 404, {"error": f"no handler for method {request.name!r} on this device"}
        try:
            argument = _json(payload) if payload.strip() else None
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
            patch = _json(payload)
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
        """Accept one telemetry message (QoS 1) and return at once with a :class:`SendHandle`.

        ``payload`` is bytes or str (sent as UTF-8); ``properties`` application properties (str values);
        keyword arguments are system properties: ``message_id`` (default: a fresh unique id, so every message
        has a ``$.mid``), ``correlation_id``, ``user_id``, ``content_type``, ``content_encoding``,
        ``absolute_expiry``, ``creation_time``, ``component`` (IoT Plug and Play, ``$.sub``) and, for
        modules, ``output_name``. Wire format::

            devices/{id}/messages/events/%24.mid=m1&%24.ct=application%2Fjson&unit=C

        With an outbox the message is committed to it before this returns (senders on several threads
        share one commit: see :meth:`send_many`). Raises :class:`ConfigError` for bad properties,
        :class:`MessageTooLargeError` above 256 KB, :class:`QueueFullError` when the queue (or outbox) is
        full and ``full_policy`` is ``"reject_new"``, and :class:`~lightclient.exceptions.OutboxError` if
        the outbox cannot be written.
        """
        return self._acks.put(self._maker.message(payload, properties, system_properties))

    def send_many(self, payloads: Iterable[Any], properties: Optional[topics.Properties] = None,
                  **system_properties: Any) -> List[SendHandle]:
        """Accept a batch of telemetry messages with the same properties; one :class:`SendHandle` each, in order.

        The batch is accepted whole or not at all (:class:`QueueFullError`, nothing queued); with an outbox
        it is one transaction (one disk flush), which is what makes durable telemetry fast. Every message
        gets its own fresh ``$.mid``, so ``message_id`` is not accepted here; other arguments and errors
        are those of :meth:`send`. Wait for the batch with :meth:`wait_all`::

            handles = device.send_many([reading.encode() for reading in batch], {"unit": "C"})
            device.wait_all(handles, timeout=30)
        """
        if "message_id" in system_properties:
            raise ConfigError("send_many() gives every message its own fresh message_id; to choose message ids, "
                              "call send(payload, message_id=...) for each message")
        if isinstance(payloads, (bytes, str, bytearray, memoryview)):
            raise ConfigError("send_many() takes a list of payloads, not one payload: send_many([payload]) or "
                              "send(payload)")
        return self._acks.put_many([self._maker.message(payload, properties, system_properties)
                                    for payload in payloads])

    @staticmethod
    def wait_all(handles: Iterable[SendHandle], timeout: Optional[float] = 30.0) -> None:
        """Wait until the hub acknowledged every message in ``handles`` (from :meth:`send` or :meth:`send_many`).

        :class:`OperationTimeout` if they are not all acknowledged within ``timeout`` seconds in all (they
        stay queued and are sent again after a reconnect); :class:`MessageDroppedError` (the first, in the
        order given, after waiting for the rest) if some were dropped to make room (``drop_oldest``).
        """
        wait_all(handles, timeout)

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

    # ------------------------------------------------------------------------- certificate renewal

    def replace_context(self, ssl_context: ssl.SSLContext, timeout: float = 30.0, *,
                        certificate: Any = None) -> None:
        """Reconnect with ``ssl_context`` (a renewed certificate, perhaps a new key) and keep it.

        Telemetry accepted meanwhile stays queued (in memory or the outbox) and unacknowledged messages
        are resent; the twin is read again after the connect, as after any reconnect; twin requests
        waiting for an answer at that moment fail with :class:`OperationTimeout`. If the new context
        cannot connect within ``timeout`` s, the Device goes back to the old one and the error is
        raised: the old credential keeps working. On success ``on_certificate_renewed(certificate)``
        runs on the events thread. A Device that is not started just takes the context for its next
        :meth:`connect`.
        """
        if not isinstance(ssl_context, ssl.SSLContext):
            raise ConfigError("ssl_context must be an ssl.SSLContext with the renewed certificate, e.g. from "
                              f"lightclient.tls.client_context(), not {type(ssl_context).__name__}")
        old, running = self._ssl_context, self._running
        if running:
            self.disconnect(min(timeout, 5.0))
        self._use_context(ssl_context)
        if running:
            try:
                self.connect(timeout)
            except LightClientError:
                log.error("could not connect with the renewed certificate; going back to the old one")
                self._use_context(old)
                self.connect(timeout)
                raise
        if certificate is not None and self.on_certificate_renewed is not None:
            self._submit(self._events, self._call_user, "on_certificate_renewed", self.on_certificate_renewed,
                         certificate)

    def _use_context(self, ssl_context: ssl.SSLContext) -> None:
        # paho allows tls_set_context() once per client; its next connect wraps the socket with
        # _ssl_context, so setting that (while disconnected) is the whole swap.
        self._ssl_context = ssl_context
        self._client._ssl_context = ssl_context

    def request_certificate(self, csr_der: bytes, *, replace: Optional[str] = None, timeout: float = 120.0) -> Any:
        """Ask the hub for a certificate for ``csr_der`` over ``$iothub/credentials`` (preview) and wait.

        Returns a :class:`~lightclient.topics.CredentialsAnswer` whose ``certificates`` hold the chain
        (DER, leaf first). Raises :class:`~lightclient.exceptions.RenewalError` for an error status and
        :class:`OperationTimeout` after ``timeout`` s. The chain takes effect on the next connection
        (:meth:`replace_context`); see :mod:`lightclient.renewal` for the whole renewal.
        """
        if self._credentials is None:
            from ._credentials import CredentialsChannel

            self._credentials = CredentialsChannel(self._client, self.identity.device_id, self._subscriptions,
                                                   self._connected)
        return self._credentials.request(csr_der, replace=replace, timeout=timeout)

    def upload_file(self, path_or_fileobj: Any, blob_name: str, progress: Optional[Callable[[int, int], None]] = None,
                    **options: Any) -> Any:
        """Upload a file (path or seekable binary file object) to the hub's linked storage as ``blob_name``, over
        HTTPS with this device's key (or its SAS credential); needs no MQTT connection. Returns an
        :class:`~lightclient.upload.UploadResult`; ``progress(sent, total)`` gets bytes. ``options`` are
        those of :func:`lightclient.upload.upload_file` (``endpoint`` defaults to the hub host on 443)."""
        from . import upload

        if self.identity.module_id:
            raise ConfigError("file upload is for device identities: IoT Hub offers it to no module")
        options.setdefault("endpoint", self.host)
        options.setdefault("sas", self._sas)  # a symmetric-key device: its SAS token authenticates to the hub
        return upload.upload_file(path_or_fileobj, blob_name, device_id=self.identity.device_id,
                                  ssl_context=self._ssl_context, progress=progress, **options)

    # ------------------------------------------------------------------------------------- twin

    def get_twin(self, timeout: Optional[float] = None) -> Dict[str, Any]:
        """The whole twin: ``{"desired": {…, "$version": n}, "reported": {…, "$version": m}}``.

        Publishes ``$iothub/twin/GET/?$rid={rid}`` and waits for ``$iothub/twin/res/200/?$rid={rid}``.
        Answers 429 and 5xx, lost answers and reconnects are retried with back-off within ``timeout`` s
        (default ``twin_timeout``); then the last error is raised: :class:`ServiceError` for an error
        status (``retryable`` for 429 and 5xx) or :class:`OperationTimeout`. Other statuses raise at once.
        """
        _, payload = self._twin_request("GET", lambda rid: lcpaho.request_twin(self._client, rid=rid), timeout)
        try:
            twin = _json(payload)
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
        body = lcpaho.json_body(patch)  # fail here, not on the network thread, if it is not JSON
        record, _ = self._twin_request(
            "reported PATCH", lambda rid: lcpaho.patch_reported(self._client, body, rid=rid), timeout)
        return record.version

    def _twin_request(self, what: str, publish: Callable[[str], Any],
                      timeout: Optional[float]) -> Tuple[TwinResponse, bytes]:
        return self._twin_requests.request(what, publish, lcpaho.new_rid(),
                                           self._twin_timeout if timeout is None else timeout)


#: Deeper JSON from the network is refused: IoT Hub itself allows 10 levels in twins, and the recursive
#: code that handles documents (merge patches, diffs, copies) must not meet Python's recursion limit.
MAX_JSON_DEPTH = 64


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # json.loads would accept NaN and Infinity


def _json(payload: bytes) -> Any:
    """``json.loads`` for data from the network: every failure (bad UTF-8, bad JSON, nesting deeper than
    :data:`MAX_JSON_DEPTH`) is a ValueError."""
    try:
        value = json.loads(payload, parse_constant=_not_json)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise ValueError(f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return value


def first_connect_retry(exc: OSError, host: str, port: int, ssl_context: ssl.SSLContext, backoff: Backoff,
                        attempt: int, deadline: float, timeout: float) -> float:
    """How long to wait before the next try of a FIRST connect that failed with ``exc`` (attempt ``attempt``,
    0-based), or the typed error to raise: what no retry can cure (a proxy that refuses, an untrusted
    certificate, no TLS version in common) at once, anything else once ``deadline`` would pass.

    Shared by :class:`Device` and :class:`lightclient.aio.Device`, which differ only in how they wait.
    """
    if isinstance(exc, ProxyError) and not exc.retryable:
        raise exc
    permanent = permanent_tls_error(exc, host, port, ssl_context)
    if permanent is not None:
        raise permanent from exc
    delay = backoff.delay(attempt)
    if time.monotonic() + delay >= deadline:
        if isinstance(exc, ProxyError):
            raise ProxyError(f"could not connect to {host} within {timeout} s ({attempt + 1} attempts): {exc}",
                             proxy=exc.proxy, reason=exc.reason, status=exc.status) from None
        raise OperationTimeout(f"could not connect to {host}:{port}{_ws_hint(exc)} within {timeout} s "
                               f"({attempt + 1} attempts); last error: {exc}") from exc
    log.info("connecting to %s:%d failed (%s); retrying in %.1f s", host, port, exc, delay)
    return delay


def _ws_hint(exc: BaseException) -> str:
    """paho says only "WebSocket handshake error" when the server refuses the upgrade; say where to look."""
    if type(exc).__name__ == "WebsocketConnectionError":
        return (f" (the server did not accept the WebSocket upgrade on {_transport.WEBSOCKET_PATH} with "
                "subprotocol mqtt: is websocket_port an IoT Hub WebSocket endpoint?)")
    return ""


def _check_int(name: str, value: Any, low: int, high: int, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{name} must be an int from {low} to {high}, not {value!r}: {hint}")


__all__ = ["ConnectRefusedError", "Device", "MAX_KEEPALIVE", "MessageDroppedError", "MethodResponse", "Outbox",
           "QueueFullError", "SendHandle", "ServerCertificateError", "TlsVersionError"]
