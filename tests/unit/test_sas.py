"""lightclient.sas against vectors computed independently (openssl dgst) and the DPS docs' derive example."""
import base64
import json
from pathlib import Path

import pytest

from lightclient import sas
from lightclient.exceptions import ConfigError

VECTORS = json.loads((Path(__file__).parents[1] / "vectors" / "sas.json").read_text())
KEY = VECTORS["key"]


@pytest.mark.parametrize("case", VECTORS["tokens"], ids=lambda c: c["uri"])
def test_token_vectors(case):
    message = sas.string_to_sign(case["uri"], case["expiry"])
    assert message == case["string_to_sign"].encode()
    signature = sas.hmac_sha256(sas.decode_key(KEY), message)
    assert base64.b64encode(signature).decode() == case["signature"]
    tok = sas.token(case["uri"], signature, case["expiry"], case["policy"])
    assert str(tok) == case["token"]
    assert "sig=" not in repr(tok) and case["signature"][:10] not in repr(tok)


@pytest.mark.parametrize("case", VECTORS["derive"], ids=lambda c: c["registration_id"])
def test_derive_vector(case):
    assert sas.derive_device_key(case["group_key"], case["registration_id"]) == case["device_key"]


def test_resource_uris():
    assert sas.resource_uri("h.azure-devices.net", "d1") == "h.azure-devices.net/devices/d1"
    assert sas.resource_uri("h", "d1", "m1") == "h/devices/d1/modules/m1"
    assert sas.dps_resource_uri("0ne1", "r1") == "0ne1/registrations/r1"


def test_expiry_and_renewal_point():
    assert sas.expiry_for(1000.7, 3600) == 4600
    assert sas.renew_at(1000, 1100) == pytest.approx(1080)
    with pytest.raises(ConfigError, match="lifetime must be between"):
        sas.expiry_for(0, 5)
    with pytest.raises(ConfigError, match="whole number"):
        sas.check_lifetime("3600")


@pytest.mark.parametrize("bad, match", [("", "empty"), ("not base64!", "not valid base64"),
                                        (base64.b64encode(b"short").decode(), "decodes to 5 bytes"),
                                        ("QUJD", "decodes to 3 bytes")])
def test_bad_keys_are_named_not_shown(bad, match):
    with pytest.raises(ConfigError, match=match) as info:
        sas.decode_key(bad)
    if bad:
        assert bad not in str(info.value)


def test_connection_string():
    cs = sas.parse_connection_string(f"HostName=h.azure-devices.net;DeviceId=d1;ModuleId=m1;SharedAccessKey={KEY}")
    assert (cs.hostname, cs.device_id, cs.module_id, cs.shared_access_key) == ("h.azure-devices.net", "d1", "m1", KEY)
    assert KEY not in repr(cs) and KEY[:12] not in repr(cs)
    with pytest.raises(ConfigError, match="lacks SharedAccessKey"):
        sas.parse_connection_string("HostName=h;DeviceId=d1")
    with pytest.raises(ConfigError, match="not service or X.509"):
        sas.parse_connection_string(f"HostName=h;SharedAccessKeyName=iothubowner;SharedAccessKey={KEY}")
    with pytest.raises(ConfigError) as info:
        sas.parse_connection_string("HostName=h;DeviceId=d1;SharedAccessKey=secret-not-b64")
    assert "secret-not-b64" not in str(info.value)


def test_group_registration_ids_use_the_strict_set():
    with pytest.raises(ConfigError, match="lowercase"):
        sas.derive_device_key(KEY, "Device_1")


def test_emulator_skn_rules_for_devices_and_dps():
    """Device tokens carry no skn; DPS tokens skn=registration (docs, C SDK) or none (the Python SDK)."""
    from lightclient.emulator import sas as emulated

    key = base64.b64encode(b"k" * 32).decode()

    def tok(uri, policy):
        return sas.token(uri, sas.hmac_sha256(sas.decode_key(key), sas.string_to_sign(uri, 2000)), 2000, policy).value

    dps_uri, dev_uri = "0ne1/registrations/r1", "hub/devices/d1"
    for policy, ok in (("registration", True), (None, True), ("service", False)):
        problem, _ = emulated.check(tok(dps_uri, policy), [key], dps_uri, policy="registration", now=1000)
        assert (problem is None) == ok, (policy, problem)
    for policy, ok in ((None, True), ("registration", False)):
        problem, _ = emulated.check(tok(dev_uri, policy), [key], dev_uri, now=1000)
        assert (problem is None) == ok, (policy, problem)


def test_authorized_requests_hide_the_token_and_name_the_sas_on_401():
    """One helper adds the SAS to DPS and file-upload requests; their repr never shows it, and a hub 401
    for a SAS device says to check the key and the clock (not the certificate)."""
    from lightclient import upload
    from lightclient._https import authorized
    from lightclient.symkey import SasCredential, SoftwareKey

    key = base64.b64encode(b"k" * 32).decode()
    cred = SasCredential(SoftwareKey(key), "hub/devices/d1", clock=lambda: 1000)
    plain = upload.sas_uri_request("d1", "a.txt", endpoint="hub")
    assert authorized(plain, None) is plain
    signed = authorized(plain, cred)
    assert signed.headers["Authorization"] == cred.current().value and "Authorization" not in plain.headers
    assert cred.current().value not in repr(signed) and "<secret>" in repr(signed)
    assert "SAS token" in str(upload.hub_error(401, b"", {}, sas=True))
    assert "certificate" in str(upload.hub_error(401, b"", {}))
