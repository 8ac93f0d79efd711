"""DPS over MQTT (protocol notes §3.3) against the emulator: a raw paho client for the wire rules and both
readings of the UNCERTAIN points, and Microsoft's own Python SDK (azure-iot-device, pinned, in its own
virtual environment) provisioning over MQTT and then connecting to the assigned hub."""
from __future__ import annotations

import json
import os
import queue
import re
import ssl
import subprocess
import sys
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from lightclient.emulator.service import Emulator

ROOT = Path(__file__).resolve().parents[2]
SCOPE = "0ne00000001"
#: The SDK version the test pins (its own venv: the SDK needs paho-mqtt < 2, lightclient paho-mqtt 2).
SDK_PIN = "azure-iot-device==2.14.0"


@pytest.fixture
def emu(tmp_path):
    with Emulator(tmp_path / "emu", hostname="localhost") as hub:
        hub.start_dps(0, polls=1, retry_after=1, mqtt_port=0)
        yield hub


def _client(emu, tmp_path, rid, username=None, clean=True):
    cert, key = emu.issue_certificate(rid, out_dir=tmp_path / rid)
    ctx = ssl.create_default_context(cafile=str(emu.ca_path))
    ctx.load_cert_chain(str(cert), str(key))
    return _connect(emu, rid, ctx, username, None, clean)


def _connect(emu, rid, ctx, username=None, password=None, clean=True):
    """A raw paho client on the DPS MQTT port: (client, inbox of (topic, JSON), the CONNACK's reason)."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=rid, protocol=mqtt.MQTTv311,
                         clean_session=clean)
    client.username_pw_set(username or f"{SCOPE}/registrations/{rid}/api-version=2019-03-31&ClientVersion=t%2F1",
                           password)
    client.tls_set_context(ctx)
    inbox: "queue.Queue" = queue.Queue()
    connack: "queue.Queue" = queue.Queue()
    client.on_message = lambda c, u, m: inbox.put((m.topic, json.loads(m.payload)))
    client.on_connect = lambda c, u, f, rc, p=None: connack.put(str(rc))
    client.connect("127.0.0.1", emu.dps_mqtt_port)
    client.loop_start()
    return client, inbox, connack.get(timeout=10)


def _split(topic):
    path, _, query = topic.partition("?")
    return int(path.split("/")[3]), dict(p.split("=", 1) for p in query.split("&"))


@pytest.mark.parametrize("body_has_id,clean", [(True, False), (False, True)])
def test_register_poll_and_assign(emu, tmp_path, body_has_id, clean):
    """Both readings: body with registrationId (SDKs) or without (unified C SDK); clean session 0 or 1."""
    rid = "mqtt-dev-1"
    client, inbox, rc = _client(emu, tmp_path, rid, clean=clean)
    try:
        assert rc == "Success"
        client.subscribe("$dps/registrations/res/#", qos=1)[1]
        body = {"registrationId": rid, "payload": {"a": 1}} if body_has_id else {"payload": {"a": 1}}
        client.publish("$dps/registrations/PUT/iotdps-register/?$rid=1", json.dumps(body), qos=1)
        topic, data = inbox.get(timeout=10)
        status, props = _split(topic)
        assert (status, props["$rid"], props["retry-after"]) == (202, "1", "1")
        assert data["status"] == "assigning"
        op = data["operationId"]
        seen = []
        for n in range(2, 6):
            client.publish(f"$dps/registrations/GET/iotdps-get-operationstatus/?$rid={n}&operationId={op}", b"", qos=1)
            topic, data = inbox.get(timeout=10)
            seen.append(_split(topic)[0])
            if data["status"] == "assigned":
                break
        assert seen == [202, 200]
        assert "retry-after" not in _split(topic)[1]
        state = data["registrationState"]
        assert (state["assignedHub"], state["deviceId"]) == ("localhost", rid)
    finally:
        client.disconnect()
        client.loop_stop()
    assert [i.name for i in emu.identities()] == [rid]
    assert not emu.diagnostics(rule="dps.")


def test_refusals_are_named(emu, tmp_path):
    _, _, rc = _client(emu, tmp_path, "d-scope", username="0neWRONG/registrations/d-scope/api-version=2019-03-31")
    assert rc == "Not authorized"
    assert "unknown ID scope '0neWRONG'" in emu.wait_for_diagnostic("dps.id-scope").message
    _, _, rc = _client(emu, tmp_path, "d-api", username=f"{SCOPE}/registrations/d-api/api-version=1999-01-01")
    assert rc == "Not authorized"
    emu.wait_for_diagnostic("dps.api-version")
    # A body naming another registration id gets DPS's 400, as over HTTPS.
    client, inbox, rc = _client(emu, tmp_path, "d-cn")
    try:
        client.subscribe("$dps/registrations/res/#", qos=1)
        client.publish("$dps/registrations/PUT/iotdps-register/?$rid=9",
                       json.dumps({"registrationId": "someone-else"}), qos=1)
        topic, data = inbox.get(timeout=10)
        assert _split(topic)[0] == 400 and "registrationId" in data["message"]
    finally:
        client.disconnect()
        client.loop_stop()


# ------------------------------------------------------------------ the official SDK


def _sdk_python() -> str:
    """A cached venv with the pinned SDK (benchmarks' mechanism: benchmarks/.work, reused across runs)."""
    venv = ROOT / "benchmarks" / ".work" / "sdk-venv-pinned"
    python = venv / "bin" / "python"
    stamp = venv / ".installed"
    if not (python.exists() and stamp.exists() and stamp.read_text() == SDK_PIN):
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, timeout=120)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", SDK_PIN],
                       check=True, timeout=300)
        stamp.write_text(SDK_PIN)
    return str(python)


