"""DPS over HTTPS with the SoftHSM key, against the DPS emulator (and curl against the emulator)."""
import os

import stat
import subprocess

import paho.mqtt.client as mqtt
import pytest

from lightclient import _native, dps, tls
from lightclient.emulator import certs
from lightclient.emulator.dps import DpsEmulator
from lightclient.exceptions import OperationTimeout, ProvisioningError


SCOPE = "0ne00000001"
FAST = dict(poll_interval=(0.05, 0.2), timeout=20)


@pytest.fixture
def emulator(test_ca):
    assigned = []
    emu = DpsEmulator(ca=certs.CertificateAuthority(test_ca.cert, test_ca.key), server_cert=test_ca.server_cert,
                      server_key=test_ca.server_key, id_scope=SCOPE, retry_after=1,
                      on_assigned=lambda dev, hub, cert: assigned.append((dev, hub, cert)))
    emu.assigned = assigned
    with emu:
        yield emu


@pytest.fixture
def https_ctx(device, test_ca):
    return tls.https_context(cert=device["ec"]["cert"], key=device["ec"]["key"], ca=test_ca.cert)


def _enroll(emulator, device, kind="ec", **options):
    return emulator.add_individual(device[kind]["cn"], device[kind]["cert"].read_bytes(), **options)


def test_assigned_after_two_polls_with_one_handshake(emulator, device, https_ctx):
    _enroll(emulator, device, assigned_hub="hub-a.localhost", payload={"tier": "gold"}, polls=1)
    result = dps.provision(SCOPE, "device-ec", ssl_context=https_ctx, endpoint=emulator.endpoint,
                           payload={"hello": 1}, **FAST)
    assert (result.status, result.assigned_hub, result.device_id) == ("assigned", "hub-a.localhost", "device-ec")
    assert result.substatus == "initialAssignment" and result.payload == {"tier": "gold"}
    assert [(m, s) for m, _, s in emulator.requests] == [("PUT", 202), ("GET", 202), ("GET", 200)]
    assert emulator.handshakes == {"device-ec": 1}
    assert emulator.assigned and emulator.assigned[0][:2] == ("device-ec", "hub-a.localhost")


def test_throttled_then_assigned(emulator, device, https_ctx):
    _enroll(emulator, device, polls=0)
    emulator.inject("device-ec", 429, 500)
    result = dps.provision(SCOPE, "device-ec", ssl_context=https_ctx, endpoint=emulator.endpoint, **FAST)
    assert result.status == "assigned"
    assert [s for _, _, s in emulator.requests] == [429, 500, 202, 200]
    assert emulator.handshakes == {"device-ec": 1}


def test_cn_mismatch_is_401_with_a_clear_message(emulator, device, https_ctx):
    emulator.add_individual("someone-else", device["ec"]["cert"].read_bytes())
    with pytest.raises(ProvisioningError) as exc:
        dps.provision(SCOPE, "someone-else", ssl_context=https_ctx, endpoint=emulator.endpoint, **FAST)
    assert exc.value.status == 401 and not exc.value.retryable
    assert "must equal the certificate's subject CN" in str(exc.value)
    assert "does not match the certificate CN 'device-ec'" in str(exc.value)


def test_unknown_scope_and_missing_enrollment_are_404(emulator, device, https_ctx):
    with pytest.raises(ProvisioningError, match="ID scope") as exc:
        dps.provision("0ne99999999", "device-ec", ssl_context=https_ctx, endpoint=emulator.endpoint, **FAST)
    assert exc.value.status == 404
    with pytest.raises(ProvisioningError, match="no enrollment matches"):
        dps.provision(SCOPE, "device-ec", ssl_context=https_ctx, endpoint=emulator.endpoint, **FAST)


def test_disabled_enrollment(emulator, device, https_ctx):
    _enroll(emulator, device, disabled=True, polls=0)
    with pytest.raises(ProvisioningError, match="disabled"):
        dps.provision(SCOPE, "device-ec", ssl_context=https_ctx, endpoint=emulator.endpoint, **FAST)


