"""The `lightclient` command end to end: the real console script in a subprocess, SoftHSM keys, the
IoT Hub emulator and the DPS emulator in this process, loopback only.

The key used throughout is made by `lightclient keygen` on a token of this module's own SoftHSM
directory, its CSR by `lightclient csr`, and its certificate by the test CA from that CSR.
"""
from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests import lab
from lightclient.emulator import Emulator, certs
from lightclient.emulator.dps import DpsEmulator

from ..conftest import PIN, SO_PIN

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "cli-token"
DEVICE = "cli-dev"
SCOPE = "0ne0000C11"
# Variables the CLI reads; none may leak in from the environment running the tests.
_SCRUB = ("IOT_HUB_HOSTNAME", "DEVICE_ID", "PATH_TO_CERTIFICATE_FILE", "KEY_IDENTIFIER", "PKCS11_MODULE_PATH",
          "PROVISIONING_IDSCOPE", "PROVISIONING_REGISTRATION_ID", "PROVISIONING_HOST")


def _env(base: dict, **extra) -> dict:
    env = {k: v for k, v in base.items() if not k.startswith("LIGHTCLIENT_") and k not in _SCRUB}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _with(env: dict, **extra) -> dict:
    return {**env, **{k: str(v) for k, v in extra.items()}}


def cli(*args, env, input=None, timeout=30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lightclient", *map(str, args)], env=env, cwd=ROOT,
                          input=input, capture_output=True, text=True, timeout=timeout,
                          stdin=None if input is not None else subprocess.DEVNULL)


def ok(*args, env, **kw) -> str:
    proc = cli(*args, env=env, **kw)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert PIN not in proc.stdout + proc.stderr
    return proc.stdout


def fails(code: int, *args, env, **kw) -> subprocess.CompletedProcess:
    proc = cli(*args, env=env, **kw)
    assert proc.returncode == code, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr and PIN not in proc.stdout + proc.stderr
    return proc


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def lab_(tmp_path_factory, test_ca):
    """Token, key (keygen), CSR (csr) and certificate, all made through the CLI."""
    root = tmp_path_factory.mktemp("cli")
    hsm = lab.SoftHSM(root / "hsm")
    hsm.init_token(TOKEN, PIN, SO_PIN)
    pin_file, bad_pin = root / "pin", root / "bad-pin"
    pin_file.write_text(PIN + "\n")
    bad_pin.write_text("0000-wrong\n")
    env = _env(hsm.env, LIGHTCLIENT_MODULE_PATH=hsm.module_path)
    keygen_out = ok("keygen", "--token", TOKEN, "--label", "devkey", "--pin-file", pin_file, env=env)
    uri = next(line for line in keygen_out.splitlines() if line.startswith("pkcs11:"))
    csr = root / "dev.csr"
    csr_out = ok("csr", "--key", uri, "--device-id", DEVICE, "--pin-file", pin_file, "--out", csr, env=env)
    cert = test_ca.sign_csr(csr.read_bytes(), root / "dev.pem", days=365)
    return SimpleNamespace(root=root, hsm=hsm, env=env, pin_file=pin_file, bad_pin=bad_pin, uri=uri, csr=csr,
                           cert=cert, keygen_out=keygen_out, csr_out=csr_out, ca=test_ca)


@pytest.fixture(scope="module")
def hub(lab_, test_ca):
    emu = Emulator(lab_.root / "emulator", ca_cert=test_ca.cert, ca_key=test_ca.key,
                   server_cert=test_ca.server_cert, server_key=test_ca.server_key)
    with emu:
        emu.register_device(DEVICE)
        yield emu


@pytest.fixture(scope="module")
def conn(lab_, hub):
    """Environment for a device connection, the way the original samples set it."""
    return _with(lab_.env, IOT_HUB_HOSTNAME="localhost", DEVICE_ID=DEVICE, PATH_TO_CERTIFICATE_FILE=lab_.cert,
                KEY_IDENTIFIER=lab_.uri, LIGHTCLIENT_PIN=PIN, LIGHTCLIENT_CA=lab_.ca.cert,
                LIGHTCLIENT_PORT=hub.port)


