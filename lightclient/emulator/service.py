"""The in-process service API: run the emulator on a background thread and drive it like a hub's
service side (register identities, invoke methods, update desired properties, send C2D, read telemetry
and diagnostics).

    with Emulator(state_dir) as hub:          # picks free ports on 127.0.0.1
        hub.register_device("d1")
        cert, key = hub.issue_certificate("d1")
        ...                                   # connect a device to hub.host:hub.port, trusting hub.ca_path
        hub.wait_for_events(1, "d1")
        result = hub.invoke_method("d1", "reboot", {"delay": 1}, timeout=5)

Every method is thread-safe; hub state itself lives on the emulator's own asyncio loop.
"""
from __future__ import annotations

import asyncio
import hashlib
import ssl
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, TextIO, Tuple

from . import certs, codec
from .diagnostics import MAX_DIAGNOSTICS, Diagnostic, DiagnosticLog
from .errors import EmulatorError
from .events import MAX_EVENTS, Event, EventLog
from .hub import MAX_CONNECTIONS, MAX_SUBSCRIPTIONS, Hub
from .registry import CA_SIGNED, SELF_SIGNED, SYMMETRIC_KEY, Identity, Registry, check_id


@dataclass(frozen=True)
class MethodResult:
    status: int
    """The status the device put in ``$iothub/methods/res/{status}/``."""
    payload: Any
    """The device's JSON response body, decoded (None for an empty body)."""


_X509_V_FLAG_NO_CHECK_TIME = 0x200000   # OpenSSL's flag; the ssl module has no name for it

#: File descriptors kept free beside the connections: listeners, the HTTP API and DPS, state files, stdio.
FD_HEADROOM = 64


def _certificate_der(pem: str, source: str) -> bytes:
    """The DER of the first certificate in ``pem``, parsed by OpenSSL; EmulatorError naming ``source``."""
    begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
    start = pem.find(begin)
    stop = pem.find(end, max(start, 0))
    if start < 0 or stop < 0:
        raise EmulatorError(f"{source} holds no PEM certificate ({begin} … {end})")
    try:
        der = ssl.PEM_cert_to_DER_cert(pem[start:stop + len(end)])
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=der)  # a real X.509 parse
    except (ValueError, ssl.SSLError) as exc:
        raise EmulatorError(f"{source} is not a valid X.509 certificate: {exc}") from None
    return der


def _identity_name(device_id: str, module_id: Optional[str]) -> str:
    return f"{device_id}/{module_id}" if module_id else device_id


