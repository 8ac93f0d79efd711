"""Level 2: IoT Hub on a paho-mqtt client that you own.

For applications that already have a paho client (their own loop, callbacks, other brokers' habits) and
want IoT Hub in a few lines, without handing the client over. Nothing here takes ``on_connect`` or
``on_message``: :func:`route` uses paho's ``message_callback_add`` for IoT Hub's filters only, so the
application's own callbacks keep firing for everything else::

    client = lightclient.paho.new_client(identity, ssl_context=ctx)     # or configure(your_client, …)
    client.on_connect = lambda c, *a: c.subscribe(lightclient.paho.subscriptions(identity))
    lightclient.paho.route(client, identity, on_method=handle_method, on_desired=handle_desired)
    client.connect(identity.hostname, 8883)
    client.loop_start()

What goes on the wire (device ``d1`` on ``hub.azure-devices.net``)::

    CONNECT    client id  d1          (module: d1/m1)
               username   hub.azure-devices.net/d1/?api-version=2021-04-12&DeviceClientType=lightclient%2F0.1.0
               password   none (X.509: the certificate in the TLS handshake is the credential)
    SUBSCRIBE  devices/d1/messages/devicebound/# (QoS 1)   or, for a module, devices/d1/modules/m1/# (QoS 1)
               $iothub/methods/POST/# (QoS 0)
               $iothub/twin/res/# (QoS 0)
               $iothub/twin/PATCH/properties/desired/# (QoS 1)
    PUBLISH    $iothub/methods/res/200/?$rid=7        answer_method(client, request, 200, {"ok": true})
               $iothub/twin/GET/?$rid=5f2a9c-1        request_twin(client)          (empty body)
               $iothub/twin/PATCH/properties/reported/?$rid=5f2a9c-2  patch_reported(client, {"fw": "1.2"})

Callbacks given to :func:`route` run on paho's network thread, like any paho callback, and receive the
typed record from :func:`lightclient.topics.parse` and the raw payload bytes.

Behind a firewall that blocks 8883, or through a proxy: ``configure(client, identity, ssl_context=ctx,
transport="websockets", proxy="http://proxy:3128")`` and ``connect(client, host, transport=...)``, which
for ``transport="auto"`` tries 8883 and falls back to WebSockets on 443 (see :func:`connect`).
"""
from __future__ import annotations

import itertools
import json
import logging
import secrets
import ssl
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple

import paho.mqtt.client as mqtt

from . import _transport, topics
from .exceptions import ConfigError, ProtocolError
from .identity import API_VERSION, Identity
from .topics import C2DMessage, DesiredPatch, InputMessage, MethodRequest, Record, RequestId, TwinResponse

log = logging.getLogger("lightclient.paho")

# QoS per filter. C2D, module input and desired patches are state the hub will not send twice, so they
# are taken with QoS 1. Method calls and twin responses answer a pending request that times out on its
# own; QoS 1 would only add a PUBACK per message (the hub grants at most QoS 1 anyway).
_QOS_MESSAGES = 1
_QOS_REQUESTS = 0
_QOS_DESIRED = 1

# Keyword arguments of paho's Client that new_client() fixes, because IoT Hub dictates them.
_FIXED_CLIENT_ARGS = ("callback_api_version", "client_id", "protocol")


def new_client(identity: Identity, *, ssl_context: Optional[ssl.SSLContext] = None, clean_session: bool = False,
               api_version: str = API_VERSION, client_type: Optional[str] = None, transport: str = "tcp",
               proxy: Any = None, **kwargs: Any) -> mqtt.Client:
    """A paho 2.x client set up for ``identity``: callback API version 2, MQTT 3.1.1, the IoT Hub client id
    and username, and TLS with ``ssl_context`` (typically :func:`lightclient.tls.client_context`).

    ``clean_session=False`` (what the Azure SDKs use) keeps subscriptions and queued cloud-to-device
    messages across reconnects. Other keyword arguments go to ``paho.mqtt.client.Client`` (e.g.
    ``userdata=``, ``manual_ack=``). Without ``ssl_context`` call ``client.tls_set_context()`` yourself.
    ``transport`` and ``proxy`` as for :func:`configure`.
    """
    if not isinstance(identity, Identity):
        raise ConfigError(f"identity must be a lightclient Identity, not {type(identity).__name__}")
    fixed = sorted(k for k in kwargs if k in _FIXED_CLIENT_ARGS)
    if fixed:
        raise ConfigError(f"new_client() sets {', '.join(fixed)} itself (IoT Hub requires them); drop the argument")
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=identity.client_id,
                         clean_session=clean_session, protocol=mqtt.MQTTv311, **kwargs)
    configure(client, identity, ssl_context=ssl_context, api_version=api_version, client_type=client_type,
              transport=transport, proxy=proxy)
    return client


