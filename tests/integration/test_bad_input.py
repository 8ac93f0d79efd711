"""Bad input, one test each: a typed LightClientError with a helpful message, the process survives,
and the PIN appears in no exception text, repr, log line or anything written to stdout/stderr.
"""
import logging
import ssl

import pytest

from lightclient import _native, keys, tls
from lightclient.exceptions import (
    BackendUnavailableError,
    CertificateError,
    KeyMismatchError,
    KeyNotFoundError,
    LightClientError,
    ModuleLoadError,
    PinError,
    TokenNotFoundError,
)

from ..conftest import PIN

WRONG_PIN = "wrong-9d2c"


@pytest.fixture
def fresh_token(softhsm):
    return softhsm.fresh_uri


def _assert_clean(exc_info, capfd, caplog, *secrets):
    err = exc_info.value
    assert isinstance(err, LightClientError)
    captured = capfd.readouterr()
    texts = [str(err), repr(err), captured.out, captured.err, caplog.text,
             "\n".join(getattr(err, "openssl_errors", ()))]
    for secret in secrets + (PIN,):
        for text in texts:
            assert secret not in text


@pytest.fixture(autouse=True)
def _log_everything(caplog):
    caplog.set_level(logging.DEBUG)


def test_wrong_pin(fresh_token, softhsm, capfd, caplog):
    with pytest.raises(PinError, match="refused") as exc_info:
        keys.load_key(fresh_token, pin=WRONG_PIN)
    _assert_clean(exc_info, capfd, caplog, WRONG_PIN)


def test_wrong_pin_in_uri(fresh_token, softhsm, capfd, caplog):
    uri = f"{fresh_token}&pin-value={WRONG_PIN}"
    with pytest.raises(PinError) as exc_info:
        keys.load_key(uri)
    _assert_clean(exc_info, capfd, caplog, WRONG_PIN)
    assert "pin-value=***" in str(exc_info.value) or "pin-value" not in str(exc_info.value)


def test_missing_pin(fresh_token, softhsm, capfd, caplog):
    with pytest.raises(PinError, match="needs a PIN"):
        keys.load_key(fresh_token)


def test_unknown_token(softhsm, capfd, caplog):
    with pytest.raises(TokenNotFoundError, match="no token labelled 'no-such-token'") as exc_info:
        keys.load_key("pkcs11:token=no-such-token;object=eckey", module_path=softhsm.module_path, pin=PIN)
    assert "lc-test" in str(exc_info.value)  # names the tokens that are there
    _assert_clean(exc_info, capfd, caplog)


def test_unknown_object_label(softhsm, device, capfd, caplog):
    with pytest.raises(KeyNotFoundError, match="no private key matches") as exc_info:
        keys.load_key("pkcs11:token=lc-test;object=no-such-key", module_path=softhsm.module_path, pin=PIN)
    assert not isinstance(exc_info.value, TokenNotFoundError)
    _assert_clean(exc_info, capfd, caplog)


def test_missing_module_path(capfd, caplog):
    with pytest.raises(ModuleLoadError, match="does not exist") as exc_info:
        keys.load_key("pkcs11:token=lc-test;object=eckey", module_path="/nonexistent/libpkcs11.so", pin=PIN)
    _assert_clean(exc_info, capfd, caplog)


def _child(code: str, env):
    """Run code in a fresh process: the engine in this one is already bound to SoftHSM."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)


NOT_PKCS11 = "/lib/x86_64-linux-gnu/libz.so.1"


def test_wrong_module_path(softhsm, device):
    """A library that is not a PKCS#11 module: a clear error, the process lives on, and the
    engine is not left bound to the wrong module (the right one still works afterwards)."""
    import os

    assert os.path.exists(NOT_PKCS11)
    code = f"""
from lightclient import keys
from lightclient.exceptions import ModuleLoadError
try:
    keys.load_key("pkcs11:token=lc-test;object=eckey", module_path={NOT_PKCS11!r}, pin={PIN!r})
except ModuleLoadError as exc:
    print("MODULE-ERROR", exc)
