"""Property on the real paths: random PINs never show, in whole or in part, while keys load and CSRs are signed.

In-process against the session's SoftHSM token (loads that fail on a wrong PIN and loads that succeed),
and through the `lightclient csr` command against a token made for each example with that very PIN.
See tests/pinleak.py for how "in part" is told apart from chance.
"""
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightclient import keys, tls
from lightclient.exceptions import LightClientError

from ..conftest import PIN
from ..pinleak import SENTINEL, leaks, pins, vocabulary

ROOT = Path(__file__).resolve().parents[2]
SLOW = settings(max_examples=3, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
FAST = settings(max_examples=8, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def _in_process(softhsm, device, test_ca, pin, raw):
    """Load keys (wrong PIN on a fresh token; any PIN on the logged-in one), sign CSRs; every text made."""
    value = pin if raw else quote(pin, safe="")
    texts = []
    handler = _Records()
    log = logging.getLogger("lightclient")
    log.addHandler(handler)
    old_level = log.level
    log.setLevel(logging.DEBUG)
    try:
        for ref in (f"{softhsm.fresh_uri}&pin-value={value}", f"{device['ec']['uri']}&pin-value={value}"):
            try:
                key = keys.load_key(ref)
                texts += [repr(key), str(key.description)]
                der = keys.sign_csr(key, [("CN", "dev-1"), ("O", "Contoso")])
                texts.append(keys.csr_pem(der).decode())
                keys.sign_csr(key, [("CN", "dev-1\x00")])
            except LightClientError as exc:
                texts += [str(exc), repr(exc), *getattr(exc, "openssl_errors", ())]
            try:
                tls.client_context(cert=device["ec"]["cert"], key=ref, ca=test_ca.cert)
            except LightClientError as exc:
                texts += [str(exc), repr(exc), *getattr(exc, "openssl_errors", ())]
        try:   # the PIN given as an argument, refused by the fresh token
            keys.load_key(softhsm.fresh_uri, pin=pin)
        except LightClientError as exc:
            texts += [str(exc), repr(exc), *getattr(exc, "openssl_errors", ())]
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
    return texts + handler.lines


@pytest.fixture(scope="module")
def in_process_vocab(softhsm, device, test_ca):
    return vocabulary(_in_process(softhsm, device, test_ca, SENTINEL, raw=False)
                      + _in_process(softhsm, device, test_ca, SENTINEL, raw=True) + [PIN])


@FAST
@given(data=st.data(), raw=st.booleans())
def test_in_process_loading_and_csr_never_show_the_pin(softhsm, device, test_ca, in_process_vocab, data, raw):
    pin = data.draw(pins(in_process_vocab), label="pin")
    found = leaks(pin, _in_process(softhsm, device, test_ca, pin, raw))
    assert not found, found


# ------------------------------------------------------------------------------------------ the CLI


class _TokenLab:
    """One SoftHSM directory, remade at the same path for each example (so paths never differ)."""

    def __init__(self, softhsm, root: Path):
        self.kind, self.root, self.module = type(softhsm), root, softhsm.module_path

    def run(self, pin: str):
        shutil.rmtree(self.root, ignore_errors=True)
        hsm = self.kind(self.root)
        hsm.init_token("prop", pin, "so-pin-prop")
        hsm.keygen("prop", pin, "propkey", "ec-p256")
        env = {k: v for k, v in hsm.env.items() if not k.startswith(("LIGHTCLIENT_", "KEY_IDENTIFIER", "DEVICE_ID"))}
        base = f"pkcs11:token=prop;object=propkey?module-path={self.module}"
        pin_file = self.root / "pin"
        pin_file.write_text(pin + "\n")
        out = []
        for key, extra, code in (
                (f"{base}&pin-value={quote(pin, safe='')}", [], 0),              # the PIN in --key: works, warned
                (f"{base}&pin-value={quote(pin + '!x', safe='')}", [], 3),       # a wrong one: refused
                (base, ["--pin-file", str(pin_file)], 0)):                       # the PIN from a file
            proc = subprocess.run([sys.executable, "-m", "lightclient", "csr", "--cn", "dev-1", "--key", key,
                                   "--out", str(self.root / "dev.csr"), *extra], env=env, cwd=ROOT,
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
            assert proc.returncode == code and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
            if "pin-value" in key:
                assert "--key holds a pin-value" in proc.stderr
            out += [proc.stdout, proc.stderr]
        return out


@pytest.fixture(scope="module")
def token_lab(softhsm, tmp_path_factory):
    lab = _TokenLab(softhsm, tmp_path_factory.mktemp("pinprop") / "hsm")
    lab.vocab = vocabulary(lab.run(SENTINEL))
    return lab


@SLOW
@given(data=st.data())
def test_cli_csr_with_the_pin_in_key_never_shows_it(token_lab, data):
    pin = data.draw(pins(token_lab.vocab, max_size=16), label="pin")
    found = leaks(pin, token_lab.run(pin))
    assert not found, found
