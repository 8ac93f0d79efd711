"""The same-OpenSSL-copy check: pure logic over facts, plus the facts of this very process."""
import pytest

from lightclient import _openssl_copy
from lightclient._openssl_copy import OpenSSLFacts, check_same_openssl
from lightclient.exceptions import OpenSSLMismatchError

SYS_SSL = "/lib/x86_64-linux-gnu/libssl.so.3"
SYS_CRYPTO = "/lib/x86_64-linux-gnu/libcrypto.so.3"


def facts(**over):
    base = dict(python_ssl_origin=SYS_SSL, python_crypto_origin=SYS_CRYPTO, shim_ssl_origin=SYS_SSL,
                shim_crypto_origin=SYS_CRYPTO, python_version_number=0x30000160,
                python_version_text="OpenSSL 3.0.22", shim_version_number=0x30000160,
                shim_version_text="OpenSSL 3.0.22")
    base.update(over)
    return OpenSSLFacts(**base)


def test_same_copy_passes():
    check_same_openssl(facts())


def test_statically_linked_python_is_refused():
    # python-build-standalone (uv): _ssl exports no OpenSSL symbols from a shared library.
    with pytest.raises(OpenSSLMismatchError) as exc:
        check_same_openssl(facts(python_ssl_origin=None, python_crypto_origin=None))
    text = str(exc.value)
    assert "statically" in text and "python-build-standalone" in text and "Debian" in text
    assert isinstance(exc.value, ImportError)


def test_second_copy_is_refused_and_named():
    conda = "/opt/conda/lib/libssl.so.3"
    with pytest.raises(OpenSSLMismatchError, match=f"uses {conda} but the shim uses {SYS_SSL}"):
        check_same_openssl(facts(python_ssl_origin=conda))


def test_crypto_copy_alone_differs():
    with pytest.raises(OpenSSLMismatchError, match="libcrypto"):
        check_same_openssl(facts(python_crypto_origin="/opt/other/libcrypto.so.3"))


def test_version_difference_is_refused():
    with pytest.raises(OpenSSLMismatchError, match="runs OpenSSL 3.0.11"):
        check_same_openssl(facts(python_version_number=0x300000b0, python_version_text="OpenSSL 3.0.11"))


def test_unlocatable_shim_library_is_refused():
    with pytest.raises(OpenSSLMismatchError, match="could not be located"):
        check_same_openssl(facts(shim_ssl_origin=None))


def test_symlinked_paths_to_one_file_pass(tmp_path):
    real = tmp_path / "libssl.so.3"
    real.write_bytes(b"x")
    link = tmp_path / "libssl.so"
    link.symlink_to(real)
    check_same_openssl(facts(python_ssl_origin=str(link), shim_ssl_origin=str(real)))


def test_this_process_shares_one_copy():
    f = _openssl_copy.openssl_facts()
    assert f.python_ssl_origin and f.shim_ssl_origin
    check_same_openssl(f)
