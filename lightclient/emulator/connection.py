"""One device connection once its TLS handshake is done: CONNECT, then the hub's rules for every packet.

A connection that breaks a rule the hub enforces by disconnecting (malformed packet, QoS 2, a topic the
identity may not use, a message over 256 KB, keep-alive expiry) is closed; nothing it did can affect
another connection, because all per-device state is keyed by the authenticated identity.
"""
from __future__ import annotations

import asyncio
import json
import ssl
from typing import Optional

from . import codec, credentials, jsonlimits, namespace
from . import sas as sas_expiry
from .codec import MalformedPacket, PacketTooLarge
from .events import Event
from .registry import SELF_SIGNED, Identity, PeerCertificate, authorize
from .tls_channel import TlsChannel
from .twin import TwinTooLarge

#: IoT Hub's telemetry limit, counted as body + system property values + application names and values.
D2C_MAX_BYTES = 262_144
#: The Azure load balancer's idle timeout caps the keep-alive window whatever the client asks for.
MAX_KEEPALIVE_WINDOW = 1767.0
#: Bytes queued for a device that does not read before the hub gives up on it (50 full C2D messages fit).
MAX_SEND_BACKLOG = 4 * 1024 * 1024


class _Close(Exception):
    """Raised inside the packet loop to end the connection after a rule violation was recorded."""


