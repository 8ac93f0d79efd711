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


# ------------------------------------------------------------------ RFC 7512 parsing (one parser)


from lightclient import keys  # noqa: E402


@pytest.mark.parametrize("uri, attrs, pin, module", [
    # RFC 7512 section 3 examples (those naming a key), plus percent-encoding and the PIN in both places
    ("pkcs11:object=my-pubkey;type=private", {"object": "my-pubkey", "type": "private"}, None, None),
    ("pkcs11:token=The%20Software%20PKCS%2311%20Softtoken;manufacturer=Snake%20Oil,%20Inc.;model=1.0;"
     "object=my-certificate;type=private",
     {"token": "The Software PKCS#11 Softtoken", "manufacturer": "Snake Oil, Inc.", "model": "1.0",
      "object": "my-certificate"}, None, None),
    ("pkcs11:object=my-sign-key;type=private?module-name=mypkcs11", {"object": "my-sign-key"}, None, None),
    ("pkcs11:object=my-sign-key;type=private?module-path=/mnt/libmypkcs11.so.1",
     {"object": "my-sign-key"}, None, "/mnt/libmypkcs11.so.1"),
    ("pkcs11:token=Software%20PKCS%2311%20softtoken;manufacturer=Snake%20Oil,%20Inc.;object=k"
     "?pin-value=the-pin", {"token": "Software PKCS#11 softtoken"}, "the-pin", None),
    ("pkcs11:slot-description=Sun%20Metaslot;object=k", {"slot-description": "Sun Metaslot"}, None, None),
    ("pkcs11:token=a&b;object=k", {"token": "a&b"}, None, None),            # '&' is literal in the path
    ("pkcs11:object=k?pin-value=12%3B34%26x", {"object": "k"}, "12;34&x", None),
    ("pkcs11:object=k;pin-value=in%20path?module-path=/m%20x.so", {"object": "k"}, "in path", "/m x.so"),
    ("pkcs11:object=k?module-path=/m.so&pin-value=1234;5678", {}, "1234;5678", "/m.so"),
    ("pkcs11:object=k?pin-value=a&b&module-path=/m.so", {}, "a&b", "/m.so"),
    ("pkcs11:object=k?pin-value=a b", {}, "a b", None),
    ("pkcs11:object=k?pin-value=a?b", {}, "a?b", None),
    ("pkcs11:object=k;pin-value=12;34?module-path=/m.so", {}, "12;34", "/m.so"),
    ("pkcs11:object=k;id=%01%a2", {"id": "\x01\ufffd"}, None, None),
])
def test_rfc7512_vectors(uri, attrs, pin, module):
    ref = parse_key_ref(uri)
    assert ref.kind == "pkcs11" and ref.needs_engine and not ref.needs_provider
    assert {n: ref.attribute(n) for n in attrs} == attrs
    assert ref.resolve_pin() == pin and ref.module_path == module
    assert ref.has_pin_value == (pin is not None) and ref.needs_pin == (pin is None)
    for text in (ref.target, ref.pkcs11_uri, str(ref), repr(ref)):
        assert "pin-value" not in text or "pin-value=***" in text
        if pin:
            assert pin not in text


def test_id_attribute_as_bytes_and_module_path_in_query_only():
    ref = parse_key_ref("pkcs11:object=k;id=%01%a2?module-path=/m.so")
    assert ref.attribute_bytes("id") == b"\x01\xa2"
    assert ref.target == "pkcs11:object=k;id=%01%a2;type=private"   # values go to OpenSSL as written


@pytest.mark.parametrize("text, expected", [
    ("pkcs11:object=k?pin-value=1234;5678", "pkcs11:object=k?pin-value=***"),
    ("pkcs11:object=k?pin-value=a&b", "pkcs11:object=k?pin-value=***"),
    ("pkcs11:object=k?pin-value=a b", "pkcs11:object=k?pin-value=***"),
    ("pkcs11:object=k?pin-value=a?b", "pkcs11:object=k?pin-value=***"),
    ("pkcs11:object=k?pin-value=a%26b&module-path=/m.so", "pkcs11:object=k?pin-value=***&module-path=/m.so"),
    ("pkcs11:object=k;pin-value=1;2?module-path=/m.so", "pkcs11:object=k;pin-value=***?module-path=/m.so"),
    ("pkcs11:object=k;pin-value=1;2;type=private", "pkcs11:object=k;pin-value=***;type=private"),
    ("pkcs11:object=k?PIN-VALUE=secret", "pkcs11:object=k?PIN-VALUE=***"),
    # free text: the end of a URI is not knowable, so the value runs to the end of the text
    ("cannot load pkcs11:object=k?pin-value=12 34 (refused)", "cannot load pkcs11:object=k?pin-value=***"),
    ("engine:pkcs11:pkcs11:object=k?pin-value=x#y", "engine:pkcs11:pkcs11:object=k?pin-value=***"),
    ("two: pkcs11:object=a?pin-value=1 and pkcs11:object=b?pin-value=2", "two: pkcs11:object=a?pin-value=***"),
    ("no pin here: pkcs11:object=k?module-path=/m.so", "no pin here: pkcs11:object=k?module-path=/m.so"),
])
def test_redact_hides_the_whole_value(text, expected):
    assert redact(text) == expected


