"""Level 3 for asyncio: :class:`Device`, an IoT Hub device or module client driven by the event loop.

The same features and guarantees as :class:`lightclient.device.Device`, by sharing its parts rather than
copying them: the telemetry :class:`~lightclient._pipeline.Pipeline` (bounded queue, ``full_policy``,
outbox, ``$.mid``), :class:`~lightclient._twin.TwinRequests` and :class:`~lightclient._twin.DesiredState`,
:class:`~lightclient.backoff.Backoff`, and the level-2 helpers of :mod:`lightclient.paho`::

    async with Device(identity, ctx) as device:
        await device.send(b'{"t": 21.5}', {"unit": "C"})       # returns once the hub acknowledged it
        handles = [device.send(b"%d" % i) for i in range(100)]  # pipelined: accepted now, awaited later
        await asyncio.gather(*handles)
        twin = await device.get_twin()
        async for message in device.c2d():
            print(message.properties, message.payload)

How paho runs here (paho 2.x's documented external-loop pattern): the socket is watched with
``loop.add_reader`` / ``add_writer`` (paho's ``on_socket_open/close`` and
``on_socket_register_write/unregister_write`` callbacks), readiness calls ``loop_read`` / ``loop_write``,
and a task calls ``loop_misc`` every second for keep-alive. There is no network thread: every paho
callback runs on the event loop. The one blocking step is paho's ``reconnect()`` (DNS, TCP connect and
the TLS handshake, where the hardware key signs): it runs on a one-thread executor, so a slow token, TPM
or unreachable host never stalls the loop; the socket callbacks it triggers are handed to the loop.

Other threads: synchronous method handlers run on a pool of ``method_workers`` threads (coroutine
handlers run on the loop), and a twin request waits for its answer on a small pool (the shared
:class:`~lightclient._twin.TwinRequests` is blocking). None of them touches the socket.

Not thread-safe: call a Device's methods from the thread running its event loop. The one sanctioned
exception is :class:`lightclient.renewal.Renewer`: it keeps a blocking face of the Device (attach it on
the loop) whose calls from the renewal thread run on the loop.

Certificate renewal: ``await device.replace_context(ctx)``, ``await device.request_certificate(csr)``,
``on_certificate_renewed``, and the shared :class:`~lightclient.renewal.Renewer` (token, DPS, hub, state
file: the sync Device's code), connected with ``await renewer.connect_device_async(factory)``.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import logging
import os
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Dict, Iterable, List, Optional, Set, Tuple, Union

import paho.mqtt.client as mqtt

from . import _transport
from . import paho as lcpaho
from . import topics
from ._device_common import DeviceCore, MethodResponse, check_context
from ._pipeline import SendHandle
from .backoff import Backoff
from .exceptions import (ConfigError, ConnectRefusedError, LightClientError, MessageDroppedError, OperationTimeout,
                         QueueFullError, ServiceError)
from .identity import API_VERSION, Identity
from .outbox import Outbox
from .topics import C2DMessage, DesiredPatch, InputMessage, MethodRequest, TwinResponse

log = logging.getLogger("lightclient.aio")

_MISC_INTERVAL = 1.0          # seconds between loop_misc() calls (paho's own loop uses 1 s as well)
_TWIN_WORKERS = 4             # twin requests waiting for answers at the same time (more queue up)
_DRAIN_POLL = 0.02            # seconds between checks while disconnect() waits for acknowledgements
_LOOP_CALL_TIMEOUT = 10.0     # seconds a worker thread waits for the loop to run a short call for it


@dataclass(frozen=True)
class Message:
    """A cloud-to-device message (``record`` is a :class:`~lightclient.topics.C2DMessage`) or, for a
    module, an input message (:class:`~lightclient.topics.InputMessage`), with its body."""

    record: Union[C2DMessage, InputMessage]
    payload: bytes

    @property
    def properties(self) -> Any:
        """Application properties (decoded)."""
        return self.record.properties

    @property
    def system_properties(self) -> Any:
        """System properties by wire name (``$.mid``, ``$.ct`` …)."""
        return self.record.system_properties

    @property
    def message_id(self) -> Any:
        return self.record.message_id

    @property
    def content_type(self) -> Any:
        return self.record.content_type


class _Waker:
    """A :class:`SendHandle`'s wait lock (``_waker``: held until the pipeline releases it on the
    acknowledgement or the drop) that also resolves the futures of the coroutines awaiting the handle.

    It wraps the plain lock a synchronous ``wait()`` may already have made (or makes one), so threads
    blocked in ``SendHandle.wait()`` on the same handle wake exactly as before."""

    __slots__ = ("loop", "thread", "lock", "futures")

    def __init__(self, loop: asyncio.AbstractEventLoop, thread: int, lock: Optional[Any]):
        self.loop = loop
        self.thread = thread
        if lock is None:
            lock = threading.Lock()
            lock.acquire()
        self.lock = lock
        self.futures: List["asyncio.Future[None]"] = []

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return self.lock.acquire(blocking, timeout)  # SendHandle.wait() on another thread

    def release(self) -> None:  # called with the pipeline's lock held: must not block
        self.lock.release()
        if threading.get_ident() == self.thread:
            self._wake()
        else:
            try:
                self.loop.call_soon_threadsafe(self._wake)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

    def _wake(self) -> None:
        futures, self.futures = self.futures, []
        for future in futures:
            if not future.done():
                future.set_result(None)


class AsyncSendHandle:
    """A telemetry message on its way; ``await handle`` (or :meth:`wait`) returns once the hub acknowledged it.

    Cancelling the await does not cancel the message: it stays queued (or in the outbox) and is delivered
    at least once, exactly as if nobody had waited. ``message_id`` is its ``$.mid``; ``mid`` the MQTT
    packet id once handed to the network.
    """

    __slots__ = ("_handle",)

    def __init__(self, handle: SendHandle):
        self._handle = handle

    @property
    def message_id(self) -> str:
        return self._handle.message_id

    @property
    def mid(self) -> Optional[int]:
        return self._handle.mid

    @property
    def error(self) -> Optional[LightClientError]:
        """:class:`MessageDroppedError` if the message was dropped unsent (``drop_oldest``), else None."""
        return self._handle.error

    def done(self) -> bool:
        """True once the hub has acknowledged the message."""
        return self._handle.done()

    async def wait(self, timeout: Optional[float] = None) -> None:
        """Wait for the acknowledgement; :class:`OperationTimeout` after ``timeout`` s (the message stays
        queued), :class:`MessageDroppedError` if it was dropped to make room for newer ones."""
        handle = self._handle
        if handle.done():
            return
        loop = asyncio.get_running_loop()
        with handle._book.lock:
            if handle._state is not None:  # acknowledged or dropped meanwhile
                waker = None
            else:
                waker = handle._waker
                if not isinstance(waker, _Waker):  # made lazily, by the first waiter (sync or async)
                    waker = handle._waker = _Waker(loop, threading.get_ident(), waker)  # type: ignore[assignment]
                future: "asyncio.Future[None]" = loop.create_future()
                waker.futures.append(future)
        if waker is None:
            self._raise_if_dropped()
            return
        try:
            if timeout is None:
                await future
            else:
                await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            raise OperationTimeout(
                f"message {handle.message_id!r} was not acknowledged within {timeout} s; it stays queued "
                "and is sent again after a reconnect, so wait again or check the connection") from None
        finally:
            if not future.done():  # cancelled: forget this waiter, keep the message
                future.cancel()
            try:
                waker.futures.remove(future)
            except ValueError:
                pass
        self._raise_if_dropped()

    def _raise_if_dropped(self) -> None:
        error = self._handle.error
        if error is not None:
            raise error

    def __await__(self):
        return self.wait().__await__()

    def __repr__(self) -> str:
        return repr(self._handle).replace("<SendHandle", "<AsyncSendHandle", 1)


class Device(DeviceCore):
    """An IoT Hub device (or module) connection for asyncio: telemetry, direct methods, the twin and C2D.

    ::

        ctx = lightclient.tls.client_context(cert="device.pem", key="pkcs11:token=t;object=k")
        async with Device(Identity("hub.azure-devices.net", "dev1"), ctx) as device:
            @device.method("reboot")
            async def reboot(payload):
                return {"scheduled": True}          # status 200; MethodResponse(…) picks another
            await device.send(b'{"t": 21.5}', {"unit": "C"}, content_type="application/json")
            await device.patch_reported({"fw": "1.2"})
            async for patch in device.desired():
                apply(patch)

    The constructor takes the options of :class:`lightclient.device.Device` (``host``, ``port``,
    ``keepalive``, ``max_inflight``, ``clean_session``, ``backoff``, ``method_workers``, ``twin_timeout``,
    ``api_version``, ``client_type``, ``max_queue``, ``max_queue_bytes``, ``full_policy``, ``outbox``,
    ``transport``, ``websocket_port``, ``proxy``, ``gateway_hostname``, ``transport_cache``, ``sas``) with the
    same meaning and the same checks, plus ``on_connection_state(connected, reason)`` (a function or a
    coroutine function). ``sas=`` (a :class:`~lightclient.symkey.SasCredential`) signs a fresh token for
    every connect attempt (on the connect thread, so a token-held key never blocks the loop) and renews
    it by reconnecting after 80 % of its lifetime, as the sync Device does.

    :meth:`upload_file` uploads to the hub's linked storage as the sync Device's does, on a worker thread.

    Certificate renewal as on the sync Device: :meth:`replace_context` (hot swap, nothing queued lost,
    the twin re-read), :meth:`request_certificate` (``$iothub/credentials``) and
    ``on_certificate_renewed(certificate)`` (a function or a coroutine function, run on the loop). A
    :class:`lightclient.renewal.Renewer` drives them from its thread::

        device = await renewer.connect_device_async(lambda ctx: Device(identity, ctx))
        renewer.start()                       # renews in the background; the swap runs on this loop
        ...
        await asyncio.to_thread(renewer.stop)  # before closing the Device
        await device.close()

    Not here, sync :class:`lightclient.device.Device` only: the callback attributes ``on_c2d`` /
    ``on_input`` / ``on_desired`` (here: :meth:`c2d` and :meth:`desired`). ``send_and_wait`` is
    ``await device.send(…)``.

    Telemetry: :meth:`send` accepts the message at once (raising :class:`ConfigError`,
    :class:`MessageTooLargeError`, :class:`QueueFullError` right there) and returns an
    :class:`AsyncSendHandle`; ``await device.send(…)`` returns when the hub acknowledged it. Delivery is
    at-least-once with a ``$.mid`` on every message, bounded by ``max_queue`` / ``max_queue_bytes``, kept
    across reconnects (and restarts, with ``outbox=``), exactly as for the sync Device. With an outbox,
    :meth:`send` commits the message to SQLite before returning, on the event loop (one fsync).

    Received: :meth:`c2d` iterates cloud-to-device (or module input) messages as :class:`Message`; they
    are buffered from the connect on, so none is missed before the ``async for`` starts. :meth:`desired`
    iterates desired-property patches (each with its ``$version``) in version order; the first patch is
    the whole desired document (if it is not empty), read when :meth:`desired` is first called or the
    device connects, and after every reconnect the changes missed while offline arrive as one patch.

    Direct methods: :meth:`method` / :meth:`add_method_handler`. A coroutine handler runs on the loop;
    a plain function runs on one of ``method_workers`` threads, so neither a slow coroutine nor a blocking
    function holds up the connection or other calls. Statuses as for the sync Device: the return value
    (200), a :class:`MethodResponse`, 500 when the handler raises, 404 without a handler, 400 for a
    payload that is not JSON.

    Reconnect: with :class:`~lightclient.backoff.Backoff` (jitter; the long pause after CONNACK 4/5),
    resubscribing every time, resending unacknowledged telemetry and pending twin requests, and re-reading
    the twin for :meth:`desired`. The first :meth:`connect` raises at once for a CONNACK refusal
    (:class:`ConnectRefusedError`) and for permanent TLS failures (:class:`ServerCertificateError`,
    :class:`~lightclient.exceptions.TlsVersionError`).
    """

    _log = log

    def __init__(self, identity: Identity, ssl_context: ssl.SSLContext, *, host: Optional[str] = None,
                 port: int = 8883, keepalive: int = 60, max_inflight: int = 20, clean_session: bool = False,
                 backoff: Optional[Backoff] = None, method_workers: int = 4, twin_timeout: float = 60.0,
                 api_version: str = API_VERSION, client_type: Optional[str] = None,
                 max_queue: Optional[int] = None, max_queue_bytes: Optional[int] = None,
                 full_policy: Optional[str] = None, outbox: Union[None, str, "os.PathLike[str]", Outbox] = None,
                 on_connection_state: Optional[Callable[[bool, str], Any]] = None,
                 transport: str = "tcp", websocket_port: int = _transport.WEBSOCKET_PORT, proxy: Any = None,
                 gateway_hostname: Optional[str] = None,
                 transport_cache: Union[None, str, "os.PathLike[str]"] = None, sas: Any = None):
        if on_connection_state is not None and not callable(on_connection_state):
            raise ConfigError("on_connection_state must be a function or coroutine function taking "
                              f"(connected, reason), not {type(on_connection_state).__name__}")
        super().__init__(identity, ssl_context, host=host, port=port, keepalive=keepalive, max_inflight=max_inflight,
                         clean_session=clean_session, backoff=backoff, method_workers=method_workers,
                         twin_timeout=twin_timeout, api_version=api_version, client_type=client_type,
                         max_queue=max_queue, max_queue_bytes=max_queue_bytes, full_policy=full_policy, outbox=outbox,
                         on_connection_state=on_connection_state, transport=transport,
                         websocket_port=websocket_port, proxy=proxy, gateway_hostname=gateway_hostname,
                         transport_cache=transport_cache, sas=sas)
        self._renewing = False          # our own disconnect for a fresh SAS token (see _sas_renewal)
        self._swapping = False          # replace_context() under way: method handlers carry on (see _swap)
        client = self._client
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write

        # Loop-side state (made in connect(): asyncio objects belong to the running loop).
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._loop_thread = 0
        self._fd: Optional[int] = None
        self._outcome: Optional["asyncio.Future[None]"] = None
        self._dropped: Optional[asyncio.Event] = None
        self._tasks: Set["asyncio.Task[Any]"] = set()
        self._method_tasks: Set["asyncio.Task[Any]"] = set()
        self._opening: Optional["asyncio.Future[Any]"] = None
        self._connector: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._method_pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._twin_pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._messages: Optional["asyncio.Queue[Message]"] = None
        self._desired_out: Optional["asyncio.Queue[Dict[str, Any]]"] = None
        self._twin_inbox: Optional["asyncio.Queue[Tuple[str, int, bytes]]"] = None
        self._want_desired = False
        #: Handles of the messages an earlier run left in the outbox (sent first, in order, once connected).
        self.recovered: List[AsyncSendHandle]

    _handle = AsyncSendHandle   # what send() returns for a pipeline handle

    # ---------------------------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> "Device":
        await self.connect()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    def __repr__(self) -> str:
        state = "connected" if self.is_connected else ("connecting" if self._running else "disconnected")
        return f"<aio.Device {self.identity.client_id!r} on {self.host}:{self.port} {state}>"

    async def connect(self, timeout: float = 30.0) -> None:
        """Connect and subscribe, then stay connected (reconnecting by itself) until :meth:`disconnect`.

        As :meth:`lightclient.device.Device.connect`: transient failures are retried with back-off until
        ``timeout`` (then :class:`OperationTimeout` with the last error); a CONNACK refusal, an untrusted
        or invalid server certificate and a TLS version mismatch raise at once. Does nothing if started.
        """
        if self._running:
            return
        loop = asyncio.get_running_loop()
        if self._loop is not None and self._loop is not loop:
            raise ConfigError("this Device was used on another event loop; make a new Device for this one")
        self._loop, self._loop_thread = loop, threading.get_ident()
        self._running = True
        self._stopping.clear()
        self._outcome = loop.create_future()
        self._dropped = asyncio.Event()
        self._attempt, self._refused, self._renewing = 0, None, False
        self._queues()
        self._connector = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"{self._threads}-connect")
        if self._method_pool is None:  # kept through a context swap, with the handlers running on it
            self._method_pool = concurrent.futures.ThreadPoolExecutor(
                self._method_workers, thread_name_prefix=f"{self._threads}-methods")
        deadline = time.monotonic() + timeout
        try:
            await self._first_connect(deadline, timeout)
            self._spawn(self._misc_loop())
            self._spawn(self._supervise())
            self._spawn(self._twin_worker())
            if self._sas is not None:
                self._spawn(self._sas_renewal())
            try:
                await asyncio.wait_for(asyncio.shield(self._outcome), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                raise self._connect_timeout(timeout) from None
        except BaseException:
            await self._teardown()
            raise

    async def _first_connect(self, deadline: float, timeout: float) -> None:
        attempt = 0
        while True:
            try:
                self._opened(await self._open(first=True))
                return
            except OSError as exc:
                delay = self._first_retry(exc, attempt, deadline, timeout)
                attempt += 1
                await asyncio.sleep(delay)

    async def _open(self, first: bool = False) -> Any:
        """Connect off the loop (DNS, TCP, proxy, TLS handshake with the device key, CONNECT queued):
        the first time with :func:`lightclient.paho.connect` (``transport="auto"`` chooses there), after
        a drop with paho's reconnect() to the same place, as the sync Device's network thread does."""
        assert self._loop is not None and self._connector is not None
        if first:
            opening = functools.partial(lcpaho.connect, self._client, self.host, transport=self.transport,
                                        port=self._tcp_port, websocket_port=self.websocket_port,
                                        keepalive=self.keepalive, memory=self._memory)
        else:
            opening = self._client.reconnect
        self._opening = self._loop.run_in_executor(self._connector, opening)
        try:
            # Shielded: a cancelled caller must not leave the thread's half-made socket unaccounted;
            # _teardown() waits for it.
            return await asyncio.shield(self._opening)
        finally:
            if self._opening.done():
                self._opening = None

    async def disconnect(self, timeout: float = 5.0) -> None:
        """Wait up to ``timeout`` s for unacknowledged telemetry and running method handlers, then
        disconnect. Unacknowledged messages stay queued for the next :meth:`connect`; pending twin
        requests fail with :class:`OperationTimeout`. Does nothing if not started."""
        if not self._running:
            return
        deadline = time.monotonic() + max(0.0, timeout)
        if self._connected.is_set() and timeout > 0:
            await self._drain(deadline)
            current = asyncio.current_task()
            running = [t for t in self._method_tasks if t is not current]
            if running and deadline > time.monotonic():
                await asyncio.wait(running, timeout=deadline - time.monotonic())
        await self._teardown()

    async def _drain(self, deadline: float) -> None:
        """Wait until the hub acknowledged the telemetry in flight (or the connection dropped, or ``deadline``)."""
        while self.queued and self._connected.is_set() and time.monotonic() < deadline:
            await asyncio.sleep(_DRAIN_POLL)

    async def close(self, timeout: float = 5.0) -> None:
        """:meth:`disconnect`, then close the outbox if the Device opened it from a path."""
        try:
            await self.disconnect(timeout)
        finally:
            if not self._running:
                self._close_outbox()

    async def _teardown(self) -> None:
        self._stopping.set()
        self._acks.set_online(False)
        if self._opening is not None:  # a connect still running on the executor: let it finish first
            try:
                await asyncio.shield(self._opening)
            except BaseException:
                pass
            self._opening = None
        self._connected.clear()
        self._client.disconnect()
        if self._client.socket() is not None:
            self._client.loop_write()  # DISCONNECT goes out now; paho then closes the socket
            for _ in range(50):
                if self._client.socket() is None:
                    break
                await asyncio.sleep(_DRAIN_POLL)
            if self._client.socket() is not None:
                self._client._sock_close()  # the peer does not read: give up on a polite goodbye
        current = asyncio.current_task()
        # A swap is a reconnect, not a stop: running method handlers (perhaps the one that asked for the
        # swap) carry on and answer on the new connection, as on the sync Device.
        stopping = list(self._tasks) + ([] if self._swapping else list(self._method_tasks))
        for task in stopping:
            if task is not current:
                task.cancel()
        pending = [t for t in stopping if t is not current]
        if pending:
            await asyncio.wait(pending)
        self._tasks.clear()
        self._settle()
        for pool in (self._connector, self._twin_pool):
            if pool is not None:
                pool.shutdown(wait=False)
        self._connector = self._twin_pool = None
        if not self._swapping:
            self._stop_methods()
        self._running = False

    def _stop_methods(self) -> None:
        current = asyncio.current_task()
        for task in list(self._method_tasks):
            if task is not current:
                task.cancel()
        self._method_tasks.clear()
        if self._method_pool is not None:
            self._method_pool.shutdown(wait=False)  # a blocking method handler finishes on its own; nobody waits
            self._method_pool = None

    def _spawn(self, coro: Awaitable[Any], methods: bool = False) -> "asyncio.Task[Any]":
        assert self._loop is not None
        task = self._loop.create_task(coro)  # type: ignore[arg-type]
        group = self._method_tasks if methods else self._tasks
        group.add(task)
        task.add_done_callback(group.discard)
        return task

    def _queues(self) -> None:
        if self._messages is None:
            self._messages = asyncio.Queue()
            self._desired_out = asyncio.Queue()
        self._twin_inbox = asyncio.Queue()

    # ------------------------------------------------------------------- paho on the event loop

    def _in_loop(self, fn: Callable[..., None], *args: Any) -> None:
        if threading.get_ident() == self._loop_thread:
            fn(*args)
        elif self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(fn, *args)
            except RuntimeError:  # loop closed
                pass

    # File descriptors, not socket objects: paho closes the socket right after on_socket_close, before a
    # callback handed over from the connect thread can run.
    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._in_loop(self._watch, sock.fileno())

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._in_loop(self._unwatch, sock.fileno())

    def _on_socket_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._in_loop(self._watch_write, sock.fileno())

    def _on_socket_unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._in_loop(self._unwatch_write, sock.fileno())

    def _current(self, fd: int) -> bool:
        # A callback handed over from the connect thread can arrive after the socket was closed again.
        sock = self._client.socket()
        return sock is not None and sock.fileno() == fd

    def _watch(self, fd: int) -> None:
        assert self._loop is not None
        if not self._current(fd):
            return
        self._fd = fd
        self._loop.add_reader(fd, self._readable)

    def _unwatch(self, fd: int) -> None:
        assert self._loop is not None
        self._loop.remove_reader(fd)
        self._loop.remove_writer(fd)
        if self._fd == fd:
            self._fd = None

    def _watch_write(self, fd: int) -> None:
        if self._fd == fd and self._loop is not None and self._current(fd):
            self._loop.add_writer(fd, self._writable)

    def _unwatch_write(self, fd: int) -> None:
        if self._loop is not None:
            self._loop.remove_writer(fd)

    def _readable(self) -> None:
        try:
            self._client.loop_read()
            # TLS may hold decrypted packets the socket no longer signals: read them too.
            for _ in range(1000):
                sock = self._client.socket()  # an SSLSocket, or paho's WebSocket wrapper around one
                if sock is None or not hasattr(sock, "pending") or not sock.pending():
                    break
                self._client.loop_read()
        except Exception:
            log.exception("reading from the connection failed")

    def _writable(self) -> None:
        try:
            self._client.loop_write()
        except Exception:
            log.exception("writing to the connection failed")

    async def _misc_loop(self) -> None:
        while True:
            if self._fd is not None:
                try:
                    self._client.loop_misc()  # keep-alive: PINGREQ, and a dead connection noticed
                except Exception:
                    log.exception("paho's keep-alive check failed")
            await asyncio.sleep(_MISC_INTERVAL)

    async def _supervise(self) -> None:
        """Reconnect after every drop, with Backoff, until disconnect()."""
        assert self._dropped is not None
        while True:
            await self._dropped.wait()
            self._dropped.clear()
            if self._stopping.is_set():
                return
            if self._renewing:  # our own disconnect for a fresh SAS token: reconnect at once
                self._renewing = False
            else:
                delay = self._next_backoff()
                log.warning("reconnecting to %s:%d in %.1f s", self.host, self.port, delay)
                await asyncio.sleep(delay)
            if self._stopping.is_set():
                return
            try:
                await self._open()
            except OSError as error:
                self._reconnect_failed(error, None)
                self._dropped.set()

    # ------------------------------------------------------------------------------ SAS tokens

    async def _sas_renewal(self) -> None:
        """Reconnect with a fresh token after 80 % of the current one's lifetime (MQTT 3.1.1 cannot
        re-authenticate a live connection; see lightclient._sas_session), as the sync Device does."""
        assert self._sas is not None
        while True:
            await asyncio.sleep(max(0.5, self._sas.seconds_to_renewal()))
            if self._sas.seconds_to_renewal() > 0 or not self._connected.is_set():
                continue  # a reconnect under way signs a fresh token by itself
            log.info("renewing the SAS token for %s: reconnecting with a new one", self._sas.uri)
            deadline = time.monotonic() + 5.0  # in-flight telemetry gets its acknowledgements first
            while self.queued and self._connected.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(_DRAIN_POLL)
            if not self._connected.is_set():
                continue
            self._renewing = True
            self._client.disconnect()  # on_disconnect -> _supervise reconnects; _on_pre_connect signs anew

    # ------------------------------------------------------------------- paho callbacks (on the loop)

    def _refused_at_first(self, error: ConnectRefusedError) -> None:
        outcome = self._outcome
        if outcome is not None and not outcome.done():
            outcome.set_exception(error)

    def _online(self) -> None:
        if self._outcome is not None and not self._outcome.done():
            self._outcome.set_result(None)
        self._spawn(self._notify_state(True, "connected"))
        if self._want_desired and self._twin_inbox is not None:
            self._twin_inbox.put_nowait(("resync", 0, b""))

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        was_connected = self._went_offline()
        if self._stopping.is_set():
            return
        if was_connected and not self._renewing:
            log.warning("connection to %s:%d lost (%s)", self.host, self.port, reason)
        if self._dropped is not None:
            self._dropped.set()
        if was_connected:
            self._spawn(self._notify_state(False, str(reason)))

    def _got_message(self, record: Any, payload: bytes) -> None:
        if self._messages is not None:
            self._messages.put_nowait(Message(record, payload))

    def _got_method(self, request: MethodRequest, payload: bytes) -> None:
        if self._running and not self._stopping.is_set():
            self._spawn(self._run_method(request, payload), methods=True)

    def _got_desired(self, patch: DesiredPatch, payload: bytes) -> None:
        if self._want_desired and self._twin_inbox is not None:
            self._twin_inbox.put_nowait(("patch", patch.version, payload))

    async def _notify_state(self, connected: bool, reason: str) -> None:
        await self._call_user("on_connection_state", self.on_connection_state, connected, reason)

    async def _call_user(self, what: str, fn: Optional[Callable[..., Any]], *args: Any) -> None:
        if fn is None:
            return
        try:
            result = fn(*args)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("the %s callback raised; carrying on", what)

    # ----------------------------------------------------------------------------------- telemetry

    def send(self, payload: Any, properties: Optional[topics.Properties] = None,
             **system_properties: Any) -> AsyncSendHandle:
        """Accept one telemetry message (QoS 1) now; ``await`` the returned handle for the acknowledgement.

        Arguments, wire format and errors as :meth:`lightclient.device.Device.send` (raised here, before
        anything is awaited). ``await device.send(…)`` returns once the hub acknowledged the message.
        """
        return self._handle(self._acks.put(self._maker.message(payload, properties, system_properties)))

    async def send_many(self, payloads: Iterable[Any], properties: Optional[topics.Properties] = None, *,
                        timeout: Optional[float] = None, **system_properties: Any) -> List[AsyncSendHandle]:
        """Send every payload (pipelined, in order, each with its own ``$.mid``) and wait until all are
        acknowledged; return their handles.

        As :meth:`lightclient.device.Device.send_many`, the batch is accepted whole or not at all (a bad
        payload or :class:`QueueFullError` raises before anything is queued), and with an outbox it is one
        transaction. Waiting as :meth:`wait_all` (``timeout`` s in all).
        """
        handles = [self._handle(h) for h in self._put_many(payloads, properties, system_properties)]
        await self.wait_all(handles, timeout)
        return handles

    @staticmethod
    async def wait_all(handles: Iterable[AsyncSendHandle], timeout: Optional[float] = None) -> None:
        """Wait until the hub acknowledged every handle (:class:`OperationTimeout` after ``timeout`` s in
        all; the messages stay queued). A message dropped to make room (``drop_oldest``) raises its
        :class:`MessageDroppedError` (the first, in the order given) after the others were waited for."""
        deadline = None if timeout is None else time.monotonic() + timeout
        first: Optional[MessageDroppedError] = None
        for handle in handles:
            if handle.done():
                continue
            try:
                await handle.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
            except MessageDroppedError as exc:
                first = first or exc
        if first is not None:
            raise first

    # ---------------------------------------------------------------------------------- methods

    async def _run_method(self, request: MethodRequest, payload: bytes) -> None:
        self._answer_method(request, *await self._method_result(request, payload))

    async def _method_result(self, request: MethodRequest, payload: bytes) -> Tuple[int, Any]:
        handler, argument = self._method_call(request, payload)
        if handler is None:
            return argument
        try:
            if inspect.iscoroutinefunction(handler):
                result = await handler(argument)
            else:  # a blocking function must not hold up the loop: one of method_workers threads runs it
                assert self._loop is not None
                result = await self._loop.run_in_executor(self._method_pool, handler, argument)
                if inspect.isawaitable(result):  # e.g. a functools.partial of a coroutine function
                    result = await result
        except Exception as exc:
            return self._method_raised(request, exc)
        return self._method_returned(result)

    # -------------------------------------------------------------------------------- receiving

    async def c2d(self) -> AsyncIterator[Message]:
        """Cloud-to-device messages (input messages for a module), in arrival order, for ever:
        ``async for message in device.c2d(): …`` (break out, or cancel the task, to stop)."""
        self._queues_outside()
        assert self._messages is not None
        while True:
            yield await self._messages.get()

    def desired(self) -> AsyncIterator[Dict[str, Any]]:
        """Desired-property patches in ``$version`` order (each carries ``"$version"``), for ever.

        The first one is the whole desired document (read now if connected, else right after the next
        connect), unless it holds no properties yet; after a reconnect, what changed while offline
        arrives as one patch.
        """
        first = not self._want_desired
        self._want_desired = True
        if first and self._connected.is_set() and self._twin_inbox is not None:
            self._twin_inbox.put_nowait(("resync", 0, b""))
        return self._desired_iter()

    async def _desired_iter(self) -> AsyncIterator[Dict[str, Any]]:
        self._queues_outside()
        assert self._desired_out is not None
        while True:
            yield await self._desired_out.get()

    def _queues_outside(self) -> None:
        if self._messages is None:
            self._messages = asyncio.Queue()
            self._desired_out = asyncio.Queue()

    async def _twin_worker(self) -> None:
        """Desired patches and twin re-reads, one at a time in arrival order (the sync Device's twin thread)."""
        assert self._twin_inbox is not None and self._desired_out is not None
        while True:
            kind, version, payload = await self._twin_inbox.get()
            if kind == "resync":
                await self._resync_twin()
                continue
            patch = self._desired_patch(version, payload)
            if patch is not None:
                self._desired_out.put_nowait(patch)

    async def _resync_twin(self) -> None:
        attempt = 0
        while self._connected.is_set() and not self._stopping.is_set():
            try:
                twin = await self.get_twin(self._twin_timeout)
                break
            except (OperationTimeout, ServiceError) as exc:
                delay = self._resync_delay(exc, attempt)
                attempt += 1
                if delay is None:
                    return
                await asyncio.sleep(delay)
        else:
            return
        missed = self._missed_desired(twin)
        if missed is not None and self._desired_out is not None:
            self._desired_out.put_nowait(missed[0])

    # ------------------------------------------------------------------------- certificate renewal

    async def replace_context(self, ssl_context: ssl.SSLContext, timeout: float = 30.0, *,
                              certificate: Any = None) -> None:
        """Reconnect with ``ssl_context`` (a renewed certificate, perhaps a new key) and keep it, as
        :meth:`lightclient.device.Device.replace_context` does.

        Telemetry sent meanwhile stays queued (in memory or the outbox) and unacknowledged messages are
        resent; the twin is read again (for :meth:`desired`) as after any reconnect; twin requests waiting
        at that moment fail with :class:`OperationTimeout`. If the new context cannot connect within
        ``timeout`` s, the Device connects with the old one again and the error is raised: the old
        credential keeps working. On success ``on_certificate_renewed(certificate)`` (a function or a
        coroutine function) runs on the loop. A Device that is not started just takes the context for its
        next :meth:`connect`. Cancelling the await does not stop a swap under way: it completes (or goes
        back to the old context) as if nobody had waited. Method handlers running meanwhile (a handler may
        await this itself) carry on and answer on the new connection.
        """
        check_context(ssl_context, "the renewed certificate")
        if not self._running:
            self._use_context(ssl_context)
            return
        # Shielded: a cancelled caller (or a Renewer thread that stopped waiting) must not leave the
        # Device disconnected halfway through the swap.
        await asyncio.shield(asyncio.ensure_future(self._swap(ssl_context, timeout, certificate)))

    async def _swap(self, ssl_context: ssl.SSLContext, timeout: float, certificate: Any) -> None:
        # Not disconnect(): that waits for the running method handlers, and this may run for one of them
        # (awaiting replace_context(), or a Renewer it called), which would then wait for itself.
        old = self._ssl_context
        self._swapping = True
        try:
            if self._connected.is_set():
                await self._drain(time.monotonic() + min(timeout, 5.0))
            await self._teardown()
            self._use_context(ssl_context)
            try:
                await self.connect(timeout)
            except LightClientError:
                log.error("could not connect with the renewed certificate; going back to the old one")
                self._use_context(old)
                await self.connect(timeout)
                raise
        finally:
            self._swapping = False
            if not self._running:  # not even the old context connected again: the Device is stopped
                self._stop_methods()
        if certificate is not None:
            self._spawn(self._call_user("on_certificate_renewed", self.on_certificate_renewed, certificate))

    async def request_certificate(self, csr_der: bytes, *, replace: Optional[str] = None,
                                  timeout: float = 120.0) -> Any:
        """Ask the hub for a certificate for ``csr_der`` over ``$iothub/credentials`` (preview), as
        :meth:`lightclient.device.Device.request_certificate`: returns the
        :class:`~lightclient.topics.CredentialsAnswer` (``certificates``: the chain, DER, leaf first);
        :class:`~lightclient.exceptions.RenewalError` for an error status, :class:`OperationTimeout`
        after ``timeout`` s. The chain takes effect through :meth:`replace_context`.

        The shared (blocking) credentials channel waits on a worker thread; its paho calls are made on
        the loop. Cancelling the await stops nobody: the request runs out on its thread.
        """
        loop = asyncio.get_running_loop()
        self._bind(loop)
        channel = self._credentials_channel(_PahoOnLoop(self))
        return await loop.run_in_executor(None, functools.partial(channel.request, csr_der, replace=replace,
                                                                  timeout=timeout))

    def _bind(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is None:
            self._loop, self._loop_thread = loop, threading.get_ident()

    def _call_on_loop(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` on the loop, from any thread, and its result; :class:`OperationTimeout`
        naming ``what`` if the loop does not run it soon (blocked, or no longer running)."""
        if threading.get_ident() == self._loop_thread:
            return fn(*args, **kwargs)
        assert self._loop is not None
        future: "concurrent.futures.Future[Any]" = concurrent.futures.Future()

        def run() -> None:
            if not future.set_running_or_notify_cancel():
                return  # the caller gave up on it: it must not run late
            try:
                future.set_result(fn(*args, **kwargs))
            except BaseException as exc:
                future.set_exception(exc)

        late = (f"the Device's event loop did not run {what} within {_LOOP_CALL_TIMEOUT:g} s: the loop is blocked "
                "or no longer running; keep blocking calls off the loop and keep it running while the Device is "
                "in use")
        try:
            self._loop.call_soon_threadsafe(run)
        except RuntimeError:  # the loop is closed
            raise OperationTimeout(late) from None
        try:
            return future.result(_LOOP_CALL_TIMEOUT)
        except concurrent.futures.TimeoutError:  # on Python < 3.11 not the builtin TimeoutError
            if future.cancel():
                raise OperationTimeout(late) from None
        return future.result()  # it had just started: a short paho call, its result follows at once

    # ------------------------------------------------------------------------------------ upload

    async def upload_file(self, path_or_fileobj: Any, blob_name: str,
                          progress: Optional[Callable[[int, int], Any]] = None, **options: Any) -> Any:
        """Upload a file to the hub's linked storage as ``blob_name``, as
        :meth:`lightclient.device.Device.upload_file` (HTTPS with this device's key, no MQTT connection
        needed; ``options`` as :func:`lightclient.upload.upload_file`); returns its
        :class:`~lightclient.upload.UploadResult`.

        The blocking upload runs on a worker thread, so the loop (and the MQTT connection) carries on;
        ``progress(sent, total)`` is called on the loop. Cancelling the await does not stop the upload
        already under way: it finishes (or fails) on its thread, bounded by ``timeout`` (default 1 h).
        """
        from . import upload

        if self.identity.module_id:
            raise ConfigError("file upload is for device identities: IoT Hub offers it to no module")
        if progress is not None and not callable(progress):
            raise ConfigError("progress must be a callable progress(sent_bytes, total_bytes)")
        loop = asyncio.get_running_loop()
        on_loop = None if progress is None else (
            lambda sent, total: loop.call_soon_threadsafe(progress, sent, total))
        options.setdefault("endpoint", self.host)
        options.setdefault("sas", self._sas)  # a symmetric-key device: its SAS token authenticates to the hub
        job = functools.partial(upload.upload_file, path_or_fileobj, blob_name, device_id=self.identity.device_id,
                                ssl_context=self._ssl_context, progress=on_loop, **options)
        # The progress calls are queued on the loop before the result is, so all have run when this returns.
        return await loop.run_in_executor(None, job)

    # ------------------------------------------------------------------------------------- twin

    async def get_twin(self, timeout: Optional[float] = None) -> Dict[str, Any]:
        """The whole twin; retries and errors as :meth:`lightclient.device.Device.get_twin`."""
        _, payload = await self._twin_request(
            "GET", lambda rid: lcpaho.request_twin(self._client, rid=rid), timeout)
        return self._twin_document(payload)

    async def patch_reported(self, patch: Dict[str, Any], timeout: Optional[float] = None) -> Optional[int]:
        """Update reported properties (``None`` deletes a key); return the new reported ``$version``."""
        body = self._reported_body(patch)
        record, _ = await self._twin_request(
            "reported PATCH", lambda rid: lcpaho.patch_reported(self._client, body, rid=rid), timeout)
        return record.version

    async def _twin_request(self, what: str, publish: Callable[[str], Any],
                            timeout: Optional[float]) -> Tuple[TwinResponse, bytes]:
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                    or timeout <= 0):
            raise ConfigError(f"timeout must be a positive number of seconds, not {timeout!r}")
        loop = asyncio.get_running_loop()
        self._bind(loop)
        if self._twin_pool is None:
            self._twin_pool = concurrent.futures.ThreadPoolExecutor(
                _TWIN_WORKERS, thread_name_prefix=f"{self._threads}-twin")
        # TwinRequests waits on a pool thread; the publish itself happens on the loop, like all paho calls.
        return await loop.run_in_executor(
            self._twin_pool, self._twin_requests.request, what,
            functools.partial(self._call_on_loop, f"the twin {what} request's publish", publish),
            lcpaho.new_rid(), self._twin_timeout if timeout is None else float(timeout))


class _PahoOnLoop:
    """The paho client as the shared, blocking credentials channel sees it: the calls it makes from a
    worker thread (subscribe, publish) run on the loop, where every paho call of this Device happens."""

    def __init__(self, device: Device):
        self._device = device

    def message_callback_add(self, *args: Any) -> None:
        self._device._call_on_loop("the certificate request's callback registration",
                                   self._device._client.message_callback_add, *args)

    def subscribe(self, *args: Any, **kwargs: Any) -> Any:
        return self._device._call_on_loop("the certificate request's subscribe to $iothub/credentials",
                                          self._device._client.subscribe, *args, **kwargs)

    def publish(self, *args: Any, **kwargs: Any) -> Any:
        return self._device._call_on_loop("the certificate request's publish", self._device._client.publish,
                                          *args, **kwargs)


class _FromThread:
    """A blocking face of an aio :class:`Device` for code on another thread: what
    :class:`lightclient.renewal.Renewer` drives (its worker thread, and ``connect_device`` run off the loop),
    so the renewal itself (token, DPS, files) is the very code the sync Device uses. Each call runs as a
    coroutine on the Device's loop while the calling thread waits for it."""

    def __init__(self, device: Device, loop: asyncio.AbstractEventLoop):
        self.device = device
        self._loop = loop

    @property
    def is_connected(self) -> bool:
        return self.device.is_connected

    def _run(self, coro: Any, timeout: float) -> Any:
        try:
            running: Optional[asyncio.AbstractEventLoop] = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            coro.close()
            raise ConfigError("a renewal step blocks until the Device's event loop has done it, so it cannot run "
                              "on that loop: call it from another thread, e.g. "
                              "await asyncio.to_thread(renewer.renew)")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise OperationTimeout(f"the Device's event loop did not finish the call within {timeout:g} s") from None

    def connect(self, timeout: float = 30.0) -> None:
        self._run(self.device.connect(timeout), timeout + _LOOP_CALL_TIMEOUT)

    def close(self, timeout: float = 5.0) -> None:
        self._run(self.device.close(timeout), timeout + _LOOP_CALL_TIMEOUT)

    def replace_context(self, ssl_context: ssl.SSLContext, timeout: float = 30.0, *, certificate: Any = None) -> None:
        # Up to two connects (the new context, then the old one again) and a disconnect.
        self._run(self.device.replace_context(ssl_context, timeout, certificate=certificate),
                  2 * timeout + 5.0 + _LOOP_CALL_TIMEOUT)

    def request_certificate(self, csr_der: bytes, *, replace: Optional[str] = None, timeout: float = 120.0) -> Any:
        return self._run(self.device.request_certificate(csr_der, replace=replace, timeout=timeout),
                         timeout + _LOOP_CALL_TIMEOUT)


def for_renewer(device: Any) -> Any:
    """What :meth:`lightclient.renewal.Renewer.attach` keeps: for an aio :class:`Device`, its blocking face
    bound to the loop it runs on (attach it on that loop, or after connecting it); anything else as it is."""
    if not isinstance(device, Device):
        return device
    loop = device._loop
    if loop is None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise ConfigError("attach a lightclient.aio.Device to a Renewer from a coroutine on its event loop "
                              "(or once it is connected)") from None
    return _FromThread(device, loop)


async def connect_for_renewer(renewer: Any, device_factory: Callable[[ssl.SSLContext], Device],
                              timeout: float = 30.0) -> Device:
    """:meth:`lightclient.renewal.Renewer.connect_device` for an aio :class:`Device` (see
    :meth:`~lightclient.renewal.Renewer.connect_device_async`): the same steps on a worker thread, with the
    Device's connects (and the close of a renewed certificate that does not connect) on this loop."""
    loop = asyncio.get_running_loop()

    def factory(ssl_context: ssl.SSLContext) -> _FromThread:
        device = device_factory(ssl_context)
        if not isinstance(device, Device):
            raise ConfigError("connect_device_async() needs a factory that returns a lightclient.aio.Device, not "
                              f"{type(device).__name__}; use connect_device() for the sync Device")
        return _FromThread(device, loop)

    view = await loop.run_in_executor(None, renewer.connect_device, factory, timeout)
    return view.device


__all__ = ["AsyncSendHandle", "ConnectRefusedError", "Device", "Message", "MessageDroppedError",
           "MethodResponse", "QueueFullError"]
