"""The bad-input sweep: one table, every row a bad input to the library or the `lightclient` command.

Each row must end in the expected typed error (or, for what a hub sends, in a logged drop while the
connection carries on) within a time bound; the process survives; and the PIN appears in no exception
text, repr, log line, stdout or stderr. Single-subject tests of the same inputs with more detail live in
test_bad_input.py, test_cli.py and test_dps.py; this table is the breadth check.
"""
import io
import logging
import math
import ssl
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from lightclient import dps, keys, tls
from lightclient.backoff import Backoff
from lightclient.device import Device
from lightclient.emulator import EmulatorError, HubError, certs
from lightclient.emulator.dps import DpsEmulator
from lightclient.exceptions import (BackendUnavailableError, CertificateError, ConfigError, KeyMismatchError,
                                    KeyLoadError, KeyNotFoundError, LightClientError, MessageTooLargeError, ModuleLoadError,
                                    OperationTimeout, OutboxError, PinError, ProtocolError, ProvisioningError,
                                    QueueFullError, ServerCertificateError, ServiceError, TlsVersionError,
                                    TokenNotFoundError)
from lightclient.identity import Identity

from ..conftest import PIN
from .faults import TlsServer
from .httpservers import Recorder, RedirectingHttps
from .hubside import HubSide
from .test_reliability import _server_context, _tls11_only_context

ROOT = Path(__file__).resolve().parents[2]
FAST = Backoff(initial=0.05, maximum=0.3, not_authorized=1.0)
SCOPE = "0ne00000001"
WRONG_PIN = "wrong-5e1f"


class Lab:
    """What the rows need, made once per module and torn down at its end."""

    def __init__(self, softhsm, device, test_ca, broker, service_context, tmp):
        self.softhsm, self.device, self.ca, self.broker, self.tmp = softhsm, device, test_ca, broker, tmp
        self.service_context = service_context
        self.ctx = tls.client_context(cert=device["ec"]["cert"], key=device["ec"]["key"], ca=test_ca.cert)
        self.https = tls.https_context(cert=device["ec"]["cert"], key=device["ec"]["key"], ca=test_ca.cert)
        self.servers = {}
        self.dps = DpsEmulator(ca=certs.CertificateAuthority(test_ca.cert, test_ca.key),
                               server_cert=test_ca.server_cert, server_key=test_ca.server_key, id_scope=SCOPE,
                               retry_after=1).start()
        self.dps.add_individual(device["ec"]["cn"], device["ec"]["cert"].read_bytes())
        self.garbage = GarbageHttps(test_ca)
        self.pin_file = tmp / "pin"
        self.pin_file.write_text(PIN + "\n")
        self.bad_pin_file = tmp / "bad-pin"
        self.bad_pin_file.write_text(WRONG_PIN + "\n")

    def tls_server(self, kind):
        if kind not in self.servers:
            spec = {"untrusted": ("localhost", "DNS:localhost", 30, True),
                    "expired": ("localhost", "DNS:localhost", -1, False),
                    "wrong-host": ("elsewhere", "DNS:elsewhere.example", 30, False)}[kind]
            self.servers[kind] = TlsServer(_server_context(self.ca, self.tmp, kind, *spec[:3], self_signed=spec[3]))
        return self.servers[kind]

    def device_to(self, port, **kwargs):
        return Device(Identity("localhost", f"sw-{uuid.uuid4().hex[:8]}"), self.ctx, port=port, backoff=FAST,
                      **kwargs)

    def cli(self, *args, timeout=30, env=None):
        env = {**self.softhsm.env, "LIGHTCLIENT_MODULE_PATH": self.softhsm.module_path, **(env or {})}
        env = {k: v for k, v in env.items() if not k.startswith(("IOT_HUB", "DEVICE_ID", "KEY_IDENTIFIER",
                                                                   "PATH_TO_CERT", "PROVISIONING"))}
        env.pop("LIGHTCLIENT_PIN", None)
        return subprocess.run([sys.executable, "-m", "lightclient", *map(str, args)], env=env, cwd=ROOT,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)

    def close(self):
        for server in self.servers.values():
            server.close()
        self.dps.stop()
        self.garbage.close()


class GarbageHttps(TlsServer):
    """An HTTPS server answering every request with 200 and a body that is not JSON (a broken DPS)."""

    def __init__(self, test_ca):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(test_ca.server_cert), str(test_ca.server_key))
        super().__init__(ctx)

    def _serve(self):
        while not self.closed.is_set():
            try:
                self.listener.settimeout(0.05)
                raw, _ = self.listener.accept()
            except OSError:
                continue
            raw.settimeout(2)
            try:
                with self.context.wrap_socket(raw, server_side=True) as conn:
                    conn.recv(65536)
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 9\r\n"
                                 b"Connection: close\r\n\r\n<garbage>")
            except OSError:
                pass


@pytest.fixture(scope="module")
def lab_(softhsm, device, test_ca, broker, service_context, tmp_path_factory):
    lab = Lab(softhsm, device, test_ca, broker, service_context, tmp_path_factory.mktemp("sweep"))
    yield lab
    lab.close()


# ------------------------------------------------------------------------------------------------- rows


