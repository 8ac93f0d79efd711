"""Key reference parsing and PIN handling (no token needed)."""
import pytest

from lightclient.exceptions import ConfigError, PinError
from lightclient.keys import parse_key_ref, redact

PIN = "s3cret-pin"


def test_pkcs11_uri_strips_query_pin_and_module():
    ref = parse_key_ref(f"pkcs11:token=lab;object=dev%20key?pin-value={PIN}&module-path=/usr/lib/m.so")
    assert ref.backend == "engine" and ref.engine_id == "pkcs11"
    assert ref.target == "pkcs11:token=lab;object=dev%20key;type=private"
    assert ref.module_path == "/usr/lib/m.so"
    assert ref.resolve_pin() == PIN
    assert PIN not in repr(ref) and PIN not in str(ref) and PIN not in ref.target


def test_pkcs11_uri_keeps_explicit_type_and_id():
    ref = parse_key_ref("pkcs11:token=t;id=%01%02;type=private")
    assert ref.target == "pkcs11:token=t;id=%01%02;type=private"


@pytest.mark.parametrize("bad, message", [
    ("pkcs11:token=t", "names no key"),
    ("pkcs11:token=t;object=k;type=cert", "must name a private key"),
    ("pkcs11:token=t;objectk", "expected name=value"),
    ("pkcs11:object=k?pin-value", "expected name=value"),
    ("engine:pkcs11", "expected engine:<engine-id>:<key-id>"),
    ("store:", "expected store:<uri>"),
    ("provider::handle:0x81000001", "expected provider:"),
    ("handle:0xZZ", "malformed TPM handle"),
    ("ftp:key", "unknown key reference scheme"),
    ("", "empty"),
    ("key\x00.pem", "NUL"),
])
def test_malformed_references(bad, message):
    with pytest.raises(ConfigError, match=message):
        parse_key_ref(bad)


def test_pin_in_misplaced_path_attribute_is_hidden():
    ref = parse_key_ref(f"pkcs11:token=t;object=k;pin-value={PIN}")
    assert PIN not in ref.target and PIN not in repr(ref) and PIN not in str(ref)
    assert ref.resolve_pin() == PIN


def test_engine_form_with_inner_pkcs11_uri():
    ref = parse_key_ref(f"engine:pkcs11:pkcs11:token=t;object=k?pin-value={PIN}")
    assert (ref.backend, ref.engine_id) == ("engine", "pkcs11")
    assert ref.target == "pkcs11:token=t;object=k;type=private"
    assert ref.resolve_pin() == PIN and PIN not in str(ref)


def test_other_forms():
    assert parse_key_ref("engine:tpm2tss:0x81000001").target == "0x81000001"
    h = parse_key_ref("handle:0x81000011")
    assert (h.backend, h.target, h.providers) == ("store", "handle:0x81000011", ("tpm2",))
    p = parse_key_ref("provider:tpm2,default:file:/k.pem")
    assert (p.backend, p.target, p.providers) == ("store", "file:/k.pem", ("tpm2", "default"))
    assert parse_key_ref("store:file:/k.pem").target == "file:/k.pem"
    assert parse_key_ref("/etc/dev.key").backend == "file"
    assert parse_key_ref("file:///etc/dev.key").target == "/etc/dev.key"


def test_pin_sources_in_priority_order(tmp_path):
    f = tmp_path / "pin"
    f.write_text("from-file\n")
    ref = parse_key_ref(f"pkcs11:token=t;object=k?pin-source=file:{f}")
    assert ref.resolve_pin() == "from-file"
    assert ref.resolve_pin(pin="arg") == "arg"
    assert ref.resolve_pin(pin_callback=lambda: "cb") == "cb"
    assert ref.resolve_pin(pin_file=str(f)) == "from-file"


def test_pin_file_problems(tmp_path):
    ref = parse_key_ref("pkcs11:token=t;object=k")
    with pytest.raises(PinError, match="cannot read the PIN file"):
        ref.resolve_pin(pin_file=str(tmp_path / "absent"))
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(PinError, match="empty"):
        ref.resolve_pin(pin_file=str(empty))
    with pytest.raises(ConfigError, match="must return"):
        ref.resolve_pin(pin_callback=lambda: 1234)


def test_redact():
    assert redact(f"pkcs11:object=k?pin-value={PIN}&x=1") == "pkcs11:object=k?pin-value=***&x=1"
