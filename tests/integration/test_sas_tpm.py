"""SAS keys on the TPM through tpm2-pkcs11 (1.9, Debian 12).

What tpm2-pkcs11 supports, found here: C_Sign with CKM_SHA256_HMAC on an HMAC key works (the module lists
SHA256-HMAC, hw, sign), but C_CreateObject of a CKK_GENERIC_SECRET key is refused (CKR_ATTRIBUTE_VALUE_INVALID)
and C_GenerateKey is not implemented (CKR_FUNCTION_NOT_SUPPORTED). So on the TPM the key is put in with
``tpm2_ptool import --algorithm hmac:sha256 --privkey FILE`` (or created with ``tpm2_ptool addkey``), and
lightclient signs SAS tokens with it through PKCS#11 like on any token. tpm2_ptool import leaves the key
CKA_EXTRACTABLE (set it to false afterwards, as below); CKA_VALUE reads back empty, never the key.
"""
import base64
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from lightclient import dps, tls
from lightclient.backoff import Backoff
from lightclient.device import Device
from lightclient.emulator.service import Emulator
from lightclient.exceptions import KeyLoadError
from lightclient.identity import Identity
from lightclient.symkey import SasCredential, TokenKey
from lightclient.token import run_in_child
from tests import lab
from tests.lab import free_port

PIN, SO_PIN = "tpmsas-1234", "tpmsas-so-5678"
VECTORS = json.loads((Path(__file__).parents[1] / "vectors" / "sas.json").read_text())


@pytest.fixture(scope="module")
def tpm(tmp_path_factory):
    root = tmp_path_factory.mktemp("tpm-sas")
    with lab.SoftwareTPM(root) as t:
        token = lab.Tpm2Pkcs11Token(t)
        token.init_token("tpmsas", PIN, SO_PIN)
        t.token = token
        yield t


def _import_hmac_key(tpm, label, key_b64, tmp_path):
    """``tpm2_ptool import --algorithm hmac:sha256``, then CKA_EXTRACTABLE switched off through PKCS#11; returns
    (sensitive, extractable, CKA_VALUE as read, how the switch went, the child's whole output)."""
    raw = tmp_path / f"{label}.bin"
    raw.write_bytes(base64.b64decode(key_b64))
    raw.chmod(0o600)
    # Lab only: tpm2_ptool takes the PIN on its command line; the key file is deleted right after.
    subprocess.run(["tpm2_ptool", "import", "--label", "tpmsas", "--key-label", label, "--userpin", PIN,
                    "--algorithm", "hmac:sha256", "--privkey", str(raw)], env=tpm.env, cwd=tpm.root, check=True,
                   capture_output=True)
    raw.unlink()
    code = f"""
import json, pkcs11
from pkcs11 import Attribute, ObjectClass
tok = pkcs11.lib({tpm.token.module_path!r}).get_token(token_label="tpmsas")
with tok.open(user_pin={PIN!r}, rw=True) as s:
    (k,) = s.get_objects({{Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: {label!r}}})
    try:
        k[Attribute.EXTRACTABLE] = False
        fixed = "set"
    except pkcs11.exceptions.PKCS11Error as exc:
        fixed = type(exc).__name__
    try:
        value = k[Attribute.VALUE].hex()
    except pkcs11.exceptions.PKCS11Error as exc:
        value = type(exc).__name__
    print(json.dumps([k[Attribute.SENSITIVE], k[Attribute.EXTRACTABLE], value, fixed]))
"""
    out = subprocess.run([sys.executable, "-c", code], env=tpm.env, capture_output=True, text=True, check=True)
    return (*json.loads(out.stdout), out.stdout)


def _tpm_key(tpm, label):
    return TokenKey(f"pkcs11:token=tpmsas;object={label}?module-path={tpm.token.module_path}", pin=PIN, env=tpm.env)