def test_timeout_while_assigning(emulator, device, https_ctx):
    _enroll(emulator, device, polls=1000)
    with pytest.raises(OperationTimeout, match="within 0.6 s"):
        dps.provision(SCOPE, "device-ec", ssl_context=https_ctx, endpoint=emulator.endpoint,
                      poll_interval=(0.05, 0.1), timeout=0.6)


def test_group_enrollment_by_ca(emulator, device, test_ca, test_ca_pem=None):
    emulator.add_group("lab-devices", test_ca.cert.read_bytes(), assigned_hub="hub-g.localhost", polls=0)
    ctx = tls.https_context(cert=device["rsa"]["cert"], key=device["rsa"]["key"], ca=test_ca.cert)
    result = dps.provision(SCOPE, "device-rsa", ssl_context=ctx, endpoint=emulator.endpoint, **FAST)
    assert (result.assigned_hub, result.device_id) == ("hub-g.localhost", "device-rsa")
    assert result.raw["registrationState"]["x509"] == {"enrollmentGroupId": "lab-devices"}


def test_csr_issuance_then_hub_connection_with_same_key(emulator, device, test_ca, broker, tmp_path):
    _enroll(emulator, device, polls=1)
    key = device["ec"]["key"]
    csr = _native.sign_csr(key, [("CN", "device-ec")])
    out = tmp_path / "issued.pem"
    ctx = tls.https_context(cert=device["ec"]["cert"], key=key, ca=test_ca.cert)
    result = dps.provision(SCOPE, "device-ec", ssl_context=ctx, endpoint=emulator.endpoint, csr=csr,
                           cert_out=str(out), **FAST)
    assert len(result.issued_certificate_chain) == 2
    assert "2025-07-01-preview" in emulator.requests[0][1]
    # The cache keeps the issued chain, so a reboot can connect without registering again.
    cache = dps.ProvisioningCache(str(tmp_path / "cache.json"))
    cache.save(SCOPE, "device-ec", result)
    assert cache.load(SCOPE, "device-ec").chain_pem() == out.read_bytes()
    text = subprocess.run(["openssl", "x509", "-in", str(out), "-noout", "-subject", "-issuer"],
                          capture_output=True, text=True, check=True).stdout
    assert "CN = device-ec" in text and "lightclient lab CA" in text
    # The issued certificate works at once, with the same hardware key.
    mqtt_ctx = tls.client_context(cert=out, key=key, ca=test_ca.cert)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="device-ec-issued")
    client.tls_set_context(mqtt_ctx)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        info = client.publish("devices/device-ec/messages/events/", b"issued", qos=1)
        info.wait_for_publish(timeout=5)
        assert info.is_published()
    finally:
        client.disconnect()
        client.loop_stop()


def test_csr_with_wrong_cn_is_refused(emulator, device, https_ctx):
    _enroll(emulator, device, polls=0)
    csr = _native.sign_csr(device["ec"]["key"], [("CN", "not-me")])
    with pytest.raises(ProvisioningError, match="CN must equal the registration id") as exc:
        dps.provision(SCOPE, "device-ec", ssl_context=https_ctx, endpoint=emulator.endpoint, csr=csr, **FAST)
    assert exc.value.status == 400


