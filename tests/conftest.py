"""Shared fixtures: a real SoftHSM2 token per test run, a test CA, and a mosquitto broker.

Nothing here is mocked. Keys are created on the token as sensitive and non-extractable; device
certificates are issued by the test CA from CSRs that lightclient signs with the token keys.
"""
import os
import ssl

import pytest

from lightclient import _fastpath, keys
from tests import lab

# `make test` runs the Device integration tests a second time with paho's stock PUBACK handling
# (lightclient._fastpath is used only where the installed paho allows it; both paths must pass).
STOCK_PAHO = os.environ.get("LIGHTCLIENT_TEST_STOCK_PAHO") == "1"
if STOCK_PAHO:
    _fastpath.enabled = False


def pytest_report_header(config):
    why = _fastpath.paho_version()
    return (f"paho PUBACK path: {'stock (LIGHTCLIENT_TEST_STOCK_PAHO=1)' if STOCK_PAHO else 'fast'}"
            f" (paho-mqtt {'.'.join(map(str, why or ()))})")

PIN = "4711-pin"          # distinctive, so a leak into any text is easy to spot
SO_PIN = "so-pin-0815"
TOKEN = "lc-test"
FRESH_TOKEN = "lc-fresh"
KEY_TYPES = {"rsa": "rsa-2048", "ec": "ec-p256"}


csr_pem = keys.csr_pem  # the library's own PEM armour for a DER CSR


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory):
    """A private SoftHSM2 token directory with one token and an RSA-2048 and an EC P-256 key."""
    hsm = lab.SoftHSM(tmp_path_factory.mktemp("softhsm"))
    hsm.init_token(TOKEN, PIN, SO_PIN)
    hsm.keys = {name: hsm.keygen(TOKEN, PIN, f"{name}key", kt) for name, kt in KEY_TYPES.items()}
    # A second token that only PIN-failure tests touch: libp11 keeps a slot logged in once a
    # correct PIN was given, so a wrong PIN is only observable on a token never logged in to.
    # Tokens must exist before this process first loads the module (it enumerates slots once).
    hsm.init_token(FRESH_TOKEN, PIN, SO_PIN)
    hsm.fresh_uri = hsm.keygen(FRESH_TOKEN, PIN, "freshkey", "ec-p256")["uri"] + f"?module-path={hsm.module_path}"
    hsm.activate()
    return hsm


@pytest.fixture(scope="session")
def test_ca(tmp_path_factory):
    return lab.TestCA(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="session")
def device(softhsm, test_ca, tmp_path_factory):
    """Per key type: the key URI, the loaded key, and a certificate issued from a token-signed CSR."""
    from lightclient import _native, keys

    out = tmp_path_factory.mktemp("devices")
    result = {}
    for name, info in softhsm.keys.items():
        key = keys.load_key(info["uri"], module_path=softhsm.module_path, pin=PIN)
        der = _native.sign_csr(key, [("CN", f"device-{name}")])
        cert = test_ca.sign_csr(csr_pem(der), out / f"device-{name}.pem")
        result[name] = {"uri": f"{info['uri']}?module-path={softhsm.module_path}", "key": key, "cert": cert, "cn": f"device-{name}"}
    return result


@pytest.fixture(scope="session")
def broker(test_ca, tmp_path_factory):
    with lab.Mosquitto(tmp_path_factory.mktemp("mosquitto"), test_ca) as b:
        yield b


@pytest.fixture(scope="session")
def service_context(test_ca, tmp_path_factory):
    """A plain file-key context for the test's own peer (it plays the cloud side)."""
    cert, key = test_ca.issue_file_key("service", tmp_path_factory.mktemp("service"))
    ctx = ssl.create_default_context(cafile=str(test_ca.cert))
    ctx.load_cert_chain(str(cert), str(key))
    return ctx