def _key_args(lab_, pin_file=None):
    return ["--key", lab_.uri, "--pin-file", pin_file or lab_.pin_file]


# --------------------------------------------------------------------------------------------- tokens, keygen


def test_keygen_prints_the_key_reference_with_module_path(lab_):
    assert "sensitive and non-extractable" in lab_.keygen_out
    assert re.fullmatch(rf"pkcs11:token={TOKEN};object=devkey;id=(%[0-9a-f]{{2}}){{8}};type=private"
                        rf"\?module-path={re.escape(lab_.hsm.module_path)}", lab_.uri)
    assert f"lightclient csr --key '{lab_.uri}'" in lab_.keygen_out
    # The token really holds it as sensitive and non-extractable (checked in a separate process).
    check = ("import sys, pkcs11; from pkcs11 import Attribute as A, ObjectClass as O\n"
             "t = pkcs11.lib(sys.argv[1]).get_token(token_label=sys.argv[2])\n"
             "with t.open(user_pin=sys.stdin.read().strip()) as s:\n"
             "    (k,) = s.get_objects({A.CLASS: O.PRIVATE_KEY, A.LABEL: 'devkey'})\n"
             "    print(k[A.SENSITIVE], k[A.EXTRACTABLE], k[A.SIGN])\n")
    out = subprocess.run([sys.executable, "-c", check, lab_.hsm.module_path, TOKEN], input=PIN, env=lab_.env,
                         capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "False", "True"]


def test_keygen_refuses_a_duplicate_label_and_a_missing_pin(lab_):
    proc = fails(2, "keygen", "--token", TOKEN, "--label", "devkey", "--pin-file", lab_.pin_file, env=lab_.env)
    assert proc.stderr.strip() == f"error: token '{TOKEN}' already holds a private key labelled 'devkey'"
    proc = fails(3, "keygen", "--token", TOKEN, "--label", "other", env=lab_.env)
    assert "needs the token's user PIN" in proc.stderr


def test_tokens_lists_tokens_and_with_a_pin_the_keys(lab_):
    out = ok("tokens", env=lab_.env)
    assert f"token '{TOKEN}'" in out and "give a PIN" in out and "devkey" not in out
    out = ok("tokens", "--token", TOKEN, env=_with(lab_.env, LIGHTCLIENT_PIN=PIN))
    assert "key 'devkey'  EC" in out and lab_.uri.split(";id=")[0] in out
    proc = fails(3, "tokens", "--token", TOKEN, "--pin-file", lab_.bad_pin, env=lab_.env)
    assert proc.stderr.strip() == f"error: the PIN for token '{TOKEN}' was refused"
    proc = fails(3, "tokens", "--module-path", "/nonexistent/libpkcs11.so", env=lab_.env)
    assert "does not exist" in proc.stderr


# --------------------------------------------------------------------------------------------- csr


def _openssl(*args, input=None) -> str:
    return subprocess.run(["openssl", *map(str, args)], input=input, capture_output=True, text=True,
                          check=True).stdout


def test_csr_subject_cn_defaults_to_the_device_id(lab_):
    assert f"wrote a CSR for CN={DEVICE}" in lab_.csr_out
    text = _openssl("req", "-in", lab_.csr, "-noout", "-verify", "-subject")
    assert f"subject=CN = {DEVICE}" in text


def test_csr_to_stdout_with_san_subject_digest_and_pin_sources(lab_):
    env = _with(lab_.env, MY_PIN=PIN)
    pem = ok("csr", "--key", lab_.uri, "--cn", "dev-2", "--subject", "O=Contoso", "--san", "DNS:dev-2.local",
             "--digest", "sha384", "--pin-env", "MY_PIN", env=env)
    assert pem.startswith("-----BEGIN CERTIFICATE REQUEST-----")
    text = _openssl("req", "-noout", "-verify", "-text", input=pem)
    assert "CN = dev-2, O = Contoso" in text and "DNS:dev-2.local" in text and "ecdsa-with-SHA384" in text
    # --pin works, with a warning; the PIN is never echoed.
    proc = cli("csr", "--key", lab_.uri, "--device-id", DEVICE, "--pin", PIN, env=lab_.env)
    assert proc.returncode == 0 and "warning: --pin puts the PIN in the process list" in proc.stderr
    assert PIN not in proc.stderr


