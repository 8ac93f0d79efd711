"""A local Device Provisioning Service: HTTPS with client certificates, shaped like the DPS device API.

Endpoints (``api-version`` required; ``2025-07-01-preview`` for certificate issuance)::

    PUT  /{idScope}/registrations/{registrationId}/register        -> 202 {"operationId", "status": "assigning"}
    GET  /{idScope}/registrations/{registrationId}/operations/{id} -> 202 assigning | 200 final state
    POST /{idScope}/registrations/{registrationId}                 -> 200 registration state (status lookup)

Rules it enforces like DPS: the client certificate's subject CN must equal ``registrationId`` (401),
the device must match an individual enrollment (by certificate thumbprint) or a group enrollment (by
issuing CA) (404 otherwise), a disabled enrollment ends as ``disabled``. Fault injection (429 with
``Retry-After``, 500, 503) and a configurable number of ``assigning`` polls make client retry logic
testable; TLS handshakes are counted per client so connection reuse can be checked.

Standard library only (plus the ``openssl`` command for certificate issuance).
"""
from __future__ import annotations

import base64
import datetime
import json
import re
import ssl
import threading
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple
from urllib.parse import parse_qs, unquote, urlsplit

from . import certs, jsonlimits, sas

#: The largest request body taken (413 beyond); a registration with a CSR is a few KB.
MAX_BODY_BYTES = 64 * 1024
CSR_API_VERSION = "2025-07-01-preview"
KNOWN_API_VERSIONS = ("2019-03-31", "2021-06-01", "2021-10-01", CSR_API_VERSION)

_PATH_RE = re.compile(r"^/(?P<scope>[^/]+)/registrations/(?P<rid>[^/]+)"
                      r"(?:/(?P<action>register)|/operations/(?P<op>[^/]+))?$")


@dataclass
class Enrollment:
    """An individual (``cert_der`` set) or group (``ca_cn`` set) enrollment."""

    name: str                              # registration id (individual) or group id
    cert_der: Optional[bytes] = None       # individual: the device certificate
    ca_cn: Optional[str] = None            # group: CN of the CA that issues the devices' certificates
    device_id: Optional[str] = None        # individual only; groups use the registration id
    assigned_hub: str = "localhost"
    payload: Any = None                    # returned to the device as registrationState.payload
    disabled: bool = False
    polls: int = 1                         # polls answered "assigning" before the final state
    keys: Tuple[str, ...] = field(default=(), repr=False)   # symmetric-key enrollments: primary, secondary
    symmetric_group: bool = False          # a group whose device keys are derived from ``keys``

    @property
    def kind(self) -> str:
        if self.keys:
            return "group" if self.symmetric_group else "individual"
        return "individual" if self.cert_der is not None else "group"