def configure(client: mqtt.Client, identity: Identity, *, ssl_context: Optional[ssl.SSLContext],
              api_version: str = API_VERSION, client_type: Optional[str] = None, transport: str = "tcp",
              proxy: Any = None) -> None:
    """Set the IoT Hub username (no password: X.509) and TLS on an existing paho client; call before connect.

    The client must have been created with ``client_id=identity.client_id`` and ``protocol=MQTTv311``
    (paho fixes both at construction). ``ssl_context=None`` leaves TLS to the caller.

    ``transport``: ``"tcp"`` (MQTT on 8883, the default), ``"websockets"`` (MQTT over WebSockets: TLS to
    443, ``GET /$iothub/websocket``, subprotocol ``mqtt``) or ``"auto"`` (starts as tcp; :func:`connect`
    falls back to WebSockets). ``proxy``: ``"http://[user:pass@]host:port"`` (HTTP CONNECT) or
    ``"socks5://…"``/``"socks5h://…"`` (a :class:`lightclient.proxy.Proxy` also works), used for every
    connection of this client; ``None`` leaves paho's socket creation as it is.
    """
    if not isinstance(client, mqtt.Client):
        raise ConfigError(f"client must be a paho.mqtt.client.Client, not {type(client).__name__}")
    if not isinstance(identity, Identity):
        raise ConfigError(f"identity must be a lightclient Identity, not {type(identity).__name__}")
    if ssl_context is not None and not isinstance(ssl_context, ssl.SSLContext):
        raise ConfigError(
            f"ssl_context must be an ssl.SSLContext (see lightclient.tls.client_context), not {type(ssl_context).__name__}")
    transport = _transport.check_transport(transport)
    checked_proxy = _transport.check_proxy(proxy)
    client.username_pw_set(identity.username(api_version, client_type), None)
    if ssl_context is not None:
        client.tls_set_context(ssl_context)
    _transport.set_transport(client, _transport.WEBSOCKETS if transport == _transport.WEBSOCKETS else _transport.TCP)
    if checked_proxy is not None:
        _transport.install_socket_factory(client, checked_proxy)


def connect(client: mqtt.Client, host: str, *, transport: str = "tcp", port: int = _transport.MQTT_PORT,
            websocket_port: int = _transport.WEBSOCKET_PORT, keepalive: int = 60,
            memory: Optional[_transport.TransportMemory] = None) -> str:
    """``client.connect()`` over ``transport``; returns the transport that connected (``"tcp"`` or
    ``"websockets"``). ``host`` is the hub, or an IoT Edge gateway (the username stays the hub's).

    ``"auto"`` tries MQTT on ``port`` (8883) first and, if that is refused, reset, unreachable, times out
    (``client.connect_timeout``) or a proxy will not tunnel to it, WebSockets on ``websocket_port`` (443);
    with ``memory`` (a :class:`lightclient._transport.TransportMemory`) it starts with what worked last
    time for ``host`` and records what worked now. Any other failure (TLS, certificate) is raised at once;
    if both fail, the last error is raised.
    """
    transport = _transport.check_transport(transport)
    if transport != _transport.AUTO:
        order = [transport]
    else:
        order = [_transport.TCP, _transport.WEBSOCKETS]
        known = memory.recall(host) if memory is not None else None
        if known == _transport.WEBSOCKETS:
            order.reverse()
    for index, candidate in enumerate(order):
        _transport.set_transport(client, candidate)
        target = websocket_port if candidate == _transport.WEBSOCKETS else port
        try:
            client.connect(host, target, keepalive)
        except OSError as exc:
            last = index == len(order) - 1
            if last or not _transport.blocked(exc):
                raise
            log.info("MQTT over %s to %s:%d failed (%s); trying %s", candidate, host, target, exc, order[index + 1])
            continue
        if transport == _transport.AUTO:
            log.info("transport auto: connected to %s:%d over %s", host, target,
                     "WebSockets" if candidate == _transport.WEBSOCKETS else "TCP (MQTT over TLS)")
            if memory is not None:
                memory.remember(host, candidate)
        return candidate
    raise AssertionError("unreachable")  # the loop returns or raises