def _load_in_child(lab, pin):
    """keys.load_key on the never-logged-in token, in a fresh process (libp11 keeps a slot logged in once
    any correct PIN was given in a process, so a wrong PIN is only observable in a new one); the PIN
    travels on stdin. Re-raises the child's error as the same class here."""
    import lightclient.exceptions as errors

    code = ("import sys\nfrom lightclient import keys\npin = sys.stdin.readline().rstrip('\\n') or None\n"
            f"keys.load_key({lab.softhsm.fresh_uri!r}, pin=pin)\n")
    proc = subprocess.run([sys.executable, "-c", code], input=(pin or "") + "\n", capture_output=True, text=True,
                          timeout=30, env=lab.softhsm.env, cwd=ROOT)
    assert PIN not in proc.stdout + proc.stderr and WRONG_PIN not in proc.stdout + proc.stderr
    last = next(line for line in reversed(proc.stderr.splitlines()) if line.startswith("lightclient.exceptions."))
    name, _, message = last.partition(": ")
    raise getattr(errors, name.rsplit(".", 1)[-1])(message)


def _connect(lab, kind):
    dev = lab.device_to(lab.tls_server(kind).port)
    dev.connect(timeout=5)


def _send_offline(**kwargs):
    def run(lab):
        Device(Identity("localhost", "d"), lab.ctx, max_queue=2).send(**kwargs)
    return run


def _queue_full(lab):
    dev = Device(Identity("localhost", "d"), lab.ctx, max_queue=2)
    for _ in range(3):
        dev.send(b"x")


def _corrupt_outbox(lab):
    path = lab.tmp / f"{uuid.uuid4().hex}.db"
    path.write_bytes(b"SQLite format 2\x00" + b"\xff" * 4096)
    Device(Identity("localhost", "d"), lab.ctx, outbox=path)


def _twin_answer(lab, body, status=200):
    """A hub peer that answers the twin GET with ``body``; the device asks."""
    hub = HubSide(lab.service_context, lab.broker.port, answer_twin=False)
    hub.client.on_message = lambda c, u, m: m.topic.startswith("$iothub/twin/GET/") and hub.client.publish(
        f"$iothub/twin/res/{status}/?$rid={m.topic.split('?$rid=')[1]}", body)
    dev = lab.device_to(lab.broker.port, twin_timeout=2)
    try:
        with dev:
            dev.get_twin()
    finally:
        hub.close()


def _hub_sends(topic_of, payload):
    """The hub sends something malformed; the device drops it with a log line and keeps working."""
    def run(lab):
        hub = HubSide(lab.service_context, lab.broker.port)
        got = []
        dev = lab.device_to(lab.broker.port, twin_timeout=3, on_desired=lambda p, v: got.append(v),
                            on_c2d=lambda m, p: got.append(p))
        dev.add_method_handler("m", lambda payload: payload)
        try:
            with dev:
                hub.publish(topic_of(dev.identity.device_id), payload)
                time.sleep(0.2)
                # Still connected and working: a twin round trip and a method call.
                assert dev.get_twin()["desired"]["$version"] == 1
                assert hub.call_method("m", b'{"a": 1}') == (200, {"a": 1})
                assert dev.is_connected
        finally:
            hub.close()
        raise ProtocolError("dropped and logged, connection intact")  # the row's expected outcome
    return run


def _dps(status_or_garbage, timeout=3.0):
    def run(lab):
        if status_or_garbage == "garbage":
            endpoint = f"localhost:{lab.garbage.port}"
        else:
            lab.dps.inject(lab.device["ec"]["cn"], *([status_or_garbage] * 50))
            endpoint = lab.dps.endpoint
        try:
            dps.provision(SCOPE, lab.device["ec"]["cn"], ssl_context=lab.https, endpoint=endpoint,
                          poll_interval=(0.05, 0.2), timeout=timeout, request_timeout=2)
        finally:
            with lab.dps._lock:
                lab.dps._faults.clear()
    return run


def _cli(*args, code, text):
    def run(lab):
        proc = lab.cli(*args)
        out = proc.stdout + proc.stderr
        assert PIN not in out and "Traceback" not in out, out
        assert proc.returncode == code, f"exit {proc.returncode}: {out}"
        assert text in out, out
        raise CliFailed(out)
    return run


class CliFailed(LightClientError):
    """Marks a CLI row that failed the expected way."""


def _cli_key(lab, **over):
    args = {"--key": lab.device["ec"]["uri"], "--pin-file": lab.pin_file, "--cert": lab.device["ec"]["cert"],
            "--ca": lab.ca.cert, "--hub": "localhost", "--device-id": "sw-cli", "--port": lab.broker.port}
    args.update(over)
    return [x for k, v in args.items() if v is not None for x in (k, v)]


def _cli_row(subcommand, *extra, code, text, **over):
    def run(lab):
        return _cli(*subcommand, *_cli_key(lab, **over), *extra, code=code, text=text)(lab)
    return run