def test_csr_errors_are_one_line_with_distinct_exit_codes(lab_):
    proc = fails(2, "csr", "--key", lab_.uri, "--pin-file", lab_.pin_file, env=lab_.env)
    assert proc.stderr == "error: the CSR needs a subject CN: pass --device-id (or set DEVICE_ID) or --cn\n"
    proc = fails(3, "csr", "--key", lab_.uri, "--device-id", DEVICE, "--pin-file", lab_.bad_pin, env=lab_.env)
    assert proc.stderr.startswith("error: the PIN (or pass phrase) for") and proc.stderr.count("\n") == 1
    proc = fails(2, "csr", "--key", "nope:xyz", "--device-id", DEVICE, env=lab_.env)
    assert "unknown key reference scheme 'nope'" in proc.stderr
    proc = cli("--debug", "csr", "--key", lab_.uri, "--device-id", DEVICE, "--pin-file", lab_.bad_pin, env=lab_.env)
    assert proc.returncode == 3 and "Traceback" in proc.stderr and "OpenSSL said" in proc.stderr


# --------------------------------------------------------------------------------------------- doctor


def _doctor(lab_, *extra, pin_file=None, cert=None, device=DEVICE, env=None):
    return cli("doctor", "--device-id", device, "--cert", cert or lab_.cert, "--ca", lab_.ca.cert,
               *_key_args(lab_, pin_file), *extra, env=env or lab_.env)


def _row(out: str, name: str) -> str:
    return next(line for line in out.splitlines() if name in line)


