"""Issue 18's hub behaviour, each driven by a real client (paho, raw TLS sockets, HTTP): encoding as the
hub reads it, modelId in the service twin, C2D property names kept as given, no tracebacks for
protocol mismatches."""
from __future__ import annotations

import socket
import ssl
import struct
import time

import requests

from lightclient.emulator.codec import Connect, encode

from .test_emulator import API, clients, device, emu, paho_device, workdir  # noqa: F401 (fixtures)


def test_node_style_encoding_and_raw_model_id_raise_no_diagnostic(emu, device, clients):
    identity, cert, key = device()
    model = "dtmi:com:example:Thermostat;1"
    client = paho_device(emu, clients, identity, cert, key,
                         username=f"localhost/{identity}/?api-version=2021-04-12&model-id={model}"
                                  f"&DeviceClientType=node%2F1.0%20(x64)")
    client.connect()
    client.publish(f"devices/{identity}/messages/events/%24.mid=m1&note=it's(1)*!", b"{}")
    (event,) = emu.wait_for_events(1, identity)
    assert event.properties == {"note": "it's(1)*!"}
    assert emu.diagnostics(identity) == []
    base = f"http://127.0.0.1:{emu.http_port}"
    twin = requests.get(f"{base}/twins/{identity}", timeout=10).json()
    assert twin["modelId"] == model


def test_model_id_is_empty_without_one(emu, device, clients):
    identity, cert, key = device()
    paho_device(emu, clients, identity, cert, key).connect()
    assert requests.get(f"http://127.0.0.1:{emu.http_port}/twins/{identity}", timeout=10).json()["modelId"] == ""


def test_c2d_property_names_keep_their_case(emu, device, clients):
    identity, cert, key = device()
    client = paho_device(emu, clients, identity, cert, key)
    client.connect()
    client.subscribe(f"devices/{identity}/messages/devicebound/#")
    reply = requests.post(f"http://127.0.0.1:{emu.http_port}/devices/{identity}/messages/deviceBound",
                          data=b"x", headers={"iothub-app-CamelCase": "Value", "IoTHub-MessageId": "n1"},
                          timeout=10)
    assert reply.status_code == 200
    assert client.wait_message("devices/").topic.endswith("&CamelCase=Value")


def test_non_http_client_on_the_dps_port_gets_a_diagnostic_not_a_traceback(tmp_path, capfd):
    from lightclient.emulator.service import Emulator

    with Emulator(tmp_path / "emu") as hub:
        dps = hub.start_dps(0)
        cert, key = hub.issue_certificate("probe", out_dir=tmp_path / "p")
        context = ssl.create_default_context(cafile=str(hub.ca_path))
        context.load_cert_chain(str(cert), str(key))
        # An MQTT client on the HTTPS port (the SDK's mistake when it dials the wrong port).
        with context.wrap_socket(socket.create_connection(("127.0.0.1", dps.port)), server_hostname="localhost") as t:
            t.sendall(encode(Connect("probe", username="0ne00000001/registrations/probe/api-version=2019-03-31"))
                      + b"\r\n")
            answer = t.recv(4096)
        assert b"400" in answer.split(b"\r\n")[0]
        assert "DPS over MQTT has its own port" in hub.wait_for_diagnostic("dps.not-http").message
        # The same client resetting the connection mid-request.
        t = context.wrap_socket(socket.create_connection(("127.0.0.1", dps.port)), server_hostname="localhost")
        t.sendall(encode(Connect("probe")))
        time.sleep(0.2)
        t.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        t.close()
        time.sleep(0.5)
    assert "Traceback" not in capfd.readouterr().err


# --------------------------------------------------------------------------- authorization at CONNECT


def _foreign_ca_cert(directory, cn):
    """A certificate for ``cn`` from a CA the emulator has never seen."""
    from .test_emulator import openssl

    ca_key, ca_cert = directory / "foreign-ca.key", directory / "foreign-ca.pem"
    key, csr, cert = directory / f"{cn}.key", directory / f"{cn}.csr", directory / f"{cn}.pem"
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout",
            str(ca_key), "-out", str(ca_cert), "-days", "2", "-subj", "/CN=Foreign CA")
    openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key),
            "-out", str(csr), "-subj", f"/CN={cn}")
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key), "-CAcreateserial",
            "-days", "2", "-out", str(cert))
    return cert, key


