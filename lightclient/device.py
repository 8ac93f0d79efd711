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
import logging
import os
import ssl
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import paho.mqtt.client as mqtt

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

from . import _transport
from . import paho as lcpaho
from . import _fastpath, _sas_session, topics
from ._device_common import DeviceCore, MethodResponse, check_context
# Names this module has always offered (tests and applications use them); their home is _device_common.
from ._device_common import MAX_JSON_DEPTH, MAX_KEEPALIVE, _json, first_connect_retry, paho_log  # noqa: F401
from ._pipeline import SendHandle, wait_all
from .backoff import Backoff
from .exceptions import (ConfigError, ConnectRefusedError, LightClientError, MessageDroppedError, OperationTimeout,
                         QueueFullError, ServerCertificateError, ServiceError, TlsVersionError)
from .identity import API_VERSION, Identity
from .outbox import Outbox
from .topics import C2DMessage, DesiredPatch, InputMessage, MethodRequest, TwinResponse

log = logging.getLogger("lightclient.device")


class Device(DeviceCore):
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
        super().__init__(identity, ssl_context, host=host, port=port, keepalive=keepalive, max_inflight=max_inflight,
                         clean_session=clean_session, backoff=backoff, method_workers=method_workers,
                         twin_timeout=twin_timeout, api_version=api_version, client_type=client_type,
                         max_queue=max_queue, max_queue_bytes=max_queue_bytes, full_policy=full_policy, outbox=outbox,
                         on_connection_state=on_connection_state, transport=transport,
                         websocket_port=websocket_port, proxy=proxy, gateway_hostname=gateway_hostname,
                         transport_cache=transport_cache, sas=sas)
        self._sas_renewal: Optional[_sas_session.Renewal] = None
        self.on_c2d = on_c2d
        self.on_input = on_input
        self.on_desired = on_desired
        self._client.on_connect_fail = self._on_connect_fail
        self._fast_acks = _fastpath.install(self._client)  # cheaper PUBACKs where this paho allows it

        self._lock = threading.Lock()             # connection lifecycle
        self._outcome = threading.Event()         # first connect: CONNACK+SUBACK, or a refusal
        self._first_error: Optional[LightClientError] = None
        self._attempt_failed = False               # this connection (attempt) already counted as a failure
        self._events: Optional["ThreadPoolExecutor"] = None
        self._twin_worker: Optional["ThreadPoolExecutor"] = None
        self._method_pool: Optional["ThreadPoolExecutor"] = None
        self._methods_idle = threading.Condition()
        self._methods_active = 0
        #: Handles of the messages an earlier run left in the outbox (sent first, in order, once connected).
        self.recovered: List[SendHandle]

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

    def close(self, timeout: float = 5.0) -> None:
        """:meth:`disconnect`, then close the outbox if the Device opened it from a path.

        Unacknowledged messages stay in the outbox file for the next run.
        """
        self.disconnect(timeout)
        self._close_outbox()

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
                raise self._connect_timeout(timeout)
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
                self._opened(used)
                return
            except OSError as exc:
                delay = self._first_retry(exc, attempt, deadline, timeout)
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
        self._settle()
        with self._lock:
            self._running = False
            workers = (self._events, self._twin_worker, self._method_pool)
            self._events = self._twin_worker = self._method_pool = None
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

    def _refused_at_first(self, error: ConnectRefusedError) -> None:
        if not self._outcome.is_set():
            self._first_error = error
            self._outcome.set()

    def _online(self) -> None:
        self._outcome.set()
        self._submit(self._events, self._notify_state, True, "connected")
        if self.on_desired is not None:
            self._submit(self._twin_worker, self._resync_twin)

    def _on_pre_connect(self, client: mqtt.Client, userdata: Any) -> None:
        self._attempt_failed = False
        super()._on_pre_connect(client, userdata)

    def _renew_sas(self) -> None:
        if not self._running:
            return
        self.disconnect(5.0)   # waits for in-flight telemetry; the rest stays queued for the new connection
        self._sas.renew()
        self.connect()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        was_connected = self._went_offline()
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
        self._reconnect_failed(sys.exc_info()[1], self._next_delay())

    def _next_delay(self) -> float:
        # paho waits reconnect_delay_set()'s min_delay before its next attempt; setting min = max to our
        # own delay each time replaces its jitter-less doubling with Backoff.
        delay = self._next_backoff()
        self._client.reconnect_delay_set(delay, delay)  # type: ignore[arg-type]  # paho accepts floats
        return delay

    def _got_message(self, record: Any, payload: bytes) -> None:
        self._submit(self._events, self._deliver_message, record, payload)

    def _got_method(self, request: MethodRequest, payload: bytes) -> None:
        self._submit(self._method_pool, self._run_method, request, payload)

    def _got_desired(self, patch: DesiredPatch, payload: bytes) -> None:
        if self.on_desired is not None:
            self._submit(self._twin_worker, self._apply_desired, patch.version, payload)

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
        self._answer_method(request, *self._method_result(request, payload))

    def _method_result(self, request: MethodRequest, payload: bytes) -> Tuple[int, Any]:
        handler, argument = self._method_call(request, payload)
        if handler is None:
            return argument
        try:
            return self._method_returned(handler(argument))
        except Exception as exc:
            return self._method_raised(request, exc)

    def _apply_desired(self, version: int, payload: bytes) -> None:
        patch = self._desired_patch(version, payload)
        if patch is not None:
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
                delay = self._resync_delay(exc, attempt)
                attempt += 1
                if delay is None or self._stopping.wait(delay):
                    return
        else:
            return
        missed = self._missed_desired(twin)
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
        return self._put_many(payloads, properties, system_properties)

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
        check_context(ssl_context, "the renewed certificate")
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

    def request_certificate(self, csr_der: bytes, *, replace: Optional[str] = None, timeout: float = 120.0) -> Any:
        """Ask the hub for a certificate for ``csr_der`` over ``$iothub/credentials`` (preview) and wait.

        Returns a :class:`~lightclient.topics.CredentialsAnswer` whose ``certificates`` hold the chain
        (DER, leaf first). Raises :class:`~lightclient.exceptions.RenewalError` for an error status and
        :class:`OperationTimeout` after ``timeout`` s. The chain takes effect on the next connection
        (:meth:`replace_context`); see :mod:`lightclient.renewal` for the whole renewal.
        """
        return self._credentials_channel(self._client).request(csr_der, replace=replace, timeout=timeout)

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
        return self._twin_document(payload)

    def patch_reported(self, patch: Dict[str, Any], timeout: Optional[float] = None) -> Optional[int]:
        """Update reported properties (``None`` deletes a key); return the new reported ``$version``.

        Publishes the JSON patch on ``$iothub/twin/PATCH/properties/reported/?$rid={rid}`` and waits for
        ``$iothub/twin/res/204/?$rid={rid}&$version={v}``. Errors as for :meth:`get_twin`.
        """
        body = self._reported_body(patch)
        record, _ = self._twin_request(
            "reported PATCH", lambda rid: lcpaho.patch_reported(self._client, body, rid=rid), timeout)
        return record.version

    def _twin_request(self, what: str, publish: Callable[[str], Any],
                      timeout: Optional[float]) -> Tuple[TwinResponse, bytes]:
        return self._twin_requests.request(what, publish, lcpaho.new_rid(),
                                           self._twin_timeout if timeout is None else timeout)


__all__ = ["ConnectRefusedError", "Device", "MAX_KEEPALIVE", "MessageDroppedError", "MethodResponse", "Outbox",
           "QueueFullError", "SendHandle", "ServerCertificateError", "TlsVersionError"]
