"""One MQTT connection to IoT Hub for the CLI's send, listen, twin and trace commands.

Built on the public library: :func:`lightclient.tls.client_context` (the key stays in its token),
:mod:`lightclient.paho` (client id, username, subscriptions, requests) and :func:`lightclient.topics.parse`.
"""
from __future__ import annotations

import json
import ssl
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from .. import diagnostics, tls, topics
from .. import paho as lcpaho
from ..exceptions import ConfigError, OperationTimeout, ProtocolError, ProxyError, ServiceError
from .common import (AuthRefused, ConnectionFailed, identity, load_key, proxy_for, refuse_x509_flags_with_sas,
                     sas_credential, setting, warn)

DEFAULT_PORT = 8883

CONNACK_TEXT = {1: "unacceptable protocol version", 2: "client id rejected", 3: "server unavailable",
                4: "bad user name or password", 5: "not authorized"}


def refusal_causes(code: int, ident, host_flag: str = "--hub") -> List[str]:
    """The likely causes of a refused CONNECT, most likely first, as far as the CONNACK code tells them.

    IoT Hub answers almost every refusal with 5 and never says why, so for 4 and 5 this lists every
    cause the hub folds into that code."""
    if code in (4, 5):
        return [f"{host_flag} {ident.hostname} is not the name of the hub the device is registered in (the name "
                "is part of the MQTT user name, so a wrong or aliased name is refused even when the address "
                "reaches the hub)",
                f"the device {ident.client_id!r} is not registered in this hub, or it is disabled",
                "the certificate is not the registered one (self-signed: its thumbprint differs from the "
                "registered one) or its CA is not uploaded and verified in the hub (CA-signed: CN must equal "
                "the device id)"]
    if code == 2:
        return [f"the client id {ident.client_id!r} was rejected: it must be the device id (or device/module)"]
    if code == 1:
        return ["the server does not speak MQTT 3.1.1: is --port the hub's MQTT port (8883)?"]
    return ["the hub is busy or restarting: try again in a minute"]


def drop_reason(reason_code) -> str:
    """paho's disconnect reason as words: its 'Unspecified error' means the connection was lost."""
    value = getattr(reason_code, "value", reason_code)
    if value == 0:
        return "the server closed the connection"
    if value in (128, 7):   # paho: MQTT_ERR_CONN_LOST arrives as 'Unspecified error'
        return "the connection was lost (the server closed it or the network failed)"
    if value == 141:
        return "the server did not answer keep-alive pings"
    return str(reason_code)


