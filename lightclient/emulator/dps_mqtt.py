"""DPS over MQTT (protocol notes §3.3): the same enrollments and rules as the HTTPS DPS, on its own port.

The official SDKs provision only over MQTT, so this is what they need::

    CONNECT   client id {registrationId}, username
              {idScope}/registrations/{registrationId}/api-version=2019-03-31&ClientVersion=…,
              no password (X.509: the client certificate authenticates), or, for a symmetric-key enrollment,
              password SharedAccessSignature sr={idScope}%2Fregistrations%2F{registrationId}&sig=…&se=…
              [&skn=registration]
    SUBSCRIBE $dps/registrations/res/#
    PUBLISH   $dps/registrations/PUT/iotdps-register/?$rid={rid}                      body DeviceRegistration
    PUBLISH   $dps/registrations/GET/iotdps-get-operationstatus/?$rid={rid}&operationId={opId}
    <- PUBLISH $dps/registrations/res/{status}/?$rid={rid}[&retry-after={seconds}]    body as over HTTPS

Each request is translated into the HTTPS request of :mod:`.dps` and answered by the same code, so a
device sees the same statuses and bodies on both transports (401 when the certificate CN is not the
registration id, 404 without a matching enrollment, injected faults, ``assigning`` polls).

Choices where the reference is UNCERTAIN or sources disagree (both readings are accepted):

- Clean session: DPS ignores it (always non-persistent); the docs say 1, the Python SDK sends 0. Both are
  accepted silently and no session outlives its connection.
- ``retry-after``: parsers treat it as optional (0 when absent); this emulator always sends it with a 202
  and a 429, and never otherwise.
- The register body: the SDKs send ``{"registrationId": …, "payload": …}`` as over HTTPS; the unified C
  SDK sends only ``{"csr": …}`` (+ ``payload``), the id being in the topic. A body without
  ``registrationId`` takes the connection's registration id; one that names another id gets 400.
- api-version: any the HTTPS DPS accepts, plus ``2026-11-02-preview`` (the unified SDKs' DPS MQTT
  username); an unknown one is refused at CONNECT with CONNACK 5 and a diagnostic.

A client certificate is verified during the TLS handshake against the group CA and the individual
enrollments (as the HTTPS DPS does); everything after the handshake goes through the same rules.

Symmetric-key enrollments (individual, and group with the device key derived from the group key, protocol
notes §9): the SAS password is checked at CONNECT with the HTTPS DPS's rules (signature over the ``sr`` as
sent, expiry, resource ``{idScope}/registrations/{registrationId}``, ``skn=registration``; either key);
a refusal is CONNACK 5 with a diagnostic naming the rule (``dps.sas-signature``, ``dps.sas-expired``,
``dps.sas-resource``, ``dps.sas``, ``dps.sas-enrollment``). Every request of the connection then carries
the token to the shared handler, as the HTTPS ``Authorization`` header would. A CONNECT with neither a
password nor a client certificate is refused (``dps.credentials``). The SDKs send the same username for
both kinds (the ``…&skn=registration`` the protocol notes mention is in the password's token, not in the
username); a username that carries it anyway is accepted.
Standard library only; the connection runs on the emulator's asyncio loop and each request on a worker
thread (a registration with a CSR runs the ``openssl`` command).
"""
from __future__ import annotations

import asyncio
import json
import ssl
from typing import Callable, Dict, Optional, Set
from urllib.parse import quote, unquote

from . import codec
from .diagnostics import Diagnostic
from .tls_channel import TlsChannel

RESPONSE_FILTER = "$dps/registrations/res/#"
REGISTER_TOPIC = "$dps/registrations/PUT/iotdps-register/"
STATUS_TOPIC = "$dps/registrations/GET/iotdps-get-operationstatus/"
#: api-versions the MQTT username may carry beyond those of the HTTPS DPS (see the module docstring).
EXTRA_API_VERSIONS = ("2026-11-02-preview",)
EXAMPLE_USERNAME = "{idScope}/registrations/{registrationId}/api-version=2019-03-31"