@pytest.mark.parametrize("uri", [
    "pkcs11:token=t;objectk?pin-value=abc;def",
    "pkcs11:token=t;bad&x;object=k?pin-value=abc&def",
    "pkcs11:pin-value=abc;def",
    "pkcs11:token=t;object=k;type=cert?pin-value=abc def",
    "engine:pkcs11:pkcs11:token=t?pin-value=abc?def",
    "handle:0xZZ?pin-value=abc;def",
    "provider::pin-value=abc;def",
    "engine:pkcs11?pin-value=abc;def",
])
def test_parser_errors_never_quote_the_pin(uri):
    with pytest.raises(ConfigError) as err:
        parse_key_ref(uri)
    assert "abc" not in str(err.value) and "def" not in str(err.value), str(err.value)


def test_query_errors_never_quote_query_values():
    with pytest.raises(ConfigError, match="expected name=value") as err:
        parse_key_ref("pkcs11:object=k?module-path=/m.so&s3cr3tvalue")
    assert "s3cr3t" not in str(err.value)


@pytest.mark.parametrize("ref, kind, backend, engine, provider, needs_pin", [
    ("pkcs11:token=t;object=k", "pkcs11", "engine", True, False, True),
    ("pkcs11:token=t;object=k?pin-source=/run/pin", "pkcs11", "engine", True, False, False),
    ("engine:pkcs11:pkcs11:token=t;object=k", "engine", "engine", True, False, True),
    ("engine:tpm2tss:0x81000001", "engine", "engine", True, False, True),
    ("store:file:/k.pem", "store", "store", False, True, False),
    ("provider:tpm2:handle:0x81000001", "provider", "store", False, True, False),
    ("handle:0x81000011", "handle", "store", False, True, False),
    ("/etc/dev.key", "file", "file", False, False, False),
    ("file:///etc/dev.key", "file", "file", False, False, False),
])
def test_keyref_properties_per_backend(ref, kind, backend, engine, provider, needs_pin):
    kr = parse_key_ref(ref)
    assert (kr.kind, kr.backend, kr.needs_engine, kr.needs_provider, kr.needs_pin) == (
        kind, backend, engine, provider, needs_pin)
    assert kr.kind in keys.KINDS
    assert (kr.pkcs11_uri is not None) == ("pkcs11:" in ref)
    if kr.pkcs11_uri is None:
        assert kr.attribute("token") is None and kr.attribute_bytes("id") is None
    else:
        assert kr.attribute("token") == "t" and kr.pkcs11_uri.endswith(";type=private")


def test_keyref_redacts_pins_in_every_form():
    for ref in ("store:pkcs11:object=k?pin-value=1234;5678", "provider:pkcs11:pkcs11:object=k?pin-value=1234;5678",
                "engine:e:pkcs11:object=k?pin-value=1234;5678", "pkcs11:object=k?pin-value=1234;5678"):
        kr = parse_key_ref(ref)
        assert "1234" not in str(kr) and "5678" not in str(kr) and "5678" not in repr(kr)
        assert "5678" not in kr.redacted


# ------------------------------------------------------------------ PIN files

def test_pin_file_not_utf8_is_a_pin_error_showing_no_byte(tmp_path):
    f = tmp_path / "pin"
    f.write_bytes(b"12\xff\xfe34\n")
    with pytest.raises(PinError, match="not UTF-8") as err:
        parse_key_ref("pkcs11:object=k").resolve_pin(pin_file=str(f))
    text = str(err.value) + repr(err.value)
    assert "\\xff" not in text and "\xff" not in text and "34" not in text.replace(str(f), "")


@pytest.mark.parametrize("kind", ["dir", "fifo", "dev", "big"])
def test_pin_file_must_be_a_small_regular_file(tmp_path, kind):
    import os

    path = tmp_path / "pin"
    if kind == "dir":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev":
        path = "/dev/zero"
    else:
        path.write_bytes(b"1" * (4096 + 1))
    with pytest.raises(ConfigError, match="regular file|too large") as err:
        keys.read_pin_file(str(path))
    assert str(path) in str(err.value)


# ------------------------------------------------------------------ CSR input (no key needed to refuse it)

class _NotAKey:
    pass


def test_sign_csr_refuses_what_is_not_a_loaded_key():
    with pytest.raises(ConfigError, match="loaded key"):
        keys.sign_csr(_NotAKey(), "dev-1")


def test_pin_file_may_be_a_path_object(tmp_path):
    f = tmp_path / "pin"
    f.write_text("from-path\n")
    assert parse_key_ref("pkcs11:object=k").resolve_pin(pin_file=f) == "from-path"
    with pytest.raises(ConfigError, match="pin_file must be a path"):
        keys.read_pin_file(1234)