SDK_PORTS = r'''
import json, sys
import paho.mqtt.client as mqtt
spec = json.load(sys.stdin)
original = mqtt.Client.connect
def connect(self, host, port=1883, *a, **k):
    # The SDK always dials 8883; DPS and hub differ here only by port: the DPS username starts with the scope.
    dps = (self._username or b"").startswith(spec["scope"].encode())
    return original(self, host, spec["dps_port"] if dps else spec["hub_port"], *a, **k)
mqtt.Client.connect = connect
'''
SDK_CHILD = SDK_PORTS + r'''
from azure.iot.device import ProvisioningDeviceClient, IoTHubDeviceClient, X509, Message
ca = open(spec["ca"]).read()
x509 = X509(spec["cert"], spec["key"])
prov = ProvisioningDeviceClient.create_from_x509_certificate(
    provisioning_host="localhost", registration_id=spec["rid"], id_scope=spec["scope"], x509=x509,
    server_verification_cert=ca)
prov.provisioning_payload = {"from": "sdk"}
result = prov.register()
state = result.registration_state
client = IoTHubDeviceClient.create_from_x509_certificate(
    x509=x509, hostname=state.assigned_hub, device_id=state.device_id, server_verification_cert=ca)
client.connect()
msg = Message("after-dps"); msg.custom_properties["via"] = "sdk"
client.send_message(msg)
client.shutdown()
print(json.dumps({"status": result.status, "hub": state.assigned_hub, "device": state.device_id}))
'''


