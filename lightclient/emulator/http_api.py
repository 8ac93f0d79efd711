"""A small loopback HTTP API shaped like the IoT Hub service REST API (plain HTTP, no auth: loopback only).

Routes (``?api-version=…`` is accepted and ignored; module forms insert ``/modules/{moduleId}``)::

    GET    /devices                                   list identities
    PUT    /devices/{id}[/modules/{mid}]              register: {"authentication": {"type":
                                                      "certificateAuthority"}} or {"type": "selfSigned",
                                                      "x509Thumbprint": {"primaryThumbprint": …},
                                                      "x509Certificate": PEM (emulator extension)}
    DELETE /devices/{id}[/modules/{mid}]              unregister
    GET    /twins/{id}[/modules/{mid}]                twin {"deviceId", "properties": {"desired", "reported"}}
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

Errors come back with the hub's status and a body ``{"errorCode": 404103, "message": …}``.
"""
from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional, Tuple
from urllib.parse import parse_qs, unquote, urlsplit

from .errors import EmulatorError, HubError
from .registry import CA_SIGNED, SELF_SIGNED

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

    # ------------------------------------------------------------------ plumbing

    def _route(self, method: str) -> None:
        url = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        length = int(self.headers.get("Content-Length") or 0)
        self.body = self.rfile.read(length) if length else b""
        path = unquote(url.path)
        for verb, pattern, name in _ROUTES:
            match = pattern.match(path)
            if match and verb == method:
                try:
                    status, payload = getattr(self, name)(**match.groupdict())
                except HubError as exc:
                    status, payload = exc.status, exc.body()
                except (EmulatorError, ValueError, KeyError, TypeError) as exc:
                    status, payload = 400, {"errorCode": 400004, "message": str(exc)}
                self._reply(status, payload)
                return
        self._reply(404, {"errorCode": 404000, "message": f"no route {method} {url.path}"})

    def _reply(self, status: int, payload: Optional[Any]) -> None:
        data = b"" if payload is None else json.dumps(payload).encode()
        self.send_response(status)
        if data:
            self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _json(self) -> Any:
        try:
            return json.loads(self.body or b"null")
        except ValueError as exc:
            raise HubError(400, 400004, f"request body is not valid JSON: {exc}") from None

    @property
    def emulator(self):
        return self.server.emulator

    # ------------------------------------------------------------------ routes

    def list_devices(self) -> Tuple[int, Any]:
        return 200, [_identity_json(i) for i in self.emulator.identities()]

    def register(self, device: str, module: Optional[str]) -> Tuple[int, Any]:
        body = self._json() or {}
        auth = body.get("authentication") or {"type": CA_SIGNED}
        kind = auth.get("type", CA_SIGNED)
        certificate = None
        prints = []
        if kind == SELF_SIGNED:
            prints = [t for t in (auth.get("x509Thumbprint") or {}).values() if t]
            pem = auth.get("x509Certificate")
            if pem:
                certificate = self.emulator.state_dir / "registered" / f"{device}__{module or ''}.pem"
                certificate.parent.mkdir(parents=True, exist_ok=True)
                certificate.write_text(pem)
            if not prints and certificate is None:
                raise HubError(400, 400004, "a selfSigned identity needs x509Thumbprint or x509Certificate")
        elif kind != CA_SIGNED:
            raise HubError(400, 400004, f"authentication type {kind!r} is not supported by the emulator "
                           f"(use certificateAuthority or selfSigned)")
        identity = self.emulator.register_device(device, module, certificate=certificate, thumbprints=prints,
                                                 enabled=body.get("status", "enabled") == "enabled")
        return 200, _identity_json(identity)

    def unregister(self, device: str, module: Optional[str]) -> Tuple[int, Any]:
        self.emulator.unregister(device, module)
        return 204, None

    def _twin_json(self, device: str, module: Optional[str]) -> dict:
        twin = self.emulator.get_twin(device, module)
        result = {"deviceId": device, "etag": "AAAAAAAAAAE=",
                  "version": twin["desired"]["$version"] + twin["reported"]["$version"],
                  "properties": twin}
        if module:
            result["moduleId"] = module
        return result

    def get_twin(self, device: str, module: Optional[str]) -> Tuple[int, Any]:
        return 200, self._twin_json(device, module)

    def patch_twin(self, device: str, module: Optional[str]) -> Tuple[int, Any]:
        body = self._json() or {}
        desired = (body.get("properties") or {}).get("desired")
        if not isinstance(desired, dict):
            raise HubError(400, 400004, 'expected {"properties": {"desired": {…}}}')
        self.emulator.update_desired(device, desired, module)
        return 200, self._twin_json(device, module)

    def invoke(self, device: str, module: Optional[str]) -> Tuple[int, Any]:
        body = self._json() or {}
        name = body.get("methodName")
        if not name:
            raise HubError(400, 400004, "methodName is required")
        timeout = float(body.get("responseTimeoutInSeconds", 30))
        connect_timeout = float(body.get("connectTimeoutInSeconds", 0))
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
        properties = {k[len("iothub-app-"):]: v for k, v in headers.items() if k.startswith("iothub-app-")}
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

    def diagnostics(self) -> Tuple[int, Any]:
        items = self.emulator.diagnostics(self.query.get("identity"), self.query.get("rule"))
        return 200, [{"rule": d.rule, "message": d.message, "received": d.received, "identity": d.identity,
                      "peer": d.peer, "time": d.time, "text": str(d)} for d in items]


def _identity_json(identity) -> dict:
    result = {"deviceId": identity.device_id, "status": "enabled" if identity.enabled else "disabled",
              "authentication": {"type": identity.auth}}
    if identity.module_id:
        result["moduleId"] = identity.module_id
    if identity.thumbprints:
        result["authentication"]["x509Thumbprint"] = {"thumbprints": list(identity.thumbprints)}
    return result