@dataclass
class _Operation:
    op_id: str
    registration_id: str
    enrollment: Enrollment
    remaining_polls: int
    request_payload: Any
    chain: List[bytes] = field(default_factory=list)
    created: str = ""
    result: Optional[dict] = None


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _cn_of(decoded: dict, part: str = "subject") -> Optional[str]:
    for rdn in decoded.get(part, ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


class DpsEmulator:
    """The emulator. ``start()`` serves on a thread; ``stop()`` ends it. Thread-safe."""

    def __init__(self, *, ca: certs.CertificateAuthority, server_cert: Path, server_key: Path,
                 host: str = "127.0.0.1", port: int = 0, id_scope: str = "0ne00000001",
                 retry_after: int = 1, on_assigned: Optional[Callable[[str, str, Optional[bytes]], None]] = None,
                 log: Optional[Callable[[str], None]] = None, cert_lifetime: Optional[float] = None,
                 diag: Optional[Callable[[str, str, str, str], None]] = None):
        self.ca = ca
        #: diag(rule, message, received, peer): protocol mismatches worth showing (a non-HTTP client …).
        self.diag = diag or (lambda rule, message, received, peer: None)
        self.cert_lifetime = cert_lifetime   # seconds an issued certificate is valid (None: a year)
        self.id_scope = id_scope
        self.retry_after = retry_after
        self.on_assigned = on_assigned
        self._log = log or (lambda line: None)
        self._lock = threading.Lock()
        self._enrollments: Dict[str, Enrollment] = {}
        self._groups: Dict[str, Enrollment] = {}
        self._symmetric: Dict[str, Enrollment] = {}        # registration id (lower) -> individual
        self._symmetric_groups: Dict[str, Enrollment] = {}
        self._device_keys: Dict[str, Tuple[str, ...]] = {}   # registration id (lower) -> keys it signs with
        #: ``(device_id, hub, device_keys)`` when a symmetric-key registration is assigned.
        self.on_symmetric_assigned: Optional[Callable[[str, str, Tuple[str, ...]], None]] = None
        self._faults: Dict[str, List[int]] = {}
        self._operations: Dict[str, _Operation] = {}
        self._registrations: Dict[str, dict] = {}
        self.handshakes: Dict[str, int] = {}
        self.requests: List[Tuple[str, str, int]] = []    # (method, path, status)
        self._ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self._ctx.load_cert_chain(str(server_cert), str(server_key))
        self._ctx.verify_mode = ssl.CERT_REQUIRED
        # Individual enrollments trust the device certificate itself, which is not a CA.
        self._ctx.verify_flags |= getattr(ssl, "VERIFY_X509_PARTIAL_CHAIN", 0x80000)
        self._ctx.load_verify_locations(cafile=str(ca.cert_path))
        self._server = _Server((host, port), _Handler, self)
        self._thread: Optional[threading.Thread] = None

    # -------------------------------------------------------------------------------- setup

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def ssl_context(self) -> ssl.SSLContext:
        """The server context (trusting the enrolled CAs and individual certificates); DPS over MQTT
        shares it, so both transports accept the same devices."""
        return self._ctx

    api_versions = KNOWN_API_VERSIONS

    @property
    def endpoint(self) -> str:
        """``host:port`` to pass to :func:`lightclient.dps.provision` as ``endpoint``."""
        return f"{self._server.server_address[0]}:{self.port}"

    def add_individual(self, registration_id: str, cert_pem: bytes, **options) -> Enrollment:
        """Enroll one device by its certificate (self-signed or not)."""
        der = ssl.PEM_cert_to_DER_cert(cert_pem.decode() if isinstance(cert_pem, bytes) else cert_pem)
        enrollment = Enrollment(registration_id, cert_der=der, **options)
        with self._lock:
            self._enrollments[registration_id.lower()] = enrollment
            self._ctx.load_verify_locations(cadata=der)
        return enrollment

    def add_group(self, group_id: str, ca_pem: bytes, **options) -> Enrollment:
        """Enroll every device whose certificate is issued by the CA in ``ca_pem``."""
        text = ca_pem.decode() if isinstance(ca_pem, bytes) else ca_pem
        der = ssl.PEM_cert_to_DER_cert(text)
        subject = certs._openssl("x509", "-noout", "-subject", "-nameopt", "multiline", stdin=text.encode()).decode()
        cn = re.search(r"commonName\s*=\s*(.+)", subject)
        enrollment = Enrollment(group_id, ca_cn=cn.group(1).strip() if cn else None, **options)
        with self._lock:
            self._groups[group_id] = enrollment
            self._ctx.load_verify_locations(cadata=der)
        return enrollment

    def add_symmetric_individual(self, registration_id: str, primary: str, secondary: Optional[str] = None,
                                 **options) -> Enrollment:
        """Enroll one device by its symmetric key(s): it authenticates with a SAS token (emulator/sas.py)."""
        enrollment = Enrollment(registration_id, keys=tuple(k for k in (primary, secondary) if k), **options)
        with self._lock:
            self._symmetric[registration_id.lower()] = enrollment
            self._ctx.verify_mode = ssl.CERT_OPTIONAL   # SAS devices send no certificate
        return enrollment

    def add_symmetric_group(self, group_id: str, primary: str, secondary: Optional[str] = None,
                            **options) -> Enrollment:
        """A group enrollment by symmetric key: each device signs with HMAC(group key, registration id)."""
        enrollment = Enrollment(group_id, keys=tuple(k for k in (primary, secondary) if k), symmetric_group=True,
                                **options)
        with self._lock:
            self._symmetric_groups[group_id] = enrollment
            self._ctx.verify_mode = ssl.CERT_OPTIONAL
        return enrollment

    def _symmetric_for(self, scope: str, rid: str, authorization: Optional[str]):
        """(enrollment, device keys, None) or (None, (), (rule, why)) for a SAS-authenticated request.

        Individual enrollments first; then every symmetric group whose derived key verifies. Group
        registration ids must be lowercase alphanumerics and '-' (the DPS page's rule; UNCERTAIN whether DPS
        applies the wider general rule): others are refused with a message saying so."""
        resource = f"{scope}/registrations/{rid}"
        individual = self._symmetric.get(rid.lower())
        if individual is not None:
            problem, _ = sas.check(authorization, individual.keys, resource, policy="registration", rule="dps.sas")
            return (None, (), problem) if problem else (individual, individual.keys, None)
        why = ("dps.sas-enrollment", f"no symmetric-key enrollment matches {rid!r}")
        for group in self._symmetric_groups.values():
            if not re.fullmatch(r"[a-z0-9-]{1,128}", rid):
                return None, (), ("dps.sas-registration-id", f"registration id {rid!r} is not allowed in a "
                                  "symmetric-key group enrollment: lowercase letters, digits and '-' only")
            derived = tuple(sas.derive_device_key(k, rid) for k in group.keys)
            problem, _ = sas.check(authorization, derived, resource, policy="registration", rule="dps.sas")
            if problem is None:
                return group, derived, None
            why = problem
        return None, (), why

    def inject(self, registration_id: str, *statuses: int) -> None:
        """Answer the next requests for ``registration_id`` with these statuses (429, 500, 503 …)."""
        with self._lock:
            self._faults.setdefault(registration_id.lower(), []).extend(statuses)

    def start(self) -> "DpsEmulator":
        self._thread = threading.Thread(target=self._server.serve_forever, name="dps-emulator", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> "DpsEmulator":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -------------------------------------------------------------------------------- logic

    def _enrollment_for(self, registration_id: str, peer_der: bytes, peer: dict) -> Optional[Enrollment]:
        individual = self._enrollments.get(registration_id.lower())
        if individual is not None:
            return individual if individual.cert_der == peer_der else None
        issuer = _cn_of(peer, "issuer")
        for group in self._groups.values():
            if group.ca_cn is not None and group.ca_cn == issuer:
                return group
        return None

    def handle(self, method: str, raw_path: str, body: bytes, peer_der: bytes, peer: dict,
               authorization: Optional[str] = None) -> Tuple[int, dict, Dict[str, str]]:
        """Pure request handling: (status, JSON body, extra headers)."""
        url = urlsplit(raw_path)
        query = parse_qs(url.query)
        match = _PATH_RE.match(url.path)
        if match is None:
            return _error(404, 404000, f"no such DPS endpoint: {url.path}")
        scope, rid = unquote(match["scope"]), unquote(match["rid"])
        api_version = (query.get("api-version") or [None])[0]
        if not api_version:
            return _error(400, 400004, "the api-version query parameter is required")
        if api_version not in KNOWN_API_VERSIONS:
            return _error(400, 400004, f"unsupported api-version {api_version!r}")
        if scope != self.id_scope:
            return _error(404, 404201, f"unknown ID scope {scope!r}")
        with self._lock:
            faults = self._faults.get(rid.lower())
            if faults:
                status = faults.pop(0)
                headers = {"Retry-After": str(self.retry_after)} if status == 429 else {}
                return status, {"errorCode": status * 1000 + 1, "message": f"injected fault {status}",
                                "trackingId": uuid.uuid4().hex}, headers
        if authorization is not None or not peer_der:   # symmetric key: the SAS token authenticates
            with self._lock:
                enrollment, device_keys, why = self._symmetric_for(scope, rid, authorization)
            if enrollment is None:
                return _error(401, 401002, f"SAS authentication failed: {why[1]}")
            self._device_keys[rid.lower()] = device_keys
        else:
            cn = _cn_of(peer)
            if cn != rid:
                return _error(401, 401002, f"registration id {rid!r} does not match the certificate CN {cn!r}")
            with self._lock:
                enrollment = self._enrollment_for(rid, peer_der, peer)
            if enrollment is None:
                return _error(404, 404201, f"no enrollment matches {rid!r} and its certificate")

        if method == "PUT" and match["action"] == "register":
            return self._register(rid, enrollment, body, api_version)
        if method == "GET" and match["op"]:
            return self._poll(rid, unquote(match["op"]))
        if method == "POST" and not match["action"] and not match["op"]:
            with self._lock:
                state = self._registrations.get(rid.lower())
            if state is None:
                return _error(404, 404202, f"{rid!r} has not registered")
            return 200, {k: v for k, v in state.items() if k != "issuedCertificateChain"}, {}
        return _error(405, 405000, f"{method} is not allowed here")

    def _register(self, rid: str, enrollment: Enrollment, body: bytes, api_version: str):
        try:
            data = jsonlimits.loads(body or b"{}")
        except jsonlimits.JsonTooDeep as exc:
            return _error(400, 400001, f"the request body is too deeply nested: {exc}")
        except ValueError:
            return _error(400, 400001, "the request body is not JSON")
        if not isinstance(data, dict) or data.get("registrationId") != rid:
            return _error(400, 400002, "registrationId in the body must equal the one in the path")
        chain: List[bytes] = []
        if data.get("csr") is not None:
            if api_version != CSR_API_VERSION:
                return _error(400, 400005, f"csr needs api-version {CSR_API_VERSION}")
            try:
                chain = self._issue(rid, data["csr"])
            except ValueError as exc:
                return _error(400, 400006, str(exc))
        op = _Operation(uuid.uuid4().hex, rid, enrollment, enrollment.polls, data.get("payload"), chain, _now())
        with self._lock:
            self._operations[op.op_id] = op
        return 202, {"operationId": op.op_id, "status": "assigning"}, {"Retry-After": str(self.retry_after)}

    def _issue(self, rid: str, csr_b64: str) -> List[bytes]:
        try:
            der = base64.b64decode(csr_b64, validate=True)
        except (TypeError, ValueError):
            raise ValueError("csr is not base64") from None
        return certs.issue_from_csr(self.ca, der, rid, self.cert_lifetime, what="registration id")

    def _poll(self, rid: str, op_id: str):
        with self._lock:
            op = self._operations.get(op_id)
            if op is None or op.registration_id.lower() != rid.lower():
                return _error(404, 404203, f"no operation {op_id!r} for {rid!r}")
            if op.remaining_polls > 0:
                op.remaining_polls -= 1
                return 202, {"operationId": op.op_id, "status": "assigning"}, {"Retry-After": str(self.retry_after)}
            first = op.result is None
            if first:
                op.result = self._final_state(op)
                self._registrations[rid.lower()] = op.result["registrationState"]
            result = op.result
        if first and result["status"] == "assigned" and op.enrollment.keys:
            if self.on_symmetric_assigned is not None:
                state = result["registrationState"]
                self.on_symmetric_assigned(state["deviceId"], state["assignedHub"],
                                           self._device_keys.get(rid.lower(), ()))
        elif first and result["status"] == "assigned" and self.on_assigned is not None:
            cert = op.chain[0] if op.chain else (op.enrollment.cert_der if op.enrollment.kind == "individual" else None)
            self.on_assigned(result["registrationState"]["deviceId"], result["registrationState"]["assignedHub"], cert)
        self._log(f"DPS {rid}: {result['status']}")
        return 200, result, {}

    def _final_state(self, op: _Operation) -> dict:
        e = op.enrollment
        state: Dict[str, Any] = {"registrationId": op.registration_id, "createdDateTimeUtc": op.created,
                                 "lastUpdatedDateTimeUtc": _now(), "etag": uuid.uuid4().hex}
        if e.keys:
            state["symmetricKey"] = {"enrollmentGroupId": e.name} if e.kind == "group" else {}
        elif e.kind == "group":
            state["x509"] = {"enrollmentGroupId": e.name}
        if e.disabled:
            state.update(status="disabled", errorCode=401004, errorMessage="the enrollment is disabled")
            return {"operationId": op.op_id, "status": "disabled", "registrationState": state}
        state.update(status="assigned", substatus="initialAssignment", assignedHub=e.assigned_hub,
                     deviceId=(e.device_id if e.kind == "individual" and e.device_id else op.registration_id))
        if e.payload is not None:
            state["payload"] = e.payload
        if op.chain:
            state["issuedCertificateChain"] = [base64.b64encode(d).decode() for d in op.chain]
        return {"operationId": op.op_id, "status": "assigned", "registrationState": state}


def _error(status: int, code: int, message: str) -> Tuple[int, dict, Dict[str, str]]:
    return status, {"errorCode": code, "message": message, "trackingId": uuid.uuid4().hex,
                    "timestampUtc": _now()}, {}


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, handler, emulator: DpsEmulator):
        self.emulator = emulator
        super().__init__(address, handler)

    def handle_error(self, request, client_address) -> None:
        """An unexpected failure in a handler: one line through the log, never a traceback on stderr."""
        import sys

        exc = sys.exc_info()[1]
        self.emulator.diag("dps.internal", f"the DPS emulator failed on a request: {type(exc).__name__}: {exc}",
                           "", f"{client_address[0]}:{client_address[1]}")

    def get_request(self):
        sock, addr = self.socket.accept()
        # The handshake happens on the handler's thread, so one slow client cannot stall accept().
        return self.emulator._ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive: a provisioning run should cost one handshake
    timeout = 30
    server: _Server

    def setup(self) -> None:
        super().setup()
        try:
            self.connection.do_handshake()
        except (ssl.SSLError, OSError):
            self.close_connection = True
            self._peer = None
            return
        self._peer = self.connection.getpeercert() or {}   # {} / b"": a SAS device sent no certificate
        self._peer_der = self.connection.getpeercert(binary_form=True) or b""
        cn = _cn_of(self._peer or {}) or "?"
        emu = self.server.emulator
        with emu._lock:
            emu.handshakes[cn] = emu.handshakes.get(cn, 0) + 1

    def handle(self) -> None:
        if self._peer is None:
            return
        try:
            super().handle()
        except (ConnectionError, ssl.SSLError, OSError) as exc:
            # The client went away mid-request (often a non-HTTP client giving up): one line, no traceback.
            self.server.emulator._log(f"DPS connection from {self.client_address[0]} ended: {exc}")

    def send_error(self, code: int, message: Optional[str] = None, explain: Optional[str] = None) -> None:
        """The base class's answer to a request it cannot parse: a diagnostic naming the likely cause."""
        line = (getattr(self, "raw_requestline", b"") or b"")[:60]
        if line[:1] == b"\x10" or b"MQTT" in line:
            hint = ("an MQTT CONNECT arrived on the DPS HTTPS port; DPS over MQTT has its own port "
                    "(--dps-mqtt-port / start_dps(mqtt_port=…))")
        else:
            hint = f"the request is not HTTP/1.1 ({message or code})"
        self.server.emulator.diag("dps.not-http", hint, f"first bytes {line!r}",
                                  f"{self.client_address[0]}:{self.client_address[1]}")
        self.close_connection = True
        if self.request_version in ("", "HTTP/0.9"):  # a status line even when the request line was garbage
            self.request_version = self.protocol_version
        try:
            self._send(*_error(400 if code < 500 else code, 400004, hint))
        except (ConnectionError, ssl.SSLError, OSError):
            pass

    def _serve(self) -> None:
        emu = self.server.emulator
        text = (self.headers.get("Content-Length") or "0").strip()
        if not re.fullmatch(r"[0-9]{1,18}", text):
            self.close_connection = True  # the body's end is unknown, so is the next request's start
            self._send(*_error(400, 400004, f"Content-Length must be a non-negative whole number, got {text!r}"))
            return
        length = int(text)
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            self._send(*_error(413, 413000, f"request body of {length} bytes is over {MAX_BODY_BYTES} bytes"))
            return
        try:
            body = self.rfile.read(length) if length else b""
        except OSError:
            body = b""
        if len(body) != length:
            self.close_connection = True
            self._send(*_error(400, 400004, f"the body ended after {len(body)} of {length} bytes"))
            return
        status, data, headers = emu.handle(self.command, self.path, body, self._peer_der, self._peer,
                                           self.headers.get("Authorization"))
        with emu._lock:
            emu.requests.append((self.command, self.path, status))
        self._send(status, data, headers)

    def _send(self, status: int, data: dict, headers: Dict[str, str]) -> None:
        payload = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(payload)))
        if status >= 400:
            self.send_header("x-ms-error-code", str(data.get("errorCode", "")))
        if self.close_connection:
            self.send_header("Connection", "close")
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(payload)

    do_PUT = do_GET = do_POST = _serve

    def log_message(self, fmt: str, *args) -> None:
        self.server.emulator._log("DPS " + (fmt % args))
