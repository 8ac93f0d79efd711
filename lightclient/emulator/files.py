"""The hub's file-upload endpoints: HTTPS with the device's client certificate or its SAS token, as on the real
hub's port 443.

    POST /devices/{deviceId}/files?api-version=…                {"blobName": "…"}
         -> 200 {"correlationId", "hostName", "containerName", "blobName": "{deviceId}/{name}", "sasToken": "?…"}
    POST /devices/{deviceId}/files/notifications?api-version=…  {"correlationId", "isSuccess", "statusCode",
                                                                 "statusDescription"} -> 204

Choices where the protocol notes say UNCERTAIN or the SDKs differ (all explicit here):

* api-version: every version an SDK or the docs use is accepted (:data:`API_VERSIONS`); a missing one is 400.
* The C SDK's ``/files/?api-version`` (a ``/`` before ``?``) is accepted like ``/files?api-version``.
* The SAS's ``sv`` is :data:`blob.DEFAULT_SERVICE_VERSION` (the docs' example) unless configured.
* CA-signed X.509 devices may upload (``allow_ca_signed=False`` plays a hub where that is still a preview:
  403 for them, thumbprint devices only).

Rules like the hub's: the certificate must authenticate the device in the path (CA-signed: issued by the
emulator's CA with CN = device id; self-signed: a registered thumbprint), or, for a symmetric-key device,
``Authorization: SharedAccessSignature sr=…&sig=…&se=…`` signed with its primary or secondary key for the
resource ``{hub}/devices/{deviceId}`` (protocol notes §9/§10; checked by :mod:`.sas`: signature, expiry,
resource, no ``skn``; the docs' lower-cased ``sr`` reading is accepted too, UNCERTAIN which the hub requires);
the device enabled (401/403 otherwise). A SAS refusal is 401 ``401002`` plus a diagnostic (``files.sas``,
``files.sas-expired``, ``files.sas-resource``, ``files.sas-signature``) naming what is wrong; so is a missing
client certificate (``files.certificate``). Choices: a symmetric-key device is authenticated by its token
alone (a client certificate it may send is ignored); an X.509 device that sends an ``Authorization`` header is
refused (it has no key to check it with); at most 10 uploads open per device (the 11th gets 403 ``403006``);
an upload's slot frees with its notification or when its SAS expires. Every notification is recorded
(:attr:`FileUpload.notifications`). Fault injection: :meth:`FileUpload.inject` answers a device's next request
of one step with a status.
"""
from __future__ import annotations

import json
import re
import ssl
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple
from urllib.parse import parse_qs, unquote, urlsplit

from . import jsonlimits, sas
from .blob import BlobStore
from .diagnostics import Diagnostic
from .registry import CA_SIGNED, SYMMETRIC_KEY, PeerCertificate, Registry
from .tls_http import ServerThread, TlsHttpServer

API_VERSIONS = ("2016-11-14", "2018-06-30", "2019-03-30", "2019-10-01", "2020-03-13", "2020-09-30", "2021-04-12")
MAX_ACTIVE = 10
MAX_BODY_BYTES = 16 * 1024
MAX_BLOB_NAME = 1024

_PATH_RE = re.compile(r"^/devices/(?P<device>[^/]+)/files(?P<notify>/notifications)?/?$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f\\]")


@dataclass(frozen=True)
class Notification:
    device_id: str
    correlation_id: str
    blob_name: str
    is_success: bool
    status_code: int
    status_description: str


@dataclass
class _Upload:
    device_id: str
    blob_name: str
    expires: float


def blob_name_problem(name: Any, device_id: str) -> Optional[str]:
    """Why the hub refuses ``name`` as a blob name, or None."""
    if not isinstance(name, str) or not name:
        return "blobName must be a non-empty string"
    if len(device_id) + 1 + len(name) > MAX_BLOB_NAME:
        return f"the blob name {{deviceId}}/{{blobName}} is longer than {MAX_BLOB_NAME} characters"
    if _CONTROL.search(name):
        return "blobName contains a control character or a backslash"
    if name.endswith((".", "/")) or any(p in ("", ".", "..") for p in name.split("/")):
        return "blobName has an empty, '.' or '..' path segment, or ends in '.' or '/'"
    return None


