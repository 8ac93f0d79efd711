"""What :class:`lightclient.device.Device` and :class:`lightclient.aio.Device` share: one home for it.

:class:`DeviceCore` is their base class. It checks the constructor's options, builds and routes the
private paho client, owns the telemetry pipeline, the twin request tracker, the method-handler registry
and the credentials channel, and holds every decision that does not depend on *how* a Device waits:
what a refused CONNACK means, what a method answer is, how a twin body is read, which desired patch is
new, how a reconnect failure is reported, how a certificate context is swapped. The two subclasses add
only the waiting: threads and events (sync) or the event loop (asyncio).

The paho callbacks defined here run where each Device runs paho (its network thread, or the loop); the
hooks they call (:meth:`DeviceCore._refused_at_first`, :meth:`DeviceCore._online`) are the subclass's.
"""
from __future__ import annotations

import json
import logging
import os
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

from . import _sas_session, _transport
from . import paho as lcpaho
from . import topics
from ._pipeline import MessageMaker, Pipeline, SendHandle, queue_settings
from ._twin import DesiredState, TwinRequests
from ._verify import permanent_tls_error
from .backoff import Backoff
from .exceptions import ConfigError, ConnectRefusedError, OperationTimeout, ProxyError, ServiceError
from .identity import Identity
from .outbox import Outbox
from .topics import MethodRequest, TwinResponse

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


MethodResponse.__module__ = "lightclient.device"   # its public home (and the name users import)

MethodHandler = Callable[[Any], Any]