def parse_username(username: Optional[str]) -> Optional[Dict[str, str]]:
    """``{idScope}/registrations/{registrationId}/api-version=…&k=v`` -> its parts, or None if misshaped.

    The query part follows the last ``/`` (no ``?``, as every SDK sends it); ``?`` before it is tolerated."""
    if not username:
        return None
    parts = username.split("/", 3)
    if len(parts) != 4 or parts[1] != "registrations":
        return None
    query = parts[3][1:] if parts[3].startswith("?") else parts[3]
    result = {"id_scope": parts[0], "registration_id": parts[2]}
    for item in query.split("&") if query else []:
        key, _, value = item.partition("=")
        result[unquote(key)] = unquote(value)
    return result


def response_topic(status: int, rid: str, retry_after: Optional[str]) -> str:
    topic = f"$dps/registrations/res/{status}/?$rid={rid}"
    return topic + (f"&retry-after={retry_after}" if retry_after is not None else "")


class DpsMqttServer:
    """Serves DPS over MQTT/TLS for a :class:`~.dps.DpsEmulator` on an asyncio loop."""

    def __init__(self, dps, diag: Callable[[Diagnostic], None], *, handshake_timeout: float = 10.0,
                 connect_timeout: float = 10.0):
        self.dps = dps
        self._diag = diag
        self.handshake_timeout = handshake_timeout
        self.connect_timeout = connect_timeout
        self._server: Optional[asyncio.base_events.Server] = None
        self._channels: Set[TlsChannel] = set()
        self._tasks: Set[asyncio.Task] = set()
        self._buffer = memoryview(bytearray(65536))
        self.port = 0

    def diag(self, rule: str, message: str, received: str = "", identity: Optional[str] = None,
             peer: str = "") -> None:
        self._diag(Diagnostic(rule, message, received, identity, peer))

    async def start(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._new_channel, host, port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for channel in list(self._channels):
            channel.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _new_channel(self) -> TlsChannel:
        return TlsChannel(self.dps.ssl_context, self._buffer, on_made=self._on_made,
                          on_handshake=self._on_secure, on_failure=self._on_failure,
                          on_lost=self._channels.discard, handshake_timeout=self.handshake_timeout)

    def _on_made(self, channel: TlsChannel) -> bool:
        self._channels.add(channel)
        return True

    def _on_failure(self, channel: TlsChannel, reason: str, timed_out: bool) -> None:
        self.diag("dps.tls-handshake", "DPS (MQTT) TLS handshake failed; DPS requires TLS 1.2 and a client "
                  "certificate from an enrolled group's CA or of an individual enrollment", reason,
                  peer=channel.peer)

    def _on_secure(self, channel: TlsChannel) -> None:
        task = asyncio.get_running_loop().create_task(_DpsConnection(self, channel).run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class _DpsConnection:
    def __init__(self, server: DpsMqttServer, channel: TlsChannel):
        self.server = server
        self.channel = channel
        self.decoder = codec.Decoder()
        self.registration_id: Optional[str] = None
        self.api_version = ""
        self.authorization: Optional[str] = None    # the SAS token of a symmetric-key registration
        self.subscribed = False
        self.closed = False

    def diag(self, rule: str, message: str, received: str = "") -> None:
        self.server.diag(rule, message, received, self.registration_id, self.channel.peer)

    def send(self, packet) -> None:
        if not self.closed:
            self.channel.write(codec.encode(packet))

    async def _next(self, timeout: Optional[float]) -> Optional[codec.Packet]:
        while True:
            packet = self.decoder.next_packet()
            if packet is not None:
                return packet
            data = await asyncio.wait_for(self.channel.read(), timeout)
            if not data:
                return None
            self.decoder.feed(data)

    async def run(self) -> None:
        try:
            if await self._connect():
                await self._serve()
        except codec.MalformedPacket as exc:
            self.diag("dps.malformed", f"malformed MQTT packet, connection closed: {exc}")
        except asyncio.TimeoutError:
            pass
        except (ConnectionError, ssl.SSLError, OSError):
            pass
        finally:
            self.closed = True
            self.channel.abort()

    async def _refuse(self, rule: str, message: str, received: str) -> bool:
        self.diag(rule, f"CONNACK 5: {message}", received)
        self.send(codec.Connack(False, codec.CONNACK_NOT_AUTHORIZED))
        self.closed = True
        await self.channel.close(2.0)
        return False

    async def _connect(self) -> bool:
        try:
            packet = await self._next(self.server.connect_timeout)
        except asyncio.TimeoutError:
            self.diag("dps.connect-timeout", f"no CONNECT within {self.server.connect_timeout:g} s of the TLS "
                      f"handshake")
            raise
        if packet is None:
            return False
        if not isinstance(packet, codec.Connect):
            self.diag("dps.first-packet", "the first packet must be CONNECT [MQTT-3.1.0-1]", codec.describe(packet))
            return False
        received = f"client id {packet.client_id!r}, username {packet.username!r}"
        if packet.protocol_level != 4 or packet.protocol_name != "MQTT":
            self.diag("dps.protocol", "DPS speaks MQTT 3.1.1 (protocol 'MQTT' level 4)", received)
            self.send(codec.Connack(False, codec.CONNACK_BAD_PROTOCOL_VERSION))
            return False
        parts = parse_username(packet.username)
        dps = self.server.dps
        if parts is None:
            return await self._refuse("dps.username", f"the DPS username is {EXAMPLE_USERNAME!r}", received)
        if parts["id_scope"] != dps.id_scope:
            return await self._refuse("dps.id-scope", f"unknown ID scope {parts['id_scope']!r}; this DPS "
                                      f"serves {dps.id_scope!r}", received)
        if parts["registration_id"] != packet.client_id:
            return await self._refuse("dps.client-id", f"the client id must be the registration id "
                                      f"{parts['registration_id']!r} of the username", received)
        version = parts.get("api-version")
        known = tuple(dps.api_versions) + EXTRA_API_VERSIONS
        if version not in known:
            return await self._refuse("dps.api-version", f"api-version {version!r} is not one DPS accepts "
                                      f"({', '.join(known)})", received)
        self.registration_id = packet.client_id     # names the device in the diagnostics of the refusals below
        if packet.password is not None:
            token = self._sas_password(packet.password)
            if token is None:
                return await self._refuse("dps.password", "a password must be a SAS token 'SharedAccessSignature "
                                          "sr=…&sig=…&se=…&skn=registration' (UTF-8); X.509 registrations send "
                                          "none", received)
            with dps._lock:
                enrollment, _, problem = dps._symmetric_for(dps.id_scope, packet.client_id, token)
            if enrollment is None:
                return await self._refuse(problem[0], problem[1], received)
            self.authorization = token
        elif not self.channel.ssl_object.getpeercert(binary_form=True):
            return await self._refuse("dps.credentials", "the device sent neither a client certificate (X.509) "
                                      "nor a SAS token as the password (symmetric key)", received)
        self.api_version = version
        self.send(codec.Connack(False, codec.CONNACK_ACCEPTED))
        return True

    @staticmethod
    def _sas_password(password: bytes) -> Optional[str]:
        try:
            text = bytes(password).decode("utf-8")
        except UnicodeDecodeError:
            return None
        return text if text.startswith("SharedAccessSignature ") else None

    async def _serve(self) -> None:
        keep_alive = None
        while True:
            packet = await self._next(keep_alive)
            if packet is None or isinstance(packet, codec.Disconnect):
                return
            if isinstance(packet, codec.Pingreq):
                self.send(codec.Pingresp())
            elif isinstance(packet, codec.Subscribe):
                codes = []
                for topic_filter, qos in packet.requests:
                    if topic_filter == RESPONSE_FILTER:
                        self.subscribed = True
                        codes.append(min(qos, 1))
                    else:
                        self.diag("dps.subscribe", f"SUBACK 0x80: DPS offers only {RESPONSE_FILTER!r}",
                                  f"SUBSCRIBE {topic_filter!r}")
                        codes.append(codec.SUBACK_FAILURE)
                self.send(codec.Suback(packet.packet_id, tuple(codes)))
            elif isinstance(packet, codec.Unsubscribe):
                self.subscribed = self.subscribed and RESPONSE_FILTER not in packet.filters
                self.send(codec.Unsuback(packet.packet_id))
            elif isinstance(packet, codec.Publish):
                if packet.qos == 2:
                    self.diag("dps.qos2", "DPS does not support QoS 2; connection closed", codec.describe(packet))
                    return
                if packet.qos:
                    self.send(codec.Puback(packet.packet_id))
                if not await self._request(packet):
                    return
            elif isinstance(packet, codec.Puback):
                pass
            else:
                self.diag("dps.unexpected-packet", "devices never send this packet; connection closed",
                          codec.describe(packet))
                return
            await self.channel.drain()

    async def _request(self, packet: codec.Publish) -> bool:
        """Answer one request; False closes the connection (a topic DPS does not know)."""
        path, _, query = packet.topic.partition("?")
        params: Dict[str, str] = {}
        for item in query.split("&") if query else []:
            key, _, value = item.partition("=")
            params[unquote(key)] = value
        rid = params.get("$rid")
        base = f"/{quote(self.server.dps.id_scope, safe='')}/registrations/{quote(self.registration_id, safe='')}"
        body = packet.payload
        if path == REGISTER_TOPIC:
            method, url = "PUT", f"{base}/register"
            body = self._register_body(body)
        elif path == STATUS_TOPIC:
            op = params.get("operationId")
            if not op:
                self.diag("dps.operation-id", "status request without 'operationId' (expected "
                          f"'{STATUS_TOPIC}?$rid={{rid}}&operationId={{operationId}}'); ignored",
                          f"topic {packet.topic!r}")
                return True
            method, url = "GET", f"{base}/operations/{op}"
        else:
            self.diag("dps.topic", f"DPS accepts requests only on {REGISTER_TOPIC!r} and {STATUS_TOPIC!r}; "
                      f"connection closed", codec.describe(packet))
            return False
        if rid is None:
            self.diag("dps.rid", "request has no '$rid'; DPS cannot correlate a response, so it is ignored",
                      f"topic {packet.topic!r}")
            return True
        if not self.subscribed:
            self.diag("dps.not-subscribed", f"request before subscribing to {RESPONSE_FILTER!r}: its response "
                      f"is lost", f"topic {packet.topic!r}")
        ssl_object = self.channel.ssl_object
        peer_der, peer = ssl_object.getpeercert(binary_form=True), ssl_object.getpeercert() or {}
        loop = asyncio.get_running_loop()
        status, data, headers = await loop.run_in_executor(
            None, self.server.dps.handle, method, f"{url}?api-version={quote(self.api_version)}", body,
            peer_der, peer, self.authorization)
        if status >= 400:
            self.diag("dps.refused", f"DPS answered {status}: {data.get('message', '')}", f"topic {packet.topic!r}")
        if self.subscribed:
            retry = headers.get("Retry-After") if status in (202, 429) else None
            self.send(codec.Publish(response_topic(status, rid, retry), json.dumps(data).encode(), 0))
        return True

    def _register_body(self, body: bytes) -> bytes:
        try:
            data = json.loads(body or b"{}")
        except ValueError:
            return body                 # the shared handler answers 400 naming the problem
        if isinstance(data, dict) and "registrationId" not in data:
            data["registrationId"] = self.registration_id
            return json.dumps(data).encode()
        return body