class Connection:
    """Runs once the TLS handshake is done (see :mod:`.tls_channel`): CONNECT, then the packet loop."""

    def __init__(self, hub, channel: TlsChannel):
        self.hub = hub
        self.channel = channel
        self.peer = channel.peer
        self.identity: Optional[Identity] = None
        self.session = None
        self.decoder = codec.Decoder(hub.max_packet_size)
        self.will: Optional[codec.Will] = None
        self.closed = False
        self._expiry = None

    # ------------------------------------------------------------------ plumbing

    @property
    def name(self) -> Optional[str]:
        return self.identity.name if self.identity else None

    def diag(self, rule: str, message: str, received: str = "") -> None:
        self.hub.diag(rule, message, received, self.name, self.peer)

    def send(self, packet) -> None:
        if self.closed:
            return
        self.channel.write(codec.encode(packet))
        backlog = self.channel.write_buffer_size()
        if backlog > MAX_SEND_BACKLOG:
            # Sends from the service side (C2D, desired patches, method calls) do not wait for the
            # device; one that stops reading would otherwise grow this buffer without end.
            self.diag("mqtt.send-backlog", f"{backlog} bytes wait to be sent because the device is not "
                      f"reading (limit {MAX_SEND_BACKLOG}); connection closed")
            self.abort()

    def abort(self) -> None:
        """Drop the connection at once (no TLS close_notify), as the hub does on a violation."""
        self.closed = True
        self.channel.abort()

    async def _close_gracefully(self) -> None:
        """Flush what was written (a refusing CONNACK must reach the device), then close."""
        self.closed = True
        await self.channel.close(2.0)

    async def _next_packet(self, timeout: float) -> Optional[codec.Packet]:
        """The next packet, or None at end of stream; raises TimeoutError, MalformedPacket."""
        while True:
            packet = self.decoder.next_packet()
            if packet is not None:
                return packet
            data = await asyncio.wait_for(self.channel.read(), timeout)
            if not data:
                return None
            self.decoder.feed(data)

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        clean_exit = False
        try:
            if not await self._connect():
                return
            clean_exit = await self._serve()
        except PacketTooLarge as exc:
            self.diag("mqtt.packet-too-large", f"{exc}; refused from its header, connection closed")
        except MalformedPacket as exc:
            self.diag("mqtt.malformed", f"malformed packet, connection closed: {exc}")
        except asyncio.TimeoutError:
            pass  # recorded where the timeout is known
        except _Close:
            pass
        except (ConnectionError, ssl.SSLError, OSError):
            pass  # the device went away; nothing to report
        finally:
            if self.session is not None and not clean_exit:
                self._publish_will()
            self.hub.detach(self)
            if self._expiry is not None:
                self._expiry.cancel()
            if not self.closed:
                self.abort()

    async def _connect(self) -> bool:
        try:
            packet = await self._next_packet(self.hub.connect_timeout)
        except asyncio.TimeoutError:
            self.diag("connect.timeout", f"no CONNECT within {self.hub.connect_timeout:g} s of the TLS "
                      f"handshake")
            raise
        if packet is None:
            return False
        if not isinstance(packet, codec.Connect):
            self.diag("connect.first-packet", "the first packet must be CONNECT [MQTT-3.1.0-1]",
                      codec.describe(packet))
            return False
        ssl_object = self.channel.ssl_object
        peer = PeerCertificate.from_ssl(ssl_object.getpeercert(binary_form=True) or b"", ssl_object.getpeercert() or {})
        result = authorize(packet, peer, self.hub.registry, self.hub.hostname, self.hub.ca_subject)
        untrusted = self._untrusted(ssl_object, packet.client_id)
        if untrusted and result.return_code in (codec.CONNACK_ACCEPTED, codec.CONNACK_NOT_AUTHORIZED):
            result.return_code = codec.CONNACK_NOT_AUTHORIZED
            result.refusal = ("connect.certificate-untrusted", untrusted)
        received = f"client id {packet.client_id!r}, username {packet.username!r}"
        expired = credentials.expiry_refusal(ssl_object.getpeercert() or {})
        if result.return_code == codec.CONNACK_ACCEPTED and expired:
            result.return_code = codec.CONNACK_NOT_AUTHORIZED
            result.refusal = ("connect.certificate-expired", expired)
        if result.return_code == codec.CONNACK_ACCEPTED and packet.will is not None:
            prefix = namespace.events_prefix(result.identity.device_id, result.identity.module_id)
            if not (packet.will.topic == prefix or packet.will.topic.startswith(prefix + "/")):
                result.return_code = codec.CONNACK_NOT_AUTHORIZED
                result.refusal = ("connect.will", f"the will topic must be this identity's telemetry "
                                  f"topic {prefix + '/'!r}, got {packet.will.topic!r}")
        if result.return_code == codec.CONNACK_ACCEPTED and not self._allowed(result.identity.name, "connect"):
            result.return_code = codec.CONNACK_SERVER_UNAVAILABLE
            result.refusal = ("throttle.connect", f"more than {self.hub.throttle.rates['connect']:g} connects per "
                              f"second for this identity (--throttle connect=…); SDKs retry CONNACK 3 with back-off")
        for rule, message in result.warnings:
            self.hub.diag(rule, message, received, packet.client_id or None, self.peer)
        if result.return_code != codec.CONNACK_ACCEPTED:
            rule, message = result.refusal
            self.hub.diag(rule, f"CONNACK {result.return_code}: {message}", received,
                          packet.client_id or None, self.peer)
            self.send(codec.Connack(False, result.return_code))
            await self._close_gracefully()
            return False
        self.identity = result.identity
        self.will = packet.will
        self.keepalive_window = (min(1.5 * packet.keep_alive, MAX_KEEPALIVE_WINDOW) if packet.keep_alive
                                 else MAX_KEEPALIVE_WINDOW)
        self.session, present = self.hub.attach(self, self.identity.name, packet.clean_session)
        # IoT Plug and Play: the hub shows the model the device announced (twin "modelId").
        self.hub.model_ids[self.identity.name] = _model_id(packet.username)
        self.send(codec.Connack(present, codec.CONNACK_ACCEPTED))
        if result.sas_expiry is not None:  # the hub drops a connection whose SAS token expires
            self._expiry = sas_expiry.watch(self, result.sas_expiry)
        elif self.hub.disconnect_on_expiry:
            self._expiry = credentials.watch_expiry(self, ssl_object.getpeercert() or {})
        self.hub.resume(self.session)
        return True

    def _untrusted(self, ssl_object, client_id: str) -> Optional[str]:
        """Why the TLS layer's chain verification failed, when that matters (see :mod:`.peer_trust`).
        A self-signed identity is authorized by its thumbprint alone, as on the hub."""
        if self.hub.peer_trust is None:
            return None
        identity = self.hub.registry.get(client_id)
        if identity is not None and identity.auth == SELF_SIGNED:
            return None
        code, text = self.hub.peer_trust.verify_result(ssl_object)
        if code == 0:
            return None
        return (f"the client certificate does not chain to a CA this hub trusts (X.509 error {code}: {text}); "
                f"IoT Hub accepts it in the TLS handshake and refuses here. Use a certificate issued by the "
                f"emulator's CA, or register a self-signed one by thumbprint")

    async def _serve(self) -> bool:
        """Handle packets until DISCONNECT (returns True) or the stream ends (False)."""
        while True:
            try:
                packet = await self._next_packet(self.keepalive_window)
            except asyncio.TimeoutError:
                self.diag("mqtt.keep-alive", f"no packet within {self.keepalive_window:g} s (1.5 × the "
                          f"CONNECT keep-alive); the hub closes the connection")
                raise
            if packet is None:
                return False
            if isinstance(packet, codec.Disconnect):
                self.will = None
                return True
            self._dispatch(packet)
            await self.channel.drain()

    def _dispatch(self, packet) -> None:
        if isinstance(packet, codec.Publish):
            self._on_publish(packet)
        elif isinstance(packet, codec.Puback):
            if not self.hub.acknowledge(self.session, packet.packet_id):
                self.diag("mqtt.puback", f"PUBACK for packet id {packet.packet_id}, which is not in flight")
        elif isinstance(packet, codec.Subscribe):
            self._on_subscribe(packet)
        elif isinstance(packet, codec.Unsubscribe):
            for topic_filter in packet.filters:
                self.session.subscriptions.pop(topic_filter, None)
            self.send(codec.Unsuback(packet.packet_id))
        elif isinstance(packet, codec.Pingreq):
            self.send(codec.Pingresp())
        elif isinstance(packet, codec.Connect):
            self.diag("mqtt.second-connect", "a second CONNECT on one connection is a protocol violation "
                      "[MQTT-3.1.0-2]; connection closed")
            raise _Close()
        elif isinstance(packet, (codec.Pubrec, codec.Pubrel, codec.Pubcomp)):
            self.diag("publish.qos2", "IoT Hub does not support QoS 2; connection closed",
                      codec.describe(packet))
            raise _Close()
        else:
            self.diag("mqtt.unexpected-packet", "devices never send this packet; connection closed",
                      codec.describe(packet))
            raise _Close()

    # ------------------------------------------------------------------ subscribe

    def _on_subscribe(self, packet: codec.Subscribe) -> None:
        codes = []
        device_id, module_id = self.identity.device_id, self.identity.module_id
        for topic_filter, qos in packet.requests:
            reason = namespace.refuse_subscription(topic_filter, device_id, module_id,
                                                   self.hub.credentials is not None)
            subs = self.session.subscriptions
            if reason is None and topic_filter not in subs and len(subs) >= self.hub.max_subscriptions:
                reason = (f"a device can only subscribe to {self.hub.max_subscriptions} topics at a time; "
                          f"already subscribed to {', '.join(subs)}")
                self.diag("subscribe.limit", f"SUBACK 0x80: {reason}", f"SUBSCRIBE {topic_filter!r}")
                codes.append(codec.SUBACK_FAILURE)
                continue
            if reason is not None:
                self.diag("subscribe.filter", f"SUBACK 0x80: {reason}", f"SUBSCRIBE {topic_filter!r}")
                codes.append(codec.SUBACK_FAILURE)
                continue
            if qos == 2:
                self.diag("subscribe.qos2", "QoS 2 requested; the hub grants QoS 1",
                          f"SUBSCRIBE {topic_filter!r} qos=2")
            granted = min(qos, 1)
            subs[topic_filter] = granted
            codes.append(granted)
        self.send(codec.Suback(packet.packet_id, tuple(codes)))
        self.hub.pump_c2d(self.identity.name)

    # ------------------------------------------------------------------ publish

    def _on_publish(self, packet: codec.Publish) -> None:
        if packet.qos == 2:
            self.diag("publish.qos2", "IoT Hub does not support QoS 2 publishes; the hub closes the "
                      "connection", codec.describe(packet))
            raise _Close()
        kind = namespace.classify_publish(packet.topic, self.identity.device_id, self.identity.module_id)
        if isinstance(kind, namespace.Forbidden):
            self.diag("publish.topic", f"{kind.reason}; the hub closes the connection",
                      codec.describe(packet))
            raise _Close()
        if isinstance(kind, namespace.Telemetry):
            self._on_telemetry(packet, kind)
        else:
            if packet.retain:
                self.diag("publish.retain", "RETAIN is meaningless on $iothub topics and is ignored",
                          codec.describe(packet))
            if packet.qos:
                self.send(codec.Puback(packet.packet_id))
            if isinstance(kind, namespace.CredentialsRequest):
                if self.hub.credentials is None:
                    self.diag("credentials.off", "certificate request ignored: this hub runs without the "
                              "credentials API", codec.describe(packet))
                else:
                    self.hub.credentials.handle(self, kind.raw_rid, packet.payload)
            elif isinstance(kind, namespace.TwinGet):
                self._on_twin_get(packet, kind)
            elif isinstance(kind, namespace.TwinReported):
                self._on_twin_reported(packet, kind)
            else:
                self._on_method_response(packet, kind)
            return
        if packet.qos:
            self.send(codec.Puback(packet.packet_id))

    def _on_telemetry(self, packet: codec.Publish, kind: namespace.Telemetry) -> None:
        if not self._allowed(self.identity.name, "telemetry"):
            self.diag("throttle.telemetry", f"more than {self.hub.throttle.rates['telemetry']:g} messages per "
                      f"second (--throttle telemetry=…): connection closed without PUBACK, as MQTT 3.1.1 has no "
                      f"negative acknowledgement; reconnect with back-off and resend", codec.describe(packet))
            raise _Close()
        bag = namespace.decode_property_bag(kind.bag)
        size = (len(packet.payload) + sum(len((v or "").encode()) for v in bag.system.values())
                + sum(len(k.encode()) + len((v or "").encode()) for k, v in bag.application.items()))
        if size > D2C_MAX_BYTES:
            self.diag("publish.size", f"message of {size} bytes (body + properties) exceeds the hub's "
                      f"{D2C_MAX_BYTES}-byte limit; the hub closes the connection", codec.describe(packet))
            raise _Close()
        for rule, message in bag.problems:
            self.diag(rule, message, f"topic {packet.topic!r}")
        application = dict(bag.application)
        if packet.retain:
            # The hub stores nothing; it marks the message so routing can see RETAIN was set.
            application["mqtt-retain"] = "true"
        self.hub.events.add(Event(self.identity.device_id, self.identity.module_id, packet.payload,
                                  bag.system, application, packet.topic, packet.retain))
        if self.hub.routes:
            self.hub.route(self.identity.device_id, self.identity.module_id, packet.payload, bag.system,
                           dict(bag.application))

    def _allowed(self, identity: str, kind: str) -> bool:
        return self.hub.throttle is None or self.hub.throttle.allow(identity, kind)

    def _twin_throttled(self, rid: str, packet: codec.Publish) -> bool:
        if self._allowed(self.identity.name, "twin"):
            return False
        self.diag("throttle.twin", f"more than {self.hub.throttle.rates['twin']:g} twin requests per second "
                  f"(--throttle twin=…): answered 429; retry with back-off", f"topic {packet.topic!r}")
        self._respond_twin(429, rid)
        return True

    def _check_rid(self, kind, packet: codec.Publish) -> Optional[str]:
        if not kind.raw_rid:
            self.diag("twin.rid" if not isinstance(kind, namespace.MethodResponse) else "method.rid",
                      "request has no '$rid' (expected '…/?$rid={request id}'); the hub cannot correlate "
                      "a response, so the request is ignored", f"topic {packet.topic!r}")
            return None
        return kind.raw_rid

    def _respond_twin(self, status: int, rid: str, body: bytes = b"", extra: str = "") -> None:
        topic = f"$iothub/twin/res/{status}/?$rid={rid}{extra}"
        if not self.hub.deliver(self.session, topic, body, 0):
            self.diag("twin.not-subscribed", f"twin response {status} dropped: the device is not "
                      f"subscribed to {namespace.TWIN_RESPONSE_FILTER!r}", f"response topic {topic!r}")

    def _on_twin_get(self, packet: codec.Publish, kind: namespace.TwinGet) -> None:
        rid = self._check_rid(kind, packet)
        if rid is None:
            return
        if self._twin_throttled(rid, packet):
            return
        document = self.hub.twin(self.identity.name).document()
        self._respond_twin(200, rid, json.dumps(document).encode())

    def _on_twin_reported(self, packet: codec.Publish, kind: namespace.TwinReported) -> None:
        rid = self._check_rid(kind, packet)
        if rid is None:
            return
        if self._twin_throttled(rid, packet):
            return
        depth = jsonlimits.nesting(packet.payload)
        if depth > jsonlimits.MAX_TWIN_DEPTH + 1:   # + 1: the patch's own object is the section
            self.diag("twin.reported-depth", f"reported patch nests objects {depth - 1} levels below the "
                      f"section; the hub allows {jsonlimits.MAX_TWIN_DEPTH} and answers 400",
                      f"body {packet.payload[:80]!r}")
            self._respond_twin(400, rid)
            return
        try:
            patch = json.loads(packet.payload)
        except (ValueError, UnicodeDecodeError) as exc:
            self.diag("twin.reported-json", f"reported patch is not valid JSON ({exc}); hub answers 400",
                      f"body {packet.payload[:80]!r}")
            self._respond_twin(400, rid)
            return
        if not isinstance(patch, dict):
            self.diag("twin.reported-json", "reported patch must be a JSON object; hub answers 400",
                      f"body {packet.payload[:80]!r}")
            self._respond_twin(400, rid)
            return
        try:
            version = self.hub.twin(self.identity.name).patch_reported(patch)
        except TwinTooLarge as exc:
            self.diag("twin.reported-size", f"{exc}; hub answers 400", f"body {packet.payload[:80]!r}")
            self._respond_twin(400, rid)
            return
        self._respond_twin(204, rid, extra=f"&$version={version}")

    def _on_method_response(self, packet: codec.Publish, kind: namespace.MethodResponse) -> None:
        rid = self._check_rid(kind, packet)
        if rid is None:
            return
        try:
            status = int(kind.status)
        except ValueError:
            self.diag("method.status", f"method response status must be an integer, got {kind.status!r}; "
                      f"response ignored", f"topic {packet.topic!r}")
            return
        payload = None
        if packet.payload:
            try:
                payload = jsonlimits.loads(packet.payload)
            except jsonlimits.JsonTooDeep as exc:
                self.diag("method.payload", f"method response body: {exc}; passed on as text",
                          f"body {packet.payload[:80]!r}")
                payload = packet.payload.decode("utf-8", "replace")
            except (ValueError, UnicodeDecodeError):
                self.diag("method.payload", "method response body must be JSON (or empty); passed on "
                          "as text", f"body {packet.payload[:80]!r}")
                payload = packet.payload.decode("utf-8", "replace")
        if not self.hub.complete_method(self.identity.name, rid, status, payload):
            self.diag("method.rid", f"no pending method call with $rid {rid!r} for this identity (it "
                      f"timed out, was already answered, or the rid was altered)", f"topic {packet.topic!r}")

    def _publish_will(self) -> None:
        if self.will is None or self.identity is None:
            return
        prefix = namespace.events_prefix(self.identity.device_id, self.identity.module_id)
        bag = namespace.decode_property_bag(self.will.topic[len(prefix) + 1:].rstrip("/"))
        self.hub.events.add(Event(self.identity.device_id, self.identity.module_id, self.will.payload,
                                  bag.system, {**bag.application, "iothub-MessageType": "Will"},
                                  self.will.topic, self.will.retain))


def _model_id(username: Optional[str]) -> Optional[str]:
    """The ``model-id`` query value of an accepted username (percent-decoded), or None."""
    from urllib.parse import unquote

    query = (username or "").partition("?")[2]
    for item in query.split("&"):
        key, sep, value = item.partition("=")
        if sep and unquote(key) == "model-id":
            return unquote(value) or None
    return None
