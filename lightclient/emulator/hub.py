"""Hub state shared by all connections: sessions, twins, C2D queues, pending method calls.

Everything here runs on the emulator's single asyncio loop, so no locks are needed; the thread-safe
service API (:mod:`.service`) reaches it with ``run_coroutine_threadsafe``.

Delivery QoS, as chosen by this emulator: cloud-to-device messages go out at min(granted QoS, 1) and are
completed by the device's PUBACK; twin responses, desired-property patches and method requests go out at
QoS 0, because the hub only sends them to a connected device and never replays them.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import time
import ssl
import uuid
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Deque, Dict, List, Optional, Set, Tuple

from . import c2d_feedback, codec, jsonlimits, namespace, routing
from .diagnostics import Diagnostic, DiagnosticLog
from .errors import HubError
from .events import EventLog
from .registry import Registry
from .tls_channel import TlsChannel
from .twin import Twin, TwinTooLarge

#: IoT Hub quotas used here (protocol notes §1 and the hub's quota page).
C2D_MAX_BYTES = 65_536
C2D_QUEUE_DEPTH = 50
MAX_SUBSCRIPTIONS = 5
#: Open connections (TLS finished or not) before further ones are closed at once: room for 2,000+ devices.
MAX_CONNECTIONS = 4096
#: Socket reads go into one buffer of this size per hub; a TLS record is at most ~16 KiB.
RECEIVE_BUFFER = 65536
#: Per-connection send buffer above which the device's packet loop waits (drain) for it to read.
WRITE_HIGH_WATER = 65536


@dataclass
class C2DMessage:
    device_id: str
    body: bytes
    pairs: Tuple[Tuple[str, Optional[str]], ...]
    message_id: str
    expires: Optional[float] = None    # seconds since the epoch ($.exp), None: never

    def expired(self, now: float) -> bool:
        return self.expires is not None and now >= self.expires

    @property
    def topic(self) -> str:
        return namespace.c2d_topic(self.device_id, self.pairs)


@dataclass
class Session:
    """MQTT session state; outlives its connection only when the device connected with clean session 0."""
    identity: str
    persistent: bool
    subscriptions: Dict[str, int] = field(default_factory=dict)
    inflight: "OrderedDict[int, Tuple[codec.Publish, Optional[C2DMessage]]]" = field(
        default_factory=OrderedDict)
    connection: Any = None
    _next_id: int = 0

    def allocate_packet_id(self) -> int:
        for _ in range(65535):
            self._next_id = self._next_id % 65535 + 1
            if self._next_id not in self.inflight:
                return self._next_id
        raise RuntimeError("all 65535 packet identifiers are in flight")

    def granted_qos(self, topic: str) -> Optional[int]:
        matches = [qos for f, qos in self.subscriptions.items() if namespace.topic_matches(f, topic)]
        return max(matches) if matches else None


class Hub:
    def __init__(self, *, hostname: str, registry: Registry, diagnostics: DiagnosticLog, events: EventLog,
                 ssl_context: ssl.SSLContext, ca_subject: Dict[str, str],
                 max_packet_size: int = codec.DEFAULT_MAX_PACKET_SIZE, connect_timeout: float = 10.0,
                 max_subscriptions: int = MAX_SUBSCRIPTIONS, max_connections: int = MAX_CONNECTIONS,
                 handshake_timeout: float = 10.0):
        self.hostname = hostname
        self.registry = registry
        self.diagnostics = diagnostics
        self.events = events
        self.ssl_context = ssl_context
        self.ca_subject = ca_subject
        self.max_packet_size = max_packet_size
        self.connect_timeout = connect_timeout
        self.max_subscriptions = max_subscriptions
        self.max_connections = max_connections
        self.handshake_timeout = handshake_timeout
        self.credentials = None            # a credentials.CredentialsService while the credentials API is on
        self.disconnect_on_expiry = False  # drop a connection when its certificate expires (UNCERTAIN, off)
        self.peer_trust = None             # a peer_trust.PeerTrust: certificates are authorized at CONNECT
        self.peer_trust_off = ""           # why not, when peer_trust is None (named in TLS diagnostics)
        self.sessions: Dict[str, Session] = {}
        self.twins: Dict[str, Twin] = {}
        self.c2d_queues: Dict[str, Deque[C2DMessage]] = {}
        self.pending_methods: Dict[Tuple[str, str], asyncio.Future] = {}
        self.c2d_feedback: List[Dict[str, Any]] = []   # see c2d_feedback.py
        self.routes: List[routing.Route] = []           # module output -> input routes (routing.py)
        self.throttle = None                             # a throttle.Throttle when rates are set
        self.model_ids: Dict[str, Optional[str]] = {}   # identity -> model-id of its last CONNECT
        #: observer(kind, data) for what the service side does and who connects (the dashboard's feed);
        #: kinds: connected, disconnected, c2d, method, method-result, desired.
        self.observers: List[Any] = []
        self._method_rids = itertools.count(1)
        self._server: Optional[asyncio.base_events.Server] = None
        self._ws_server: Optional[asyncio.base_events.Server] = None   # MQTT over WebSockets (.websocket)
        self._tasks: Set[asyncio.Task] = set()
        self._channels: Set[TlsChannel] = set()       # every open TCP connection, secure or not
        self._at_cap = False
        # One receive buffer for every socket read on this loop (see tls_channel).
        self._receive_buffer = memoryview(bytearray(RECEIVE_BUFFER))

    # ------------------------------------------------------------------ server lifecycle

    async def start(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._new_channel, host, port)
        return self._server.sockets[0].getsockname()[1]

    async def start_websocket(self, host: str, port: int) -> int:
        """Serve MQTT over WebSockets (TLS, ``/$iothub/websocket``) on ``port``; returns the port."""
        loop = asyncio.get_running_loop()
        self._ws_server = await loop.create_server(lambda: self._new_channel(websocket=True), host, port)
        return self._ws_server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._ws_server is not None:
            self._ws_server.close()
        if self._server is not None:
            self._server.close()
        for channel in list(self._channels):
            channel.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            # Last: from Python 3.12 on this also waits for every accepted connection to be gone.
            await self._server.wait_closed()
        if self._ws_server is not None:
            await self._ws_server.wait_closed()
        for future in self.pending_methods.values():
            future.cancel()

    @property
    def connection_count(self) -> int:
        """Open TCP connections, whether their TLS handshake finished or not."""
        return len(self._channels)

    def _new_channel(self, websocket: bool = False) -> TlsChannel:
        return TlsChannel(self.ssl_context, self._receive_buffer, on_made=self._on_accept,
                          on_handshake=self._on_secure_websocket if websocket else self._on_secure, on_failure=self._on_handshake_failure,
                          on_lost=self._channels.discard,
                          handshake_timeout=self.handshake_timeout)

    def _on_accept(self, channel: TlsChannel) -> bool:
        if len(self._channels) >= self.max_connections:
            channel.abort()
            self.diagnostics.count("connection.limit")
            if not self._at_cap:  # one record per episode; the counter has every refusal
                self._at_cap = True
                self.diag("connection.limit", f"{self.max_connections} connections are open (the emulator's "
                          f"connection cap); further connections are closed at once until some end",
                          peer=channel.peer, count=False)
            return False
        self._at_cap = False
        self._channels.add(channel)
        channel.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        return True

    def _on_handshake_failure(self, channel: TlsChannel, reason: str, timed_out: bool) -> None:
        if timed_out:
            self.diag("tls.handshake-timeout", "TLS handshake not completed in time; connection closed",
                      reason, peer=channel.peer)
        else:
            why = (f" (IoT Hub accepts any certificate here and refuses at CONNECT with CONNACK 5; this "
                   f"emulator refuses in the handshake because {self.peer_trust_off})"
                   if self.peer_trust is None and self.peer_trust_off else "")
            self.diag("tls.handshake", "TLS handshake failed; the hub requires TLS 1.2+ and a client "
                      "certificate issued by the emulator's CA or registered as self-signed" + why, reason,
                      peer=channel.peer)

    def _on_secure(self, channel: TlsChannel) -> None:
        from .connection import Connection  # circular: a Connection needs the Hub it serves
        task = asyncio.get_running_loop().create_task(Connection(self, channel).run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_secure_websocket(self, channel: TlsChannel) -> None:
        from . import websocket
        task = asyncio.get_running_loop().create_task(websocket.serve(self, channel))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def notify(self, kind: str, **data: Any) -> None:
        for observer in list(self.observers):
            observer(kind, data)

    # ------------------------------------------------------------------ diagnostics

    def diag(self, rule: str, message: str, received: str = "", identity: Optional[str] = None,
             peer: str = "", count: bool = True) -> None:
        self.diagnostics.add(Diagnostic(rule, message, received, identity, peer), count=count)

    # ------------------------------------------------------------------ sessions

    def attach(self, connection, identity: str, clean: bool) -> Tuple[Session, bool]:
        """Bind an authenticated connection to its session; return (session, session_present)."""
        existing = self.sessions.get(identity)
        if existing is not None and existing.connection is not None:
            old = existing.connection
            self.diag("connect.duplicate", "a new connection for this identity dropped the previous one, "
                      "as the hub does (one connection per identity)", f"CONNECT from {connection.peer}, "
                      f"previous connection from {old.peer}", identity)
            existing.connection = None
            old.abort()
        if existing is not None and (clean or not existing.persistent):
            self._discard(existing)
            existing = None
        if existing is None:
            session, present = Session(identity, persistent=not clean), False
        else:
            session, present = existing, True
        session.connection = connection
        self.sessions[identity] = session
        self.notify("connected", identity=identity)
        return session, present

    def detach(self, connection) -> None:
        session = connection.session
        if session is None or session.connection is not connection:
            return
        session.connection = None
        self.notify("disconnected", identity=session.identity)
        if not session.persistent and self.sessions.get(session.identity) is session:
            self._discard(session)
            del self.sessions[session.identity]

    def _discard(self, session: Session) -> None:
        # A C2D message lives in the hub's queue, not in the MQTT session: an unacknowledged one goes
        # back to the front of the queue (in order) instead of being lost with the session.
        unacked = [c2d for _, c2d in session.inflight.values() if c2d is not None]
        if unacked:
            queue = self.c2d_queues.setdefault(namespace.split_identity(session.identity)[0], deque())
            queue.extendleft(reversed(unacked))
        session.inflight.clear()
        session.subscriptions.clear()

    def is_connected(self, identity: str) -> bool:
        session = self.sessions.get(identity)
        return session is not None and session.connection is not None

    def deliver(self, session: Session, topic: str, payload: bytes, max_qos: int,
                c2d: Optional[C2DMessage] = None) -> bool:
        """Send to the session's connection if it subscribed to a matching filter; False otherwise."""
        granted = session.granted_qos(topic)
        if granted is None or session.connection is None:
            return False
        qos = min(granted, max_qos)
        packet_id = session.allocate_packet_id() if qos else None
        packet = codec.Publish(topic, payload, qos, packet_id=packet_id)
        if qos:
            session.inflight[packet_id] = (packet, c2d)
        session.connection.send(packet)
        return True

    def resume(self, session: Session) -> None:
        """After CONNACK: redeliver unacknowledged QoS 1 messages (DUP set), then queued C2D."""
        for packet_id, (packet, _) in list(session.inflight.items()):
            session.connection.send(codec.Publish(packet.topic, packet.payload, 1, dup=True,
                                                  packet_id=packet_id))
        self.pump_c2d(session.identity)

    def pump_c2d(self, identity: str) -> None:
        session = self.sessions.get(identity)
        device_id, module_id = namespace.split_identity(identity)
        if session is None or session.connection is None or module_id is not None:
            return
        if namespace.c2d_filter(device_id) not in session.subscriptions:
            return
        self.expire_c2d(device_id)
        queue = self.c2d_queues.get(device_id)
        while queue:
            message = queue.popleft()
            self.deliver(session, message.topic, message.body, 1, message)

    def acknowledge(self, session: Session, packet_id: int) -> bool:
        entry = session.inflight.pop(packet_id, None)
        if entry is not None and entry[1] is not None:   # a C2D message completed by the device
            c2d_feedback.record(self.c2d_feedback, entry[1], "Success")
        return entry is not None

    def expire_c2d(self, device_id: str) -> None:
        """Drop queued messages whose $.exp has passed (with Expired feedback where asked for)."""
        queue = self.c2d_queues.get(device_id)
        if not queue:
            return
        now = time.time()
        for message in [m for m in queue if m.expired(now)]:
            queue.remove(message)
            c2d_feedback.record(self.c2d_feedback, message, "Expired")

    def route(self, device_id: str, module_id: Optional[str], payload: bytes,
              system: Dict[str, Optional[str]], application: Dict[str, Optional[str]]) -> None:
        """Deliver a copy of a telemetry message to every module input a route names (routing.py)."""
        for target, input_name in routing.targets(self.routes, module_id, system):
            identity = f"{device_id}/{target}"
            topic = (f"devices/{device_id}/modules/{target}/inputs/{input_name}/"
                     + namespace.encode_property_bag(routing.input_pairs(device_id, module_id, system, application)))
            session = self.sessions.get(identity)
            if session is None or not self.deliver(session, topic, payload, 1):
                self.diag("routing.undelivered", f"route to {identity!r} input {input_name!r}: the module is not "
                          f"connected or not subscribed to 'devices/{device_id}/modules/{target}/inputs/#'; the "
                          f"copy is dropped (IoT Edge would store it)", f"message from {device_id}/{module_id}",
                          f"{device_id}/{module_id}" if module_id else device_id)

    # ------------------------------------------------------------------ twins

    def twin(self, identity: str) -> Twin:
        return self.twins.setdefault(identity, Twin())

    def _require(self, identity: str) -> None:
        if self.registry.get(identity) is None:
            raise HubError(404, 404001, f"Device {identity!r} not found in the registry.")

    async def get_twin(self, identity: str) -> Dict[str, Any]:
        self._require(identity)
        return self.twin(identity).document()

    async def update_desired(self, identity: str, patch: Dict[str, Any]) -> int:
        self._require(identity)
        if not isinstance(patch, dict):
            raise HubError(400, 400004, "The desired properties patch must be a JSON object.")
        depth = jsonlimits.depth_of(patch, jsonlimits.MAX_TWIN_DEPTH + 1) - 1   # the patch is the section
        if depth > jsonlimits.MAX_TWIN_DEPTH:
            message = (f"The desired properties patch nests objects more than {jsonlimits.MAX_TWIN_DEPTH} "
                       f"levels deep; IoT Hub allows {jsonlimits.MAX_TWIN_DEPTH}.")
            self.diag("service.twin-depth", message, identity=identity)
            raise HubError(400, 400004, message)
        try:
            version = self.twin(identity).patch_desired(patch)
        except TwinTooLarge as exc:
            self.diag("service.twin-size", str(exc), identity=identity)
            raise HubError(400, 400004, f"{exc}.") from None
        self.notify("desired", identity=identity, patch=patch, version=version)
        session = self.sessions.get(identity)
        if session is not None:
            body = json.dumps({**patch, "$version": version}).encode()
            self.deliver(session, f"$iothub/twin/PATCH/properties/desired/?$version={version}", body, 0)
        return version

    # ------------------------------------------------------------------ direct methods

    async def invoke_method(self, identity: str, method_name: str, payload: Any,
                            timeout: float) -> Tuple[int, Any]:
        """Call a direct method; return (status, payload) or raise HubError 404 (offline) / 504."""
        self._require(identity)
        session = self.sessions.get(identity)
        if session is None or session.connection is None or \
                session.granted_qos(f"$iothub/methods/POST/{method_name}/") is None:
            raise HubError(404, 404103, "Timed out waiting for device to connect "
                           "(the device is offline or not subscribed to $iothub/methods/POST/#).")
        rid = str(next(self._method_rids))
        future = asyncio.get_running_loop().create_future()
        self.pending_methods[(identity, rid)] = future
        self.notify("method", identity=identity, method=method_name, payload=payload)
        try:
            self.deliver(session, f"$iothub/methods/POST/{method_name}/?$rid={rid}",
                         json.dumps(payload).encode(), 0)
            status, answer = await asyncio.wait_for(future, timeout)
            self.notify("method-result", identity=identity, method=method_name, status=status, payload=answer)
            return status, answer
        except asyncio.TimeoutError:
            self.notify("method-result", identity=identity, method=method_name, status=504, payload=None)
            raise HubError(504, 504101, "Timed out waiting for the response from device.") from None
        finally:
            self.pending_methods.pop((identity, rid), None)

    def complete_method(self, identity: str, rid: str, status: int, payload: Any) -> bool:
        future = self.pending_methods.get((identity, rid))
        if future is None or future.done():
            return False
        future.set_result((status, payload))
        return True

    # ------------------------------------------------------------------ cloud-to-device

    async def send_c2d(self, device_id: str, body: bytes, *, message_id: Optional[str] = None,
                       correlation_id: Optional[str] = None, user_id: Optional[str] = None,
                       content_type: Optional[str] = None, content_encoding: Optional[str] = None,
                       expiry: Optional[str] = None, ack: Optional[str] = None,
                       properties: Optional[Dict[str, Optional[str]]] = None) -> str:
        self._require(device_id)
        if "/" in device_id:
            raise HubError(400, 400027, "Cloud-to-device messages go to devices, not modules.")
        if len(body) > C2D_MAX_BYTES:
            raise HubError(413, 413001, f"Message of {len(body)} bytes exceeds the C2D limit of "
                           f"{C2D_MAX_BYTES} bytes.")
        expires = c2d_feedback.parse_expiry(expiry)
        self.expire_c2d(device_id)
        queue = self.c2d_queues.setdefault(device_id, deque())
        # As on the hub, a message counts against the queue depth until the device completes it (PUBACK),
        # so one that never acknowledges cannot make the emulator hold messages without end.
        session = self.sessions.get(device_id)
        unacked = sum(1 for _, c2d in session.inflight.values() if c2d is not None) if session else 0
        if len(queue) + unacked >= C2D_QUEUE_DEPTH:
            raise HubError(403, 403004, f"Device {device_id!r} already has {C2D_QUEUE_DEPTH} messages "
                           f"queued or not yet acknowledged (DeviceMaximumQueueDepthExceeded).")
        message_id = message_id or str(uuid.uuid4())
        pairs: List[Tuple[str, Optional[str]]] = [("$.mid", message_id),
                                                  ("$.to", f"/devices/{device_id}/messages/devicebound")]
        for key, value in (("$.cid", correlation_id), ("$.uid", user_id), ("$.ct", content_type),
                           ("$.ce", content_encoding), ("$.exp", expiry), ("iothub-ack", ack)):
            if value is not None:
                pairs.append((key, value))
        pairs.extend((properties or {}).items())
        queue.append(C2DMessage(device_id, bytes(body), tuple(pairs), message_id, expires))
        self.notify("c2d", identity=device_id, body=bytes(body), properties=dict(pairs))
        self.pump_c2d(device_id)
        return message_id

    def queued_c2d(self, device_id: str) -> int:
        """Messages waiting in the hub's queue (not yet sent to the device)."""
        self.expire_c2d(device_id)
        return len(self.c2d_queues.get(device_id, ()))
