"""A live web dashboard for protocol debugging (``--web-port``; loopback only, no authentication).

Devices and their connection state, a live feed of decoded messages both ways (telemetry, C2D, method
calls and answers, desired patches), twins and diagnostics; forms to send C2D, invoke a method and patch
desired properties. The page is plain HTML/CSS/JS shipped in ``emulator/static`` (no build step); the
server is the standard library's ``http.server``::

    GET  /                    the page (static/index.html, app.js, style.css under /static/)
    GET  /api/state           {"devices": [...], "feed": [...], "diagnostics": [...]}
    GET  /api/stream          server-sent events: one ``feed`` event per entry (``id`` = its sequence)
    POST /api/c2d             {"deviceId", "body", "properties"?}
    POST /api/method          {"deviceId", "moduleId"?, "methodName", "payload"?, "timeout"?}
    POST /api/desired         {"deviceId", "moduleId"?, "patch": {...}}
"""
from __future__ import annotations

import json
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Deque, Dict, List, Optional

from .errors import EmulatorError, HubError

STATIC = Path(__file__).resolve().parent / "static"
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".png": "image/png"}
LOOPBACK = ("127.0.0.1", "::1", "localhost")
#: Feed entries kept for pages that (re)connect; the event log keeps every telemetry message anyway.
FEED_SIZE = 500
#: Seconds between keep-alive comments on an idle event stream (proxies and browsers drop silent ones).
HEARTBEAT = 15.0
MAX_BODY = 256 * 1024


def _text(body: bytes) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        return f"<{len(body)} bytes, not UTF-8>"


class Feed:
    """Thread-safe ring of feed entries with increasing sequence numbers; readers wait for new ones."""

    def __init__(self, size: int = FEED_SIZE) -> None:
        self._items: Deque[Dict[str, Any]] = deque(maxlen=size)
        self._cond = threading.Condition()
        self._seq = 0
        self.closed = False

    def add(self, kind: str, identity: Optional[str], **data: Any) -> None:
        with self._cond:
            self._seq += 1
            self._items.append({"seq": self._seq, "kind": kind, "identity": identity, "time": time.time(), **data})
            self._cond.notify_all()

    def since(self, seq: int, timeout: float) -> List[Dict[str, Any]]:
        with self._cond:
            self._cond.wait_for(lambda: self.closed or (self._items and self._items[-1]["seq"] > seq), timeout)
            return [e for e in self._items if e["seq"] > seq]

    def items(self) -> List[Dict[str, Any]]:
        with self._cond:
            return list(self._items)

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()