def subscriptions(identity: Identity) -> List[Tuple[str, int]]:
    """The ``(filter, qos)`` pairs to subscribe to, e.g. ``client.subscribe(subscriptions(identity))``.

    Four filters: the hub allows five subscriptions per connection, and only these exact strings.
    """
    first = topics.input_filter(identity) if identity.is_module else topics.c2d_filter(identity)
    return [
        (first, _QOS_MESSAGES),
        (topics.METHODS_FILTER, _QOS_REQUESTS),
        (topics.TWIN_RESPONSE_FILTER, _QOS_REQUESTS),
        (topics.DESIRED_PATCH_FILTER, _QOS_DESIRED),
    ]


RecordCallback = Callable[[Any, bytes], None]
ErrorCallback = Callable[[ProtocolError, mqtt.MQTTMessage], None]


@dataclass
class Routes:
    """What :func:`route` installed; :meth:`remove` takes it out again."""

    client: mqtt.Client
    filters: Tuple[str, ...]

    def remove(self) -> None:
        for sub in self.filters:
            self.client.message_callback_remove(sub)


def route(client: mqtt.Client, identity: Identity, *,
          on_c2d: Optional[Callable[[C2DMessage, bytes], None]] = None,
          on_input: Optional[Callable[[InputMessage, bytes], None]] = None,
          on_method: Optional[Callable[[MethodRequest, bytes], None]] = None,
          on_twin_response: Optional[Callable[[TwinResponse, bytes], None]] = None,
          on_desired: Optional[Callable[[DesiredPatch, bytes], None]] = None,
          on_error: Optional[ErrorCallback] = None) -> Routes:
    """Deliver IoT Hub messages to typed callbacks through ``client.message_callback_add``.

    Each callback is called as ``callback(record, payload)`` on paho's network thread: ``record`` is the
    :mod:`lightclient.topics` record (``C2DMessage`` with decoded properties, ``MethodRequest`` with
    ``name`` and ``rid``, ``TwinResponse`` with ``status``, ``rid`` and ``version``, ``DesiredPatch`` with
    ``version``), ``payload`` the message body as bytes. Only the filters whose callback is given are
    routed; everything else still reaches the client's own ``on_message``. ``on_c2d`` is for devices,
    ``on_input`` for modules.

    A malformed topic in IoT Hub's namespace is handed to ``on_error(error, message)`` (default: logged
    and dropped) instead of raising inside paho's loop.
    """
    if not isinstance(client, mqtt.Client):
        raise ConfigError(f"client must be a paho.mqtt.client.Client, not {type(client).__name__}")
    if on_c2d is not None and identity.is_module:
        raise ConfigError("on_c2d is for device identities; a module receives input messages: pass on_input")
    if on_input is not None and not identity.is_module:
        raise ConfigError("on_input is for module identities; a device receives cloud-to-device messages: pass on_c2d")
    wanted = [
        (topics.c2d_filter, C2DMessage, on_c2d),
        (topics.input_filter, InputMessage, on_input),
        (topics.METHODS_FILTER, MethodRequest, on_method),
        (topics.TWIN_RESPONSE_FILTER, TwinResponse, on_twin_response),
        (topics.DESIRED_PATCH_FILTER, DesiredPatch, on_desired),
    ]
    installed = []
    for sub, kind, callback in wanted:
        if callback is None:
            continue
        if not callable(callback):
            raise ConfigError(f"the callback for {kind.__name__} must be callable, not {type(callback).__name__}")
        sub = sub if isinstance(sub, str) else sub(identity)
        client.message_callback_add(sub, _dispatcher(identity, kind, callback, on_error))
        installed.append(sub)
    return Routes(client, tuple(installed))


