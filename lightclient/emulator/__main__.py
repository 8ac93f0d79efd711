"""``python -m lightclient.emulator``: run the strict local IoT Hub until interrupted.

    python -m lightclient.emulator --state-dir .emulator --port 8883 --ws-port 8443 --device d1 --device d1/m1 \\
        --http-port 8080 --verbose

Settings can also come from a small JSON file (``--config emulator.json``); flags given on the
command line win over the file::

    {"port": 8883, "ws_port": 9443, "hostname": "localhost", "state_dir": ".emulator", "http_port": 8080,
     "devices": ["d1", "d1/m1"], "self_signed": {"d2": "d2.pem"},
     "dps": {"port": 8443, "mqtt_port": 8884, "id_scope": "0ne00000001", "polls": 1, "retry_after": 1},
     "max_connections": 4096, "handshake_timeout": 10, "connect_timeout": 10, "verbose": true}

Every ``--device`` is registered CA-signed and gets a key and certificate from the emulator's CA in
``{state-dir}/devices/`` (kept across runs).  ``--self-signed ID=CERT.pem`` registers a self-signed
certificate by thumbprint.  ``--sign-csr CSR --out CERT`` only issues a certificate and exits.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from typing import List, Optional

from .errors import EmulatorError
from .hub import MAX_CONNECTIONS
from .service import Emulator


def _split(identity: str):
    device_id, _, module_id = identity.partition("/")
    return device_id, module_id or None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def build_parser(prog: str = "python -m lightclient.emulator") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog,
                                     description="A strict local Azure IoT Hub (MQTT 3.1.1 over TLS with "
                                                 "X.509 client certificates).")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8883, help="MQTT/TLS port; 0 picks a free one")
    parser.add_argument("--ws-port", type=int, default=None,
                        help="also serve MQTT over WebSockets (TLS, /$iothub/websocket, subprotocol mqtt) on "
                             "this port, as IoT Hub does on 443; 0 picks a free one")
    parser.add_argument("--hostname", default="localhost",
                        help="the hub's host name: in the server certificate and the expected username")
    parser.add_argument("--state-dir", default=".iothub-emulator", type=Path,
                        help="where the CA, server and device certificates live (default .iothub-emulator)")
    parser.add_argument("--device", action="append", default=[], metavar="ID[/MODULE]",
                        help="register a CA-signed identity and issue its certificate (repeatable)")
    parser.add_argument("--self-signed", action="append", default=[], metavar="ID[/MODULE]=CERT",
                        help="register an identity by the thumbprint of a self-signed certificate")
    parser.add_argument("--http-port", type=int, default=None,
                        help="serve the service REST API on this loopback port (0 picks a free one)")
    parser.add_argument("--ca-cert", type=Path, help="use this CA certificate instead of creating one")
    parser.add_argument("--ca-key", type=Path, help="the key of --ca-cert (needed to issue certificates)")
    parser.add_argument("--server-cert", type=Path, help="use this server certificate")
    parser.add_argument("--server-key", type=Path, help="the key of --server-cert")
    parser.add_argument("--sign-csr", type=Path, metavar="CSR", help="issue a certificate for CSR and exit")
    parser.add_argument("--out", type=Path, help="where --sign-csr writes the certificate")
    parser.add_argument("--dps-port", type=int, default=None,
                        help="also serve a Device Provisioning Service over HTTPS on this port (0: free port)")
    parser.add_argument("--dps-mqtt-port", type=int, default=None,
                        help="also serve the DPS over MQTT (as the official SDKs provision) on this port "
                             "(0: free port); implies the DPS")
    parser.add_argument("--id-scope", default="0ne00000001", help="the DPS ID scope (default 0ne00000001)")
    parser.add_argument("--dps-polls", type=int, default=1,
                        help="DPS answers 'assigning' this many times before assigning (default 1)")
    parser.add_argument("--dps-retry-after", type=int, default=1, help="DPS Retry-After seconds (default 1)")
    parser.add_argument("--files-port", type=int, default=None,
                        help="also serve the hub's file-upload endpoints (HTTPS, device certificates or SAS "
                             "tokens) on this port and a local blob storage on --blob-port (0: free ports)")
    parser.add_argument("--blob-port", type=int, default=0, help="the blob storage's HTTPS port (default: a free one)")
    parser.add_argument("--max-connections", type=_positive_int, default=MAX_CONNECTIONS, metavar="N",
                        help=f"open MQTT connections before further ones are closed at once (default "
                             f"{MAX_CONNECTIONS}); the open-file limit is raised to fit where allowed")
    parser.add_argument("--handshake-timeout", type=_positive_float, default=10.0, metavar="SECONDS",
                        help="close a connection whose TLS handshake is not done within this time (default 10)")
    parser.add_argument("--connect-timeout", type=_positive_float, default=10.0, metavar="SECONDS",
                        help="close a connection that sends no CONNECT within this time after TLS (default 10)")
    parser.add_argument("--cert-lifetime", type=_positive_float, default=None, metavar="SECONDS",
                        help="certificates issued over DPS or $iothub/credentials are valid this long (default a year)")
    parser.add_argument("--no-credentials-api", action="store_true",
                        help="refuse $iothub/credentials (a hub without certificate management)")
    parser.add_argument("--disconnect-on-expiry", action="store_true",
                        help="drop a connection when its certificate expires (not documented for the real hub)")
    parser.add_argument("--route", action="append", default=[], metavar="ROUTE",
                        help="route module outputs to module inputs as IoT Edge does, e.g. 'FROM /messages/modules/"
                             "m1/outputs/out1 INTO BrokeredEndpoint(\"/modules/m2/inputs/in1\")' (repeatable)")
    parser.add_argument("--throttle", action="append", default=[], metavar="KIND=RATE",
                        help="throttle each identity to RATE operations per second, KIND one of connect "
                             "(CONNACK 3), twin (status 429), telemetry (disconnect); repeatable")
    parser.add_argument("--web-port", type=int, default=None,
                        help="serve the live web dashboard on this loopback port (0 picks a free one)")
    parser.add_argument("--refuse-in-tls", action="store_true",
                        help="refuse untrusted client certificates in the TLS handshake instead of with CONNACK 5 "
                             "at CONNECT as the hub does (the fallback when the native shim is not built)")
    parser.add_argument("--verbose", "-v", action="store_true", help="print each diagnostic as it happens")
    parser.add_argument("--config", type=Path, metavar="FILE",
                        help="read settings from a JSON file (command-line flags win)")
    return parser


_CONFIG_KEYS = {"host": str, "port": int, "ws_port": int, "hostname": str, "state_dir": str, "http_port": int,
                "web_port": int, "devices": list, "routes": list, "self_signed": dict, "dps": dict, "verbose": bool,
                "ca_cert": str, "ca_key": str,
                "server_cert": str, "server_key": str, "max_connections": int, "handshake_timeout": float,
                "connect_timeout": float}
_DPS_KEYS = {"port": "dps_port", "mqtt_port": "dps_mqtt_port", "id_scope": "id_scope", "polls": "dps_polls",
             "retry_after": "dps_retry_after"}


def _config_defaults(path: Path) -> dict:
    """Parser defaults from a JSON config file; every mistake is named."""
    import json

    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise EmulatorError(f"cannot read the config file {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise EmulatorError(f"the config file {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise EmulatorError(f"the config file {path} must hold a JSON object")
    defaults = {}
    for key, value in data.items():
        kind = _CONFIG_KEYS.get(key)
        if kind is None:
            raise EmulatorError(f"unknown setting {key!r} in {path}; known: {', '.join(sorted(_CONFIG_KEYS))}")
        accepted = (int, float) if kind is float else kind  # a whole number of seconds is a number too
        if not isinstance(value, accepted) or (kind in (int, float) and isinstance(value, bool)):
            raise EmulatorError(f"setting {key!r} in {path} must be a {kind.__name__}, not {type(value).__name__}")
        if key in ("max_connections", "handshake_timeout", "connect_timeout") and not value > 0:
            raise EmulatorError(f"setting {key!r} in {path} must be positive, not {value!r}")
        if key == "devices":
            defaults["device"] = [str(d) for d in value]
        elif key == "routes":
            defaults["route"] = [str(r) for r in value]
        elif key == "self_signed":
            defaults["self_signed"] = [f"{name}={cert}" for name, cert in value.items()]
        elif key == "dps":
            for dkey, dvalue in value.items():
                if dkey not in _DPS_KEYS:
                    raise EmulatorError(f"unknown DPS setting {dkey!r} in {path}; known: {', '.join(_DPS_KEYS)}")
                defaults[_DPS_KEYS[dkey]] = dvalue
        elif key in ("state_dir", "ca_cert", "ca_key", "server_cert", "server_key"):
            defaults[key] = Path(value)
        else:
            defaults[key] = value
    return defaults


#: Beside the CA in the state directory while the emulator runs with a service API: its URL, so that
#: `lightclient doctor --connect … --ca STATE/ca.pem` can ask for the emulator's diagnostics.
SERVICE_API_FILE = "service-api"


def _busy(exc: OSError, args) -> str:
    """One line for a port that cannot be bound (the usual cause: another emulator still running)."""
    import errno

    if exc.errno == errno.EADDRINUSE:
        return (f"a port is already in use on {args.host} (MQTT {args.port}"
                + (f", service API {args.http_port}" if args.http_port else "")
                + (f", DPS {args.dps_port}" if args.dps_port else "")
                + "): is another emulator running? Stop it, or pick other ports (0 picks free ones)")
    if exc.errno == errno.EACCES:
        return f"not allowed to listen on {args.host}:{args.port}: ports below 1024 need root; use 8883"
    return f"cannot listen on {args.host}: {exc.strerror or exc}"


def main(argv: Optional[List[str]] = None, prog: str = "python -m lightclient.emulator") -> int:
    parser = build_parser(prog)
    finder = argparse.ArgumentParser(add_help=False)
    finder.add_argument("--config", type=Path)
    config = finder.parse_known_args(argv)[0].config
    if config is not None:
        try:
            parser.set_defaults(**_config_defaults(config))
        except EmulatorError as exc:
            print(f"emulator: error: {exc}", file=sys.stderr)
            return 2
    args = parser.parse_args(argv)
    try:
        from .throttle import parse_rates

        rates = parse_rates(args.throttle)
    except EmulatorError as exc:
        print(f"emulator: error: {exc}", file=sys.stderr)
        return 2
    emulator = Emulator(args.state_dir, host=args.host, port=args.port, hostname=args.hostname,
                        http_port=args.http_port, verbose=args.verbose, ca_cert=args.ca_cert,
                        ca_key=args.ca_key, server_cert=args.server_cert, server_key=args.server_key,
                        max_connections=args.max_connections, handshake_timeout=args.handshake_timeout,
                        connect_timeout=args.connect_timeout, cert_lifetime=args.cert_lifetime,
                        credentials_api=not args.no_credentials_api,
                        disconnect_on_expiry=args.disconnect_on_expiry, ws_port=args.ws_port,
                        authorize_at_connect=not args.refuse_in_tls, throttle=rates or None)
    written: List[Path] = []
    try:
        if args.sign_csr:
            if not args.out:
                raise EmulatorError("--sign-csr needs --out CERT")
            from . import certs
            ca = certs.CertificateAuthority(args.ca_cert, args.ca_key) if args.ca_cert else \
                certs.ensure_ca(args.state_dir)
            print(certs.sign_csr(ca, args.sign_csr, args.out))
            return 0
        emulator.start()
        lines = [f"IoT Hub emulator '{args.hostname}' listening on mqtts://{args.host}:{emulator.port}",
                 f"  at most {emulator.max_connections} connections"]
        lines += [f"  warning: {d.message}" for d in emulator.diagnostics(rule="connection.fd-limit")]
        lines.append("  client certificates: " + (f"refused in the TLS handshake when untrusted, because "
                                                   f"{emulator.tls_refusal_reason}" if emulator.tls_refusal_reason
                                                   else "authorized at CONNECT (CONNACK 5 when untrusted), as the hub does"))
        lines += [
                 f"  devices must trust the CA: {emulator.ca_path.resolve()}",
                 f"  username: {args.hostname}/{{deviceId}}[/{{moduleId}}]/?api-version=2021-04-12"]
        if emulator.ws_port is not None:
            lines.insert(1, f"  MQTT over WebSockets: wss://{args.host}:{emulator.ws_port}/$iothub/websocket")
        if emulator.http_port is not None:
            api = f"http://{args.host}:{emulator.http_port}"
            lines.append(f"  service API: {api}")
            (args.state_dir / SERVICE_API_FILE).write_text(api + "\n")
            written.append(args.state_dir / SERVICE_API_FILE)
        if args.dps_port is not None or args.dps_mqtt_port is not None:
            dps = emulator.start_dps(args.dps_port or 0, id_scope=args.id_scope, retry_after=args.dps_retry_after,
                                     polls=args.dps_polls, mqtt_port=args.dps_mqtt_port)
            lines.append(f"  DPS: https://{args.host}:{dps.port}  id scope {args.id_scope}; group enrollment "
                         "'lab-devices' accepts every certificate issued by the emulator's CA")
            if emulator.dps_mqtt_port is not None:
                lines.append(f"  DPS over MQTT: mqtts://{args.host}:{emulator.dps_mqtt_port}")
        for route in args.route:
            lines.append(f"  route: {emulator.add_route(route).text}")
        if args.web_port is not None:
            lines.append(f"  dashboard: {emulator.start_dashboard(args.web_port).url}")
        if args.files_port is not None:
            files = emulator.start_file_upload(args.files_port, blob_port=args.blob_port)
            lines.append(f"  file upload: https://{args.host}:{files.port}/devices/{{id}}/files (lightclient upload "
                         f"--https-port {files.port}); blob storage https://{files.blob_host}")
        for spec in args.device:
            device_id, module_id = _split(spec)
            emulator.register_device(device_id, module_id)
            stem = spec.replace("/", "__")
            cert = args.state_dir / "devices" / f"{stem}.pem"
            key = args.state_dir / "devices" / f"{stem}.key"
            if not (cert.exists() and key.exists()):
                cert, key = emulator.issue_certificate(device_id, module_id)
            lines.append(f"  device {spec}: CA-signed, cert {cert.resolve()} key {key.resolve()}")
        for spec in args.self_signed:
            name, sep, path = spec.partition("=")
            if not sep:
                raise EmulatorError(f"--self-signed expects ID[/MODULE]=CERT, got {spec!r}")
            identity = emulator.register_device(*_split(name), certificate=Path(path))
            lines.append(f"  device {identity.describe()}")
        if not args.device and not args.self_signed:
            lines.append("  no devices registered (use --device ID or the service API)")
        lines.append("ready")
        stop = threading.Event()
        # Before "ready": whoever waits for that line may send SIGTERM right after it.
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        print("\n".join(lines), flush=True)
        while not stop.wait(0.5):  # a timed wait keeps signal delivery prompt on every platform
            pass
        return 0
    except EmulatorError as exc:
        print(f"emulator: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:     # a busy or forbidden port: one line, no traceback
        print(f"emulator: error: {_busy(exc, args)}", file=sys.stderr)
        return 2
    finally:
        for path in written:
            try:
                path.unlink()
            except OSError:
                pass
        emulator.stop()


if __name__ == "__main__":
    sys.exit(main())