def test_official_sdk_provisions_over_mqtt_then_connects(emu, tmp_path):
    python = _sdk_python()
    rid = "sdk-dps-1"
    cert, key = emu.issue_certificate(rid, out_dir=tmp_path / "sdk")
    spec = {"scope": SCOPE, "rid": rid, "ca": str(emu.ca_path), "cert": str(cert), "key": str(key),
            "dps_port": emu.dps_mqtt_port, "hub_port": emu.port}
    proc = subprocess.run([python, "-c", SDK_CHILD], input=json.dumps(spec), capture_output=True, text=True,
                          timeout=90, env={**os.environ, "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == {"status": "assigned", "hub": "localhost", "device": rid}
    (event,) = emu.wait_for_events(1, rid)
    assert event.body == b"after-dps" and event.properties["via"] == "sdk"
    assert not emu.diagnostics(rule="dps."), emu.diagnostics(rule="dps.")


# ------------------------------------------------------------------ symmetric-key enrollments (SAS password)

SAS_KEY = "8isrFI1sGsIlvvFSSFRiMfCNzv21fjbE/+ah/lSh3lF8e2YG1Te7w1KpZhJFFXJrqYKi9yegxkqIChbqOS9Egw=="
GROUP_KEY = "Z3JvdXAta2V5LWdyb3VwLWtleS1ncm91cC1rZXktZ3JvdXAta2V5LWdyb3VwLWs="
OTHER_KEY = "b3RoZXIta2V5LW90aGVyLWtleS1vdGhlci1rZXktMTI="

SDK_SAS_CHILD = SDK_PORTS + r'''
from azure.iot.device import ProvisioningDeviceClient, IoTHubDeviceClient, Message
ca = open(spec["ca"]).read()
prov = ProvisioningDeviceClient.create_from_symmetric_key(
    provisioning_host="localhost", registration_id=spec["rid"], id_scope=spec["scope"],
    symmetric_key=spec["key"], server_verification_cert=ca)
result = prov.register()
state = result.registration_state
client = IoTHubDeviceClient.create_from_symmetric_key(
    symmetric_key=spec["key"], hostname=state.assigned_hub, device_id=state.device_id, server_verification_cert=ca)
client.connect()
msg = Message("after-dps-sas"); msg.custom_properties["via"] = "sdk-sas"
client.send_message(msg)
client.shutdown()
print(json.dumps({"status": result.status, "hub": state.assigned_hub, "device": state.device_id}))
'''


@pytest.mark.parametrize("kind", ["individual", "group"])
def test_official_sdk_provisions_with_a_symmetric_key_over_mqtt_then_connects(emu, kind):
    """azure-iot-device's create_from_symmetric_key: the SAS password at the DPS CONNECT (individual key, or the
    key derived from the group key), then the hub CONNECT with a SAS over the same key."""
    from lightclient import sas

    python = _sdk_python()
    rid = f"sdk-sas-{kind}"
    if kind == "individual":
        emu.dps.add_symmetric_individual(rid, OTHER_KEY, SAS_KEY, assigned_hub="localhost")   # secondary signs
        key = SAS_KEY
    else:
        emu.dps.add_symmetric_group("sdk-group", GROUP_KEY, assigned_hub="localhost")
        key = sas.derive_device_key(GROUP_KEY, rid)
    spec = {"scope": SCOPE, "rid": rid, "ca": str(emu.ca_path), "key": key, "dps_port": emu.dps_mqtt_port,
            "hub_port": emu.port}
    proc = subprocess.run([python, "-c", SDK_SAS_CHILD], input=json.dumps(spec), capture_output=True, text=True,
                          timeout=90, env={**os.environ, "PYTHONPATH": ""})
    assert proc.returncode == 0, (emu.diagnostics(), proc.stderr[-3000:])
    assert json.loads(proc.stdout.splitlines()[-1]) == {"status": "assigned", "hub": "localhost", "device": rid}
    (event,) = emu.wait_for_events(1, rid)
    assert event.body == b"after-dps-sas" and event.properties["via"] == "sdk-sas"
    assert emu.registry.get(rid).keys == ((OTHER_KEY, SAS_KEY) if kind == "individual" else (key,))
    assert not emu.diagnostics(rule="dps."), emu.diagnostics(rule="dps.")
    assert not emu.diagnostics(rule="connect."), emu.diagnostics(rule="connect.")


def _sas_client(emu, rid, password):
    return _connect(emu, rid, ssl.create_default_context(cafile=str(emu.ca_path)), password=password)  # no cert


def _dps_token(rid, key, expiry_in=600, uri=None, policy="registration"):
    import time

    from lightclient import sas

    uri = uri or sas.dps_resource_uri(SCOPE, rid)
    expiry = int(time.time()) + expiry_in
    return sas.token(uri, sas.hmac_sha256(sas.decode_key(key), sas.string_to_sign(uri, expiry)), expiry,
                     policy).value


def test_group_derived_key_registers_over_mqtt_with_raw_paho(emu):
    from lightclient import sas

    rid = "raw-grp-1"
    emu.dps.add_symmetric_group("raw-group", GROUP_KEY, assigned_hub="localhost")
    client, inbox, rc = _sas_client(emu, rid, _dps_token(rid, sas.derive_device_key(GROUP_KEY, rid)))
    try:
        assert rc == "Success"
        client.subscribe("$dps/registrations/res/#", qos=1)
        client.publish("$dps/registrations/PUT/iotdps-register/?$rid=1", json.dumps({"registrationId": rid}), qos=1)
        topic, data = inbox.get(timeout=10)
        assert _split(topic)[0] == 202
        for n in range(2, 6):
            client.publish(f"$dps/registrations/GET/iotdps-get-operationstatus/?$rid={n}&operationId="
                           f"{data['operationId']}", b"", qos=1)
            topic, data = inbox.get(timeout=10)
            if data["status"] == "assigned":
                break
        assert data["registrationState"]["symmetricKey"] == {"enrollmentGroupId": "raw-group"}
    finally:
        client.disconnect()
        client.loop_stop()
    assert emu.registry.get(rid).keys == (sas.derive_device_key(GROUP_KEY, rid),)
    assert not emu.diagnostics(rule="dps."), emu.diagnostics(rule="dps.")


def test_sas_refusals_are_connack_5_with_a_diagnostic(emu):
    emu.dps.add_symmetric_individual("raw-ind-1", SAS_KEY, assigned_hub="localhost")
    emu.dps.add_symmetric_group("raw-group", GROUP_KEY, assigned_hub="localhost")
    cases = [
        ("raw-ind-1", _dps_token("raw-ind-1", OTHER_KEY), "dps.sas-signature"),
        ("raw-ind-1", _dps_token("raw-ind-1", SAS_KEY, expiry_in=-5), "dps.sas-expired"),
        ("raw-ind-1", _dps_token("raw-ind-1", SAS_KEY, uri=f"{SCOPE}/registrations/raw-ind-2"), "dps.sas-resource"),
        ("raw-ind-1", _dps_token("raw-ind-1", SAS_KEY, policy="service"), "dps.sas"),
        ("raw-grp-2", _dps_token("raw-grp-2", GROUP_KEY), "dps.sas-signature"),     # the group key itself
        ("Raw_Grp", _dps_token("Raw_Grp", GROUP_KEY), "dps.sas-registration-id"),
        ("raw-ind-1", "not a token", "dps.password"),
        ("raw-ind-1", None, "dps.credentials"),
    ]
    for rid, password, rule in cases:
        client, _, rc = _sas_client(emu, rid, password)
        client.loop_stop()
        assert rc == "Not authorized", (rule, rc)
        diag = emu.wait_for_diagnostic(rule, rid)
        assert diag.message.startswith("CONNACK 5: "), diag
        assert (password is None or password not in str(diag)) and not re.search(r"sig=[A-Za-z0-9%]", str(diag))
    assert [i.name for i in emu.identities()] == []