def _dispatcher(identity: Identity, kind: type, callback: RecordCallback,
                on_error: Optional[ErrorCallback]) -> Callable[[mqtt.Client, Any, mqtt.MQTTMessage], None]:
    def dispatch(client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            record: Optional[Record] = topics.parse(message.topic, identity)
        except ProtocolError as exc:
            # Raising here would stop paho's loop (suppress_exceptions is off by default); one bad
            # message from the hub must not take the connection down.
            if on_error is not None:
                on_error(exc, message)
            else:
                log.warning("dropped a message on a malformed IoT Hub topic: %s", exc)
            return
        # The module input filter devices/{d}/modules/{m}/# also matches the module's own telemetry
        # topic when a broker echoes it; parse() says None for those.
        if isinstance(record, kind):
            callback(record, message.payload)

    dispatch.__name__ = f"lightclient_route_{kind.__name__}"
    return dispatch


# ------------------------------------------------------------------------------------------ requests

# A random per-process prefix, so a late answer to a request of an earlier run (a persistent session
# can deliver one) never matches a request of this run.
_RID_PREFIX = secrets.token_hex(3)
_rid_counter = itertools.count(1)


def new_rid() -> str:
    """A fresh request id, e.g. ``"5f2a9c-17"``: unique in this process, unreserved characters only."""
    return f"{_RID_PREFIX}-{next(_rid_counter)}"  # next() on itertools.count is atomic under the GIL


def json_body(payload: Any) -> bytes:
    """The body for a method response or reported patch: bytes are sent as given (already JSON), anything
    else as ``json.dumps(payload)`` in UTF-8 (so ``None`` is ``null`` and ``"ok"`` is ``"\\"ok\\""``)."""
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return bytes(payload)
    try:
        return json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"the payload cannot be sent as JSON: {exc}") from None


def answer_method(client: mqtt.Client, request: MethodRequest, status: int, payload: Any = None, *,
                  qos: int = 1) -> mqtt.MQTTMessageInfo:
    """Answer a direct method: publish :func:`json_body` ``(payload)`` on ``$iothub/methods/res/{status}/?$rid={rid}``.

    ``status`` is any integer the service caller should see (200 success, 404 unknown method, 500 …).
    """
    if not isinstance(request, MethodRequest):
        raise ConfigError(f"request must be the MethodRequest being answered, not {type(request).__name__}")
    return client.publish(topics.method_response_topic(status, request.rid), json_body(payload), qos=qos)


def request_twin(client: mqtt.Client, *, rid: Optional[RequestId] = None, qos: int = 1) -> str:
    """Ask for the whole twin: publish an empty body on ``$iothub/twin/GET/?$rid={rid}``; return the rid.

    The answer arrives on ``$iothub/twin/res/200/?$rid={rid}`` with ``{"desired": {…}, "reported": {…}}``
    (route it with ``on_twin_response``).
    """
    rid = new_rid() if rid is None else rid
    client.publish(topics.twin_get_topic(rid), b"", qos=qos)
    return str(rid)


def patch_reported(client: mqtt.Client, patch: Any, *, rid: Optional[RequestId] = None, qos: int = 1) -> str:
    """Update reported properties: publish the JSON ``patch`` on
    ``$iothub/twin/PATCH/properties/reported/?$rid={rid}``; return the rid.

    ``null`` values delete keys. The hub answers ``$iothub/twin/res/204/?$rid={rid}&$version={new version}``.
    """
    if not isinstance(patch, (dict, bytes, bytearray, memoryview)):
        raise ConfigError(f"a reported patch is a JSON object (dict), not {type(patch).__name__}")
    rid = new_rid() if rid is None else rid
    client.publish(topics.twin_patch_reported_topic(rid), json_body(patch), qos=qos)
    return str(rid)


__all__ = [
    "Routes", "answer_method", "configure", "connect", "json_body", "new_client", "new_rid", "patch_reported",
    "request_twin", "route", "subscriptions",
]
