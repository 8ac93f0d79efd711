"""The CLI's pure parts: argument parsing, settings and PIN sources, exit codes, the trace decoder, doctor output."""

import os
import socket

import pytest

from lightclient import cli
from lightclient.commands import common, doctor, trace
from lightclient.exceptions import (CertificateError, ConfigError, ConnectRefusedError, ServerCertificateError,
                                    TlsVersionError, KeyMismatchError, LightClientError,
                                    ModuleLoadError, OpenSSLMismatchError, OperationTimeout, PinError,
                                    ProtocolError, ProvisioningError, ServiceError)
from lightclient.identity import Identity

ID = Identity("hub.azure-devices.net", "d1")
MOD = Identity("hub.azure-devices.net", "d1", "m1")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for names in common.ENV.values():
        for name in names:
            monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv(common.PIN_ENV_DEFAULT, raising=False)


def parse(*argv):
    return cli.build_parser().parse_args(list(argv))


# ------------------------------------------------------------------------------------ parsing and settings


@pytest.mark.parametrize("argv", [
    ["tokens"], ["keygen", "--token", "t", "--label", "k"], ["csr", "--cn", "x"], ["doctor"],
    ["provision", "--id-scope", "s"], ["trace", "--dry-run"], ["send", "a", "b"], ["listen", "--count", "1"],
    ["twin", "get"], ["twin", "report", "{}"],
])
def test_every_subcommand_parses(argv):
    assert callable(parse(*argv).func)


def test_keygen_key_types_and_default():
    assert parse("keygen", "--token", "t", "--label", "k").key_type == "ec-p256"
    assert parse("keygen", "--token", "t", "--label", "k", "--type", "rsa-3072").key_type == "rsa-3072"
    with pytest.raises(SystemExit):
        parse("keygen", "--token", "t", "--label", "k", "--type", "dsa-1024")


def test_settings_come_from_flags_then_the_sample_variable_names(monkeypatch):
    args = parse("send", "x")
    assert common.setting(args, "hub") is None
    monkeypatch.setenv("LIGHTCLIENT_HUB", "second.example")
    assert common.setting(args, "hub") == "second.example"
    monkeypatch.setenv("IOT_HUB_HOSTNAME", "first.example")
    assert common.setting(args, "hub") == "first.example"
    assert common.setting(parse("send", "x", "--hub", "flag.example"), "hub") == "flag.example"
    monkeypatch.setenv("KEY_IDENTIFIER", "pkcs11:token=a;object=b")
    monkeypatch.setenv("PATH_TO_CERTIFICATE_FILE", "/c.pem")
    monkeypatch.setenv("DEVICE_ID", "dev")
    assert (common.setting(args, "key"), common.setting(args, "cert"), common.setting(args, "device_id")) == \
        ("pkcs11:token=a;object=b", "/c.pem", "dev")
    with pytest.raises(ConfigError, match="pass --module-path or set LIGHTCLIENT_MODULE_PATH or PKCS11_MODULE_PATH"):
        common.setting(args, "module_path", required=True, what="the module")


def test_pin_sources_in_order(monkeypatch, tmp_path, capsys):
    pin_file = tmp_path / "pin"
    pin_file.write_text("from-file\n")
    monkeypatch.setenv("LIGHTCLIENT_PIN", "from-default-env")
    monkeypatch.setenv("OTHER", "from-other-env")
    assert common.resolve_pin(parse("csr", "--pin-file", str(pin_file))) == "from-file"
    assert common.resolve_pin(parse("csr", "--pin-env", "OTHER")) == "from-other-env"
    assert "OTHER" not in os.environ  # read once, then gone: child processes never inherit it
    assert common.resolve_pin(parse("csr")) == "from-default-env"
    assert "LIGHTCLIENT_PIN" not in os.environ
    assert common.resolve_pin(parse("csr", "--pin", "from-argv")) == "from-argv"
    assert "warning: --pin puts the PIN in the process list" in capsys.readouterr().err
    with pytest.raises(PinError, match="--pin-env UNSET"):
        common.resolve_pin(parse("csr", "--pin-env", "UNSET"))
    assert common.resolve_pin(parse("csr"), prompt=False) is None
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(PinError, match="is empty"):
        common.resolve_pin(parse("csr", "--pin-file", str(tmp_path / "empty")))


def test_pin_prompt_only_on_a_terminal(monkeypatch):
    import getpass
    import sys

    asked = []
    monkeypatch.setattr(getpass, "getpass", lambda prompt: asked.append(prompt) or "typed")

    class Tty:
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdin", Tty())
    assert common.resolve_pin(parse("csr"), "token 'lab'") == "typed" and asked == ["PIN for token 'lab': "]