CASES = {
    # keys, PINs, modules
    "wrong-pin": (lambda lab: _load_in_child(lab, WRONG_PIN), PinError, "refused"),
    "missing-pin": (lambda lab: _load_in_child(lab, None), PinError, "PIN"),
    "pin-with-nul": (lambda lab: keys.load_key(lab.device["ec"]["uri"], pin="12\x0034"), ConfigError, "NUL|nul|zero"),
    "unknown-token": (lambda lab: keys.load_key(lab.device["ec"]["uri"].replace("token=lc-test", "token=nope"),
                                                pin=PIN), TokenNotFoundError, "nope"),
    "unknown-object": (lambda lab: keys.load_key(lab.device["ec"]["uri"].replace("object=eckey", "object=nokey"),
                                                 pin=PIN), KeyNotFoundError, "nokey"),
    "missing-module": (lambda lab: keys.load_key("pkcs11:token=t;object=k?module-path=/nonexistent/libp11x.so",
                                                 pin=PIN), ModuleLoadError, "/nonexistent/libp11x.so"),
    "no-module-given": (lambda lab: keys.load_key(f"pkcs11:token=t;object=k?pin-value={PIN}"), ConfigError,
                        "no PKCS#11 module"),
    "unknown-engine": (lambda lab: keys.load_key("engine:nosuchengine:key1"), BackendUnavailableError, "nosuchengine"),
    "garbage-key-ref": (lambda lab: keys.load_key("this is not a key reference"), KeyLoadError,
                        "cannot read the key file"),
    # certificates
    "cert-key-mismatch": (lambda lab: tls.client_context(cert=lab.ca.cert, key=lab.device["ec"]["key"],
                                                         ca=lab.ca.cert), KeyMismatchError, ""),
    "missing-cert-file": (lambda lab: tls.client_context(cert=lab.tmp / "none.pem", key=lab.device["ec"]["key"]),
                          CertificateError, "none.pem"),
    "server-cert-untrusted": (lambda lab: _connect(lab, "untrusted"), ServerCertificateError, "untrusted"),
    "server-cert-expired": (lambda lab: _connect(lab, "expired"), ServerCertificateError, "expired"),
    "server-cert-wrong-host": (lambda lab: _connect(lab, "wrong-host"), ServerCertificateError, "another host"),
    # messages, ids, properties
    "oversized-message": (_send_offline(payload=b"x" * (256 * 1024 + 1)), MessageTooLargeError, "262144"),
    "property-name-dollar": (_send_offline(payload=b"x", properties={"$.mid": "1"}), ConfigError, "starts with '\\$'"),
    "property-name-empty": (_send_offline(payload=b"x", properties={"": "v"}), ConfigError, ""),
    "property-value-not-str": (_send_offline(payload=b"x", properties={"n": 1}), ConfigError, ""),
    "unknown-system-property": (_send_offline(payload=b"x", colour="red"), ConfigError, "system properties are"),
    "payload-not-bytes": (_send_offline(payload=12.5), ConfigError, "bytes or str"),
    "invalid-device-id": (lambda lab: Identity("localhost", "bad/id"), ConfigError, "bad/id"),
    "invalid-module-id": (lambda lab: Identity("localhost", "d", "m#1"), ConfigError, ""),
    "reported-patch-not-a-dict": (lambda lab: Device(Identity("localhost", "d"), lab.ctx).patch_reported([1]),
                                  ConfigError, "JSON object"),
    "reported-patch-nan": (lambda lab: Device(Identity("localhost", "d"), lab.ctx).patch_reported({"x": math.nan}),
                           ConfigError, "JSON"),
    "queue-full": (_queue_full, QueueFullError, "full"),
    "corrupt-outbox": (_corrupt_outbox, OutboxError, "not a usable"),
    "keepalive-too-long": (lambda lab: Device(Identity("localhost", "d"), lab.ctx, keepalive=5000), ConfigError, "1177"),
    # a hub sending malformed topics or payloads
    "hub-twin-body-not-json": (lambda lab: _twin_answer(lab, b"{not json"), ServiceError, "not JSON"),
    "hub-twin-body-not-object": (lambda lab: _twin_answer(lab, b"[1, 2]"), ServiceError, "not an object"),
    "hub-twin-status-garbage": (lambda lab: _twin_answer(lab, b"", status="2x0"), OperationTimeout, "twin GET"),
    "hub-desired-patch-not-json": (_hub_sends(lambda d: "$iothub/twin/PATCH/properties/desired/?$version=7",
                                              b"{malformed"), ProtocolError, "intact"),
    "hub-desired-no-version": (_hub_sends(lambda d: "$iothub/twin/PATCH/properties/desired/", b"{}"),
                               ProtocolError, "intact"),
    "hub-c2d-bad-escape": (_hub_sends(lambda d: f"devices/{d}/messages/devicebound/a=%zz", b"x"),
                           ProtocolError, "intact"),
    "hub-method-without-rid": (_hub_sends(lambda d: "$iothub/methods/POST/m/", b"{}"), ProtocolError, "intact"),
    # DPS
    "dps-401": (_dps(401), ProvisioningError, "401"),
    "dps-404": (_dps(404), ProvisioningError, "404"),
    "dps-429-forever": (_dps(429, timeout=1.5), (ProvisioningError, OperationTimeout), "429"),
    "dps-500-forever": (_dps(500, timeout=1.5), (ProvisioningError, OperationTimeout), "500"),
    "dps-garbage": (_dps("garbage"), (ProvisioningError, ProtocolError), ""),
    # the command line
    "cli-wrong-pin-file": (_cli_row(["send", "x"], code=3, text="error:", **{"--pin-file": None, "--key": None},
                                    ), CliFailed, ""),
    "cli-twin-report-malformed-json": (_cli_row(["twin", "report", "{nope"], code=2, text="is not valid JSON"),
                                       CliFailed, ""),
    "cli-send-bad-property": (_cli_row(["send", "x", "--prop", "$bad=1"], code=2, text="'$'"), CliFailed, ""),
    "cli-missing-cert-file": (_cli_row(["send", "x"], code=3, text="error:", **{"--cert": "/nonexistent/dev.pem"}),
                              CliFailed, ""),
    "cli-untrusted-server": (_cli_row(["send", "x"], code=4, text="failed verification: untrusted", **{"--ca": None}), CliFailed, ""),
    "cli-unknown-token": (_cli_row(["send", "x"], code=3, text="error:",
                                   **{"--key": "pkcs11:token=nope;object=eckey"}), CliFailed, ""),
    "cli-missing-module": (_cli_row(["send", "x"], code=3, text="error:",
                                    **{"--key": "pkcs11:token=lc-test;object=eckey?module-path=/nonexistent/m.so"}),
                           CliFailed, ""),
    "cli-invalid-device-id": (_cli_row(["send", "x"], code=2, text="error:", **{"--device-id": "bad/id"}),
                              CliFailed, ""),
    "payload-none": (_send_offline(payload=None), ConfigError, "payload must be bytes or str.*not NoneType"),
    "outbox-row-topic-not-text": (lambda lab: _outbox_with_bad_topic_row(lab), OutboxError, "row 1 .*not UTF-8"),
    "server-tls-1.1-only": (lambda lab: _connect_tls11_only(lab), TlsVersionError, "only offers TLS 1.0/1.1"),
}


