"""CSR input is checked before it reaches OpenSSL, which would silently cut a value at its first NUL."""
import subprocess

import pytest

from lightclient import keys
from lightclient.exceptions import ConfigError


@pytest.fixture(scope="module")
def file_key(tmp_path_factory):
    path = tmp_path_factory.mktemp("csr") / "k.pem"
    subprocess.run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path)],
                   capture_output=True, check=True)
    return keys.load_key(str(path))


def _subject(der: bytes) -> str:
    proc = subprocess.run(["openssl", "req", "-inform", "der", "-noout", "-subject", "-text"], input=der,
                          capture_output=True, check=True)
    return proc.stdout.decode()


@pytest.mark.parametrize("subject, san, match", [
    ("dev-1\x00admin", None, "control character"),
    ([("CN", "dev-1"), ("O", "Contoso\nInc")], None, "control character"),
    ([("CN", "dev-1"), ("O\x00U", "x")], None, "control character"),
    ([("CN", 5)], None, "must be a str, got int"),
    ([(b"CN", "x")], None, "must be a str, got bytes"),
    ([("CN",)], None, r"\(field, value\) pair"),
    ([("C N", "x")], None, "field name"),
    ([], None, "needs a subject"),
    (None, None, "common name or"),
    ("dev-1", "DNS:a\x00.example", "control character"),
    ("dev-1", 7, "must be a str"),
    ("", None, "empty"),
])
def test_bad_subject_or_san_is_a_config_error(file_key, subject, san, match):
    with pytest.raises(ConfigError, match=match):
        keys.sign_csr(file_key, subject, san=san)


@pytest.mark.parametrize("digest", ["md4", "md5", "sha1", "sha3-256", "", None, "sha256\x00"])
def test_digest_outside_the_allowed_list_is_a_config_error(file_key, digest):
    with pytest.raises(ConfigError, match="sha256, sha384, sha512"):
        keys.sign_csr(file_key, "dev-1", digest=digest)


@pytest.mark.parametrize("digest", ["sha256", "sha384", "sha512", "SHA384"])
def test_allowed_digests_sign(file_key, digest):
    der = keys.sign_csr(file_key, [("CN", "dev-1"), ("O", "Contoso")], san="DNS:dev-1", digest=digest)
    text = _subject(der)
    assert "CN = dev-1" in text and "O = Contoso" in text and digest.lower() in text.lower()