def test_props():
    assert common.parse_props(["a=b", "c=", "d", "e=f=g"]) == [("a", "b"), ("c", ""), ("d", None), ("e", "f=g")]
    with pytest.raises(ConfigError):
        common.parse_props(["=x"])


@pytest.mark.parametrize("exc,code", [
    (ConfigError("x"), 2), (LightClientError("x"), 2), (PinError("x"), 3), (ModuleLoadError("x"), 3),
    (CertificateError("x"), 3), (KeyMismatchError("x"), 3), (OpenSSLMismatchError("x"), 3),
    (common.AuthRefused("x"), 3), (ServiceError("x", 500), 4), (ProvisioningError("x", 404), 4),
    # DPS refusing the device's credentials is a credentials refusal, as the README's table says (issue 14).
    (ProvisioningError("x", 401), 3), (ProvisioningError("x", 403), 3), (ConnectRefusedError("x", 5), 3),
    (ConnectRefusedError("x", 3), 4),
    (OperationTimeout("x"), 4), (ProtocolError("x"), 4), (common.ConnectionFailed("x"), 4),
    (ServerCertificateError("x", "untrusted"), 4), (TlsVersionError("x"), 4),
    # Plain OSErrors: a file named in the arguments is a usage problem, the network is not.
    (FileNotFoundError(2, "No such file or directory"), 2), (PermissionError(13, "Permission denied"), 2),
    (ConnectionRefusedError(111, "Connection refused"), 4), (socket.gaierror(-2, "Name or service not known"), 4),
])
def test_exit_codes(exc, code):
    assert common.exit_code_for(exc) == code


def test_emulator_arguments_are_split_off_before_parsing():
    assert cli._split_emulator(["emulator", "--port", "0", "-h"]) == ([], ["--port", "0", "-h"])
    assert cli._split_emulator(["--debug", "emulator", "--device", "d1"]) == (["--debug"], ["--device", "d1"])
    assert cli._split_emulator(["send", "emulator"]) is None


# ------------------------------------------------------------------------------------ trace decoder

LOG_VECTORS = [
    ("Sending CONNECT (u1, p0, wr0, wq0, wf0, c0, k60) client_id=b'd1'",
     "→ CONNECT     client_id=d1 clean_session=0 keepalive=60  connect as d1, username "
     "hub.azure-devices.net/d1/?api-version=2021-04-12&DeviceClientType=lightclient%2F0.1.0, "
     "no password: X.509 certificate"),
    ("Received CONNACK (0, 0)", "← CONNACK     session_present=0 rc=0  connection accepted"),
    ("Received CONNACK (0, 5)", "← CONNACK     session_present=0 rc=5  refused: not authorized"),
    ("Sending SUBSCRIBE (d0, m1) [(b'devices/d1/messages/devicebound/#', 1), (b'$iothub/methods/POST/#', 0)]",
     "→ SUBSCRIBE   m1 devices/d1/messages/devicebound/# q1, $iothub/methods/POST/# q0"),
    ("Received SUBACK", None),
    ("Sending PUBLISH (d0, q1, r0, m2), 'b'$iothub/twin/PATCH/properties/reported/?$rid=7'', ... (12 bytes)",
     "→ PUBLISH     q1 m2 $iothub/twin/PATCH/properties/reported/?$rid=7 (12 bytes)  twin report rid=7"),
    ("Received PUBLISH (d0, q0, r0, m0), '$iothub/twin/res/204/?$rid=7&$version=12', ...  (0 bytes)",
     "← PUBLISH     q0 m0 $iothub/twin/res/204/?$rid=7&$version=12 (0 bytes)  "
     "twin response status=204 rid=7 version=12 (reported properties updated)"),
    ("Sending PUBLISH (d1, q1, r0, m9), 'devices/d1/messages/events/%24.ct=application%2Fjson&a=b%20c', ... (2 bytes)",
     "→ PUBLISH     q1 m9 dup devices/d1/messages/events/%24.ct=application%2Fjson&a=b%20c (2 bytes)  "
     "telemetry $.ct=application/json a=b c"),
    ("Sending PUBLISH (d0, q0, r0, m3), '$iothub/twin/GET/?$rid=x-1' (NULL payload)",
     "→ PUBLISH     q0 m3 $iothub/twin/GET/?$rid=x-1 (0 bytes)  twin get rid=x-1"),
    ("Received PUBLISH (d0, q0, r0, m0), '$iothub/methods/POST/reboot/?$rid=3', ...  (2 bytes)",
     "← PUBLISH     q0 m0 $iothub/methods/POST/reboot/?$rid=3 (2 bytes)  method call name=reboot rid=3"),
    ("Received PUBLISH (d0, q1, r0, m4), '$iothub/twin/PATCH/properties/desired/?$version=8', ...  (9 bytes)",
     "← PUBLISH     q1 m4 $iothub/twin/PATCH/properties/desired/?$version=8 (9 bytes)  "
     "desired properties patch version=8"),
    ("Received PUBLISH (d0, q1, r0, m5), 'devices/d1/messages/devicebound/%24.mid=m1&prio=high', ...  (4 bytes)",
     "← PUBLISH     q1 m5 devices/d1/messages/devicebound/%24.mid=m1&prio=high (4 bytes)  "
     "cloud-to-device message $.mid=m1 prio=high"),
    ("Received PUBLISH (d0, q0, r0, m0), '$iothub/twin/res/abc/?$rid=1', ...  (0 bytes)",
     "← PUBLISH     q0 m0 $iothub/twin/res/abc/?$rid=1 (0 bytes)  malformed IoT Hub topic: status 'abc' in "
     "'$iothub/twin/res/abc/?$rid=1' is not a decimal integer"),
    ("Sending PUBLISH (d0, q0, r0, m6), 'some/other', ... (1 bytes)",
     "→ PUBLISH     q0 m6 some/other (1 bytes)  not an IoT Hub topic (the hub would disconnect)"),
    ("Received PUBACK (Mid: 2)", "← PUBACK      m2  the hub accepted message m2"),
    ("Sending PUBACK (Mid: 4)", "→ PUBACK      m4  acknowledged message m4"),
    ("Sending PINGREQ", "→ PINGREQ     keep-alive"),
    ("Received PINGRESP", "← PINGRESP    keep-alive"),
    ("Sending DISCONNECT", "→ DISCONNECT"),
    ("failed to receive on socket: [Errno 104]", None),
]


