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
import subprocess
import sys
from pathlib import Path

import pytest


from lightclient.exceptions import KeyLoadError
from lightclient.symkey import SasCredential, TokenKey
from lightclient.token import run_in_child
from tests import lab

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


def test_tpm2_pkcs11_signs_sas_with_an_imported_hmac_key(tpm, tmp_path):
    raw = tmp_path / "key.bin"
    raw.write_bytes(base64.b64decode(VECTORS["key"]))
    raw.chmod(0o600)
    # Lab only: tpm2_ptool takes the PIN on its command line; the key file is deleted right after.
    subprocess.run(["tpm2_ptool", "import", "--label", "tpmsas", "--key-label", "dev", "--userpin", PIN,
                    "--algorithm", "hmac:sha256", "--privkey", str(raw)], env=tpm.env, cwd=tpm.root, check=True,
                   capture_output=True)
    raw.unlink()
    key = TokenKey(f"pkcs11:token=tpmsas;object=dev?module-path={tpm.token.module_path}", pin=PIN, env=tpm.env)
    case = VECTORS["tokens"][0]
    cred = SasCredential(key, case["uri"], clock=lambda: case["expiry"] - 3600)
    assert str(cred.current()) == case["token"]
    code = f"""
import json, pkcs11
from pkcs11 import Attribute, ObjectClass
tok = pkcs11.lib({tpm.token.module_path!r}).get_token(token_label="tpmsas")
with tok.open(user_pin={PIN!r}, rw=True) as s:
    (k,) = s.get_objects({{Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: "dev"}})
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
    sensitive, extractable, value, fixed = json.loads(out.stdout)
    # tpm2_ptool import marks the key CKA_EXTRACTABLE; it can (and should) be turned off afterwards.
    assert fixed == "set" and sensitive is True and extractable is False
    # tpm2-pkcs11 answers CKA_VALUE with an empty value instead of CKR_ATTRIBUTE_SENSITIVE: no key bytes.
    assert value in ("", "AttributeSensitive")
    assert base64.b64decode(VECTORS["key"]).hex() not in out.stdout


def test_tpm2_pkcs11_cannot_create_hmac_keys_through_pkcs11(tpm):
    """Documented limitation (module docstring): the typed error says what the token refused."""
    with pytest.raises(KeyLoadError, match="refused to import an HMAC key"):
        run_in_child("import-secret", module_path=tpm.token.module_path, token_label="tpmsas", key_label="x",
                     key_b64=VECTORS["key"], pin=PIN, env=tpm.env)
    with pytest.raises(KeyLoadError, match="cannot generate an HMAC key"):
        run_in_child("keygen-secret", module_path=tpm.token.module_path, token_label="tpmsas", key_label="y",
                     pin=PIN, env=tpm.env)
