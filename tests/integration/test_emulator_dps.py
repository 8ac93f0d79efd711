"""The hub and DPS emulators together: a SoftHSM-key device provisions, gets its certificate issued
from a CSR, and connects to the assigned hub with the same key."""
import paho.mqtt.client as mqtt
import pytest

from lightclient import _native, dps, tls
from lightclient.emulator.service import Emulator
from lightclient.identity import Identity
from lightclient import topics

from ..conftest import csr_pem


@pytest.fixture
def hub(tmp_path):
    with Emulator(tmp_path / "emu", hostname="localhost") as emu:
        emu.start_dps(0, polls=1, retry_after=1)
        yield emu


def test_provision_issue_certificate_and_connect(hub, device, tmp_path):
    key = device["ec"]["key"]
    # Bootstrap certificate for DPS from the emulator's CA (the group enrollment trusts that CA).
    boot_csr = tmp_path / "boot.csr"
    boot_csr.write_bytes(csr_pem(_native.sign_csr(key, [("CN", "dps-dev-1")])))
    boot = hub.sign_csr(boot_csr, tmp_path / "boot.pem")
    https = tls.https_context(cert=boot, key=key, ca=hub.ca_path)
    issued = tmp_path / "issued.pem"
    result = dps.provision("0ne00000001", "dps-dev-1", ssl_context=https, endpoint=hub.dps.endpoint,
                           csr=_native.sign_csr(key, [("CN", "dps-dev-1")]), cert_out=str(issued),
                           poll_interval=(0.05, 0.2), timeout=20)
    assert (result.assigned_hub, result.device_id) == ("localhost", "dps-dev-1")
    assert hub.dps.handshakes == {"dps-dev-1": 1}
    assert [i.name for i in hub.identities()] == ["dps-dev-1"]

    ident = Identity(result.assigned_hub, result.device_id)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=ident.client_id, protocol=mqtt.MQTTv311)
    client.username_pw_set(ident.username())
    client.tls_set_context(tls.client_context(cert=issued, key=key, ca=hub.ca_path))
    client.connect("127.0.0.1", hub.port)
    client.loop_start()
    try:
        info = client.publish(topics.telemetry_topic(ident, {"stage": "after-dps"}), b'{"t": 1}', qos=1)
        info.wait_for_publish(timeout=5)
        assert info.is_published()
        (event,) = hub.wait_for_events(1, "dps-dev-1")
        assert event.body == b'{"t": 1}'
        assert event.properties.get("stage") == "after-dps"
    finally:
        client.disconnect()
        client.loop_stop()
    assert not hub.diagnostics("dps-dev-1")