class Dashboard:
    def __init__(self, emulator, host: str = "127.0.0.1", port: int = 0):
        if host not in LOOPBACK:
            raise EmulatorError(f"the dashboard listens on loopback only (127.0.0.1 or ::1), not {host!r}: it has "
                                f"no authentication and can send commands to devices")
        self.emulator = emulator
        self.feed = Feed()
        server = _Server((host, port), _Handler)
        server.dashboard = self
        self._server = server
        self.port = server.server_address[1]
        self.url = f"http://{'localhost' if host == 'localhost' else host}:{self.port}/"
        emulator.event_log.listeners.append(self._on_event)
        emulator.diagnostic_log.listeners.append(self._on_diagnostic)
        emulator._hub.observers.append(self._on_hub)
        self._thread = threading.Thread(target=server.serve_forever, name="iothub-emulator-web", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ sources (hub loop thread)

    def _on_event(self, event) -> None:
        self.feed.add("telemetry", event.identity, body=_text(event.body), properties=event.properties,
                      systemProperties=event.system_properties)

    def _on_diagnostic(self, diagnostic) -> None:
        self.feed.add("diagnostic", diagnostic.identity, rule=diagnostic.rule, text=str(diagnostic))

    def _on_hub(self, kind: str, data: Dict[str, Any]) -> None:
        data = dict(data)
        identity = data.pop("identity", None)
        if "body" in data:
            data["body"] = _text(data["body"])
        self.feed.add(kind, identity, **data)

    # ------------------------------------------------------------------ state

    def state(self) -> Dict[str, Any]:
        devices = []
        for identity in self.emulator.identities():
            device, module = identity.device_id, identity.module_id
            try:
                twin = self.emulator.get_twin(device, module)
            except HubError:
                twin = None
            devices.append({"identity": identity.name, "deviceId": device, "moduleId": module,
                            "auth": identity.auth, "enabled": identity.enabled,
                            "connected": self.emulator.is_connected(device, module),
                            "modelId": self.emulator.model_id(device, module), "twin": twin})
        diagnostics = [{"rule": d.rule, "identity": d.identity, "text": str(d), "time": d.time}
                       for d in self.emulator.diagnostics()[-200:]]
        return {"devices": devices, "feed": self.feed.items(), "diagnostics": diagnostics,
                "hub": {"hostname": self.emulator.hostname, "port": self.emulator.port}}

    def close(self) -> None:
        self.feed.close()
        for listeners, item in ((self.emulator.event_log.listeners, self._on_event),
                                (self.emulator.diagnostic_log.listeners, self._on_diagnostic)):
            if item in listeners:
                listeners.remove(item)
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    dashboard: Dashboard


class _Handler(BaseHTTPRequestHandler):
    server_version = "lightclient-iothub-emulator-dashboard"
    protocol_version = "HTTP/1.1"
    timeout = 30

    def log_message(self, *args) -> None:
        pass

    @property
    def dashboard(self) -> Dashboard:
        return self.server.dashboard

    def _reply(self, status: int, payload: Any, content_type: str = "application/json; charset=utf-8") -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        try:
            if path in ("/", "/index.html"):
                self._static("index.html")
            elif path.startswith("/static/"):
                self._static(path[len("/static/"):])
            elif path == "/api/state":
                self._reply(200, self.dashboard.state())
            elif path == "/api/stream":
                self._stream()
            else:
                self._reply(404, {"message": f"no such page {path}"})
        except (ConnectionError, OSError):
            pass  # the browser went away

    def _static(self, name: str) -> None:
        file = (STATIC / name).resolve()
        if file.parent != STATIC or not file.is_file():
            self._reply(404, {"message": f"no static file {name!r}"})
            return
        self._reply(200, file.read_bytes(), _TYPES.get(file.suffix, "application/octet-stream"))

    def _stream(self) -> None:
        """Server-sent events until the page goes away; a reconnecting page resumes after Last-Event-ID."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.close_connection = True
        feed = self.dashboard.feed
        query = dict(part.partition("=")[::2] for part in self.path.partition("?")[2].split("&") if part)
        last = self.headers.get("Last-Event-ID") or query.get("after")
        seq = int(last) if last and last.isdigit() else (feed.items()[-1]["seq"] if feed.items() else 0)
        self.wfile.write(b"retry: 1000\n\n")
        self.wfile.flush()
        while not feed.closed:
            entries = feed.since(seq, HEARTBEAT)
            if not entries:
                self.wfile.write(b": keep-alive\n\n")
            for entry in entries:
                seq = entry["seq"]
                self.wfile.write(f"id: {seq}\nevent: feed\ndata: {json.dumps(entry)}\n\n".encode())
            self.wfile.flush()

    def do_POST(self) -> None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
            if not 0 <= length <= MAX_BODY:
                raise HubError(413, 413000, f"request body over {MAX_BODY} bytes")
            body = json.loads(self.rfile.read(length) or b"{}")
            if not isinstance(body, dict):
                raise HubError(400, 400004, "the request body must be a JSON object")
            status, payload = self._action(self.path.split("?", 1)[0], body)
        except HubError as exc:
            status, payload = exc.status, exc.body()
        except (EmulatorError, ValueError, TypeError, KeyError) as exc:
            status, payload = 400, {"errorCode": 400004, "message": str(exc)}
        try:
            self._reply(status, payload)
        except (ConnectionError, OSError):
            pass

    def _action(self, path: str, body: Dict[str, Any]):
        emulator = self.dashboard.emulator
        device = body.get("deviceId")
        if not isinstance(device, str) or not device:
            raise HubError(400, 400004, "deviceId is required")
        module = body.get("moduleId") or None
        if path == "/api/c2d":
            text = body.get("body", "")
            message_id = emulator.send_c2d(device, text if isinstance(text, str) else json.dumps(text),
                                           properties=body.get("properties") or None)
            return 200, {"messageId": message_id}
        if path == "/api/method":
            name = body.get("methodName")
            if not isinstance(name, str) or not name:
                raise HubError(400, 400004, "methodName is required")
            timeout = float(body.get("timeout", 10))
            result = emulator.invoke_method(device, name, body.get("payload"), module_id=module,
                                            timeout=min(max(timeout, 1.0), 300.0))
            return 200, {"status": result.status, "payload": result.payload}
        if path == "/api/desired":
            patch = body.get("patch")
            if not isinstance(patch, dict):
                raise HubError(400, 400004, "patch must be a JSON object")
            return 200, {"version": emulator.update_desired(device, patch, module)}
        raise HubError(404, 404000, f"no action {path}")