class Output:
    """Line output shared by paho's thread and the main thread."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdout
        self.lock = threading.Lock()

    def __call__(self, line: str) -> None:
        with self.lock:
            print(line, file=self.stream, flush=True)


def preview(payload: bytes, limit: int = 300) -> str:
    """A payload as text for a terminal: UTF-8 as it is (shortened), anything else as a hex summary."""
    if not payload:
        return "(empty)"
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return f"<{len(payload)} bytes: {payload[:32].hex()}{'…' if len(payload) > 32 else ''}>"
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else text[:limit] + f"… ({len(payload)} bytes)"


class Session:
    """Connects on :meth:`connect`; ``on_record(record, message)`` gets every parsed IoT Hub message."""

    def __init__(self, args, *, on_record: Optional[Callable[[Any, Any], None]] = None,
                 on_log: Optional[Callable[[str], None]] = None, ssl_context=None,
                 address: Optional[Tuple[str, int]] = None, ident=None, sas=None):
        """``ssl_context``, ``address`` (host, port to connect to), ``ident`` and ``sas`` (a SasCredential)
        override what ``args`` say (the doctor has them already)."""
        self.identity = ident or identity(args)
        self.host = setting(args, "gateway") or self.identity.hostname
        self.transport = setting(args, "transport") or "tcp"
        if self.transport not in ("tcp", "websockets", "auto"):
            raise ConfigError(f"LIGHTCLIENT_TRANSPORT must be tcp, websockets or auto, not {self.transport!r}")
        port, ws_port = setting(args, "port"), setting(args, "websocket_port")
        try:
            self.port = int(port) if port is not None else DEFAULT_PORT
            self.websocket_port = int(ws_port) if ws_port is not None else 443
        except ValueError:
            raise ConfigError(f"the port {port if ws_port is None else ws_port!r} is not a number") from None
        if address is not None:
            self.host, self.port = address
        self.proxy = proxy_for(args, self.host)
        self.timeout = getattr(args, "timeout", 15.0)
        if sas is None and ssl_context is None:
            refuse_x509_flags_with_sas(args)
            sas = sas_credential(args, self.identity)
        if sas is not None and ssl_context is None:
            ssl_context = tls.server_context(ca=setting(args, "ca"))
        if ssl_context is None:
            cert = setting(args, "cert", required=True, what="the device certificate")
            key = load_key(args)
            ssl_context = tls.client_context(cert=cert, key=key, ca=setting(args, "ca"))
        ctx = self.ssl_context = ssl_context
        if getattr(args, "keylog", None):
            ctx.keylog_filename = tls.private_keylog(args.keylog)
            warn(f"--keylog {args.keylog}: this file holds the TLS session secrets; anyone who can read it can "
                 "decrypt the captured traffic. Delete it when done.")
        self.client = lcpaho.new_client(self.identity, ssl_context=ctx, transport=self.transport, proxy=self.proxy)
        if sas is not None:  # the MQTT password is the SAS token, signed in the token just now
            self.client.username_pw_set(self.identity.username(), sas.current().value)
        self.on_record = on_record
        self._connected = threading.Event()
        self._connack: Optional[Any] = None
        self._dropped: Optional[str] = None
        self._subacks: Dict[int, List[Any]] = {}
        self._sub_cond = threading.Condition()
        self._twin: Dict[str, Tuple[topics.TwinResponse, bytes]] = {}
        self._twin_cond = threading.Condition()
        self.acked = 0
        self._ack_cond = threading.Condition()
        self.protocol_errors: List[str] = []
        c = self.client
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_subscribe = self._on_subscribe
        c.on_publish = self._on_publish
        c.on_message = self._on_message
        if on_log is not None:
            c.on_log = lambda client, userdata, level, buf: on_log(buf)

    # ------------------------------------------------------------------------ connection

    def connect(self, keepalive: int = 60) -> None:
        where = f"{self.host}:{self.websocket_port if self.transport == 'websockets' else self.port}"
        try:
            used = lcpaho.connect(self.client, self.host, transport=self.transport, port=self.port,
                                  websocket_port=self.websocket_port, keepalive=keepalive)
            self.port = self.websocket_port if used == "websockets" else self.port
        except ProxyError:
            raise                       # names the proxy (never its credentials), not the hub
        except OSError as exc:
            typed = diagnostics.tls_failure(exc, self.host, self.port, self.ssl_context)
            if typed is not None:       # untrusted, expired, another host's certificate, no TLS 1.2+
                raise typed from None
            if isinstance(exc, ssl.SSLError) and "CERTIFICATE" in str(exc.reason or "").upper():
                raise AuthRefused(
                    f"the TLS handshake with {where} failed ({exc.reason}): the server refused the device "
                    "certificate; register it (or its CA) with the hub. `lightclient doctor --connect "
                    f"{where}` checks the whole chain") from None
            if isinstance(exc, ssl.SSLError):
                raise ConnectionFailed(f"the TLS handshake with {where} failed ({exc.reason or exc}): is --port "
                                       "the hub's MQTT/TLS port (8883)?") from None
            raise ConnectionFailed(f"cannot connect to {where}: {diagnostics.network_reason(exc)}. Check --hub "
                                   "and --port, and that outbound TCP to it is allowed") from None
        self.client.loop_start()
        self._connected.wait(self.timeout)
        if self._connack is None:
            self.close()
            if self._dropped:
                raise AuthRefused(
                    f"{where} closed the connection before answering CONNECT ({self._dropped}); with TLS 1.3 "
                    "this is how a refused device certificate shows: is the certificate (or its CA) registered? "
                    f"Run `lightclient doctor --connect {where}`")
            raise OperationTimeout(f"{where} did not answer CONNECT within {self.timeout:g} s: is it an IoT Hub "
                                   "(MQTT) endpoint?")
        rc = self._connack
        if rc is not None and rc.is_failure:
            self.close()
            code = self.connack_code
            causes = refusal_causes(code, self.identity)
            text = (f"the hub refused the connection: CONNACK {code} ({CONNACK_TEXT.get(code, rc)}). "
                    + ("IoT Hub does not say which of these it is: " if len(causes) > 1 else "")
                    + "; ".join(f"({i}) {c}" if len(causes) > 1 else c for i, c in enumerate(causes, 1))
                    + f". `lightclient doctor --connect {where}` checks each")
            if code in (4, 5):
                raise AuthRefused(text)
            raise ConnectionFailed(text)

    @property
    def connack_code(self) -> Optional[int]:
        """The MQTT 3.1.1 CONNACK return code (paho reports it as an MQTT 5 reason code)."""
        rc = self._connack
        if rc is None:
            return None
        return {0: 0, 132: 1, 133: 2, 136: 3, 134: 4, 135: 5}.get(rc.value, rc.value)

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()

    def _on_connect(self, client, userdata, flags, reason_code, properties=None):
        self._connack = reason_code
        self._connected.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties=None):
        if not self._connected.is_set():
            self._dropped = drop_reason(reason_code)
            self._connected.set()      # wake connect(): no CONNACK is coming
        elif reason_code.is_failure:
            self._dropped = drop_reason(reason_code)
        with self._sub_cond:
            self._sub_cond.notify_all()
        with self._twin_cond:
            self._twin_cond.notify_all()
        with self._ack_cond:
            self._ack_cond.notify_all()

    @property
    def dropped(self) -> Optional[str]:
        return self._dropped

    def _check_alive(self) -> None:
        if self._dropped:
            raise ConnectionFailed(f"the connection to {self.host}:{self.port} dropped: {self._dropped}")

    # ------------------------------------------------------------------------ subscriptions

    def subscribe(self, filters: List[Tuple[str, int]]) -> None:
        rc, mid = self.client.subscribe(filters)
        if rc != 0:
            raise ConnectionFailed(f"cannot subscribe: {rc}")
        deadline = time.monotonic() + self.timeout
        with self._sub_cond:
            while mid not in self._subacks:
                self._check_alive()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise OperationTimeout(f"no SUBACK within {self.timeout:g} s")
                self._sub_cond.wait(left)
            codes = self._subacks.pop(mid)
        refused = [f for (f, _), code in zip(filters, codes) if code.is_failure]
        if refused:
            raise ServiceError(f"the hub refused the subscription to {', '.join(refused)}")

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties=None):
        with self._sub_cond:
            self._subacks[mid] = list(reason_codes)
            self._sub_cond.notify_all()

    # ------------------------------------------------------------------------ publishing

    def _on_publish(self, client, userdata, mid, reason_code=None, properties=None):
        with self._ack_cond:
            self.acked += 1
            self._ack_cond.notify_all()

    def wait_acked(self, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._ack_cond:
            while self.acked < count:
                left = deadline - time.monotonic()
                if left <= 0 or self._dropped:
                    return False
                self._ack_cond.wait(left)
        return True

    # ------------------------------------------------------------------------ messages and twin

    def _on_message(self, client, userdata, message):
        try:
            record = topics.parse(message.topic, self.identity)
        except ProtocolError as exc:
            self.protocol_errors.append(str(exc))
            return
        if isinstance(record, topics.TwinResponse):
            with self._twin_cond:
                self._twin[record.rid] = (record, message.payload)
                self._twin_cond.notify_all()
        if record is not None and self.on_record is not None:
            self.on_record(record, message)

    def twin_request(self, publish: Callable[[], str]) -> Tuple[topics.TwinResponse, bytes]:
        """Send a twin request (``publish`` returns its rid) and wait for the matching response."""
        rid = publish()
        deadline = time.monotonic() + self.timeout
        with self._twin_cond:
            while rid not in self._twin:
                self._check_alive()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise OperationTimeout(f"no twin response for $rid={rid} within {self.timeout:g} s")
                self._twin_cond.wait(left)
            return self._twin.pop(rid)

    def get_twin(self) -> Dict[str, Any]:
        response, body = self.twin_request(lambda: lcpaho.request_twin(self.client))
        if response.status != 200:
            raise ServiceError(f"the hub answered the twin GET with status {response.status}: {preview(body)}",
                               status=response.status)
        try:
            return json.loads(body)
        except ValueError:
            raise ProtocolError(f"the twin document is not JSON: {preview(body)}") from None

    def report(self, patch: Dict[str, Any]) -> topics.TwinResponse:
        response, body = self.twin_request(lambda: lcpaho.patch_reported(self.client, patch))
        if response.status not in (200, 204):
            raise ServiceError(f"the hub refused the reported properties with status {response.status}: "
                               f"{preview(body)}", status=response.status)
        return response