def test_cached_result_is_reused(emulator, device, https_ctx, tmp_path):
    _enroll(emulator, device, assigned_hub="hub-c.localhost", polls=0)
    cache = dps.ProvisioningCache(str(tmp_path / "dps.json"))
    first, cached = dps.provision_cached(cache, SCOPE, "device-ec", ssl_context=https_ctx,
                                         endpoint=emulator.endpoint, **FAST)
    assert not cached and first.assigned_hub == "hub-c.localhost"
    assert stat.S_IMODE(os.stat(cache.path).st_mode) == 0o600
    n = len(emulator.requests)
    again, cached = dps.provision_cached(cache, SCOPE, "device-ec", ssl_context=https_ctx,
                                         endpoint=emulator.endpoint, **FAST)
    assert cached and (again.assigned_hub, again.device_id) == ("hub-c.localhost", "device-ec")
    assert len(emulator.requests) == n  # no network at all
    # When the hub rejects the device, force a new registration.
    fresh, cached = dps.provision_cached(cache, SCOPE, "device-ec", ssl_context=https_ctx, force=True,
                                         endpoint=emulator.endpoint, **FAST)
    assert not cached and len(emulator.requests) > n


def test_curl_with_a_file_key(emulator, test_ca, tmp_path):
    """A client lightclient did not write: curl with a file key and certificate."""
    cert, key = test_ca.issue_file_key("curl-dev", tmp_path)
    emulator.add_individual("curl-dev", cert.read_bytes(), polls=0)
    url = f"https://127.0.0.1:{emulator.port}/{SCOPE}/registrations/curl-dev/register?api-version=2021-10-01"
    out = subprocess.run(["curl", "-sS", "--fail-with-body", "--cacert", str(test_ca.cert), "--cert", str(cert),
                          "--key", str(key), "-X", "PUT", "-H", "Content-Type: application/json",
                          "-d", '{"registrationId":"curl-dev"}', "-w", "\n%{http_code}", url],
                         capture_output=True, text=True, timeout=30)
    body, code = out.stdout.rsplit("\n", 1)
    assert code == "202", out.stderr
    result = dps.parse_operation(body)
    assert result.status == "assigning" and result.operation_id
    # Without a client certificate the emulator refuses the handshake.
    refused = subprocess.run(["curl", "-sS", "--cacert", str(test_ca.cert), "-X", "PUT", url],
                             capture_output=True, text=True, timeout=30)
    assert refused.returncode != 0


def test_untrusted_dps_server_is_a_typed_certificate_error(emulator, device, tmp_path):
    """A DPS whose certificate the device does not trust: ServerCertificateError saying so."""
    from lightclient.exceptions import ServerCertificateError

    _enroll(emulator, device, polls=0)
    ctx = tls.https_context(cert=device["ec"]["cert"], key=device["ec"]["key"])  # bundled IoT Hub roots only
    with pytest.raises(ServerCertificateError) as exc:
        dps.provision(SCOPE, "device-ec", ssl_context=ctx, endpoint=emulator.endpoint, **FAST)
    assert exc.value.reason == "untrusted" and "127.0.0.1" in str(exc.value)


def test_retry_delays_honour_retry_after_and_the_clamps(emulator, device, https_ctx):
    """429 with Retry-After: the server's wait, clamped to poll_interval; 5xx without it: the one Backoff
    (doubling from poll_interval's minimum, capped at its maximum, jittered into the upper half)."""
    _enroll(emulator, device, polls=1)
    emulator.inject("device-ec", 429, 500, 503, 500)
    waits = []
    result = dps.provision(SCOPE, "device-ec", ssl_context=https_ctx, endpoint=emulator.endpoint,
                           poll_interval=(0.05, 0.2), timeout=20, sleep=waits.append)
    assert result.status == "assigned"
    assert [s for _, _, s in emulator.requests] == [429, 500, 503, 500, 202, 202, 200]
    assert waits[0] == 0.2                        # Retry-After: 1, clamped to the maximum 0.2
    assert 0.05 <= waits[1] <= 0.1                # failure 1: 0.1 with jitter
    assert 0.1 <= waits[2] <= 0.2                 # failure 2: 0.2 with jitter
    assert 0.1 <= waits[3] <= 0.2                 # failure 3: capped at 0.2, jittered
    assert waits[4:] == [0.2, 0.2]                # the 202s' Retry-After: 1, clamped
    assert emulator.handshakes == {"device-ec": 1}
