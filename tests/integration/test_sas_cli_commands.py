"""--sas-key on the CLI beyond send: provision (individual and group enrollments against the emulator's DPS),
twin get with a key derived in the token, and doctor (the key signs in the token; --connect uses the SAS)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from lightclient import sas
from lightclient.emulator.service import Emulator
from lightclient.token import run_in_child
from tests import lab
from tests.lab import free_port

ROOT = Path(__file__).resolve().parents[2]
PIN, SO_PIN = "sascmd-pin-31", "sascmd-so-32"
KEY = json.loads((ROOT / "tests" / "vectors" / "sas.json").read_text())["key"]
GROUP_KEY = "Z3JvdXAta2V5LWdyb3VwLWtleS1ncm91cC1rZXktZ3JvdXAta2V5LWdyb3VwLWs="
OTHER_KEY = "b3RoZXIta2V5LW90aGVyLWtleS1vdGhlci1rZXktb3RoZXIta2V5LW90aGVyLWs="


def cli(*args, env):
    return subprocess.run([sys.executable, "-m", "lightclient", *map(str, args)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=90)


@pytest.fixture(scope="module")
def hsm(tmp_path_factory):
    h = lab.SoftHSM(tmp_path_factory.mktemp("sascmd-hsm"))
    h.init_token("cmd", PIN, SO_PIN)
    for label, key in (("individual", KEY), ("group", GROUP_KEY), ("other", OTHER_KEY)):
        run_in_child("import-secret", module_path=h.module_path, token_label="cmd", key_label=label, key_b64=key,
                     pin=PIN, env=h.env)
    return h


@pytest.fixture
def emu(tmp_path):
    with Emulator(tmp_path / "emu", hostname="localhost", port=free_port()) as e:
        e.start_dps(group=None, polls=1)
        yield e


def ref(hsm, label):
    return f"pkcs11:token=cmd;object={label};type=secret-key?module-path={hsm.module_path}"


def env_of(hsm):
    return {**hsm.env, "LIGHTCLIENT_PIN": PIN}


def secrets_absent(out):
    text = out.stdout + out.stderr
    return PIN not in text and "SharedAccessSignature" not in text and KEY not in text and GROUP_KEY not in text


def test_provision_individual_enrollment_with_sas_key(hsm, emu):
    emu.dps.add_symmetric_individual("cli-ind-1", KEY, assigned_hub="localhost")
    out = cli("provision", "--id-scope", emu.dps.id_scope, "--registration-id", "cli-ind-1", "--endpoint",
              emu.dps.endpoint, "--ca", emu.ca_path, "--sas-key", ref(hsm, "individual"), "--timeout", 30,
              env=env_of(hsm))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "assigned hub localhost, device id cli-ind-1" in out.stdout
    nxt = [line for line in out.stdout.splitlines() if line.startswith("next: ")][0]
    assert "--sas-key" in nxt and "object=individual" in nxt and "--cert" not in nxt
    assert secrets_absent(out)


def test_provision_refuses_a_wrong_key_and_certificate_options(hsm, emu):
    emu.dps.add_symmetric_individual("cli-ind-2", KEY, assigned_hub="localhost")
    base = ("provision", "--id-scope", emu.dps.id_scope, "--registration-id", "cli-ind-2", "--endpoint",
            emu.dps.endpoint, "--ca", emu.ca_path, "--timeout", 30)
    out = cli(*base, "--sas-key", ref(hsm, "other"), env=env_of(hsm))
    assert out.returncode == 3, out.stdout + out.stderr          # DPS refused the credentials: 401
    assert "401" in out.stderr and secrets_absent(out)
    out = cli(*base, "--sas-key", ref(hsm, "individual"), "--new-csr", "--cert-out", "x.pem", env=env_of(hsm))
    assert out.returncode == 2 and "--new-csr is for X.509 enrollments" in out.stderr, out.stderr


def test_provision_group_enrollment_derives_the_key_then_twin_get_uses_it(hsm, emu):
    emu.dps.add_symmetric_group("cli-group", GROUP_KEY, assigned_hub="localhost")
    rid = "cli-grp-dev-1"
    out = cli("provision", "--id-scope", emu.dps.id_scope, "--registration-id", rid, "--endpoint", emu.dps.endpoint,
              "--ca", emu.ca_path, "--sas-group-key", ref(hsm, "group"), "--json", "--timeout", 30, env=env_of(hsm))
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert "derived the device key" in lines[0] and secrets_absent(out)
    assert json.loads(lines[-1])["deviceId"] == rid
    # The hub registered the device with the key the reference formula gives, and the token holds it.
    assert emu.registry.get(rid).keys == (sas.derive_device_key(GROUP_KEY, rid),)
    twin = cli("twin", "get", "--hub", "localhost", "--device-id", rid, "--port", emu.port, "--ca", emu.ca_path,
               "--sas-key", ref(hsm, rid), env=env_of(hsm))
    assert twin.returncode == 0, twin.stdout + twin.stderr
    assert "desired" in json.loads(twin.stdout) and secrets_absent(twin)


@pytest.fixture
def emu_api(tmp_path):
    """An emulator with its service API, announced beside its CA as `lightclient emulator` does (the doctor
    asks it for its diagnostic of a refused CONNECT)."""
    with Emulator(tmp_path / "emu", hostname="localhost", port=free_port(), http_port=0) as e:
        (Path(e.ca_path).parent / "service-api").write_text(f"http://127.0.0.1:{e.http_port}\n")
        yield e


def test_doctor_checks_the_sas_key_and_connects_with_it(hsm, emu_api):
    emu = emu_api
    emu.register_device("doc-sas", symmetric_keys=(KEY,))
    args = ("doctor", "--hub", "localhost", "--device-id", "doc-sas", "--ca", emu.ca_path, "--connect",
            f"localhost:{emu.port}")
    out = cli(*args, "--sas-key", ref(hsm, "individual"), env=env_of(hsm))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "✓ SAS key signs in the token" in out.stdout and "localhost/devices/doc-sas" in out.stdout
    assert "server verified (SAS: no client certificate)" in out.stdout
    assert "✓ MQTT CONNECT accepted" in out.stdout and "✓ SUBSCRIBE" in out.stdout and secrets_absent(out)
    wrong = cli(*args, "--sas-key", ref(hsm, "other"), env=env_of(hsm))
    assert wrong.returncode == 1
    assert "✓ SAS key signs in the token" in wrong.stdout
    assert "✗ MQTT CONNECT accepted" in wrong.stdout and "connect.sas-signature" in wrong.stdout, wrong.stdout
    assert "import the hub's key" in wrong.stdout and secrets_absent(wrong)
    missing = cli(*args, "--sas-key", ref(hsm, "nosuchkey"), env=env_of(hsm))
    assert missing.returncode == 1 and "✗ SAS key signs in the token" in missing.stdout
    assert "no secret key with object=nosuchkey" in missing.stdout and "– MQTT CONNECT accepted" in missing.stdout