key = keys.load_key({device["ec"]["uri"]!r}, pin={PIN!r})
print("THEN-LOADED", key.key_type)
"""
    proc = _child(code, softhsm.env)
    assert proc.returncode == 0, proc.stderr
    assert "MODULE-ERROR the PKCS#11 module '/lib/x86_64-linux-gnu/libz.so.1' could not be loaded" in proc.stdout
    assert "THEN-LOADED EC" in proc.stdout
    assert PIN not in proc.stdout + proc.stderr


def test_second_module_in_one_process_is_refused(softhsm, device, capfd, caplog):
    # This process's engine serves SoftHSM (the device fixture loaded keys through it).
    with pytest.raises(ModuleLoadError, match="already serves") as exc_info:
        keys.load_key("pkcs11:token=x;object=y", module_path=NOT_PKCS11, pin=PIN)
    _assert_clean(exc_info, capfd, caplog)


def test_unknown_engine_id(capfd, caplog):
    with pytest.raises(BackendUnavailableError, match="engine 'nosuchengine' is not available") as exc_info:
        keys.load_key("engine:nosuchengine:some-key", pin=PIN)
    assert isinstance(exc_info.value, ImportError)
    _assert_clean(exc_info, capfd, caplog)


def test_certificate_does_not_match_key(device, test_ca, capfd, caplog):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    with pytest.raises(KeyMismatchError, match="does not belong to the private key") as exc_info:
        tls.client_context(cert=device["rsa"]["cert"], key=device["ec"]["uri"], pin=PIN, ca=test_ca.cert)
    _assert_clean(exc_info, capfd, caplog)
    # A refused pair leaves the user's context untouched and usable.
    with pytest.raises(KeyMismatchError):
        tls.attach_key(ctx, cert=device["rsa"]["cert"], key=device["ec"]["key"])
    tls.attach_key(ctx, cert=device["ec"]["cert"], key=device["ec"]["key"])


def test_missing_certificate_file(device, tmp_path, capfd, caplog):
    with pytest.raises(CertificateError, match="cannot read the certificate file") as exc_info:
        tls.client_context(cert=tmp_path / "absent.pem", key=device["ec"]["key"])
    _assert_clean(exc_info, capfd, caplog)


def test_garbage_certificate_file(device, tmp_path, capfd, caplog):
    bad = tmp_path / "garbage.pem"
    bad.write_bytes(b"this is not a certificate\x00\xff")
    with pytest.raises(CertificateError, match="holds no PEM certificate"):
        tls.client_context(cert=bad, key=device["ec"]["key"])
    # PEM armour around garbage gets past the cheap check and is refused by OpenSSL.
    bad.write_bytes(b"-----BEGIN CERTIFICATE-----\nAAAAnotbase64!!\n-----END CERTIFICATE-----\n")
    with pytest.raises(CertificateError, match="holds no PEM certificate") as exc_info:
        tls.client_context(cert=bad, key=device["ec"]["key"])
    _assert_clean(exc_info, capfd, caplog)


@pytest.mark.parametrize("thing", [None, 42, "ssl.SSLContext", object(), ssl.TLSVersion.TLSv1_2])
def test_not_an_sslcontext(thing, device):
    with pytest.raises(TypeError, match="expected an ssl.SSLContext"):
        _native.install(thing, device["ec"]["key"], device["ec"]["cert"].read_bytes())
    with pytest.raises(TypeError):
        _native.check_context(thing)


def test_shim_itself_refuses_non_contexts(device):
    """The C side checks the type too: a non-context address never gets dereferenced as one."""
    from lightclient import _shim

    ffi, lib = _shim.ffi, _shim.lib
    for thing in (object(), b"bytes", [1, 2, 3], ssl.create_default_context().cert_store_stats):
        assert lib.lc_ctx_check(ffi.cast("void *", id(thing)), 0) == lib.LC_E_TYPE
    ctx = ssl.create_default_context()
    assert lib.lc_ctx_check(ffi.cast("void *", id(ctx)), int(ctx.options)) == lib.LC_OK
    # A pointer that does not prove itself (wrong options) is refused before use.
    assert lib.lc_ctx_check(ffi.cast("void *", id(ctx)), int(ctx.options) ^ 1) == lib.LC_E_CTX_CHECK


def test_pkcs11_uri_without_module(capfd, caplog):
    from lightclient.exceptions import ConfigError

    with pytest.raises(ConfigError, match="no PKCS#11 module given") as exc_info:
        keys.load_key(f"pkcs11:token=lc-test;object=eckey?pin-value={PIN}")
    _assert_clean(exc_info, capfd, caplog)


def test_key_reference_repr_hides_pin():
    ref = keys.parse_key_ref(f"pkcs11:token=t;object=k?pin-value={PIN}&module-path=/m.so")
    assert PIN not in repr(ref) and PIN not in str(ref)
    assert "pin=<set>" in repr(ref)
    assert ref.module_path == "/m.so"
