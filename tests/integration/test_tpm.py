"""Real TPM 2.0 chains: swtpm + tpm2-abrmd, then lightclient through tpm2-pkcs11 (libp11 engine)
and through the tpm2-openssl provider (OSSL_STORE), and an engine-free build of the shim.

Every chain runs in a child process (tests/integration/tpm_child.py): OpenSSL allows one libp11
engine instance per process and this one is bound to SoftHSM, and the tpm2 provider serves a whole
process once loaded. This process owns the services (TPM, mosquitto, DPS emulator) and asserts on
what the child reports. The TPM is started once per module and every process is stopped by PID.
"""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import lab
from lightclient.emulator import certs
from lightclient.emulator.dps import DpsEmulator

from ..conftest import PIN, SO_PIN

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "lc-tpm"
SCOPE = "0ne00000007"
HUB = "hub-tpm.localhost"
H_RSA, H_EC = 0x81000010, 0x81000011
VERSIONS = ("1.2", "1.3")


@pytest.fixture(scope="module")
def tpm(tmp_path_factory):
    root = tmp_path_factory.mktemp("tpm")
    with lab.SoftwareTPM(root) as t:
        token = lab.Tpm2Pkcs11Token(t)
        token.init_token(TOKEN, PIN, SO_PIN)
        t.token = token
        t.p11 = {name: token.keygen(TOKEN, PIN, f"{name}key", kt)
                 for name, kt in (("rsa", "rsa-2048"), ("ec", "ec-p256"))}
        t.handles = {"rsa": t.persistent_key(H_RSA, "rsa"), "ec": t.persistent_key(H_EC, "ec")}
        t.files = {kind: str(t.tss2_key_file(root / f"{kind}.tss2.pem", kind)) for kind in ("rsa", "ec")}
        yield t
    # Nothing that was started for this TPM may outlive it: look for any process whose command line
    # names the TPM's directory (swtpm's state, the D-Bus socket) or swtpm's port (abrmd's TCTI).
    assert _processes_mentioning(str(root)) == []
    assert _processes_mentioning(f"port={t.port}") == []


def _processes_mentioning(text):
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmdline = fh.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        if text in cmdline and int(pid) != os.getpid():
            found.append((int(pid), cmdline.strip()))
    return found


@pytest.fixture(scope="module")
def services(test_ca, tmp_path_factory):
    """mosquitto (client certificates required) and the DPS emulator with a group enrollment."""
    emu = DpsEmulator(ca=certs.CertificateAuthority(test_ca.cert, test_ca.key), server_cert=test_ca.server_cert,
                      server_key=test_ca.server_key, id_scope=SCOPE, retry_after=1)
    emu.add_group("tpm-devices", test_ca.cert.read_bytes(), assigned_hub=HUB, polls=1)
    with lab.Mosquitto(tmp_path_factory.mktemp("tpm-mosquitto"), test_ca) as broker, emu:
        yield broker, emu


