"""A small loopback HTTP API shaped like the IoT Hub service REST API (plain HTTP, no auth: loopback only).

Routes (``?api-version=…`` is accepted and ignored; module forms insert ``/modules/{moduleId}``)::

    GET    /devices                                   list identities
    PUT    /devices/{id}[/modules/{mid}]              register: {"authentication": {"type":
                                                      "certificateAuthority"}} or {"type": "selfSigned",
                                                      "x509Thumbprint": {"primaryThumbprint": …},
                                                      "x509Certificate": PEM (emulator extension)}
    DELETE /devices/{id}[/modules/{mid}]              unregister
    GET    /twins/{id}[/modules/{mid}]                twin {"deviceId", "modelId", "properties": {…}}
    PATCH  /twins/{id}[/modules/{mid}]                {"properties": {"desired": {…}}} -> updated twin
    POST   /twins/{id}[/modules/{mid}]/methods        {"methodName", "payload", "responseTimeoutInSeconds"}
                                                      -> {"status", "payload"}; 404 offline, 504 timeout
    POST   /devices/{id}/messages/deviceBound         body = message; headers iothub-messageid,
                                                      iothub-correlationid, iothub-userid,
                                                      iothub-contenttype, iothub-contentencoding,
                                                      iothub-expiry, iothub-ack, iothub-app-{name}
                                                      (the real service sends C2D over AMQP only)
    GET    /emulator/events[?deviceId=&moduleId=]     accepted telemetry, oldest first
    GET    /emulator/diagnostics[?identity=&rule=]    recorded protocol deviations
    GET    /emulator/feedback[?deviceId=]             C2D feedback records (Success / Expired), see c2d_feedback

Errors come back with the hub's status and a body ``{"errorCode": 404103, "message": …}``; so does every
malformed request (bad JSON, a body that is not an object, too deep JSON, a wrong Content-Length, a body
over 1 MiB: 413, an unknown route: 404).
"""
from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional, Tuple
from urllib.parse import parse_qs, unquote, urlsplit

from . import jsonlimits
from .diagnostics import Diagnostic
from .errors import EmulatorError, HubError
from .registry import CA_SIGNED, SELF_SIGNED

#: The largest request body taken (413 beyond): far above the hub's own limits (C2D 64 KB, twin 32 KB).
MAX_BODY_BYTES = 1024 * 1024
#: Seconds a connection may take to send its request before its thread gives up on it.
REQUEST_TIMEOUT = 30
#: IoT Hub's range for responseTimeoutInSeconds / connectTimeoutInSeconds.
MAX_METHOD_SECONDS = 300

_IDENTITY = r"(?P<device>[^/]+)(?:/modules/(?P<module>[^/]+))?"
_ROUTES = [
    ("GET", re.compile(r"^/devices/?$"), "list_devices"),
    ("PUT", re.compile(rf"^/devices/{_IDENTITY}$"), "register"),
    ("DELETE", re.compile(rf"^/devices/{_IDENTITY}$"), "unregister"),
    ("GET", re.compile(rf"^/twins/{_IDENTITY}$"), "get_twin"),
    ("PATCH", re.compile(rf"^/twins/{_IDENTITY}$"), "patch_twin"),
    ("POST", re.compile(rf"^/twins/{_IDENTITY}/methods/?$"), "invoke"),
    ("POST", re.compile(r"^/devices/(?P<device>[^/]+)/messages/deviceBound/?$", re.I), "send_c2d"),
    ("GET", re.compile(r"^/emulator/events/?$"), "events"),
    ("GET", re.compile(r"^/emulator/diagnostics/?$"), "diagnostics"),
    ("GET", re.compile(r"^/emulator/feedback/?$"), "feedback"),
]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    emulator: Any = None


class HttpApi:
    def __init__(self, emulator, host: str, port: int):
        self._server = _Server((host, port), _Handler)
        self._server.emulator = emulator
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="iothub-emulator-http",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