def test_doctor_healthy_with_a_live_handshake(lab_, hub):
    proc = _doctor(lab_, "--connect", f"localhost:{hub.port}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line[:1] in "✓✗–!"]
    assert len(rows) == 15 and all(r.startswith("✓") for r in rows), proc.stdout
    assert "✓ TLS handshake with localhost:" in proc.stdout and proc.stdout.endswith("all checks passed\n")
    # --connect goes on to MQTT: CONNECT as the device and SUBSCRIBE to its topics.
    assert re.search(rf"^✓ MQTT CONNECT accepted +as '{DEVICE}', user name localhost/{DEVICE}/…$", proc.stdout, re.M)
    assert re.search(r"^✓ SUBSCRIBE to the device's topics +4 filters granted", proc.stdout, re.M)


@pytest.mark.parametrize("case", ["wrong-pin", "no-pin", "missing-module", "not-a-module", "wrong-token",
                                  "wrong-key-label"])
def test_doctor_token_problems(lab_, case):
    uri = lab_.uri
    env = lab_.env
    if case == "wrong-pin":
        proc = _doctor(lab_, pin_file=lab_.bad_pin)
        row, text = "login with the PIN works", "was refused"
    elif case == "no-pin":
        proc = cli("doctor", "--device-id", DEVICE, "--cert", lab_.cert, "--key", uri, env=env)
        row, text = "login with the PIN works", "no PIN given"
    else:
        if case == "missing-module":
            uri = uri.split("?")[0] + "?module-path=/nonexistent/module.so"
            row, text = "PKCS#11 module loads", "does not exist"
        elif case == "not-a-module":
            uri = uri.split("?")[0] + "?module-path=" + _libz()
            row, text = "PKCS#11 module loads", "C_GetFunctionList"
        elif case == "wrong-token":
            uri = uri.replace(f"token={TOKEN}", "token=nope")
            row, text = "token present", f"no token 'nope' (tokens present: '{TOKEN}')"
        else:
            uri = re.sub(r"object=devkey;id=[^;]*", "object=other", uri)
            row, text = "key found on the token", "no private key matches object='other'"
        proc = cli("doctor", "--device-id", DEVICE, "--cert", lab_.cert, "--key", uri, "--pin-file",
                   lab_.pin_file, env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    line = _row(proc.stdout, row)
    assert line.startswith("✗") and text in line, proc.stdout
    assert "fix:" in proc.stdout.split(line, 1)[1].splitlines()[1]
    assert _row(proc.stdout, "key loads through OpenSSL").startswith("–")
    assert proc.stdout.rstrip().endswith("found") and PIN not in proc.stdout + proc.stderr


def _libz() -> str:
    for path in ("/usr/lib/x86_64-linux-gnu/libz.so.1", "/lib/x86_64-linux-gnu/libz.so.1",
                 "/usr/lib/aarch64-linux-gnu/libz.so.1", "/lib/aarch64-linux-gnu/libz.so.1"):
        if os.path.exists(path):
            return path
    import ctypes.util

    return ctypes.util.find_library("c") or "/bin/sh"


def _expired_cert(lab_) -> Path:
    """A certificate for the token key that expired in 2020: `openssl ca` with explicit dates."""
    d = lab_.root / "expired"
    d.mkdir(exist_ok=True)
    (d / "index.txt").write_text("")
    (d / "serial").write_text("1000\n")
    (d / "ca.cnf").write_text(
        "[ca]\ndefault_ca = CA_default\n[CA_default]\n"
        f"database = {d}/index.txt\nnew_certs_dir = {d}\nserial = {d}/serial\n"
        "default_md = sha256\npolicy = any\nunique_subject = no\n[any]\ncommonName = supplied\n")
    out = d / "expired.pem"
    subprocess.run(["openssl", "ca", "-batch", "-config", str(d / "ca.cnf"), "-cert", str(lab_.ca.cert),
                    "-keyfile", str(lab_.ca.key), "-in", str(lab_.csr), "-out", str(out), "-notext",
                    "-startdate", "20200101000000Z", "-enddate", "20200201000000Z"],
                   capture_output=True, check=True)
    return out


def test_doctor_certificate_problems(lab_, tmp_path):
    # Expired.
    proc = _doctor(lab_, cert=_expired_cert(lab_))
    assert proc.returncode == 1
    line = _row(proc.stdout, "certificate within its validity period")
    assert line.startswith("✗") and "expired on 2020-02-01 00:00 UTC" in line
    assert _row(proc.stdout, "certificate matches the key").startswith("✓")
    # CN is not the device id.
    proc = _doctor(lab_, device="someone-else")
    assert proc.returncode == 1
    line = _row(proc.stdout, "certificate CN equals the device id")
    assert line.startswith("✗") and f"CN is '{DEVICE}' but the device id is 'someone-else'" in line
    assert proc.stdout.rstrip().endswith("1 problem found")
    # A certificate with the right CN for another key.
    other_cert, _ = lab_.ca.issue_file_key(DEVICE, tmp_path)
    proc = _doctor(lab_, cert=other_cert)
    assert proc.returncode == 1
    line = _row(proc.stdout, "certificate matches the key")
    assert line.startswith("✗") and "public key differs" in line
    assert _row(proc.stdout, "certificate CN equals the device id").startswith("✓")
    # No certificate file.
    proc = _doctor(lab_, cert=tmp_path / "missing.pem")
    assert proc.returncode == 1 and _row(proc.stdout, "certificate readable").startswith("✗")
    assert "No such file or directory" in proc.stdout


# --------------------------------------------------------------------------------------------- provision


@pytest.fixture
def dps_emulator(test_ca):
    emu = DpsEmulator(ca=certs.CertificateAuthority(test_ca.cert, test_ca.key), server_cert=test_ca.server_cert,
                      server_key=test_ca.server_key, id_scope=SCOPE, retry_after=1)
    with emu:
        yield emu


def _provision_args(lab_, dps_emulator):
    return ["provision", "--id-scope", SCOPE, "--endpoint", f"localhost:{dps_emulator.port}", "--cert", lab_.cert,
            "--ca", lab_.ca.cert, *_key_args(lab_)]


def test_provision_prints_the_assignment(lab_, dps_emulator):
    dps_emulator.add_individual(DEVICE, lab_.cert.read_bytes(), assigned_hub="hub-1.localhost",
                                payload={"tier": "gold"}, polls=0)
    out = ok(*_provision_args(lab_, dps_emulator), "--device-id", DEVICE, "--payload", '{"hello": 1}', env=lab_.env)
    assert f"assigned hub hub-1.localhost, device id {DEVICE}\n" in out
    assert 'payload {"tier": "gold"}' in out and "substatus initialAssignment" in out
    assert [(m, status) for m, _, status in dps_emulator.requests] == [("PUT", 202), ("GET", 200)]


def test_provision_with_csr_writes_the_issued_chain(lab_, dps_emulator, tmp_path):
    dps_emulator.add_individual(DEVICE, lab_.cert.read_bytes(), polls=0)
    issued = tmp_path / "issued.pem"
    env = _with(lab_.env, PROVISIONING_REGISTRATION_ID=DEVICE)
    out = ok(*_provision_args(lab_, dps_emulator), "--csr", lab_.csr, "--cert-out", issued, env=env)
    assert f"issued certificate chain (2 certificates) written to {issued}" in out
    text = _openssl("x509", "-in", issued, "-noout", "-subject", "-issuer")
    assert f"CN = {DEVICE}" in text and "lightclient lab CA" in text
    # The issued certificate belongs to the token key: doctor agrees.
    assert _doctor(lab_, cert=issued).returncode == 0
    # --new-csr signs a fresh CSR with the key on the way; --json output.
    out = ok(*_provision_args(lab_, dps_emulator), "--device-id", DEVICE, "--new-csr", "--cert-out",
             tmp_path / "again.pem", "--json", env=lab_.env)
    assert json.loads(out)["issuedCertificate"] == str(tmp_path / "again.pem")


def test_provision_errors(lab_, dps_emulator):
    proc = fails(4, *_provision_args(lab_, dps_emulator), "--device-id", DEVICE, env=lab_.env)
    assert proc.stderr.startswith("error: ") and "no enrollment matches" in proc.stderr
    proc = fails(2, *_provision_args(lab_, dps_emulator), "--device-id", DEVICE, "--new-csr", env=lab_.env)
    assert proc.stderr == "error: certificate issuance needs --cert-out FILE for the issued chain\n"
    proc = fails(2, "provision", "--device-id", DEVICE, env=lab_.env)
    assert "the DPS ID scope is not set: pass --id-scope or set PROVISIONING_IDSCOPE or LIGHTCLIENT_ID_SCOPE" in proc.stderr


# --------------------------------------------------------------------------------------------- trace


DRY_RUN_VECTORS = [
    (["--hub", "hub.azure-devices.net", "--device-id", "d1"], "",
     "client id     d1\n"
     "username      hub.azure-devices.net/d1/?api-version=2021-04-12&DeviceClientType=lightclient%2F0.1.0\n"
     "password      (none: the X.509 client certificate authenticates)\n"
     "server        hub.azure-devices.net:8883 (TLS 1.2+, MQTT 3.1.1, clean session 0)\n"
     "subscribe     devices/d1/messages/devicebound/# qos=1\n"
     "subscribe     $iothub/methods/POST/# qos=0\n"
     "subscribe     $iothub/twin/res/# qos=0\n"
     "subscribe     $iothub/twin/PATCH/properties/desired/# qos=1\n"
     "publish       devices/d1/messages/events/  telemetry\n"
     "publish       $iothub/twin/GET/?$rid={rid}  twin get\n"
     "publish       $iothub/twin/PATCH/properties/reported/?$rid={rid}  twin report\n"
     "publish       $iothub/methods/res/{status}/?$rid={rid}  method response\n"),
    (["--device-id", "d1", "--module-id", "m1", "--model-id", "dtmi:com:example:Thermostat;1", "--port", "443",
      "--prop", "a=b c", "--content-type", "application/json"],
     "IOT_HUB_HOSTNAME=h.example",
     "client id     d1/m1\n"
     "username      h.example/d1/m1/?api-version=2021-04-12&DeviceClientType=lightclient%2F0.1.0"
     "&model-id=dtmi%3Acom%3Aexample%3AThermostat%3B1\n"
     "password      (none: the X.509 client certificate authenticates)\n"
     "server        h.example:443 (TLS 1.2+, MQTT 3.1.1, clean session 0)\n"
     "subscribe     devices/d1/modules/m1/# qos=1\n"
     "subscribe     $iothub/methods/POST/# qos=0\n"
     "subscribe     $iothub/twin/res/# qos=0\n"
     "subscribe     $iothub/twin/PATCH/properties/desired/# qos=1\n"
     "publish       devices/d1/modules/m1/messages/events/%24.ct=application%2Fjson&a=b%20c  telemetry\n"
     "publish       $iothub/twin/GET/?$rid={rid}  twin get\n"
     "publish       $iothub/twin/PATCH/properties/reported/?$rid={rid}  twin report\n"
     "publish       $iothub/methods/res/{status}/?$rid={rid}  method response\n"),
]


@pytest.mark.parametrize("args,env_text,expected", DRY_RUN_VECTORS)
def test_trace_dry_run_vectors(lab_, args, env_text, expected):
    extra = dict(item.split("=", 1) for item in env_text.split()) if env_text else {}
    assert ok("trace", "--dry-run", *args, env=_with(lab_.env, **extra)) == expected


class _Reader:
    """Lines of a running CLI process, read on a thread."""

    def __init__(self, proc):
        self.proc, self.lines, self._q = proc, [], queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.proc.stdout:
            self._q.put(line.rstrip("\n"))
        self._q.put(None)

    def wait_for(self, text, timeout=10.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._q.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            self.lines.append(line)
            if text in line:
                return line
        raise AssertionError(f"{text!r} not seen; output so far:\n" + "\n".join(self.lines)
                             + "\nstderr:\n" + (self.proc.stderr.read() if self.proc.poll() is not None else ""))

    def finish(self, timeout=10.0):
        try:
            self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        while True:
            try:
                line = self._q.get(timeout=2)
            except queue.Empty:
                break
            if line is None:
                break
            self.lines.append(line)
        return self.proc.returncode


def _spawn(*args, env) -> _Reader:
    proc = subprocess.Popen([sys.executable, "-m", "lightclient", *map(str, args)], env=env, cwd=ROOT,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return _Reader(proc)


def test_trace_live_decodes_packets_both_ways(conn, hub, tmp_path):
    keylog = tmp_path / "keys.log"
    r = _spawn("trace", "--duration", "30", "--send", "hello", "--prop", "k=v", "--report", '{"fw": "2"}',
               "--keylog", keylog, env=conn)
    try:
        r.wait_for("twin response status=204")
        hub.update_desired(DEVICE, {"interval": 5})
        r.wait_for("desired properties patch version=")
        result = hub.invoke_method(DEVICE, "reboot", {"delay": 0}, timeout=5)
        assert result.status == 200
        r.wait_for("method response status=200")
        r.wait_for("← PUBACK")
        r.proc.terminate()      # SIGTERM: a clean disconnect and exit 0
    finally:
        assert r.finish() == 0
    out = "\n".join(r.lines)
    assert re.search(rf"→ CONNECT +client_id={DEVICE} clean_session=0 keepalive=60  connect as {DEVICE}, "
                     rf"username localhost/{DEVICE}/\?api-version=2021-04-12&DeviceClientType=lightclient%2F", out)
    assert "← CONNACK     session_present=" in out and "rc=0  connection accepted" in out
    assert f"→ SUBSCRIBE   m1 devices/{DEVICE}/messages/devicebound/# q1, $iothub/methods/POST/# q0" in out
    assert "← SUBACK      m1 granted q1, q0, q0, q1" in out
    assert re.search(r"← PUBLISH     q0 m0 \$iothub/twin/res/200/\?\$rid=(\S+) \(\d+ bytes\)  "
                     r"twin response status=200 rid=\1 \(twin document\)", out)
    assert re.search(rf"→ PUBLISH     q1 m\d+ devices/{DEVICE}/messages/events/k=v \(5 bytes\)  telemetry k=v", out)
    assert re.search(r"← PUBLISH     q0 m0 \$iothub/twin/res/204/\?\$rid=(\S+)&\$version=(\d+) \(0 bytes\)  "
                     r"twin response status=204 rid=\1 version=\2 \(reported properties updated\)", out)
    assert re.search(r"← PUBLISH     q\d m\d+ \$iothub/twin/PATCH/properties/desired/\?\$version=\d+ .*"
                     r"desired properties patch version=\d+", out)
    assert re.search(r"← PUBLISH     q\d m\d+ \$iothub/methods/POST/reboot/\?\$rid=(\S+) .*method call name=reboot "
                     r"rid=\1", out)
    assert re.search(r"← PUBACK      m\d+  the hub accepted message", out)
    assert re.search(r"→ PUBLISH     q1 m\d+ \$iothub/methods/res/200/\?\$rid=\S+ \(2 bytes\)  method response "
                     r"status=200 rid=", out)
    assert "payload {\"delay\": 0}" in out and "→ DISCONNECT" in out
    assert "CLIENT_HANDSHAKE_TRAFFIC_SECRET" in keylog.read_text() or "CLIENT_RANDOM" in keylog.read_text()


# --------------------------------------------------------------------------------------------- send, listen, twin


def test_send_arguments_count_props_and_summary(conn, hub):
    before = len(hub.events(DEVICE))
    out = ok("send", '{"n": {n}}', "second", "--count", "2", "--prop", "site=lab", "--json", env=conn)
    assert re.fullmatch(r"sent 4, acknowledged 4 in \d+\.\d\d s \(\d+\.\d msg/s\)\n", out)
    events = hub.wait_for_events(before + 4, DEVICE)[before:]
    assert [e.body for e in events] == [b'{"n": 1}', b"second", b'{"n": 3}', b"second"]
    assert events[0].properties == {"site": "lab"}
    assert events[0].system_properties["$.ct"] == "application/json"
    assert events[0].system_properties["$.ce"] == "utf-8"


def test_send_one_message_per_stdin_line_with_progress(conn, hub):
    before = len(hub.events(DEVICE))
    proc = cli("send", "--interval", "0.6", env=conn, input="one\n\ntwo\nthree\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("sent 3, acknowledged 3")
    assert re.search(r"^progress: sent \d/3, acknowledged \d, \d+\.\d msg/s, ETA \d+ s$", proc.stderr, re.M)
    assert [e.body for e in hub.wait_for_events(before + 3, DEVICE)[before:]] == [b"one", b"two", b"three"]


def test_send_connection_errors_have_their_exit_codes(conn, hub, lab_):
    proc = fails(4, "send", "x", "--port", str(lab.free_port()), env=conn)
    assert proc.stderr.startswith("error: cannot connect to localhost:")
    proc = fails(3, "send", "x", "--device-id", "not-registered", env=conn)
    assert proc.stderr.startswith("error: the hub ")
    proc = fails(2, "send", "x", env=_with(conn, IOT_HUB_HOSTNAME=""), timeout=10)
    assert "the IoT Hub host name is not set: pass --hub or set IOT_HUB_HOSTNAME or LIGHTCLIENT_HUB" in proc.stderr


def test_listen_prints_c2d_desired_and_answers_methods(conn, hub):
    r = _spawn("listen", "--count", "3", "--method-status", "201", "--method-payload", '{"ok": true}', "--duration",
               "15", env=conn)
    try:
        r.wait_for(f"listening as device {DEVICE} on localhost:{hub.port}")
        hub.send_c2d(DEVICE, b"open the door", properties={"prio": "high"}, message_id="m-1")
        r.wait_for("c2d message")
        version = hub.update_desired(DEVICE, {"color": "blue"})
        r.wait_for("desired properties")
        result = hub.invoke_method(DEVICE, "unlock", {"door": 2}, timeout=5)
        assert (result.status, result.payload) == (201, {"ok": True})
    finally:
        assert r.finish() == 0
    out = "\n".join(r.lines)
    assert "c2d message $.mid=m-1" in out and "prio=high" in out and out.count(": open the door") == 1
    assert re.search(rf'desired properties version={version}: {{.*"color": "blue".*}}', out)
    assert 'method call unlock rid=' in out and '-> answered 201 {"ok": true}' in out


def test_twin_report_then_get(conn, hub):
    out = ok("twin", "report", '{"firmware": "1.2", "battery": 88}', env=conn)
    assert re.fullmatch(r"reported properties updated \(status 204, version \d+\)\n", out)
    twin = json.loads(ok("twin", "get", env=conn))
    assert twin["reported"]["firmware"] == "1.2" and twin["reported"]["battery"] == 88
    assert "$version" in twin["desired"]
    proc = fails(2, "twin", "report", "[1, 2]", env=conn)
    assert "a reported patch is a JSON object" in proc.stderr
    proc = fails(2, "twin", "report", "{nope", env=conn)
    assert "is not valid JSON" in proc.stderr


# --------------------------------------------------------------------------------------------- emulator, misc


def test_emulator_subcommand_forwards_its_arguments(lab_, tmp_path):
    out = ok("emulator", "--help", env=lab_.env)
    assert out.startswith("usage: lightclient emulator ") and "--state-dir" in out
    cert = tmp_path / "issued.pem"
    ok("emulator", "--state-dir", tmp_path / "state", "--ca-cert", lab_.ca.cert, "--ca-key", lab_.ca.key,
       "--sign-csr", lab_.csr, "--out", cert, env=lab_.env)
    assert f"CN = {DEVICE}" in _openssl("x509", "-in", cert, "-noout", "-subject")


def test_usage_errors_and_help(lab_):
    proc = cli(env=lab_.env)
    assert proc.returncode == 2 and "usage: lightclient" in proc.stderr
    proc = cli("frobnicate", env=lab_.env)
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
    out = ok("--version", env=lab_.env)
    assert out.startswith("lightclient ")


def test_init_token_then_keygen_with_pins_from_files(tmp_path):
    """A new user's first commands on an empty SoftHSM: init-token, tokens, keygen; no PIN on argv."""
    hsm = lab.SoftHSM(tmp_path / "hsm")
    env = _env(hsm.env)
    pin_file, so_file = tmp_path / "pin", tmp_path / "so-pin"
    pin_file.write_text(PIN + "\n")
    so_file.write_text(SO_PIN + "\n")
    out = ok("init-token", "--module-path", hsm.module_path, "--label", "first", "--so-pin-file", so_file,
             "--pin-file", pin_file, env=env)
    assert "initialised token 'first'" in out and "next: lightclient keygen" in out
    assert "token 'first'" in ok("tokens", "--module-path", hsm.module_path, env=env)
    out = ok("keygen", "--module-path", hsm.module_path, "--token", "first", "--label", "k1", "--pin-file", pin_file,
             env=env)
    assert "pkcs11:token=first;object=k1" in out
    # Without an SO PIN it says how to give one (and never prompts without a terminal).
    proc = fails(3, "init-token", "--module-path", hsm.module_path, "--label", "second", "--pin-file", pin_file,
                 env=env)
    assert "needs an SO PIN" in proc.stderr


def test_pin_from_the_environment_is_not_inherited_by_child_processes(lab_):
    """doctor and the token diagnosis start child processes; the PIN variable must not reach them."""
    import textwrap

    probe = lab_.root / "sitecustomize.py"
    # Any Python child started by the CLI records whether it saw the variable.
    probe.write_text(textwrap.dedent(f"""
        import os
        open({str(lab_.root / "started")!r}, "a").write(str(os.getpid()) + "\\n")
        if os.environ.get("LIGHTCLIENT_PIN"):
            open({str(lab_.root / "leaked")!r}, "a").write(str(os.getpid()) + "\\n")
    """))
    env = _with(lab_.env, LIGHTCLIENT_PIN=PIN, PYTHONPATH=f"{lab_.root}:{ROOT}")
    cli("doctor", "--device-id", DEVICE, "--cert", lab_.cert, "--key", lab_.uri, env=env)
    cli("csr", "--key", lab_.uri.replace("object=", "object=no-such-"), "--device-id", DEVICE, env=env)
    started = (lab_.root / "started").read_text().split()
    leaked = (lab_.root / "leaked").read_text().split()
    # The two CLI processes see the variable (they read it); the child processes they started
    # (the doctor's token probe, the token-label diagnosis) must not.
    assert len(started) >= 4, started
    assert len(leaked) == 2, (started, leaked)