def test_untrusted_certificate_gets_connack_5_and_a_diagnostic(emu, clients, tmp_path):
    assert emu.tls_refusal_reason == ""           # the shim is built in this venv
    emu.register_device("foreign-1")
    cert, key = _foreign_ca_cert(tmp_path, "foreign-1")
    paho_device(emu, clients, "foreign-1", cert, key).connect(expect=135)  # paho: CONNACK 5
    diagnostic = emu.wait_for_diagnostic("connect.certificate-untrusted", "foreign-1")
    assert "CONNACK 5" in diagnostic.message
    assert "X.509 error 21: unable to verify the first certificate" in diagnostic.message


def test_self_signed_registered_by_thumbprint_alone_connects(emu, clients, tmp_path):
    """Only the thumbprint is known (nothing trusted for TLS): as on the hub, that is enough."""
    import hashlib

    from .test_emulator import self_signed_cert

    cert, key = self_signed_cert(tmp_path, "thumb-only")
    der = ssl.PEM_cert_to_DER_cert(cert.read_text())
    emu.register_device("thumb-only", thumbprints=[hashlib.sha256(der).hexdigest()])
    paho_device(emu, clients, "thumb-only", cert, key).connect()
    assert emu.diagnostics("thumb-only") == []


def test_without_the_shim_untrusted_certificates_are_refused_in_tls_with_the_reason(tmp_path, monkeypatch):
    import sys

    from lightclient.emulator.service import Emulator

    monkeypatch.setitem(sys.modules, "lightclient._shim", None)   # import fails, as when it is not built
    with Emulator(tmp_path / "emu") as hub:
        assert "native shim is not built" in hub.tls_refusal_reason
        hub.register_device("foreign-2")
        cert, key = _foreign_ca_cert(tmp_path, "foreign-2")
        context = ssl.create_default_context(cafile=str(hub.ca_path))
        context.load_cert_chain(str(cert), str(key))
        try:
            with context.wrap_socket(socket.create_connection(("127.0.0.1", hub.port)),
                                     server_hostname="localhost") as t:
                t.sendall(encode(Connect("foreign-2", username=f"localhost/foreign-2/?{API}")))
                assert t.recv(10) == b""
        except (ssl.SSLError, ConnectionError):
            pass
        diagnostic = hub.wait_for_diagnostic("tls.handshake")
        assert "refuses at CONNECT with CONNACK 5" in diagnostic.message
        assert "native shim is not built" in diagnostic.message


# --------------------------------------------------------------------------- C2D expiry and feedback


