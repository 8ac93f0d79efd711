"""DPS with symmetric keys held in a SoftHSM token: an individual enrollment, and a group enrollment whose
device key is derived inside the token; the provisioned device then connects to the hub with that key."""
import json
from pathlib import Path

import pytest

from lightclient import dps, sas, tls
from lightclient.backoff import Backoff
from lightclient.device import Device
from lightclient.emulator.service import Emulator
from lightclient.exceptions import ProvisioningError
from lightclient.identity import Identity
from lightclient.symkey import SasCredential, TokenKey
from lightclient.token import run_in_child
from tests import lab
from tests.lab import free_port

PIN, SO_PIN = "sasdps-pin-3", "sasdps-so-4"
KEY = json.loads((Path(__file__).parents[1] / "vectors" / "sas.json").read_text())["key"]
GROUP_KEY = "Z3JvdXAta2V5LWdyb3VwLWtleS1ncm91cC1rZXktZ3JvdXAta2V5LWdyb3VwLWs="
FAST = dict(poll_interval=(0.05, 0.2), timeout=30)


@pytest.fixture(scope="module")
def hsm(tmp_path_factory):
    h = lab.SoftHSM(tmp_path_factory.mktemp("sasdps-hsm"))
    h.init_token("dps", PIN, SO_PIN)
    for label, key in (("individual", KEY), ("group", GROUP_KEY)):
        run_in_child("import-secret", module_path=h.module_path, token_label="dps", key_label=label, key_b64=key,
                     pin=PIN, env=h.env)
    return h


@pytest.fixture
def emulator(tmp_path):
    with Emulator(tmp_path / "emu", hostname="localhost", port=free_port()) as emu:
        emu.start_dps(group=None, polls=1)
        yield emu


def _key(hsm, label):
    return TokenKey(f"pkcs11:token=dps;object={label}?module-path={hsm.module_path}", pin=PIN, env=hsm.env)


def _provision(emu, rid, key):
    cred = SasCredential.for_dps(emu.dps.id_scope, rid, key)
    return dps.provision(emu.dps.id_scope, rid, ssl_context=tls.server_context(ca=emu.ca_path, alpn=["http/1.1"]),
                         endpoint=emu.dps.endpoint, sas=cred, **FAST)


def _connect_and_send(emu, device_id, key):
    identity = Identity("localhost", device_id)
    with Device(identity, tls.server_context(ca=emu.ca_path), host="127.0.0.1", port=emu.port,
                sas=SasCredential.for_identity(identity, key), backoff=Backoff(initial=0.05, maximum=0.3)) as dev:
        dev.send_and_wait(b"hello", timeout=10)
    assert emu.wait_for_events(1, device_id)


def test_individual_enrollment(emulator, hsm):
    emulator.dps.add_symmetric_individual("sym-ind-1", KEY, assigned_hub="localhost")
    result = _provision(emulator, "sym-ind-1", _key(hsm, "individual"))
    assert (result.status, result.device_id, result.assigned_hub) == ("assigned", "sym-ind-1", "localhost")
    _connect_and_send(emulator, "sym-ind-1", _key(hsm, "individual"))


def test_group_enrollment_with_a_key_derived_in_the_token(emulator, hsm):
    emulator.dps.add_symmetric_group("sym-group", GROUP_KEY, assigned_hub="localhost")
    rid = "sym-grp-dev-1"
    run_in_child("derive-secret", module_path=hsm.module_path, token_label="dps", registration_id=rid,
                 new_label=rid, group_label="group", pin=PIN, env=hsm.env)
    derived = _key(hsm, rid)
    result = _provision(emulator, rid, derived)
    assert result.status == "assigned" and result.device_id == rid
    _connect_and_send(emulator, rid, derived)
    # The hub registered the device with the key the reference formula gives.
    assert emulator.registry.get(rid).keys == (sas.derive_device_key(GROUP_KEY, rid),)


def test_group_key_itself_is_refused_and_the_token_never_shows(emulator, hsm):
    emulator.dps.add_symmetric_group("sym-group", GROUP_KEY, assigned_hub="localhost")
    with pytest.raises(ProvisioningError) as info:
        _provision(emulator, "sym-grp-dev-2", _key(hsm, "group"))   # signing with the group key: wrong
    assert info.value.status == 401
    assert "SharedAccessSignature" not in str(info.value) and PIN not in str(info.value)


def test_wrong_individual_key_is_401(emulator, hsm):
    emulator.dps.add_symmetric_individual("sym-ind-2", GROUP_KEY)
    with pytest.raises(ProvisioningError) as info:
        _provision(emulator, "sym-ind-2", _key(hsm, "individual"))
    assert info.value.status == 401 and "signature" in str(info.value)