def _outbox_with_bad_topic_row(lab):
    import sqlite3

    path = lab.tmp / f"{uuid.uuid4().hex}.db"
    Device(Identity("localhost", "d"), lab.ctx, outbox=path).close()
    with sqlite3.connect(path) as peer:
        peer.execute("INSERT INTO messages (topic, payload, created) VALUES (x'ff', x'00', 0)")
    Device(Identity("localhost", "d"), lab.ctx, outbox=path)


def _connect_tls11_only(lab):
    server = TlsServer(_tls11_only_context(lab.ca, lab.tmp))
    try:
        lab.device_to(server.port).connect(timeout=5)
    finally:
        server.close()


def _fix_cli_wrong_pin(lab):
    return _cli(*["send", "x"], *_cli_key(lab, **{"--pin-file": lab.bad_pin_file,
                                                  "--key": lab.softhsm.fresh_uri}), code=3, text="error:")(lab)


CASES["cli-wrong-pin-file"] = (_fix_cli_wrong_pin, CliFailed, "")


def _dps_redirect(status, scheme, on="PUT"):
    """A DPS redirecting the register PUT (or the status GET) elsewhere: a typed error, nothing sent there."""
    def run(lab):
        recorder = Recorder()
        server = RedirectingHttps(lab.ca, status, f"{scheme}://127.0.0.1:{recorder.port}/x", on=on)
        try:
            dps.provision(SCOPE, lab.device["ec"]["cn"], ssl_context=lab.https, endpoint=server.endpoint,
                          poll_interval=(0.05, 0.2), timeout=5, request_timeout=2)
        finally:
            server.close()
            recorder.close()
            assert recorder.connections == 0 and not recorder.received, "the redirect target was contacted"
    return run


def _https_session_plain_http(lab):
    recorder = Recorder()
    try:
        with tls.https_session(lab.https) as session:
            session.put(f"http://127.0.0.1:{recorder.port}/register", data=b"{}")
    finally:
        recorder.close()
        assert recorder.connections == 0 and not recorder.received


def _dps_oversized(lab):
    from lightclient._https import MAX_BODY

    server = RedirectingHttps(lab.ca, 200, None, body=b"{" + b" " * MAX_BODY + b"}")
    try:
        dps.provision(SCOPE, lab.device["ec"]["cn"], ssl_context=lab.https, endpoint=server.endpoint,
                      poll_interval=(0.05, 0.2), timeout=5, request_timeout=2)
    finally:
        server.close()


def _dps_endpoint(endpoint):
    return lambda lab: dps.provision(SCOPE, lab.device["ec"]["cn"], ssl_context=lab.https, endpoint=endpoint)


CASES.update({
    # redirects are never followed (issue 12, item 1)
    "dps-redirect-307-put-to-http": (_dps_redirect(307, "http"), ProvisioningError, "307 redirecting to http://"),
    "dps-redirect-301-put-to-other-https": (_dps_redirect(301, "https"), ProvisioningError,
                                            "301 redirecting to https://127.0.0.1"),
    "dps-redirect-302-get-to-http": (_dps_redirect(302, "http", on="GET"), ProvisioningError, "302 redirecting"),
    "dps-redirect-308-get-to-other-https": (_dps_redirect(308, "https", on="GET"), ProvisioningError,
                                            "308 redirecting"),
    "dps-oversized-answer": (_dps_oversized, ProvisioningError, "more than 1048576 bytes"),
    "https-session-plain-http": (_https_session_plain_http, ConfigError, "speaks only HTTPS"),
    # host names: DNS names or IP addresses only (issue 12, item 6)
    "identity-host-query": (lambda lab: Identity("hub?x=1", "d"), ConfigError, r"hostname 'hub\?x=1' contains '\?'"),
    "identity-host-fragment": (lambda lab: Identity("hub#", "d"), ConfigError, "contains '#'"),
    "identity-host-port": (lambda lab: Identity("hub:8883", "d"), ConfigError, r"port separately \(port=\)"),
    "identity-host-path": (lambda lab: Identity("hub/x", "d"), ConfigError, "contains '/'"),
    "identity-host-empty-label": (lambda lab: Identity("hub..azure-devices.net", "d"), ConfigError, "empty label"),
    "identity-host-long-label": (lambda lab: Identity("h" * 64 + ".net", "d"), ConfigError, "at most 63"),
    "dps-endpoint-query": (_dps_endpoint("dps?x=1"), ConfigError, r"endpoint 'dps\?x=1' contains '\?'"),
    "dps-endpoint-empty-label": (_dps_endpoint("dps..example:443"), ConfigError, "empty label"),
    "dps-endpoint-bad-port": (_dps_endpoint("127.0.0.1:99999"), ConfigError, "port must be"),
    "dps-endpoint-bare-ipv6": (_dps_endpoint("::1:8443"), ConfigError, "brackets"),
})