def _run_child(tpm, test_ca, services, tmp_path, spec, pythonpath_first=None):
    broker, emu = services
    spec = {"pin": PIN, "ca_root": str(test_ca.root), "out": str(tmp_path), "mqtt_port": broker.port,
            "dps_endpoint": emu.endpoint, "scope": SCOPE, **spec}
    if pythonpath_first:
        spec["import_check"] = str(pythonpath_first)
    env = {k: v for k, v in tpm.env.items() if k != "SOFTHSM2_CONF"}
    proc = subprocess.run([sys.executable, "-m", "tests.integration.tpm_child"], input=json.dumps(spec),
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert PIN not in proc.stdout.replace(f'"pin": "{PIN}"', "")
    return json.loads(proc.stdout)


def _cells(prefix, refs, dps=True):
    return [{"name": f"{prefix}-{kind}-{v}", "key": ref, "cn": f"{prefix}-{kind}", "tls": v, "dps": dps}
            for kind, ref in refs.items() for v in VERSIONS]


def _assert_cells(out, cells, broker, emu):
    log = broker.log()
    for cell in cells:
        r = out["cells"][cell["name"]]
        assert r["ok"], f"{cell['name']}: {r.get('error')}\n{r.get('trace', '')}"
        assert r["puback"] is True
        assert r["version"] == f"TLSv{cell['tls']}"
        assert r["key_type"] == ("EC" if "-ec" in cell["name"] else "RSA")
        # The broker authenticated the client by the certificate the TPM key proved.
        assert f"u'{cell['cn']}'" in log
        if cell["dps"]:
            assert r["dps"] == {"status": "assigned", "hub": HUB, "device_id": cell["cn"]}
            assert emu.handshakes.get(cell["cn"], 0) >= 1


def test_token_keys_made_through_pkcs11(tpm):
    """The token and both keys came from PKCS#11 (C_InitToken; generate_keypair where tpm2-pkcs11 allows)."""
    assert tpm.p11["rsa"]["via"] == "lightclient.token.generate_keypair"
    # tpm2-pkcs11 1.9 refuses generate_keypair's EC public template (CKA_VERIFY mismatch); the
    # fallback is the same C_GenerateKeyPair with those attributes left to the module.
    assert tpm.p11["ec"]["via"] in ("lightclient.token.generate_keypair",
                                    "pkcs11 C_GenerateKeyPair, module-chosen public attributes")
    out = tpm.tools("tpm2_getcap", "handles-persistent")
    for handle in ("0x81000001", "0x81000010", "0x81000011"):
        assert handle in out.lower()
    for path in tpm.files.values():
        assert Path(path).read_bytes().startswith(b"-----BEGIN TSS2 PRIVATE KEY-----")


def test_chain1_tpm2_pkcs11_engine(tpm, test_ca, services, tmp_path):
    """TPM -> tpm2-pkcs11 -> libp11 engine: RSA and EC, TLS 1.2 and 1.3, MQTT and DPS; typed errors."""
    broker, emu = services
    refs = {kind: tpm.token.uri(info) for kind, info in tpm.p11.items()}
    mod = tpm.token.module_path
    cells = _cells("c1", refs)
    errors = [
        {"name": "wrong_pin", "key": refs["ec"], "pin": "0000-wrong"},
        {"name": "missing_key", "key": f"pkcs11:token={TOKEN};object=nokey;type=private?module-path={mod}",
         "pin": PIN},
        {"name": "missing_token", "key": f"pkcs11:token=notoken;object=eckey;type=private?module-path={mod}",
         "pin": PIN},
    ]
    out = _run_child(tpm, test_ca, services, tmp_path, {"cells": cells, "errors": errors, "timing": {"rounds": 5}})
    _assert_cells(out, cells, broker, emu)
    assert out["errors"]["wrong_pin"]["raised"] == "PinError"
    assert out["errors"]["missing_key"]["raised"] == "KeyNotFoundError"
    assert out["errors"]["missing_token"]["raised"] == "TokenNotFoundError"
    for e in out["errors"].values():
        assert PIN not in e["message"] and "0000-wrong" not in e["message"]
    print("chain1 handshake ms:", {c["name"]: out["cells"][c["name"]]["handshake_ms"] for c in cells})


def test_chain2_tpm2_provider(tpm, test_ca, services, tmp_path):
    """TPM -> tpm2 provider -> OSSL_STORE: handle: keys and TSS2 PEM files, RSA and EC, TLS 1.2 and 1.3."""
    broker, emu = services
    cells = _cells("c2h", tpm.handles) + _cells("c2f", tpm.files)
    errors = [{"name": "missing_handle", "key": "handle:0x81000099"}]
    out = _run_child(tpm, test_ca, services, tmp_path,
                     {"cells": cells, "errors": errors, "timing": {"rounds": 5}})
    _assert_cells(out, cells, broker, emu)
    assert out["errors"]["missing_handle"]["raised"] == "KeyNotFoundError"
    ms = [out["cells"][c["name"]]["handshake_ms"] for c in cells]
    print("chain2 handshake ms (propq ?tpm2.signature):", ms)
    # The tpm2 provider signs; it does not hash or draw random numbers for the handshake
    # (?provider=tpm2 costs 190-330 ms per handshake on this swtpm; generous bound for slow CI).
    assert sorted(ms)[len(ms) // 2] < 150


def test_chain2_with_provider_wide_propq(tpm, test_ca, services, tmp_path):
    """The hsm-stacks.md trick, propq=?provider=tpm2: works, but every handshake hashes in the TPM.

    Measured for comparison with the library default (?tpm2.signature). In this mode EC over
    TLS 1.2 also depends on the context being made before the provider loads, which a process
    that signs a CSR first cannot do ("wrong curve"), so that cell is reported, not asserted.
    """
    broker, emu = services
    cells = [{"name": "c2p-rsa-1.2", "key": tpm.handles["rsa"], "cn": "c2p-rsa", "tls": "1.2", "dps": False},
             {"name": "c2p-ec-1.3", "key": tpm.handles["ec"], "cn": "c2p-ec", "tls": "1.3", "dps": False}]
    probe = {"name": "c2p-ec-1.2", "key": tpm.handles["ec"], "cn": "c2p-ec", "tls": "1.2", "dps": False}
    out = _run_child(tpm, test_ca, services, tmp_path,
                     {"cells": cells + [probe], "propq": "?provider=tpm2", "timing": {"rounds": 3}})
    _assert_cells(out, cells, broker, emu)
    print("chain2 handshake ms (propq ?provider=tpm2):",
          {c["name"]: out["cells"][c["name"]]["handshake_ms"] for c in cells},
          "EC/TLS1.2:", out["cells"]["c2p-ec-1.2"].get("error", "ok"))


@pytest.fixture(scope="module")
def engine_free_build(tmp_path_factory):
    """lightclient with a shim compiled with OPENSSL_NO_ENGINE, in a directory of its own."""
    root = tmp_path_factory.mktemp("no-engine")
    shutil.copytree(ROOT / "lightclient", root / "lightclient",
                    ignore=shutil.ignore_patterns("_shim*.so", "__pycache__"))
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import build_shim; "
            "build_shim.ffibuilder.compile(tmpdir='.')")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code, str(ROOT / "native")], cwd=root, capture_output=True,
                          text=True, env={**os.environ, "LIGHTCLIENT_NO_ENGINE": "1"}, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert time.monotonic() - t0 < 20
    assert list((root / "lightclient").glob("_shim*.so"))
    return root


def test_engine_free_build_provider_path(engine_free_build, tpm, test_ca, services, tmp_path):
    """Where engines are gone: the provider cells pass, and an engine reference says why it cannot."""
    broker, emu = services
    cells = _cells("nx", {"ec": tpm.handles["ec"], "rsa": tpm.files["rsa"]})
    errors = [{"name": "engine_ref", "key": tpm.token.uri(tpm.p11["ec"]), "pin": PIN}]
    out = _run_child(tpm, test_ca, services, tmp_path, {"cells": cells, "errors": errors},
                     pythonpath_first=engine_free_build)
    assert out["engine_support"] is False
    assert out["shim"].startswith(str(engine_free_build))
    _assert_cells(out, cells, broker, emu)
    err = out["errors"]["engine_ref"]
    assert err["raised"] == "BackendUnavailableError"
    assert "built without ENGINE support" in err["message"]