class FileUpload:
    """The endpoints on their own HTTPS port, sharing the hub's TLS context (so the same device certificates
    are trusted) and its registry; the storage account is ``blob`` (advertised as ``blob_host``)."""

    def __init__(self, *, registry: Registry, ssl_context: ssl.SSLContext, ca_subject: Dict[str, str],
                 blob: BlobStore, blob_host: str, host: str = "127.0.0.1", port: int = 0, sas_ttl: float = 3600.0,
                 allow_ca_signed: bool = True, log: Optional[Callable[[str], None]] = None,
                 hostname: str = "localhost", diag: Optional[Callable[[Diagnostic], None]] = None):
        self.registry = registry
        self.hostname = hostname      # the hub's name: SAS tokens are for {hostname}/devices/{deviceId}
        self._diag = diag or (lambda diagnostic: None)
        self.ca_subject = ca_subject
        self.blob = blob
        self.blob_host = blob_host
        self.sas_ttl = sas_ttl
        self.allow_ca_signed = allow_ca_signed
        self._log = log or (lambda line: None)
        self._lock = threading.Lock()
        self._active: Dict[str, _Upload] = {}
        self._faults: Dict[Tuple[str, str], List[int]] = {}
        self.notifications: List[Notification] = []
        self.requests: List[Tuple[str, str, int]] = []    # (device, step, status)
        self._ctx = ssl_context
        self._serving = ServerThread(_Server((host, port), _Handler, self), "files-emulator")

    @property
    def port(self) -> int:
        return self._serving.server.server_address[1]

    def start(self) -> "FileUpload":
        self._serving.start()
        return self

    def stop(self) -> None:
        """Stop the endpoints and the storage account."""
        self._serving.stop()
        self.blob.stop()

    def inject(self, device_id: str, *statuses: int, step: str = "sas") -> None:
        """Answer ``device_id``'s next requests of ``step`` ("sas" or "notify") with these statuses."""
        if step not in ("sas", "notify"):
            raise ValueError(f"step is 'sas' or 'notify', not {step!r}")
        with self._lock:
            self._faults.setdefault((device_id, step), []).extend(statuses)

    def active(self, device_id: str) -> int:
        """Uploads of ``device_id`` that are open (no notification yet, SAS not expired)."""
        with self._lock:
            self._expire()
            return sum(1 for u in self._active.values() if u.device_id == device_id)

    def wait_for_notification(self, count: int = 1, timeout: float = 5.0) -> List[Notification]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if len(self.notifications) >= count:
                    return list(self.notifications)
            time.sleep(0.02)
        with self._lock:
            return list(self.notifications)

    def _expire(self) -> None:
        now = time.monotonic()
        for cid in [c for c, u in self._active.items() if u.expires <= now]:
            del self._active[cid]

    # ------------------------------------------------------------------ logic

    def _refuse(self, device_id: str, rule: str, message: str, received: str = "") -> Tuple[int, int, str]:
        self._diag(Diagnostic(rule, f"HTTP 401: {message}", received, device_id))
        return 401, 401002, message

    def _authorize(self, device_id: str, peer: PeerCertificate,
                   authorization: Optional[str] = None) -> Optional[Tuple[int, int, str]]:
        identity = self.registry.get(device_id)
        if identity is None:
            return 404, 404001, f"device {device_id!r} is not registered"
        if not identity.enabled:
            return 401, 401002, f"device {device_id!r} is disabled"
        if identity.auth == SYMMETRIC_KEY:
            problem, _ = sas.check(authorization, identity.keys, f"{self.hostname}/devices/{device_id}",
                                   rule="files.sas")
            if problem is not None:
                return self._refuse(device_id, problem[0], f"SAS authentication failed: {problem[1]}")
            return None
        if authorization is not None:
            return self._refuse(device_id, "files.sas", f"{device_id!r} authenticates with an X.509 certificate; "
                                "it cannot be checked against an Authorization header (send none)")
        if not peer.present:
            return self._refuse(device_id, "files.certificate", f"{device_id!r} authenticates with an X.509 "
                                "certificate, but the device sent none in the TLS handshake")
        if identity.auth == CA_SIGNED:
            if peer.self_signed or peer.issuer != self.ca_subject or peer.common_name != device_id:
                return 401, 401002, f"the client certificate (CN={peer.common_name!r}) does not authenticate {device_id!r}"
            if not self.allow_ca_signed:
                return 403, 403001, "file upload for CA-signed X.509 devices is not enabled on this hub (preview)"
        elif peer.sha1 not in identity.thumbprints and peer.sha256 not in identity.thumbprints:
            return 401, 401002, f"the certificate thumbprint matches none registered for {device_id!r}"
        return None

    def handle(self, method: str, raw_path: str, body: bytes, peer: PeerCertificate,
               authorization: Optional[str] = None) -> Tuple[int, Optional[dict]]:
        url = urlsplit(raw_path)
        match = _PATH_RE.match(url.path)
        if match is None or method != "POST":
            return _error(404 if match is None else 405, 404000 if match is None else 405000,
                          f"no {method} endpoint {url.path[:100]}")
        device_id = unquote(match["device"])
        step = "notify" if match["notify"] else "sas"
        version = (parse_qs(url.query).get("api-version") or [None])[0]
        if not version:
            return _error(400, 400004, "the api-version query parameter is required")
        if version not in API_VERSIONS:
            return _error(400, 400004, f"unsupported api-version {version!r}")
        refusal = self._authorize(device_id, peer, authorization)
        if refusal:
            return _error(*refusal)
        with self._lock:
            faults = self._faults.get((device_id, step))
            if faults:
                status = faults.pop(0)
                return _error(status, status * 1000 + 1, f"injected fault {status}")
        try:
            data = jsonlimits.loads(body or b"")
        except ValueError:
            return _error(400, 400004, "the body must be a JSON object")
        if not isinstance(data, dict):
            return _error(400, 400004, "the body must be a JSON object")
        return self._notify(device_id, data) if step == "notify" else self._sas(device_id, data)

    def _sas(self, device_id: str, data: dict) -> Tuple[int, Optional[dict]]:
        name = data.get("blobName")
        problem = blob_name_problem(name, device_id)
        if problem:
            return _error(400, 400004, problem)
        with self._lock:
            self._expire()
            if sum(1 for u in self._active.values() if u.device_id == device_id) >= MAX_ACTIVE:
                return _error(403, 403006, "Number of active file upload requests exceeded limit")
            correlation_id = uuid.uuid4().hex
            blob_name = f"{device_id}/{name}"
            self._active[correlation_id] = _Upload(device_id, blob_name, time.monotonic() + self.sas_ttl)
        sas = self.blob.issue_sas(blob_name, ttl=self.sas_ttl)
        self._log(f"file upload {device_id}: {blob_name} ({correlation_id})")
        return 200, {"correlationId": correlation_id, "hostName": self.blob_host,
                     "containerName": self.blob.container, "blobName": blob_name, "sasToken": sas}

    def _notify(self, device_id: str, data: dict) -> Tuple[int, Optional[dict]]:
        cid, ok, code, text = (data.get(k) for k in ("correlationId", "isSuccess", "statusCode", "statusDescription"))
        if not isinstance(cid, str) or not isinstance(ok, bool):
            return _error(400, 400004, "correlationId (string) and isSuccess (boolean) are required")
        if code is not None and (isinstance(code, bool) or not isinstance(code, int)):
            return _error(400, 400004, "statusCode must be an integer")
        with self._lock:
            upload = self._active.get(cid)
            if upload is None or upload.device_id != device_id:
                return _error(400, 400028, f"no open upload {cid!r} for {device_id!r} (already notified or expired)")
            del self._active[cid]
            self.notifications.append(Notification(device_id, cid, upload.blob_name, ok, code or 0,
                                                   str(text or "")[:1000]))
        self._log(f"file upload {device_id}: {'done' if ok else 'FAILED'} {upload.blob_name} ({code})")
        return 204, None