# the emulator's service side: every malformed request gets a JSON 4xx, nothing is written before it is checked




class EmulatorRefused(Exception):
    """Marks an emulator row answered the expected way: HTTP status and the JSON error message."""


def _emulator_http(method, path, body=b"", length=None):
    def run(lab):
        import http.client
        import json
        import socket

        from lightclient.emulator import Emulator

        head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: " \
               f"{len(body) if length is None else length}\r\n\r\n"
        with Emulator(lab.tmp / "emulator", http_port=0) as emu:  # the CA in lab.tmp is made once
            with socket.create_connection(("127.0.0.1", emu.http_port), timeout=10) as sock:
                sock.sendall(head.encode() + body)
                sock.shutdown(socket.SHUT_WR)
                response = http.client.HTTPResponse(sock)
                response.begin()
                answer = json.loads(response.read())
            assert emu.identities() == [] and not (lab.tmp / "emulator" / "registered").exists()
        raise EmulatorRefused(f"{response.status} {answer['message']}")
    return run


def _emulator_with_no_room(lab):
    from lightclient.emulator import Emulator

    Emulator(lab.tmp / "emulator", max_connections=0)


def _emulator_call(call):
    def run(lab):
        from lightclient.emulator import Emulator

        with Emulator(lab.tmp / "emulator") as emu:
            emu.register_device("sweep")
            call(emu)
    return run


CASES.update({
    "emulator-http-body-not-object": (_emulator_http("PUT", "/devices/x", b"[1]"), EmulatorRefused,
                                      "^400 .*must be a JSON object"),
    "emulator-http-content-length-garbage": (_emulator_http("PUT", "/devices/x", b"{}", length="abc"),
                                             EmulatorRefused, "^400 Content-Length"),
    "emulator-http-content-length-negative": (_emulator_http("PUT", "/devices/x", b"{}", length="-5"),
                                              EmulatorRefused, "^400 Content-Length"),
    "emulator-http-dotdot-id": (_emulator_http("PUT", "/devices/..", b"{}"), EmulatorRefused, "^400 '..'"),
    "emulator-http-oversized-body": (_emulator_http("PUT", "/devices/x", length=2 ** 40), EmulatorRefused, "^413"),
    "emulator-http-deep-json": (_emulator_http("PUT", "/devices/x", b"[" * 50_000 + b"]" * 50_000),
                                EmulatorRefused, "^400 .*nested 50000 levels"),
    "emulator-http-garbage-certificate": (_emulator_http("PUT", "/devices/x", b'{"authentication": {"type": '
                                                         b'"selfSigned", "x509Certificate": "garbage"}}'),
                                          EmulatorRefused, "^400 .*x509Certificate"),
    "emulator-desired-too-deep": (_emulator_call(lambda emu: emu.update_desired("sweep", _deep_dict(11))),
                                  HubError, "^400 .*more than 10 levels"),
    "emulator-zero-connection-cap": (_emulator_with_no_room, EmulatorError, "max_connections must be a positive"),
})


def _deep_dict(levels):
    root = current = {}
    for n in range(levels):
        current[f"l{n}"] = current = {}
    return root

# ------------------------------------------------------------------------------- rows: issue 12 (keys, files)

def _user_file(lab, kind):
    """A path that is not a small regular file: a FIFO, a directory, /dev/zero or a 2 GiB sparse file."""
    import os

    if kind == "dev-zero":
        return "/dev/zero"
    path = lab.tmp / f"{kind}-{uuid.uuid4().hex[:8]}"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dir":
        path.mkdir()
    else:
        with open(path, "wb") as fh:
            fh.truncate(2 << 30)
    return str(path)


def _not_utf8_pin_file(lab):
    path = lab.tmp / f"pin-{uuid.uuid4().hex[:8]}"
    path.write_bytes(PIN.encode() + b"\xff\n")
    return path


def _pin_leak_row(ref_of, secret_tail):
    """The error for ``ref_of(lab)`` must not show ``secret_tail``, the part of the PIN after a ; & ? or space."""
    def run(lab):
        try:
            keys.load_key(ref_of(lab))
        except LightClientError as exc:
            assert secret_tail not in str(exc) + repr(exc) + "".join(getattr(exc, "openssl_errors", ())), exc
            raise
    return run


def _cli_keylog(lab, mode):
    import os

    path = lab.tmp / f"keylog-{uuid.uuid4().hex[:8]}"
    if mode is not None:
        path.write_text("")
        os.chmod(path, mode)
    old = os.umask(0o022)
    try:
        proc = lab.cli("send", "x", *_cli_key(lab, **{"--device-id": "sw-keylog"}), "--keylog", path)
    finally:
        os.umask(old)
    out = proc.stdout + proc.stderr
    assert PIN not in out and "Traceback" not in out, out
    if mode is None:   # created by the CLI: owner-only, and the user was told what it holds
        assert proc.returncode == 0, out
        assert (path.stat().st_mode & 0o777) == 0o600 and path.stat().st_size > 0
        assert out.count("holds the TLS session secrets") == 1, out
    else:
        assert proc.returncode == 2 and "can be read by other users" in out, out
        assert (path.stat().st_mode & 0o777) == mode and path.stat().st_size == 0
    raise CliFailed(out)