class DeviceCore:
    """The parts of a Device that do not depend on how it waits (see the module docstring)."""

    _log = log

    def __init__(self, identity: Identity, ssl_context: ssl.SSLContext, *, host: Optional[str], port: int,
                 keepalive: int, max_inflight: int, clean_session: bool, backoff: Optional[Backoff],
                 method_workers: int, twin_timeout: float, api_version: str, client_type: Optional[str],
                 max_queue: Optional[int], max_queue_bytes: Optional[int], full_policy: Optional[str],
                 outbox: Union[None, str, "os.PathLike[str]", Outbox], on_connection_state: Any,
                 transport: str, websocket_port: int, proxy: Any, gateway_hostname: Optional[str],
                 transport_cache: Union[None, str, "os.PathLike[str]"], sas: Any):
        if not isinstance(identity, Identity):
            raise ConfigError(f"identity must be a lightclient Identity, not {type(identity).__name__}")
        check_context(ssl_context, "the device key")
        _sas_session.check(sas)
        #: SAS authentication (a lightclient.symkey.SasCredential): the password of every CONNECT, renewed
        #: by reconnecting after 80 % of the token's lifetime (see lightclient._sas_session).
        self._sas = sas
        self._username = identity.username(api_version, client_type)
        check_int("keepalive", keepalive, 1, MAX_KEEPALIVE,
                  f"IoT Hub drops a connection idle for more than 1767 s (1.5 x keep-alive), so at most "
                  f"{MAX_KEEPALIVE} s works; 60 is the default")
        check_int("port", port, 1, 65535, "IoT Hub listens on 8883 (MQTT over TLS)")
        check_int("websocket_port", websocket_port, 1, 65535, "IoT Hub serves MQTT over WebSockets on 443")
        transport = _transport.check_transport(transport)
        checked_proxy = _transport.check_proxy(proxy)
        if gateway_hostname is not None:
            if not isinstance(gateway_hostname, str) or not gateway_hostname.strip():
                raise ConfigError(f"gateway_hostname must be the gateway's host name, not {gateway_hostname!r}")
            if host is not None:
                raise ConfigError("give host= or gateway_hostname=, not both: both name the server to connect to")
            host = gateway_hostname.strip()
        memory = _transport.TransportMemory(transport_cache)
        check_int("max_inflight", max_inflight, 1, 65535, "paho needs at least one message in flight")
        check_int("method_workers", method_workers, 1, 1024, "give the number of concurrent method handlers")
        if isinstance(twin_timeout, bool) or not isinstance(twin_timeout, (int, float)) or twin_timeout <= 0:
            raise ConfigError(f"twin_timeout must be a positive number of seconds, not {twin_timeout!r}")
        if backoff is not None and not isinstance(backoff, Backoff):
            raise ConfigError(f"backoff must be a lightclient.backoff.Backoff, not {type(backoff).__name__}")
        # Last among the checks: it may open the outbox file.
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
        self.on_connection_state = on_connection_state
        #: ``on_certificate_renewed(certificate)``: after :meth:`replace_context` connected with a renewed
        #: certificate (``certificate`` is what the renewer passed, e.g. a lightclient.renewal.Validity).
        self.on_certificate_renewed: Optional[Callable[[Any], Any]] = None
        self._credentials: Any = None              # lightclient._credentials.CredentialsChannel, on first use
        self._backoff = backoff or Backoff()
        self._twin_timeout = float(twin_timeout)
        self._method_workers = method_workers
        self._methods: Dict[str, MethodHandler] = {}
        self._threads = f"lightclient-{identity.client_id}"
        self._ssl_context = ssl_context

        client = lcpaho.new_client(identity, ssl_context=ssl_context, clean_session=clean_session,
                                   api_version=api_version, client_type=client_type,
                                   transport=transport, proxy=checked_proxy)
        if checked_proxy is None:
            _transport.install_socket_factory(client, None)  # paho must not pick a proxy from the environment
        client.max_inflight_messages_set(max_inflight)
        # A bug in a lightclient callback must not kill the network thread (or the loop): log it, carry on.
        client.suppress_exceptions = True
        client.enable_logger(paho_log)
        client.on_pre_connect = self._on_pre_connect
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        lcpaho.route(client, identity,
                     on_c2d=None if identity.is_module else self._got_message,
                     on_input=self._got_message if identity.is_module else None,
                     on_method=self._got_method, on_twin_response=self._got_twin_response,
                     on_desired=self._got_desired)
        self._client = client
        self._subscriptions = lcpaho.subscriptions(identity)

        self._running = False
        self._stopping = threading.Event()         # shared with TwinRequests
        self._connected = threading.Event()        # shared with TwinRequests and the credentials channel
        self._sub_mid: Optional[int] = None
        self._attempt = 0                          # reconnect failures in a row
        self._refused: Optional[int] = None        # return code of the last refused CONNACK
        self._twin_requests = TwinRequests(self._backoff, self._connected, self._stopping)
        self._desired_state = DesiredState()

        self._acks = Pipeline(client, max_inflight, max_queue, max_queue_bytes, full_policy, outbox)
        self._maker = MessageMaker(identity, self._acks)
        try:
            #: Handles of the messages an earlier run left in the outbox (sent first, in order, once connected).
            self.recovered = [self._handle(h) for h in self._acks.load(outbox.pending())] if outbox is not None \
                else []
        except BaseException:
            self._close_outbox()
            raise

    @staticmethod
    def _handle(handle: SendHandle) -> Any:
        """What :meth:`send` gives the caller for ``handle`` (the asyncio Device wraps it)."""
        return handle

    # ---------------------------------------------------------------------------------- lifecycle

    @property
    def is_connected(self) -> bool:
        """True while the hub has accepted the connection and the subscriptions."""
        return self._connected.is_set()

    @property
    def queued(self) -> int:
        """Telemetry messages accepted by :meth:`send` (or recovered from the outbox) and not yet acknowledged."""
        with self._acks.lock:
            return self._acks.count

    def _close_outbox(self) -> None:
        if self._own_outbox and self.outbox is not None:
            self.outbox.close()

    def _opened(self, used: str) -> None:
        """The first connect reached the server over transport ``used``."""
        self._transport_used = used
        self.port = self.websocket_port if used == _transport.WEBSOCKETS else self._tcp_port

    def _first_retry(self, exc: OSError, attempt: int, deadline: float, timeout: float) -> float:
        """Seconds to wait after a failed first connect, or the error to raise (see first_connect_retry)."""
        self.port = self._client.port or self.port
        return first_connect_retry(exc, self.host, self.port, self._ssl_context, self._backoff, attempt,
                                   deadline, timeout)

    def _connect_timeout(self, timeout: float) -> OperationTimeout:
        refused = self._refused
        why = (f"the last CONNACK was {refused} ({_CONNACK_TEXT.get(refused, '?')})" if refused
               else "check that it is an IoT Hub (or MQTT broker) endpoint")
        return OperationTimeout(f"{self.host}:{self.port} accepted the TLS connection but MQTT CONNECT and "
                                f"SUBSCRIBE did not complete within {timeout} s; {why}")

    def _next_backoff(self) -> float:
        delay = self._backoff.delay(self._attempt, not_authorized=self._refused in _NOT_AUTHORIZED)
        self._attempt += 1
        return delay

    def _reconnect_failed(self, error: Optional[BaseException], delay: Optional[float]) -> None:
        then = "" if delay is None else f"; next attempt in {delay:.1f} s"
        if isinstance(error, OSError):
            permanent = permanent_tls_error(error, self.host, self.port, self._ssl_context)
            if permanent is not None:  # retried all the same: the server side may be fixed meanwhile
                self._log.error("reconnecting to %s:%d failed: %s%s", self.host, self.port, permanent, then)
                return
            self._log.info("reconnecting to %s:%d failed (%s)%s", self.host, self.port, error, then)
        else:
            self._log.info("reconnecting to %s:%d failed%s", self.host, self.port, then)

    def _settle(self) -> None:
        """After a disconnect: acknowledged rows leave the outbox, twin requests stop waiting."""
        if self.outbox is not None:
            try:
                self.outbox.flush()
            except Exception:  # the rows are deleted on the next write, or sent again: never lost
                self._log.warning("could not delete acknowledged messages from the outbox yet", exc_info=True)
        self._twin_requests.fail_all(OperationTimeout("the device was disconnected before the hub answered"))

    # ------------------------------------------------------------------- paho callbacks

    def _on_pre_connect(self, client: Any, userdata: Any) -> None:
        # Runs inside paho's connect()/reconnect(): on the aio Device's connect thread, so signing a SAS token
        # with a key in a token never blocks the loop; on the sync Device's network thread after a drop, but on
        # the caller's thread for the first connect (which blocks until connected anyway).
        if self._sas is not None:
            _sas_session.apply(client, self._username, self._sas)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        if reason.is_failure:
            code = _CONNACK_RC.get(reason.value, reason.value)
            self._refused = code
            text = _CONNACK_TEXT.get(code, str(reason))
            self._log.warning("%s:%d refused the connection: CONNACK %s (%s)", self.host, self.port, code, text)
            if code not in ConnectRefusedError.RETRYABLE_CODES:
                hint = ("check that the device is registered and enabled in the hub, and that its certificate "
                        "(CN = device id) or CA is registered" if code in _NOT_AUTHORIZED
                        else "check the identity and api_version")
                if self._sas is not None and code in _NOT_AUTHORIZED:
                    hint = ("check that the device is registered with this symmetric key, and the clock "
                            "(SAS tokens carry their expiry)")
                self._refused_at_first(ConnectRefusedError(
                    f"{self.host} refused {self.identity.client_id!r}: CONNACK {code} ({text}); {hint}", code))
            return
        self._refused = None
        self._attempt = 0
        # Subscribe on every connect, even when the hub says the session is present: after a hub
        # fail-over a "present" session can still lack subscriptions, and subscribing twice is harmless.
        _, self._sub_mid = client.subscribe(self._subscriptions)

    def _refused_at_first(self, error: ConnectRefusedError) -> None:
        """A refusal no retry cures: the first connect (if still waiting) raises ``error``."""
        raise NotImplementedError

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reason_codes: Any, properties: Any) -> None:
        if mid != self._sub_mid:
            if self._credentials is not None:
                self._credentials.suback(mid)
            return
        refused = [sub for (sub, _), rc in zip(self._subscriptions, reason_codes) if rc.is_failure]
        if refused:
            self._log.error("the hub refused the subscriptions %s; those messages will not arrive", refused)
        # Twin requests sent on the old connection lost their answers (QoS 0): wake them to ask again.
        # This must happen before connect() can return (_online), or a request the caller makes right
        # after connect() would be taken for an old one and sent twice.
        self._twin_requests.resend_all()
        self._connected.set()
        self._log.info("connected to %s:%d (%s) as %s", self.host, self.port,
                       self._transport_used or self.transport, self.identity.client_id)
        self._acks.set_online(True)
        self._online()

    def _online(self) -> None:
        """Connected and subscribed: wake connect(), tell the application, re-read the twin."""
        raise NotImplementedError

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason: Any, properties: Any) -> None:
        raise NotImplementedError

    def _went_offline(self) -> bool:
        """Whether the connection that just ended had been up (connected and subscribed)."""
        was_connected = self._connected.is_set()
        self._connected.clear()
        self._acks.set_online(False)
        return was_connected

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, properties: Any) -> None:
        self._acks.acked(mid)

    def _got_message(self, record: Any, payload: bytes) -> None:
        raise NotImplementedError

    def _got_method(self, request: MethodRequest, payload: bytes) -> None:
        raise NotImplementedError

    def _got_desired(self, patch: Any, payload: bytes) -> None:
        raise NotImplementedError

    def _got_twin_response(self, response: TwinResponse, payload: bytes) -> None:
        self._twin_requests.answered(response, payload)

    # ----------------------------------------------------------------------------------- telemetry

    def _put_many(self, payloads: Iterable[Any], properties: Optional[topics.Properties],
                  system_properties: Dict[str, Any]) -> List[SendHandle]:
        if "message_id" in system_properties:
            raise ConfigError("send_many() gives every message its own fresh message_id ($.mid): drop message_id=, "
                              "or call send(payload, message_id=...) for each message to choose the ids")
        if isinstance(payloads, (bytes, str, bytearray, memoryview)):
            raise ConfigError("send_many() takes a list of payloads, not one payload: send_many([payload]) or "
                              "send(payload)")
        make = self._maker.message
        return self._acks.put_many([make(payload, properties, system_properties) for payload in payloads])

    # ---------------------------------------------------------------------------------- methods

    def add_method_handler(self, name: str, handler: MethodHandler) -> None:
        """Answer direct method ``name`` with ``handler(payload)``; see the class docstring for statuses.

        IoT Plug and Play component commands arrive as ``"{component}*{command}"``. On a
        :class:`lightclient.aio.Device` the handler may also be a coroutine function.
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

    def _method_call(self, request: MethodRequest, payload: bytes) -> Tuple[Optional[MethodHandler], Any]:
        """``(handler, argument)`` for ``request``, or ``(None, (status, body))`` when the answer needs no
        handler: 404 for an unknown method, 400 for a payload that is not JSON."""
        handler = self._methods.get(request.name)
        if handler is None:
            return None, (404, {"error": f"no handler for method {request.name!r} on this device"})
        try:
            return handler, (_json(payload) if payload.strip() else None)
        except ValueError:
            return None, (400, {"error": "the method payload is not valid JSON"})

    def _method_raised(self, request: MethodRequest, exc: Exception) -> Tuple[int, Any]:
        # The text stays in the local log: it may hold details the cloud should not see.
        self._log.exception("the handler of method %r raised", request.name)
        return 500, {"error": f"handler raised {type(exc).__name__}"}

    @staticmethod
    def _method_returned(result: Any) -> Tuple[int, Any]:
        if isinstance(result, MethodResponse):
            return result.status, result.payload
        return 200, result

    def _answer_method(self, request: MethodRequest, status: int, body: Any) -> None:
        try:
            encoded = lcpaho.json_body(body)
        except ConfigError:
            self._log.error("method %r returned a value that is not JSON-serialisable; answering 500", request.name)
            status, encoded = 500, lcpaho.json_body({"error": "the method result is not JSON-serialisable"})
        lcpaho.answer_method(self._client, request, status, encoded)

    # ------------------------------------------------------------------------------------- twin

    @staticmethod
    def _twin_document(payload: bytes) -> Dict[str, Any]:
        try:
            twin = _json(payload)
        except ValueError:
            raise ServiceError("the hub answered the twin GET with a body that is not JSON", 200) from None
        if not isinstance(twin, dict):
            raise ServiceError("the hub answered the twin GET with JSON that is not an object", 200)
        return twin

    @staticmethod
    def _reported_body(patch: Dict[str, Any]) -> bytes:
        if not isinstance(patch, dict):
            raise ConfigError(f"a reported patch is a dict (a JSON object), not {type(patch).__name__}")
        return lcpaho.json_body(patch)  # fail here, not on the network thread, if it is not JSON

    def _desired_patch(self, version: int, payload: bytes) -> Optional[Dict[str, Any]]:
        """The desired patch ``$version`` ``version`` to hand over, or None: not a JSON object, or old."""
        try:
            patch = _json(payload)
        except ValueError:
            self._log.warning("dropped desired patch $version=%d: the body is not JSON", version)
            return None
        if not isinstance(patch, dict):
            self._log.warning("dropped desired patch $version=%d: the body is not a JSON object", version)
            return None
        if not self._desired_state.apply(patch, version):
            self._log.debug("dropped desired patch $version=%d: already at %s", version, self._desired_state.version)
            return None
        return patch

    def _resync_delay(self, exc: Exception, attempt: int) -> Optional[float]:
        """After a failed twin re-read: seconds until the next try, or None to give up (a final error)."""
        if isinstance(exc, ServiceError) and not exc.retryable:
            self._log.error("re-reading the twin after connecting failed: %s", exc)
            return None
        delay = self._backoff.delay(attempt)
        self._log.warning("re-reading the twin after connecting failed (%s); retrying in %.1f s", exc, delay)
        return delay

    def _missed_desired(self, twin: Any) -> Optional[Tuple[Dict[str, Any], int]]:
        """What changed in the desired properties while offline, from a twin re-read (see DesiredState)."""
        desired = twin.get("desired") if isinstance(twin, dict) else None
        if not isinstance(desired, dict):
            self._log.warning("the twin has no desired section; nothing to reconcile")
            return None
        return self._desired_state.reconcile(desired)

    # ------------------------------------------------------------------------- certificate renewal

    def _use_context(self, ssl_context: ssl.SSLContext) -> None:
        # paho allows tls_set_context() once per client; its next connect wraps the socket with
        # _ssl_context, so setting that (while disconnected) is the whole swap.
        self._ssl_context = ssl_context
        self._client._ssl_context = ssl_context

    def _credentials_channel(self, client: Any) -> Any:
        """The one credentials channel (made on first use), publishing and subscribing through ``client``."""
        if self._credentials is None:
            from ._credentials import CredentialsChannel

            self._credentials = CredentialsChannel(client, self.identity.device_id, self._subscriptions,
                                                   self._connected)
        return self._credentials


def check_context(ssl_context: Any, holding: str) -> None:
    if not isinstance(ssl_context, ssl.SSLContext):
        raise ConfigError(f"ssl_context must be an ssl.SSLContext with {holding}, e.g. from "
                          f"lightclient.tls.client_context(), not {type(ssl_context).__name__}")


def check_int(name: str, value: Any, low: int, high: int, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{name} must be an int from {low} to {high}, not {value!r}: {hint}")


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

    Shared by :class:`lightclient.device.Device` and :class:`lightclient.aio.Device`, which differ only in
    how they wait.
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
