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


def _start_cli(args, cwd):
    import os
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "lightclient.emulator", *args], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ))
    lines = []
    while not lines or lines[-1] != "ready":
        line = proc.stdout.readline()
        if not line:
            proc.wait(10)
            raise AssertionError("emulator exited early:\n" + "".join(lines))
        lines.append(line.rstrip("\n"))
    return proc, "\n".join(lines)


def test_config_file_with_dps_and_flag_override(tmp_path):
    import json
    from pathlib import Path

    from tests.lab import free_port

    root = Path(__file__).resolve().parents[2]
    port = free_port()
    config = tmp_path / "emulator.json"
    config.write_text(json.dumps({"port": 0, "state_dir": str(tmp_path / "state"), "devices": ["cfg-dev"],
                                  "dps": {"port": 0, "polls": 0, "id_scope": "0ne0000CAFE"}}))
    proc, text = _start_cli(["--config", str(config), "--port", str(port)], root)
    try:
        assert f"mqtts://127.0.0.1:{port}" in text  # the flag wins over the file's port 0
        assert "device cfg-dev: CA-signed" in text and "id scope 0ne0000CAFE" in text
        dps_port = int(text.split("DPS: https://127.0.0.1:")[1].split()[0])
        state = tmp_path / "state"
        ctx = tls.https_context(cert=state / "devices" / "cfg-dev.pem", key=str(state / "devices" / "cfg-dev.key"),
                                ca=state / "ca.pem")
        result = dps.provision("0ne0000CAFE", "cfg-dev", ssl_context=ctx, endpoint=f"127.0.0.1:{dps_port}",
                               poll_interval=(0.05, 0.2), timeout=20)
        assert (result.status, result.device_id) == ("assigned", "cfg-dev")
    finally:
        proc.terminate()
        assert proc.wait(timeout=10) == 0
        proc.stdout.close()


def test_config_file_mistakes_are_named(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "bad.json"
    for content, message in [('{"porrt": 1}', "unknown setting 'porrt'"), ("[1]", "must hold a JSON object"),
                             ('{"port": "x"}', "'port' in"), ("{", "not valid JSON"),
                             ('{"dps": {"prot": 1}}', "unknown DPS setting 'prot'")]:
        bad.write_text(content)
        proc = subprocess.run([sys.executable, "-m", "lightclient.emulator", "--config", str(bad)],
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2 and message in proc.stderr, (content, proc.stderr)