def _cli_pin_value_in_key(lab):
    proc = lab.cli("csr", "--cn", "sw-csr", "--key", f"{lab.device['ec']['uri']}&pin-value={PIN};5678",
                   "--out", lab.tmp / f"{uuid.uuid4().hex[:8]}.csr")
    out = proc.stdout + proc.stderr
    assert "5678" not in out and "Traceback" not in out, out
    # The PIN after ';' is part of the pin-value (RFC 7512 splits the query on '&'): it is refused, and warned about.
    assert "--key holds a pin-value" in out, out
    raise CliFailed(out)


def _cli_upload_env_sas_key_with_key(lab):
    # The SAS key from LIGHTCLIENT_SAS_KEY, an X.509 --key on the command line: the error names the variable
    # the user set, not a --sas-key flag they never gave.
    proc = lab.cli("upload", __file__, "--hub", "localhost", "--device-id", "sw-sas", "--key", lab.device["ec"]["uri"],
                   env={"LIGHTCLIENT_SAS_KEY": _sas_ref(lab)})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in out, out
    assert "--key is for X.509 devices; LIGHTCLIENT_SAS_KEY (set in the environment)" in out, out
    assert "unset LIGHTCLIENT_SAS_KEY" in out and "--sas-key" not in out, out
    raise CliFailed(out)


CASES.update({
    "keylog-created-owner-only": (lambda lab: _cli_keylog(lab, None), CliFailed, ""),
    "keylog-existing-world-readable": (lambda lab: _cli_keylog(lab, 0o644), CliFailed, ""),
    "pin-file-not-utf8": (lambda lab: keys.load_key(lab.device["ec"]["uri"], pin_file=_not_utf8_pin_file(lab)),
                          PinError, "not UTF-8"),
    "cli-pin-file-not-utf8": (lambda lab: _cli_row(["send", "x"], code=3, text="not UTF-8",
                                                   **{"--pin-file": _not_utf8_pin_file(lab)})(lab), CliFailed, ""),
    "csr-subject-nul": (lambda lab: keys.sign_csr(lab.device["ec"]["key"], "dev-1\x00admin"), ConfigError,
                        "control character"),
    "csr-san-nul": (lambda lab: keys.sign_csr(lab.device["ec"]["key"], "dev-1", san="DNS:a\x00b"), ConfigError,
                    "control character"),
    "csr-digest-md4": (lambda lab: keys.sign_csr(lab.device["ec"]["key"], "dev-1", digest="md4"), ConfigError,
                       "sha256, sha384, sha512"),
    "csr-cn-not-str": (lambda lab: keys.sign_csr(lab.device["ec"]["key"], [("CN", 5)]), ConfigError, "got int"),
    "cli-csr-cn-control-char": (lambda lab: _cli(*["csr", "--cn", "dev\x01admin", "--key", lab.device["ec"]["uri"],
                                                   "--pin-file", lab.pin_file], code=2,
                                                 text="control character")(lab), CliFailed, ""),
    "cli-pin-value-in-key-warned": (_cli_pin_value_in_key, CliFailed, ""),
    "pin-semicolon-not-leaked": (_pin_leak_row(lambda lab: lab.device["ec"]["uri"].replace("object=eckey", "object=nokey")
                                               + f"&pin-value={PIN};5678", ";5678"), KeyNotFoundError, "nokey"),
    "pin-ampersand-not-leaked": (_pin_leak_row(lambda lab: f"pkcs11:token=t;objectk?pin-value={PIN}&tail99", "tail99"),
                                 ConfigError, "expected name=value"),
    "pin-space-not-leaked": (_pin_leak_row(lambda lab: f"pkcs11:token=t?pin-value={PIN} tail99", "tail99"),
                             ConfigError, "names no key"),
    "key-file-fifo": (lambda lab: keys.load_key(_user_file(lab, "fifo")), ConfigError, "FIFO"),
    "key-file-dir": (lambda lab: keys.load_key(_user_file(lab, "dir")), ConfigError, "directory"),
    "key-file-dev-zero": (lambda lab: keys.load_key("/dev/zero"), ConfigError, "character device"),
    "key-file-sparse-2gib": (lambda lab: keys.load_key(_user_file(lab, "sparse")), ConfigError, "too large"),
    "cert-file-fifo": (lambda lab: tls.client_context(cert=_user_file(lab, "fifo"), key=lab.device["ec"]["key"]),
                       ConfigError, "FIFO"),
    "cert-file-dev-zero": (lambda lab: tls.client_context(cert="/dev/zero", key=lab.device["ec"]["key"]),
                           ConfigError, "character device"),
    "ca-file-dev-zero": (lambda lab: tls.client_context(cert=lab.device["ec"]["cert"], key=lab.device["ec"]["key"],
                                                        ca="/dev/zero"), ConfigError, "character device"),
    "pin-file-fifo": (lambda lab: keys.load_key(lab.device["ec"]["uri"], pin_file=_user_file(lab, "fifo")),
                      ConfigError, "FIFO"),
    "pin-file-dir": (lambda lab: keys.load_key(lab.device["ec"]["uri"], pin_file=_user_file(lab, "dir")),
                     ConfigError, "directory"),
    "cli-key-file-fifo": (lambda lab: _cli_row(["send", "x"], code=2, text="FIFO",
                                               **{"--key": _user_file(lab, "fifo")})(lab), CliFailed, ""),
    "cli-cert-dev-zero": (_cli_row(["send", "x"], code=2, text="character device", **{"--cert": "/dev/zero"}),
                          CliFailed, ""),
    "csr-file-fifo": (lambda lab: dps.read_csr(_user_file(lab, "fifo")), ConfigError, "FIFO"),
    "provisioning-cache-dev-zero": (lambda lab: dps.ProvisioningCache("/dev/zero").load(SCOPE, "d"), ConfigError,
                                    "character device"),
    "cli-provision-csr-fifo": (lambda lab: _cli(
        "provision", "--id-scope", SCOPE, "--device-id", lab.device["ec"]["cn"], "--cert", lab.device["ec"]["cert"],
        "--key", lab.device["ec"]["uri"], "--pin-file", lab.pin_file, "--endpoint", lab.dps.endpoint,
        "--csr", _user_file(lab, "fifo"), "--cert-out", lab.tmp / "issued.pem", code=2, text="FIFO")(lab),
        CliFailed, ""),
})