@pytest.mark.parametrize("line,expected", LOG_VECTORS)
def test_decode_log_line(line, expected):
    assert trace.decode_log_line(line, ID) == expected


def test_module_topics_are_decoded_for_the_module():
    assert trace.describe_sent("devices/d1/modules/m1/messages/events/%24.on=out1", MOD) == "telemetry $.on=out1"
    assert trace.describe_received("devices/d1/modules/m1/inputs/in1/%24.mid=x", MOD) == "module input in1 $.mid=x"
    assert trace.describe_received("devices/d2/messages/devicebound/", ID) == "not an IoT Hub topic for this device"
    assert trace.describe_sent("$iothub/methods/res/404/?$rid=9", ID) == "method response status=404 rid=9"


def test_dry_run_lines_match_the_topics_layer():
    lines = trace.dry_run_lines(ID, "hub.azure-devices.net", 8883, [("a", "b")], "application/json", "utf-8")
    assert lines[0] == "client id     d1"
    assert "publish       devices/d1/messages/events/%24.ct=application%2Fjson&%24.ce=utf-8&a=b  telemetry" in lines
    assert "publish       $iothub/methods/res/{status}/?$rid={rid}  method response" in lines


# ------------------------------------------------------------------------------------ doctor output


def test_doctor_render_shows_fixes_only_for_problems():
    text = doctor.render([doctor.Check("token present", doctor.OK, "'lab'"),
                          doctor.Check("login with the PIN works", doctor.FAIL, "refused", "check the PIN"),
                          doctor.Check("key found on the token", doctor.SKIP, "not logged in", "never shown")])
    assert text.splitlines() == [
        "✓ token present             'lab'",
        "✗ login with the PIN works  refused",
        "                            fix: check the PIN",
        "– key found on the token    not logged in",
        "1 problem found",
    ]


def test_doctor_reads_pkcs11_uri_attributes():
    # doctor reads URIs through KeyRef, the one owner of key-reference knowledge
    from lightclient.keys import parse_key_ref

    ref = parse_key_ref("pkcs11:token=my%20lab;object=dev;id=%01%a2;type=private?module-path=/m.so&pin-source=/p")
    assert {n: ref.attribute(n) for n in ("token", "object", "type")} == {"token": "my lab", "object": "dev",
                                                                         "type": "private"}
    assert ref.attribute_bytes("id").hex() == "01a2" and ref.attribute("x") is None
    assert ref.module_path == "/m.so"


def test_doctor_validity_check_with_a_fixed_clock(tmp_path):
    import datetime as dt
    import subprocess

    key, cert = tmp_path / "k.pem", tmp_path / "c.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "10", "-subj", "/CN=d1"],
                   capture_output=True, check=True)
    now = dt.datetime.now(dt.timezone.utc)
    for when, status in ((now, doctor.OK), (now + dt.timedelta(days=5), doctor.WARN),
                         (now + dt.timedelta(days=11), doctor.FAIL), (now - dt.timedelta(days=1), doctor.FAIL)):
        checks = []
        doctor.check_certificate(checks, str(cert), "d1", None, now=when)
        assert [c.status for c in checks] == [doctor.OK, status, doctor.OK, doctor.SKIP], when