def _utc_in(seconds):
    import datetime

    moment = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=seconds)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def test_c2d_expiry_and_feedback_through_the_service_api(emu, device, clients):
    identity, cert, key = device()
    base = f"http://127.0.0.1:{emu.http_port}/devices/{identity}/messages/deviceBound"
    for message_id, expiry in (("short", _utc_in(1)), ("long", _utc_in(600))):
        reply = requests.post(base, data=message_id.encode(), timeout=10,
                              headers={"iothub-messageid": message_id, "iothub-expiry": expiry, "iothub-ack": "full"})
        assert reply.status_code == 200
    assert requests.post(base, data=b"x", headers={"iothub-expiry": "soon"}, timeout=10).status_code == 400
    time.sleep(1.5)                                   # "short" expires while the device is offline
    client = paho_device(emu, clients, identity, cert, key)
    client.connect()
    client.subscribe(f"devices/{identity}/messages/devicebound/#")
    assert client.wait_message("devices/").payload == b"long"     # the device completes it (PUBACK)
    deadline = time.monotonic() + 10
    while len(emu.c2d_feedback(identity)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    feedback = requests.get(f"http://127.0.0.1:{emu.http_port}/emulator/feedback",
                            params={"deviceId": identity}, timeout=10).json()
    assert sorted((r["originalMessageId"], r["statusCode"]) for r in feedback) == [("long", "Success"),
                                                                                   ("short", "Expired")]
    assert client.topics() == []                      # the expired message never reached the device


# --------------------------------------------------------------------------- routing


def test_module_output_is_routed_to_another_modules_input(emu, clients, workdir):
    from .test_emulator import ca_signed_cert

    emu.register_device("edge-1", "filter")
    emu.register_device("edge-1", "logger")
    emu.add_route('FROM /messages/modules/filter/outputs/alerts INTO BrokeredEndpoint("/modules/logger/inputs/in1")')
    sender = paho_device(emu, clients, "edge-1/filter", *ca_signed_cert(emu, workdir, "edge-1/filter"))
    receiver = paho_device(emu, clients, "edge-1/logger", *ca_signed_cert(emu, workdir, "edge-1/logger"))
    sender.connect()
    receiver.connect()
    assert receiver.subscribe("devices/edge-1/modules/logger/inputs/#") == [1]
    sender.publish("devices/edge-1/modules/filter/messages/events/%24.on=alerts&%24.mid=a1&level=high", b"hot")
    sender.publish("devices/edge-1/modules/filter/messages/events/%24.on=other", b"not routed")
    message = receiver.wait_message("devices/edge-1/modules/logger/inputs/in1/")
    assert message.payload == b"hot"
    bag = message.topic.rsplit("/", 1)[1]
    assert bag == "%24.mid=a1&%24.cdid=edge-1&%24.cmid=filter&level=high"
    assert len(emu.wait_for_events(2, "edge-1", "filter")) == 2          # still upstream as well
    assert [t for t in receiver.topics()] == []                           # the other output is not routed
    emu.add_route('FROM /messages/modules/filter/outputs/* INTO BrokeredEndpoint("/modules/nobody/inputs/x")')
    sender.publish("devices/edge-1/modules/filter/messages/events/%24.on=alerts", b"again")
    assert "'edge-1/nobody'" in emu.wait_for_diagnostic("routing.undelivered").message


def test_route_syntax_errors_are_named():
    from lightclient.emulator.errors import EmulatorError
    from lightclient.emulator.routing import parse_route

    import pytest

    with pytest.raises(EmulatorError, match="WHERE conditions are not supported"):
        parse_route('FROM /messages/* WHERE a = 1 INTO BrokeredEndpoint("/modules/m/inputs/i")')
    with pytest.raises(EmulatorError, match="is not of the form"):
        parse_route("FROM /messages/modules/m1 INTO $upstream")
    assert parse_route('FROM /messages/* INTO BrokeredEndpoint("/modules/m/inputs/i")').any_source


# --------------------------------------------------------------------------- throttling


def test_throttling_answers_429_disconnects_and_refuses_connects(tmp_path, clients):
    from lightclient.emulator.service import Emulator

    from .test_emulator import PahoDevice, ca_signed_cert

    rates = {"connect": 0.1, "twin": 0.1, "telemetry": 0.1}     # bursts of 1, then one per 10 s
    with Emulator(tmp_path / "emu", throttle=rates) as hub:
        hub.register_device("busy")
        cert, key = ca_signed_cert(hub, tmp_path, "busy")
        client = PahoDevice(hub, "busy", cert, key)
        clients.append(client)
        client.connect()
        client.subscribe("$iothub/twin/res/#")
        client.publish("$iothub/twin/GET/?$rid=1")
        client.publish("$iothub/twin/GET/?$rid=2")
        assert client.wait_message("$iothub/twin/res/").topic == "$iothub/twin/res/200/?$rid=1"
        assert client.wait_message("$iothub/twin/res/").topic == "$iothub/twin/res/429/?$rid=2"
        client.publish("devices/busy/messages/events/", b"first")
        client.client.publish("devices/busy/messages/events/", b"second", qos=1)
        assert client.disconnected.wait(10), "the throttled connection was not closed"
        assert [e.body for e in hub.events("busy")] == [b"first"]
        assert "connection closed without PUBACK" in hub.wait_for_diagnostic("throttle.telemetry").message
        client.connect(expect=136)                                 # paho's name for CONNACK 3
        assert "CONNACK 3" in hub.wait_for_diagnostic("throttle.connect").message
        assert hub.diagnostic_counts()["throttle.twin"] == 1