# connect from anywhere (issue 16): transports, proxies, gateways
CASES.update({
    "transport-unknown": (lambda lab: Device(Identity("localhost", "d"), lab.ctx, transport="ws"), ConfigError,
                          "'tcp', 'websockets', 'auto'"),
    "websocket-port-zero": (lambda lab: Device(Identity("localhost", "d"), lab.ctx, websocket_port=0), ConfigError,
                            "websocket_port must be an int"),
    "proxy-scheme-ftp": (lambda lab: Device(Identity("localhost", "d"), lab.ctx, proxy="ftp://p:1"), ConfigError,
                         "http://, socks5:// or socks5h://"),
    "proxy-password-not-shown": (lambda lab: Device(Identity("localhost", "d"), lab.ctx,
                                                    proxy="https://u:hidden-pw-77@p:1"), ConfigError, "not supported"),
    "proxy-not-a-string": (lambda lab: Device(Identity("localhost", "d"), lab.ctx, proxy=3128), ConfigError,
                           "URL string"),
    "gateway-empty": (lambda lab: Device(Identity("localhost", "d"), lab.ctx, gateway_hostname=" "), ConfigError,
                      "gateway_hostname"),
    "dps-proxy-with-session": (lambda lab: __import__("lightclient.dps").dps.provision(
        "0ne00000001", "d", session=object(), proxy="http://p:1"), ConfigError, "not with session="),
    "cli-proxy-and-no-proxy": (_cli_row(["send", "x"], "--no-proxy", code=2, text="contradict",
                                        **{"--proxy": "http://p:1"}), CliFailed, ""),
})

def _upload(lab, source, name="x.bin", **kwargs):
    from lightclient import upload

    return upload.upload_file(source, name, device_id="sw-up", endpoint="localhost:1", ssl_context=lab.ctx, **kwargs)


CASES.update({
    "upload-file-fifo": (lambda lab: _upload(lab, _user_file(lab, "fifo")), ConfigError, "FIFO"),
    "upload-file-dir": (lambda lab: _upload(lab, _user_file(lab, "dir")), ConfigError, "directory"),
    "upload-file-dev-zero": (lambda lab: _upload(lab, "/dev/zero"), ConfigError, "character device"),
    "upload-fileobj-text-mode": (lambda lab: _upload(lab, io.StringIO("text")), ConfigError, "binary"),
    "upload-blob-name-dotdot": (lambda lab: _upload(lab, __file__, "a/../b"), ConfigError, "'..'"),
    "upload-block-size-tiny": (lambda lab: _upload(lab, __file__, block_size=10), ConfigError, "block_size"),
})


# symmetric keys (issue 19): SAS key references, software keys, lifetimes, bearer tokens never shown
SAS_KEY = "c2FzLXN3ZWVwLWtleS1zYXMtc3dlZXAta2V5LXNhcy1zd2VlcC1rZXktc2FzLXM="


def _sas_ref(lab, path="object=nosas;"):
    return f"pkcs11:token=lc-test;{path}type=secret-key?module-path={lab.softhsm.module_path}"


def _sas_token_key(lab, ref):
    from lightclient.symkey import TokenKey

    return TokenKey(ref, pin=PIN, env=lab.softhsm.env)


def _software_key_not_base64(lab):
    from lightclient.symkey import SoftwareKey

    try:
        SoftwareKey("c2VjcmV0LXRhaWwtOTk!!c2VjcmV0LXRhaWwtOTk")
    except ConfigError as exc:
        assert "c2VjcmV0" not in str(exc) + repr(exc), exc
        raise


def _bearer_token_never_shown(lab):
    """A SAS token DPS refuses: the token is in no error, repr or log line (it authorises until it expires)."""
    from lightclient.symkey import SasCredential, SoftwareKey

    cred = SasCredential.for_dps(SCOPE, "sas-sweep-1", SoftwareKey(SAS_KEY))
    token = cred.current()
    secret = token.value.split("sig=", 1)[1].split("&", 1)[0]
    records = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger().addHandler(handler)
    try:
        dps.provision(SCOPE, "sas-sweep-1", ssl_context=tls.server_context(ca=lab.ca.cert, alpn=["http/1.1"]),
                      endpoint=lab.dps.endpoint, sas=cred, poll_interval=(0.05, 0.2), timeout=5, request_timeout=2)
    except LightClientError as exc:
        shown = [str(exc), repr(exc), repr(token), repr(cred), *records]
        assert not [t for t in shown if secret in t or "SharedAccessSignature sr=" in t], shown
        raise