def test_tpm2_pkcs11_signs_sas_with_an_imported_hmac_key(tpm, tmp_path):
    sensitive, extractable, value, fixed, output = _import_hmac_key(tpm, "dev", VECTORS["key"], tmp_path)
    case = VECTORS["tokens"][0]
    cred = SasCredential(_tpm_key(tpm, "dev"), case["uri"], clock=lambda: case["expiry"] - 3600)
    assert str(cred.current()) == case["token"]
    # tpm2_ptool import marks the key CKA_EXTRACTABLE; it can (and should) be turned off afterwards.
    assert fixed == "set" and sensitive is True and extractable is False
    # tpm2-pkcs11 answers CKA_VALUE with an empty value instead of CKR_ATTRIBUTE_SENSITIVE: no key bytes.
    assert value in ("", "AttributeSensitive")
    assert base64.b64decode(VECTORS["key"]).hex() not in output


def test_tpm_held_key_provisions_and_runs_a_device_end_to_end(tpm, tmp_path, caplog):
    """The key in the TPM (tpm2-pkcs11) for everything: DPS individual enrollment over HTTPS, then the hub
    over MQTT with a SAS signed in the TPM: telemetry, twin get and patch, a direct method; file upload."""
    caplog.set_level(logging.DEBUG)
    key_b64 = base64.b64encode(b"tpm-held-device-key-0123456789ab").decode()
    assert _import_hmac_key(tpm, "e2e", key_b64, tmp_path)[1] is False       # not extractable
    key = _tpm_key(tpm, "e2e")
    with Emulator(tmp_path / "emu", hostname="localhost", port=free_port()) as emu:
        emu.start_dps(group=None, polls=1)
        emu.dps.add_symmetric_individual("tpm-sas-1", key_b64, assigned_hub="localhost")
        result = dps.provision(emu.dps.id_scope, "tpm-sas-1", endpoint=emu.dps.endpoint,
                               ssl_context=tls.server_context(ca=emu.ca_path, alpn=["http/1.1"]),
                               sas=SasCredential.for_dps(emu.dps.id_scope, "tpm-sas-1", key),
                               poll_interval=(0.05, 0.2), timeout=30)
        assert (result.status, result.assigned_hub, result.device_id) == ("assigned", "localhost", "tpm-sas-1")
        identity = Identity(result.assigned_hub, result.device_id)
        dev = Device(identity, tls.server_context(ca=emu.ca_path), host="127.0.0.1", port=emu.port,
                     sas=SasCredential.for_identity(identity, key), twin_timeout=10,
                     backoff=Backoff(initial=0.05, maximum=0.5, not_authorized=1.0))
        dev.add_method_handler("ping", lambda payload: {"pong": payload})
        with dev:
            dev.send_and_wait(b'{"from": "tpm"}', timeout=15)
            (event,) = emu.wait_for_events(1, "tpm-sas-1")
            assert event.body == b'{"from": "tpm"}'
            assert dev.patch_reported({"held": "tpm"}, timeout=10) >= 1
            assert dev.get_twin(timeout=10)["reported"]["held"] == "tpm"
            answer = emu.invoke_method("tpm-sas-1", "ping", 3, timeout=10)
            assert (answer.status, answer.payload) == (200, {"pong": 3})
        files = emu.start_file_upload()
        (tmp_path / "log.txt").write_bytes(b"uploaded with a TPM-held key\n")
        uploaded = dev.upload_file(str(tmp_path / "log.txt"), "log.txt", endpoint=f"localhost:{files.port}")
        assert files.blob.read(uploaded.blob_name) == b"uploaded with a TPM-held key\n"
        assert not emu.diagnostics("tpm-sas-1"), emu.diagnostics("tpm-sas-1")
        assert emu.registry.get("tpm-sas-1").keys == (key_b64,)
    text = caplog.text
    assert PIN not in text and key_b64 not in text and "SharedAccessSignature" not in text


def test_tpm2_pkcs11_cannot_create_hmac_keys_through_pkcs11(tpm):
    """Documented limitation (module docstring): the typed error says what the token refused."""
    with pytest.raises(KeyLoadError, match="refused to import an HMAC key"):
        run_in_child("import-secret", module_path=tpm.token.module_path, token_label="tpmsas", key_label="x",
                     key_b64=VECTORS["key"], pin=PIN, env=tpm.env)
    with pytest.raises(KeyLoadError, match="cannot generate an HMAC key"):
        run_in_child("keygen-secret", module_path=tpm.token.module_path, token_label="tpmsas", key_label="y",
                     pin=PIN, env=tpm.env)