def _error(status: int, code: int, message: str) -> Tuple[int, dict]:
    return status, {"errorCode": code, "message": message, "trackingId": uuid.uuid4().hex}


class _Server(TlsHttpServer):
    def __init__(self, address, handler, service: FileUpload):
        self.service = service
        super().__init__(address, handler, lambda: service._ctx)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "lightclient-iothub-emulator"
    timeout = 30
    server: _Server

    def setup(self) -> None:
        super().setup()
        try:
            self.connection.do_handshake()
            # A SAS device sends no certificate (the hub asks for one but lets it go without).
            self._peer: Optional[PeerCertificate] = PeerCertificate.from_ssl(
                self.connection.getpeercert(binary_form=True) or b"", self.connection.getpeercert() or {})
        except (ssl.SSLError, OSError, TypeError):
            self._peer = None
            self.close_connection = True

    def handle(self) -> None:
        if self._peer is not None:
            super().handle()

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:
        self._serve()

    def do_GET(self) -> None:
        self._serve()

    do_PUT = do_DELETE = do_GET

    def _serve(self) -> None:
        service = self.server.service
        text = (self.headers.get("Content-Length") or "0").strip()
        if not re.fullmatch(r"[0-9]{1,9}", text) or int(text) > MAX_BODY_BYTES:
            self.close_connection = True
            status, data = _error(413 if text.isdigit() else 400, 413000 if text.isdigit() else 400004,
                                  f"the body must have a Content-Length of at most {MAX_BODY_BYTES} bytes")
        else:
            body = self.rfile.read(int(text))
            assert self._peer is not None
            status, data = service.handle(self.command, self.path, body, self._peer, self.headers.get("Authorization"))
        with service._lock:
            service.requests.append((self.path.split("/")[2] if self.path.count("/") > 1 else "?",
                                     "notify" if "/notifications" in self.path else "sas", status))
        payload = json.dumps(data).encode() if data is not None else b""
        self.send_response(status)
        if data is not None:
            self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(payload)))
        if status >= 400 and data is not None:
            self.send_header("iothub-errorcode", str(data.get("errorCode", "")))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(payload)


def start(emulator, *, port: int = 0, blob_port: int = 0, blob_host: Optional[str] = None,
          service_version: Optional[str] = None, sas_ttl: float = 3600.0, allow_ca_signed: bool = True,
          log: Optional[Callable[[str], None]] = None) -> FileUpload:
    """Start the storage account and the hub's file-upload endpoints for a running Emulator."""
    from .blob import DEFAULT_SERVICE_VERSION

    cert, key = emulator._server_files
    blob = BlobStore(Path(emulator.state_dir) / "blobstore", server_cert=cert, server_key=key, host=emulator.host,
                     port=blob_port, service_version=service_version or DEFAULT_SERVICE_VERSION).start()
    try:
        service = FileUpload(registry=emulator.registry, ssl_context=emulator._ssl_context,
                             ca_subject=emulator._ca_subject(), blob=blob,
                             blob_host=blob_host or f"{emulator.hostname}:{blob.port}", host=emulator.host,
                             port=port, sas_ttl=sas_ttl, allow_ca_signed=allow_ca_signed,
                             log=log, hostname=emulator.hostname, diag=emulator.diagnostic_log.add)
    except BaseException:
        blob.stop()
        raise
    return service.start()