CASES.update({
    "sas-key-ref-names-no-key": (lambda lab: _sas_token_key(lab, _sas_ref(lab, "")), ConfigError,
                                 "names no key"),
    "sas-key-not-on-token": (lambda lab: _sas_token_key(lab, _sas_ref(lab)).sign(b"x"), KeyNotFoundError,
                             "no secret key with object=nosas"),
    "sas-key-ref-is-a-private-key": (lambda lab: _sas_token_key(lab, _sas_ref(lab, "object=eckey;").replace(
        "type=secret-key", "type=private")), ConfigError, "names a private key"),
    "sas-software-key-not-base64": (_software_key_not_base64, ConfigError, "not valid base64"),
    "sas-lifetime-zero": (lambda lab: __import__("lightclient.symkey").symkey.SasCredential(
        __import__("lightclient.symkey").symkey.SoftwareKey(SAS_KEY), "localhost/devices/d", lifetime=0),
        ConfigError, "between 10 s"),
    "sas-expiry-zero": (lambda lab: __import__("lightclient.sas").sas.string_to_sign("localhost/devices/d", 0),
                        ConfigError, "positive Unix time"),
    "sas-bearer-token-never-shown": (_bearer_token_never_shown, LightClientError, ""),
    "cli-sas-lifetime-zero": (lambda lab: _cli("send", "x", "--hub", "localhost", "--device-id", "sw-sas",
                                               "--sas-key", _sas_ref(lab), "--pin-file", lab.pin_file,
                                               "--sas-lifetime", 0, code=2, text="--sas-lifetime must be between")(lab),
                              CliFailed, ""),
    "cli-sas-key-not-on-token": (lambda lab: _cli("send", "x", "--hub", "localhost", "--device-id", "sw-sas",
                                                  "--sas-key", _sas_ref(lab), "--pin-file", lab.pin_file,
                                                  "--port", lab.broker.port, "--ca", lab.ca.cert, code=3,
                                                  text="no secret key with object=nosas")(lab), CliFailed, ""),
    "cli-csr-with-sas-key": (lambda lab: _cli("csr", "--cn", "sw-csr", "--sas-key", _sas_ref(lab), code=2,
                                              text="`lightclient csr` is for X.509 keys only")(lab), CliFailed, ""),
    "cli-upload-sas-key-with-cert": (lambda lab: _cli("upload", __file__, "--hub", "localhost", "--device-id", "sw-sas",
                                                      "--sas-key", _sas_ref(lab), "--cert", lab.device["ec"]["cert"],
                                                      code=2, text="--cert is for X.509 devices")(lab), CliFailed, ""),
    "cli-upload-env-sas-key-with-key": (_cli_upload_env_sas_key_with_key, CliFailed, ""),
    "cli-send-sas-key-with-cert": (lambda lab: _cli("send", "x", "--hub", "localhost", "--device-id", "sw-sas",
                                                    "--sas-key", _sas_ref(lab), "--cert", lab.device["ec"]["cert"],
                                                    code=2, text="--cert is for X.509 devices")(lab), CliFailed, ""),
    "cli-upload-sas-key-not-on-token": (lambda lab: _cli("upload", __file__, "--hub", "localhost", "--device-id",
                                                         "sw-sas", "--sas-key", _sas_ref(lab), "--pin-file",
                                                         lab.pin_file, "--ca", lab.ca.cert, "--https-port", 9, code=3,
                                                         text="no secret key with object=nosas")(lab), CliFailed, ""),
    "cli-provision-sas-key-with-csr": (lambda lab: _cli(
        "provision", "--id-scope", SCOPE, "--registration-id", "sw-sas", "--endpoint", lab.dps.endpoint,
        "--sas-key", _sas_ref(lab), "--new-csr", "--cert-out", lab.tmp / "x.pem", code=2,
        text="--new-csr is for X.509 enrollments")(lab), CliFailed, ""),
})


# Key rotation (issue 17): a key made through this process's module instance; `renew` options.
CASES.update({
    "keygen-in-process-no-such-token": (lambda lab: __import__("lightclient.token").token.generate_keypair_in_process(
        lab.softhsm.module_path, "no-such-token", PIN, "rot"), TokenNotFoundError, "no token labelled 'no-such-token'"),
    "keygen-in-process-unknown-type": (lambda lab: __import__("lightclient.token").token.generate_keypair_in_process(
        lab.softhsm.module_path, "lc-test", PIN, "rot", "ec-p521"), ConfigError, "unknown key type 'ec-p521'"),
    "keygen-in-process-no-module": (lambda lab: __import__("lightclient.token").token.generate_keypair_in_process(
        str(lab.tmp / "missing.so"), "lc-test", PIN, "rot"), ModuleLoadError, "does not exist"),
    "cli-renew-retire-after-negative": (_cli_row(("renew",), "--id-scope", "0ne00000001", "--retire-after", "-1",
                                                 code=2, text="--retire-after must be 0 to 31536000 seconds"),
                                        CliFailed, ""),
})


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_sweep(lab_, name, capfd, caplog):
    caplog.set_level(logging.DEBUG)
    action, expected, match = CASES[name]
    started = time.monotonic()
    with pytest.raises(expected, match=match or None) as err:
        action(lab_)
    elapsed = time.monotonic() - started
    assert elapsed < 20, f"{name} took {elapsed:.1f} s"
    captured = capfd.readouterr()
    for text in (str(err.value), repr(err.value), captured.out, captured.err, caplog.text,
                 "\n".join(getattr(err.value, "openssl_errors", ()))):
        assert PIN not in text and WRONG_PIN not in text
    if name.startswith("hub-") and expected is ProtocolError:
        assert "dropped" in caplog.text  # the bad message was logged, not silently swallowed


def test_the_sweep_has_at_least_80_cases():
    assert len(CASES) >= 80