class Emulator:
    """A strict local IoT Hub.  ``port=0`` / ``http_port=0`` pick free ports; ``http_port=None`` turns
    the HTTP service API off.  Pass ``ca_cert``/``ca_key`` to use an existing CA instead of creating one
    in ``state_dir``, and ``server_cert``/``server_key`` to use an existing server certificate.

    ``ws_port`` serves MQTT over WebSockets (as the hub does on 443) on a second port; None leaves it off.

    Resource bounds: at most ``max_connections`` open MQTT connections (more are closed at once and
    counted as ``connection.limit``); a connection must finish TLS within ``handshake_timeout`` seconds and
    send CONNECT within ``connect_timeout`` seconds after that; the newest ``max_diagnostics`` diagnostics
    and ``max_events`` telemetry events are kept (:meth:`diagnostic_counts` counts all of them)."""

    def __init__(self, state_dir, *, host: str = "127.0.0.1", port: int = 0, hostname: str = "localhost",
                 http_port: Optional[int] = None, verbose: bool = False, output: Optional[TextIO] = None,
                 ca_cert=None, ca_key=None, server_cert=None, server_key=None,
                 max_subscriptions: int = MAX_SUBSCRIPTIONS, connect_timeout: float = 10.0,
                 max_packet_size: int = codec.DEFAULT_MAX_PACKET_SIZE, max_connections: int = MAX_CONNECTIONS,
                 handshake_timeout: float = 10.0, max_diagnostics: int = MAX_DIAGNOSTICS,
                 max_events: int = MAX_EVENTS, cert_lifetime: Optional[float] = None,
                 credentials_api: bool = True, disconnect_on_expiry: bool = False, ws_port: Optional[int] = None,
                 authorize_at_connect: bool = True, throttle: Optional[Dict[str, float]] = None):
        self.state_dir = Path(state_dir)
        self.host = host
        self.hostname = hostname
        self.port = port
        self.http_port = http_port
        #: MQTT over WebSockets (TLS, /$iothub/websocket): None = off, 0 = a free port (see .websocket).
        self.ws_port = ws_port
        for name, value in (("max_connections", max_connections), ("max_diagnostics", max_diagnostics),
                            ("max_events", max_events)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise EmulatorError(f"{name} must be a positive integer, got {value!r}")
        for name, value in (("handshake_timeout", handshake_timeout), ("connect_timeout", connect_timeout)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise EmulatorError(f"{name} must be a positive number of seconds, got {value!r}")
        if cert_lifetime is not None and (isinstance(cert_lifetime, bool) or not isinstance(cert_lifetime, (int, float))
                                          or not cert_lifetime >= 1):
            raise EmulatorError(f"cert_lifetime must be at least 1 second, got {cert_lifetime!r}")
        #: Seconds a certificate issued over DPS or the credentials API is valid (None: a year).
        self.cert_lifetime = cert_lifetime
        self._credentials_api = credentials_api
        self._disconnect_on_expiry = disconnect_on_expiry
        self._authorize_at_connect = authorize_at_connect
        from .throttle import Throttle

        #: Per-identity rates (operations per second) by kind: connect, twin, telemetry (see throttle.py).
        self._throttle = Throttle(throttle) if throttle else None
        #: Why certificates are refused in the TLS handshake instead of at CONNECT ("" when they are not).
        self.tls_refusal_reason = ""
        self.registry = Registry()
        self.diagnostic_log = DiagnosticLog(max_diagnostics)
        self.event_log = EventLog(max_events)
        self._output = output
        self.verbose = verbose
        self.dps = None
        self._dps_mqtt = None
        self.dps_mqtt_port: Optional[int] = None
        self.dashboard = None
        self.files = None      # the file-upload endpoints + blob storage (start_file_upload)
        if verbose:
            self.diagnostic_log.listeners.append(self._print_diagnostic)
        self._ca_paths = (ca_cert, ca_key)
        self._server_paths = (server_cert, server_key)
        self._options = dict(max_subscriptions=max_subscriptions, connect_timeout=connect_timeout,
                             max_packet_size=max_packet_size, max_connections=max_connections,
                             handshake_timeout=handshake_timeout)
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._hub: Optional[Hub] = None
        self._http = None
        self.ca: Optional[certs.CertificateAuthority] = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def ca_path(self) -> Path:
        """The CA certificate devices must trust (and that issues CA-signed device certificates)."""
        return self._require_started().cert_path

    def _require_started(self) -> certs.CertificateAuthority:
        if self.ca is None:
            raise EmulatorError("the emulator is not started; call start() or use it as a context manager")
        return self.ca

    def start(self) -> "Emulator":
        if self._thread is not None:
            raise EmulatorError("the emulator is already running")
        ca_cert, ca_key = self._ca_paths
        self.state_dir.mkdir(parents=True, exist_ok=True)  # also when the CA comes from elsewhere
        if ca_cert:
            self.ca = certs.CertificateAuthority(Path(ca_cert), Path(ca_key) if ca_key else Path())
        else:
            self.ca = certs.ensure_ca(self.state_dir)
        server_cert, server_key = self._server_paths
        if not server_cert:
            names = {self.hostname, "localhost", "127.0.0.1", "::1"}
            if self.host not in ("0.0.0.0", "::", ""):
                names.add(self.host)
            server_cert, server_key = certs.ensure_server_certificate(self.state_dir, self.ca, names)
        self._server_files = (Path(server_cert), Path(server_key))
        self._ssl_context = self._server_context(Path(server_cert), Path(server_key))
        self._fit_connection_cap()
        self._loop = asyncio.new_event_loop()
        self._hub = Hub(hostname=self.hostname, registry=self.registry, diagnostics=self.diagnostic_log,
                        events=self.event_log, ssl_context=self._ssl_context,
                        ca_subject=self._ca_subject(), **self._options)
        if self._credentials_api:
            from .credentials import CredentialsService

            self._hub.credentials = CredentialsService(
                lambda csr, cn: certs.issue_from_csr(self.ca, csr, cn, self.cert_lifetime))
        self._hub.disconnect_on_expiry = self._disconnect_on_expiry
        self._hub.throttle = self._throttle
        # As the hub: any client certificate passes TLS and is authorized at CONNECT (needs the native shim).
        from . import peer_trust

        self._hub.peer_trust, self.tls_refusal_reason = peer_trust.enable(self._ssl_context,
                                                                          self._authorize_at_connect)
        self._hub.peer_trust_off = self.tls_refusal_reason
        self._thread = threading.Thread(target=self._loop.run_forever, name="iothub-emulator", daemon=True)
        self._thread.start()
        try:
            self.port = self._call(self._hub.start(self.host, self.port))
            if self.ws_port is not None:
                self.ws_port = self._call(self._hub.start_websocket(self.host, self.ws_port))
            if self.http_port is not None:
                from .http_api import HttpApi
                self._http = HttpApi(self, self.host, self.http_port)
                self.http_port = self._http.port
        except BaseException:
            self.stop()
            raise
        return self

    def _fit_connection_cap(self) -> None:
        """Make room for ``max_connections`` sockets under the process's open-file limit: raise the soft
        limit toward the hard one, and where even that is too low, lower the cap to fit and say so (a
        silent EMFILE would stall accept() instead of refusing cleanly)."""
        try:
            import resource
        except ImportError:  # not on this platform: nothing to fit
            return
        wanted = self._options["max_connections"] + FD_HEADROOM
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < wanted:
            target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                soft = target
            except (ValueError, OSError):
                pass
        if soft != resource.RLIM_INFINITY and soft < wanted:
            cap = max(1, soft - FD_HEADROOM)
            self.diagnostic_log.add(Diagnostic(
                "connection.fd-limit", f"the open-file limit is {soft} (hard limit {hard}), too low for "
                f"{self._options['max_connections']} connections; the connection cap is lowered to {cap} "
                f"(raise the limit with 'ulimit -n' or lower --max-connections)"))
            self._options["max_connections"] = cap

    @property
    def max_connections(self) -> int:
        """The connection cap in force (lowered at start() if the open-file limit is too low for it)."""
        return self._options["max_connections"]

    def connection_count(self) -> int:
        """Open MQTT connections, whether their TLS handshake has finished or not."""
        return self._call(self._async(lambda: self._hub.connection_count))

    def start_dps(self, port: int = 0, *, id_scope: str = "0ne00000001", retry_after: int = 1,
                  group: Optional[str] = "lab-devices", polls: int = 1, mqtt_port: Optional[int] = None):
        """Serve a DPS beside the hub (HTTPS, same CA and server certificate); returns the DpsEmulator.
        With ``mqtt_port`` (0: a free one) the same DPS is also served over MQTT (``dps_mqtt_port``).

        With ``group``, every device whose certificate comes from this emulator's CA may register
        (a group enrollment by CA). Assigned devices are registered in this hub, so they can
        connect right after provisioning."""
        from .dps import DpsEmulator

        ca = self._require_started()
        if self.dps is not None:
            raise EmulatorError("the DPS emulator is already running")
        cert, key = self._server_files
        self.dps = DpsEmulator(ca=ca, server_cert=cert, server_key=key, host=self.host, port=port,
                               id_scope=id_scope, retry_after=retry_after, on_assigned=self._dps_assigned,
                               cert_lifetime=self.cert_lifetime,
                               diag=lambda rule, message, received, peer: self.diagnostic_log.add(
                                   Diagnostic(rule, message, received, None, peer)),
                               log=(lambda line: print(f"emulator: {line}", file=self._output or sys.stderr,
                                                       flush=True)) if self.verbose else None)
        self.dps.on_symmetric_assigned = self._dps_assigned_symmetric
        if group:
            self.dps.add_group(group, ca.cert_path.read_bytes(), assigned_hub=self.hostname, polls=polls)
        self.dps.start()
        if mqtt_port is not None:
            from .dps_mqtt import DpsMqttServer

            self._dps_mqtt = DpsMqttServer(self.dps, self.diagnostic_log.add,
                                           handshake_timeout=self._options["handshake_timeout"],
                                           connect_timeout=self._options["connect_timeout"])
            try:
                self.dps_mqtt_port = self._call(self._dps_mqtt.start(self.host, mqtt_port))
            except BaseException:
                self.stop()
                raise
        return self.dps

    def add_route(self, route: str):
        """Add an IoT Edge style route (``FROM /messages/modules/m1/outputs/o1 INTO BrokeredEndpoint(
        "/modules/m2/inputs/i1")``, see :mod:`.routing`); returns the parsed Route."""
        from .routing import parse_route

        parsed = parse_route(route)
        self._require_started()
        self._call(self._async(self._hub.routes.append, parsed))
        return parsed

    def start_dashboard(self, port: int = 0):
        """Serve the live web dashboard on loopback (see :mod:`.dashboard`); returns it (``.url``)."""
        from .dashboard import LOOPBACK, Dashboard

        self._require_started()
        if self.dashboard is not None:
            raise EmulatorError("the dashboard is already running")
        # Loopback whatever the MQTT listener's address: the dashboard has no authentication.
        self.dashboard = Dashboard(self, self.host if self.host in LOOPBACK else "127.0.0.1", port)
        return self.dashboard

    def _dps_assigned_symmetric(self, device_id: str, hub: str, keys) -> None:
        if self.registry.get(device_id) is None:
            self.register_device(device_id, symmetric_keys=keys)

    def start_file_upload(self, port: int = 0, **options):
        """Serve the hub's file-upload endpoints (HTTPS with device certificates or SAS tokens) and a local blob storage
        (``.blob``); returns the :class:`~lightclient.emulator.files.FileUpload`. Options: ``blob_port``,
        ``blob_host`` (the storage host:port the hub hands out), ``service_version``, ``sas_ttl``,
        ``allow_ca_signed``."""
        from . import files

        self._require_started()
        if self.files is not None:
            raise EmulatorError("the file-upload endpoints are already running")
        log = (lambda line: print(f"emulator: {line}", file=self._output or sys.stderr, flush=True)) \
            if self.verbose else None
        self.files = files.start(self, port=port, log=log, **options)
        return self.files

    def _dps_assigned(self, device_id: str, hub: str, cert_der: Optional[bytes]) -> None:
        if self.registry.get(device_id) is not None:
            return
        if cert_der is None or certs.issued_by(cert_der, self.ca):
            self.register_device(device_id)
        else:
            path = self.state_dir / "devices" / f"{device_id}.dps.pem"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(ssl.DER_cert_to_PEM_cert(cert_der))
            self.register_device(device_id, certificate=path)

    def stop(self) -> None:
        """Close every connection and the listeners, and join the threads.  Safe to call twice."""
        if self.dashboard is not None:
            self.dashboard.close()
            self.dashboard = None
        if self._dps_mqtt is not None:
            try:
                self._call(self._dps_mqtt.stop(), timeout=10)
            except EmulatorError:
                pass
            self._dps_mqtt = None
        if self.dps is not None:
            self.dps.stop()
            self.dps = None
        if self.files is not None:
            self.files.stop()
            self.files = None
        if self._http is not None:
            self._http.close()
            self._http = None
        if self._thread is None:
            return
        try:
            self._call(self._hub.stop(), timeout=10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
            self._loop.close()
            self._thread = None

    def __enter__(self) -> "Emulator":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _server_context(self, cert: Path, key: Path) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2  # the hub refuses TLS 1.0/1.1
        context.load_cert_chain(cert, key)
        # The hub asks for the client certificate in the handshake; Python's ssl cannot defer chain
        # verification to CONNECT, so self-signed device certificates are added as trust anchors when
        # their identity is registered (see register_device).
        context.verify_mode = ssl.CERT_REQUIRED
        # Validity times are checked at CONNECT instead, so an expired certificate gets CONNACK 5 and a
        # diagnostic naming the way out (emulator/credentials.py) rather than a bare TLS alert.
        context.verify_flags |= _X509_V_FLAG_NO_CHECK_TIME
        context.load_verify_locations(cafile=str(self.ca.cert_path))
        return context

    def _ca_subject(self) -> Dict[str, str]:
        probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        probe.load_verify_locations(cafile=str(self.ca.cert_path))
        (ca,) = probe.get_ca_certs()
        return {key: value for rdn in ca["subject"] for key, value in rdn}

    def _call(self, coroutine, timeout: Optional[float] = 30.0):
        if self._loop is None or not self._loop.is_running():
            coroutine.close()
            raise EmulatorError("the emulator is not running")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def _print_diagnostic(self, diagnostic: Diagnostic) -> None:
        print(f"emulator: {diagnostic}", file=self._output or sys.stderr, flush=True)

    # ------------------------------------------------------------------ registry and certificates

    def register_device(self, device_id: str, module_id: Optional[str] = None, *,
                        certificate=None, certificate_pem: Optional[str] = None, thumbprints: Iterable[str] = (),
                        enabled: bool = True, symmetric_keys: Iterable[str] = ()) -> Identity:
        """Register a device (or module) identity.

        Without ``certificate``/``certificate_pem``/``thumbprints`` it is CA-signed: its certificate must
        come from this emulator's CA with ``CN={device_id}`` (or ``CN={device_id}/{module_id}``).  With a
        self-signed certificate (a PEM file ``certificate``, or the PEM text ``certificate_pem``, which is
        then kept in ``{state_dir}/registered/``) its SHA-1 and SHA-256 thumbprints are registered and the
        certificate is trusted for the TLS handshake.  ``thumbprints`` alone are accepted for completeness,
        but the handshake then fails unless that certificate is trusted some other way.  Everything is
        checked before anything is written or trusted.  With ``symmetric_keys`` (base64 primary[, secondary])
        it authenticates with SAS tokens instead (emulator/sas.py), and the hub's handshake stops requiring
        a client certificate (X.509 identities are then refused at CONNECT if they send none)."""
        if symmetric_keys:
            return self._register_symmetric(device_id, module_id, tuple(symmetric_keys), enabled)
        check_id(device_id, "device id")
        if module_id is not None:
            check_id(module_id, "module id")
        prints = tuple(t.replace(":", "").upper() for t in thumbprints)
        der = None
        if certificate_pem is not None:
            der = _certificate_der(certificate_pem, "x509Certificate")
        elif certificate is not None:
            try:
                text = Path(certificate).read_text()
            except (OSError, UnicodeDecodeError) as exc:
                raise EmulatorError(f"cannot read the certificate {certificate}: {exc}") from None
            der = _certificate_der(text, str(certificate))
        if der is not None:
            if self._thread is None:
                raise EmulatorError("start() the emulator before registering self-signed identities")
            prints += (hashlib.sha1(der).hexdigest().upper(), hashlib.sha256(der).hexdigest().upper())
        auth = SELF_SIGNED if prints else CA_SIGNED
        identity = Identity(device_id, module_id, auth, prints, enabled)
        if der is not None:
            if certificate_pem is not None:
                kept = self.state_dir / "registered" / f"{device_id}__{module_id or ''}.pem"
                kept.parent.mkdir(parents=True, exist_ok=True)
                kept.write_text(ssl.DER_cert_to_PEM_cert(der))
            self._ssl_context.load_verify_locations(cadata=der)
        return self.registry.add(identity)

    def _register_symmetric(self, device_id: str, module_id: Optional[str], keys, enabled: bool) -> Identity:
        import base64
        import binascii

        for key in keys:
            try:
                if len(base64.b64decode(key, validate=True)) < 16:
                    raise ValueError
            except (binascii.Error, ValueError, TypeError):
                raise EmulatorError(f"the symmetric keys of {device_id!r} must be base64 of 16-64 bytes") from None
        identity = self.registry.add(Identity(device_id, module_id, SYMMETRIC_KEY, (), enabled, keys))
        # The hub asks for a certificate but lets a SAS device go without one.
        self._ssl_context.verify_mode = ssl.CERT_OPTIONAL
        return identity

    def unregister(self, device_id: str, module_id: Optional[str] = None) -> None:
        self.registry.remove(_identity_name(device_id, module_id))

    def identities(self) -> List[Identity]:
        return self.registry.all()

    def issue_certificate(self, device_id: str, module_id: Optional[str] = None,
                          out_dir=None, days: int = 365) -> Tuple[Path, Path]:
        """Create a key and a certificate from this emulator's CA with CN = the identity.
        Returns (cert_path, key_path); files go to ``out_dir`` (default ``{state_dir}/devices``)."""
        ca = self._require_started()
        target = Path(out_dir) if out_dir else self.state_dir / "devices"
        return certs.issue_device_certificate(ca, _identity_name(device_id, module_id), target, days)

    def sign_csr(self, csr_path, out_path, days: int = 365) -> Path:
        """Issue a client certificate for a PEM CSR from this emulator's CA."""
        return certs.sign_csr(self._require_started(), Path(csr_path), Path(out_path), days)

    # ------------------------------------------------------------------ service operations

    def invoke_method(self, device_id: str, method_name: str, payload: Any = None, *,
                      module_id: Optional[str] = None, timeout: float = 30.0) -> MethodResult:
        """Invoke a direct method and wait for the device's answer.
        Raises HubError 404 (404103) if the device is offline or not subscribed to methods, 504 (504101)
        if it does not answer within ``timeout`` seconds."""
        status, body = self._call(self._hub.invoke_method(_identity_name(device_id, module_id), method_name,
                                                          payload, timeout), timeout=timeout + 10)
        return MethodResult(status, body)

    def get_twin(self, device_id: str, module_id: Optional[str] = None) -> Dict[str, Any]:
        """``{"desired": {…, "$version": n}, "reported": {…, "$version": m}}``."""
        return self._call(self._hub.get_twin(_identity_name(device_id, module_id)))

    def model_id(self, device_id: str, module_id: Optional[str] = None) -> Optional[str]:
        """The IoT Plug and Play model id the identity announced in its last CONNECT (None if none)."""
        return self._call(self._async(lambda name: self._hub.model_ids.get(name),
                                      _identity_name(device_id, module_id)))

    def update_desired(self, device_id: str, patch: Dict[str, Any], module_id: Optional[str] = None) -> int:
        """Merge ``patch`` into the desired properties (null deletes), push it to the device if it is
        connected and subscribed, and return the new desired ``$version``."""
        return self._call(self._hub.update_desired(_identity_name(device_id, module_id), patch))

    def send_c2d(self, device_id: str, body, *, message_id: Optional[str] = None,
                 correlation_id: Optional[str] = None, user_id: Optional[str] = None,
                 content_type: Optional[str] = None, content_encoding: Optional[str] = None,
                 expiry: Optional[str] = None, ack: Optional[str] = None,
                 properties: Optional[Dict[str, Optional[str]]] = None) -> str:
        """Queue a cloud-to-device message; return its message id.  It is delivered at once if the device
        is subscribed to ``devices/{id}/messages/devicebound/#``, else when it next is."""
        data = body.encode() if isinstance(body, str) else bytes(body)
        return self._call(self._hub.send_c2d(
            device_id, data, message_id=message_id, correlation_id=correlation_id, user_id=user_id,
            content_type=content_type, content_encoding=content_encoding, expiry=expiry, ack=ack,
            properties=properties))

    def c2d_feedback(self, device_id: Optional[str] = None) -> List[Dict[str, Any]]:
        """Delivery feedback so far (see :mod:`.c2d_feedback`): ``Success`` when a device completed a
        message sent with ``ack`` ``positive``/``full``, ``Expired`` when one with ``negative``/``full`` expired."""
        def read():
            for queued in list(self._hub.c2d_queues):
                self._hub.expire_c2d(queued)
            return [dict(r) for r in self._hub.c2d_feedback if device_id in (None, r["deviceId"])]
        return self._call(self._async(read))

    def queued_c2d(self, device_id: str) -> int:
        return self._call(self._async(self._hub.queued_c2d, device_id))

    def is_connected(self, device_id: str, module_id: Optional[str] = None) -> bool:
        return self._call(self._async(self._hub.is_connected, _identity_name(device_id, module_id)))

    @staticmethod
    async def _async(function, *args):
        return function(*args)

    # ------------------------------------------------------------------ telemetry and diagnostics

    def events(self, device_id: Optional[str] = None, module_id: Optional[str] = None) -> List[Event]:
        """Telemetry accepted so far, oldest first, optionally for one device (and module)."""
        return self.event_log.items(device_id, module_id)

    def wait_for_events(self, count: int, device_id: Optional[str] = None,
                        module_id: Optional[str] = None, timeout: float = 5.0) -> List[Event]:
        return self.event_log.wait_for(count, device_id, module_id, timeout)

    def diagnostics(self, identity: Optional[str] = None, rule: Optional[str] = None) -> List[Diagnostic]:
        """Protocol deviations recorded so far; ``rule`` matches a prefix (``"connect."``)."""
        return self.diagnostic_log.items(identity, rule)

    def inject_credentials_fault(self, device_id: str, *statuses: int) -> None:
        """Answer the next ``$iothub/credentials`` requests of ``device_id`` with these error statuses."""
        if self._hub is None or self._hub.credentials is None:
            raise EmulatorError("the credentials API is off (credentials_api=False) or the emulator is not started")
        self._call(self._async(self._hub.credentials.inject, device_id, *statuses))

    def certificates_issued(self, device_id: str) -> int:
        """Certificates issued to ``device_id`` over the credentials API so far."""
        if self._hub is None or self._hub.credentials is None:
            return 0
        return self._call(self._async(lambda: self._hub.credentials.issued.get(device_id, 0)))

    def diagnostic_counts(self) -> Dict[str, int]:
        """How often each rule fired since start, including diagnostics that left the bounded log."""
        return self.diagnostic_log.counts()

    def wait_for_diagnostic(self, rule: str, identity: Optional[str] = None,
                            timeout: float = 5.0) -> Diagnostic:
        return self.diagnostic_log.wait_for(rule, identity, timeout)
