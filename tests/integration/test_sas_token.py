"""SAS keys in a real SoftHSM2 token: import, generate, sign, derive; the key never comes back out.

Every PKCS#11 call runs in a child (lightclient.token.run_in_child / TokenKey), pointed at a private
SoftHSM directory through its environment, so this process never loads the module.
"""
import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lightclient import sas
from lightclient.exceptions import ConfigError, KeyNotFoundError, PinError
from lightclient.symkey import SasCredential, SoftwareKey, TokenKey
from lightclient.token import run_in_child
from tests import lab

PIN, SO_PIN = "sas-pin-8231", "sas-so-9911"
KEY = json.loads((Path(__file__).parents[1] / "vectors" / "sas.json").read_text())["key"]
SPY = "/usr/lib/x86_64-linux-gnu/pkcs11-spy.so"


@pytest.fixture(scope="module")
def hsm(tmp_path_factory):
    h = lab.SoftHSM(tmp_path_factory.mktemp("sas-hsm"))
    h.init_token("sas", PIN, SO_PIN)
    run_in_child("import-secret", module_path=h.module_path, token_label="sas", key_label="dev", key_b64=KEY,
                 pin=PIN, env=h.env)
    return h


def _ref(h, label="dev"):
    return f"pkcs11:token=sas;object={label}?module-path={h.module_path}"


def _attributes(h, label):
    """CKA_SENSITIVE, CKA_EXTRACTABLE and what C_GetAttributeValue(CKA_VALUE) answers, read in a child."""
    code = f"""
import json, pkcs11
from pkcs11 import Attribute, ObjectClass
tok = pkcs11.lib({h.module_path!r}).get_token(token_label="sas")
with tok.open(user_pin={PIN!r}) as s:
    (k,) = s.get_objects({{Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: {label!r}}})
    try:
        k[Attribute.VALUE]; value = "READ"
    except pkcs11.exceptions.AttributeSensitive:
        value = "CKR_ATTRIBUTE_SENSITIVE"
    print(json.dumps([k[Attribute.SENSITIVE], k[Attribute.EXTRACTABLE], k[Attribute.SIGN], k[Attribute.ENCRYPT],
                      k[Attribute.DERIVE], k[Attribute.KEY_TYPE] == pkcs11.KeyType.GENERIC_SECRET, value]))
"""
    out = subprocess.run([sys.executable, "-c", code], env=h.env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_imported_key_signs_like_the_reference_and_cannot_be_read_back(hsm):
    assert _attributes(hsm, "dev") == [True, False, True, False, False, True, "CKR_ATTRIBUTE_SENSITIVE"]
    cred = SasCredential.for_identity(__import__("lightclient").Identity("myhub.azure-devices.net", "device-1"),
                                      TokenKey(_ref(hsm), pin=PIN, env=hsm.env), clock=lambda: 1700000000 - 3600)
    case = json.loads((Path(__file__).parents[1] / "vectors" / "sas.json").read_text())["tokens"][0]
    assert str(cred.current()) == case["token"]
    assert PIN not in repr(cred) and KEY not in repr(cred) and "sig=" not in repr(cred.current())


def test_generated_key_is_sensitive_and_signs(hsm):
    info = run_in_child("keygen-secret", module_path=hsm.module_path, token_label="sas", key_label="gen",
                        pin=PIN, env=hsm.env)
    assert info["key_type"] == "HMAC"
    assert _attributes(hsm, "gen")[:3] == [True, False, True]
    sig = TokenKey(_ref(hsm, "gen"), pin=PIN, env=hsm.env).sign(b"hello")
    assert len(sig) == 32


def test_group_key_derivation_happens_in_the_token(hsm):
    run_in_child("import-secret", module_path=hsm.module_path, token_label="sas", key_label="group", key_b64=KEY,
                 pin=PIN, env=hsm.env)
    reg = "sn-007-888-abc-mac-a1-b2-c3-d4-e5-f6"
    run_in_child("derive-secret", module_path=hsm.module_path, token_label="sas", registration_id=reg,
                 new_label="derived", group_label="group", pin=PIN, env=hsm.env)
    assert _attributes(hsm, "derived")[:2] == [True, False]
    derived = TokenKey(_ref(hsm, "derived"), pin=PIN, env=hsm.env)
    reference = SoftwareKey(sas.derive_device_key(KEY, reg))
    assert derived.sign(b"msg\n1") == reference.sign(b"msg\n1")


def test_lightclient_never_asks_for_cka_value(hsm, tmp_path):
    """Through pkcs11-spy: import, sign and derive issue no C_GetAttributeValue for CKA_VALUE."""
    log = tmp_path / "spy.log"
    env = {**hsm.env, "PKCS11SPY": hsm.module_path, "PKCS11SPY_OUTPUT": str(log)}
    run_in_child("import-secret", module_path=SPY, token_label="sas", key_label="spied", key_b64=KEY, pin=PIN, env=env)
    TokenKey(f"pkcs11:token=sas;object=spied?module-path={SPY}", pin=PIN, env=env).sign(b"x")
    run_in_child("derive-secret", module_path=SPY, token_label="sas", registration_id="r-1", new_label="spied-d",
                 group_label="spied", pin=PIN, env=env)
    text = log.read_text(errors="replace")
    assert "C_Sign" in text and "C_CreateObject" in text  # the spy saw the calls
    calls = re.split(r"\n(?=\d+: C_\w+\n)", text)
    reads = [c for c in calls if re.match(r"\d+: C_GetAttributeValue\n", c)]
    assert reads, "expected attribute reads (the sensitivity checks)"
    assert not [c for c in reads if re.search(r"CKA_VALUE\s", c)]
    # CKA_VALUE is only ever written: the imported key and the derived key, in C_CreateObject.
    writes = [c for c in calls if re.search(r"CKA_VALUE\s", c)]
    assert len(writes) == 2 and all(re.match(r"\d+: C_CreateObject\n", c) for c in writes)


def test_wrong_key_and_pin_are_typed_errors_without_secrets(hsm):
    with pytest.raises(KeyNotFoundError, match="no secret key with object=nope") as info:
        TokenKey(_ref(hsm, "nope"), pin=PIN, env=hsm.env).sign(b"x")
    assert PIN not in str(info.value)
    with pytest.raises(PinError) as info:
        TokenKey(_ref(hsm), pin="wrong-pin-1", env=hsm.env).sign(b"x")
    assert "wrong-pin-1" not in str(info.value)
    with pytest.raises(ConfigError) as info:
        run_in_child("import-secret", module_path=hsm.module_path, token_label="sas", key_label="bad",
                     key_b64="c2VjcmV0LXNlY3JldC1zZWNy!!", pin=PIN, env=hsm.env)
    assert "c2VjcmV0" not in str(info.value)
    with pytest.raises(ConfigError, match="already holds a secret key"):
        run_in_child("import-secret", module_path=hsm.module_path, token_label="sas", key_label="dev",
                     key_b64=KEY, pin=PIN, env=hsm.env)


def test_a_secret_key_is_not_an_x509_key(hsm):
    from lightclient import keys

    with pytest.raises(ConfigError, match="secret \\(HMAC\\) key"):
        keys.load_key(f"pkcs11:token=sas;object=dev;type=secret-key?pin-value=1&module-path={hsm.module_path}")
    with pytest.raises(ConfigError, match="names a private key"):
        TokenKey(f"pkcs11:token=sas;object=dev;type=private?module-path={hsm.module_path}", pin=PIN)