class _Handler(BaseHTTPRequestHandler):
    server_version = "lightclient-iothub-emulator"
    protocol_version = "HTTP/1.1"
    timeout = REQUEST_TIMEOUT  # a client that stops sending mid-request frees its thread after this

    def log_message(self, *args) -> None:  # keep test output clean; diagnostics carry what matters
        pass

    def do_GET(self) -> None:
        self._route("GET")

    def do_PUT(self) -> None:
        self._route("PUT")

    def do_PATCH(self) -> None:
        self._route("PATCH")

    def do_POST(self) -> None:
        self._route("POST")

    def do_DELETE(self) -> None:
        self._route("DELETE")

    def send_error(self, code: int, message: Optional[str] = None, explain: Optional[str] = None) -> None:
        """The base class's answer to a request it cannot parse (bad request line, header too long,
        unknown method), as JSON like every other answer."""
        if code == 501:  # an unknown method is the client's mistake here
            code, message = 405, f"method {self.command!r} is not supported; use GET, PUT, PATCH, POST or DELETE"
        self.close_connection = True
        if self.request_version in ("", "HTTP/0.9"):  # a status line even when the request line was garbage
            self.request_version = self.protocol_version
        self._reply(code, {"errorCode": code * 1000, "message": message or explain or "bad request"})

    # ------------------------------------------------------------------ plumbing

    def _route(self, method: str) -> None:
        try:
            status, payload = self._dispatch(method)
        except HubError as exc:
            status, payload = exc.status, exc.body()
        except (EmulatorError, ValueError, KeyError, TypeError) as exc:
            status, payload = 400, {"errorCode": 400004, "message": str(exc)}
        except Exception as exc:  # a bug here must still answer, and be visible
            self.emulator.diagnostic_log.add(Diagnostic(
                "service.internal", f"the service API failed on {method} {self.path}: "
                f"{type(exc).__name__}: {exc}"))
            status, payload = 500, {"errorCode": 500001, "message": f"internal emulator error: {exc}"}
        self._reply(status, payload)

    def _dispatch(self, method: str) -> Tuple[int, Any]:
        url = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        self.body = self._read_body()
        path = unquote(url.path)
        for verb, pattern, name in _ROUTES:
            match = pattern.match(path)
            if match and verb == method:
                for value in match.groupdict().values():
                    if value in (".", ".."):
                        raise HubError(400, 400004, f"{value!r} is not an identity id: HTTP clients resolve it "
                                       f"as a path segment, so it could never be addressed")
                return getattr(self, name)(**match.groupdict())
        raise HubError(404, 404000, f"no route {method} {url.path}")

    def _read_body(self) -> bytes:
        """The request body, exactly Content-Length bytes; a request whose framing cannot be trusted is
        answered and the connection closed, since what follows it cannot be parsed either."""
        if self.headers.get("Transfer-Encoding", "identity").strip().lower() != "identity":
            self.close_connection = True
            raise HubError(411, 411000, "send the body with a Content-Length header; Transfer-Encoding "
                           "is not supported")
        values = {v.strip() for v in self.headers.get_all("Content-Length") or ()}
        if not values:
            return b""
        text = values.pop()
        if values or not re.fullmatch(r"[0-9]{1,18}", text):
            self.close_connection = True
            raise HubError(400, 400004, f"Content-Length must be one non-negative whole number, got "
                           f"{self.headers.get_all('Content-Length')!r}")
        length = int(text)
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            raise HubError(413, 413000, f"request body of {length} bytes is over the emulator's limit of "
                           f"{MAX_BODY_BYTES} bytes")
        try:
            body = self.rfile.read(length)
        except OSError:  # socket.timeout included
            body = b""
        if len(body) != length:
            self.close_connection = True
            raise HubError(400, 400004, f"the body ended after {len(body)} of the {length} bytes its "
                           f"Content-Length announced")
        return body

    def _reply(self, status: int, payload: Optional[Any]) -> None:
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        if data:
            self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _object(self) -> dict:
        """The body as a JSON object; anything else is the client's mistake, named."""
        if not self.body:
            raise HubError(400, 400004, "the request body is missing; expected a JSON object")
        try:
            value = jsonlimits.loads(self.body)
        except jsonlimits.JsonTooDeep as exc:
            message = f"request body: {exc}"
            self.emulator.diagnostic_log.add(Diagnostic("service.json-depth", message,
                                                        f"{self.command} {self.path}"))
            raise HubError(400, 400004, message) from None
        except ValueError as exc:  # UnicodeDecodeError included
            raise HubError(400, 400004, f"request body is not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise HubError(400, 400004, f"request body must be a JSON object, not {_json_kind(value)}")
        return value

    @property
    def emulator(self):
        return self.server.emulator

    # ------------------------------------------------------------------ routes

    def list_devices(self) -> Tuple[int, Any]:
        return 200, [_identity_json(i) for i in self.emulator.identities()]

    def register(self, device: str, module: Optional[str]) -> Tuple[int, Any]:
        body = self._object()
        auth = _field(body, "authentication", dict, {"type": CA_SIGNED})
        kind = _field(auth, "type", str, CA_SIGNED)
        status = _field(body, "status", str, "enabled")
        if status not in ("enabled", "disabled"):
            raise HubError(400, 400004, f"status must be 'enabled' or 'disabled', got {status!r}")
        certificate = None
        prints = []
        if kind == SELF_SIGNED:
            thumbprints = _field(auth, "x509Thumbprint", dict, {})
            prints = [_field(thumbprints, k, str, "") for k in thumbprints]
            prints = [t for t in prints if t]
            certificate = _field(auth, "x509Certificate", str, "") or None
            if not prints and certificate is None:
                raise HubError(400, 400004, "a selfSigned identity needs x509Thumbprint or x509Certificate")
        elif kind != CA_SIGNED:
            raise HubError(400, 400004, f"authentication type {kind!r} is not supported by the emulator "
                           f"(use certificateAuthority or selfSigned)")
        identity = self.emulator.register_device(device, module, certificate_pem=certificate, thumbprints=prints,
                                                 enabled=status == "enabled")
        return 200, _identity_json(identity)

    def unregister(self, device: str, module: Optional[str]) -> Tuple[int, Any]:
        self.emulator.unregister(device, module)
        return 204, None

    def _twin_json(self, device: str, module: Optional[str]) -> dict:
        twin = self.emulator.get_twin(device, module)
        result = {"deviceId": device, "modelId": self.emulator.model_id(device, module) or "",
                  "etag": "AAAAAAAAAAE=",
                  "version": twin["desired"]["$version"] + twin["reported"]["$version"],
                  "properties": twin}
        if module:
            result["moduleId"] = module
        return result

    def get_twin(self, device: str, module: Optional[str]) -> Tuple[int, Any]:
        return 200, self._twin_json(device, module)

    def patch_twin(self, device: str, module: Optional[str]) -> Tuple[int, Any]:
        desired = _field(_field(self._object(), "properties", dict, {}), "desired", dict, None)
        if not isinstance(desired, dict):
            raise HubError(400, 400004, 'expected {"properties": {"desired": {…}}}')
        self.emulator.update_desired(device, desired, module)
        return 200, self._twin_json(device, module)

    def invoke(self, device: str, module: Optional[str]) -> Tuple[int, Any]:
        body = self._object()
        name = _field(body, "methodName", str, "")
        if not name:
            raise HubError(400, 400004, "methodName is required")
        timeout = _seconds(body, "responseTimeoutInSeconds", 30)
        connect_timeout = _seconds(body, "connectTimeoutInSeconds", 0)
        deadline = time.monotonic() + connect_timeout
        while True:
            # connectTimeoutInSeconds: how long the hub waits for an offline device to come online.
            if self.emulator.is_connected(device, module) or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        result = self.emulator.invoke_method(device, name, body.get("payload"), module_id=module,
                                             timeout=timeout)
        return 200, {"status": result.status, "payload": result.payload}

    def send_c2d(self, device: str) -> Tuple[int, Any]:
        headers = {k.lower(): v for k, v in self.headers.items()}
        # Header names are case-insensitive, property names are not: keep each name as the caller wrote it.
        properties = {k[len("iothub-app-"):]: v for k, v in self.headers.items()
                      if k.lower().startswith("iothub-app-")}
        message_id = self.emulator.send_c2d(
            device, self.body, message_id=headers.get("iothub-messageid"),
            correlation_id=headers.get("iothub-correlationid"), user_id=headers.get("iothub-userid"),
            content_type=headers.get("iothub-contenttype"),
            content_encoding=headers.get("iothub-contentencoding"), expiry=headers.get("iothub-expiry"),
            ack=headers.get("iothub-ack"), properties=properties)
        return 200, {"messageId": message_id}

    def events(self) -> Tuple[int, Any]:
        events = self.emulator.events(self.query.get("deviceId"), self.query.get("moduleId"))
        return 200, [e.to_json() for e in events]

    def feedback(self) -> Tuple[int, Any]:
        return 200, self.emulator.c2d_feedback(self.query.get("deviceId"))

    def diagnostics(self) -> Tuple[int, Any]:
        items = self.emulator.diagnostics(self.query.get("identity"), self.query.get("rule"))
        return 200, [{"rule": d.rule, "message": d.message, "received": d.received, "identity": d.identity,
                      "peer": d.peer, "time": d.time, "text": str(d)} for d in items]


def _json_kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def _field(obj: dict, key: str, kind: type, default: Any) -> Any:
    """``obj[key]`` if it has the JSON type ``kind``; absent or null gives ``default``; else a named 400."""
    value = obj.get(key)
    if value is None:
        return default
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise HubError(400, 400004, f"{key!r} must be {_json_kind(kind())}, not {_json_kind(value)}")
    return value


def _seconds(obj: dict, key: str, default: float) -> float:
    value = obj.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= MAX_METHOD_SECONDS:
        raise HubError(400, 400004, f"{key!r} must be a number of seconds from 0 to {MAX_METHOD_SECONDS}, "
                       f"got {value!r}")
    return float(value)


def _identity_json(identity) -> dict:
    result = {"deviceId": identity.device_id, "status": "enabled" if identity.enabled else "disabled",
              "authentication": {"type": identity.auth}}
    if identity.module_id:
        result["moduleId"] = identity.module_id
    if identity.thumbprints:
        result["authentication"]["x509Thumbprint"] = {"thumbprints": list(identity.thumbprints)}
    return result
