"""One message source, two renderings: the library names keyword arguments, the CLI its flags (issue 14)."""
from __future__ import annotations

import pickle
import socket
import ssl

import pytest

from lightclient import diagnostics
from lightclient.commands import common
from lightclient.exceptions import (ConfigError, PinError, ServerCertificateError, Wording, in_terms,
                                    wording)
from lightclient._verify import server_certificate_error


def _verify_error(code: int, message: str) -> ssl.SSLCertVerificationError:
    exc = ssl.SSLCertVerificationError(1, f"certificate verify failed: {message}")
    exc.verify_code, exc.verify_message = code, message
    return exc


def test_a_server_certificate_error_names_keyword_arguments_in_the_library_and_flags_in_the_cli():
    err = server_certificate_error(_verify_error(20, "unable to get local issuer certificate"), "hub.example", 8883)
    assert isinstance(err, ServerCertificateError) and err.reason == "untrusted"
    assert "check host= (is it the hub?) and the trusted CA (ca= of tls.client_context()/https_context())" in str(err)
    text = common.error_text(err)
    assert "check --hub (is it the hub?) and the trusted CA (--ca)" in text
    assert "host=" not in text and "ca=" not in text
    # provision talks to DPS: the host is --endpoint there.
    args = common.argparse.Namespace(command="provision")
    assert "check --endpoint (is it the hub?)" in common.error_text(err, args)
    hostname = server_certificate_error(_verify_error(62, "hostname mismatch"), "127.0.0.2", 8883)
    assert "(--hub must match the certificate)" in common.error_text(hostname)


def test_wording_replaces_only_its_own_placeholders_and_survives_pickling():
    w = wording('{"json": {"x": 1}} give {pin} and {other}', pin="pin=")
    assert str(w) == '{"json": {"x": 1}} give pin= and {other}'
    assert w.render({"pin": "--pin-file"}) == '{"json": {"x": 1}} give --pin-file and {other}'
    again = pickle.loads(pickle.dumps(w))
    assert isinstance(again, Wording) and again.render({"pin": "X"}) == w.render({"pin": "X"})


def test_in_terms_leaves_the_openssl_queue_out_and_plain_messages_alone():
    err = PinError(wording("needs a PIN: give {pin}", pin="pin="), ["error:1:PIN incorrect"])
    assert "OpenSSL said" in str(err) and "pin=" in str(err)
    assert in_terms(err, {"pin": "--pin-file FILE"}) == "needs a PIN: give --pin-file FILE"
    assert in_terms(ConfigError("plain words"), {"pin": "--pin-file"}) == "plain words"


@pytest.mark.parametrize("make,expected", [
    (lambda: socket.gaierror(-2, "Name or service not known"), "the host name does not resolve (Name or service not known)"),
    (lambda: ConnectionRefusedError(111, "Connection refused"), "connection refused"),
])
def test_network_errors_inside_requests_wrappers_become_one_short_line(make, expected):
    import requests
    import urllib3

    pool = urllib3.HTTPSConnectionPool("dps.example", 443)
    cause = make()
    if isinstance(cause, socket.gaierror) and hasattr(urllib3.exceptions, "NameResolutionError"):
        inner = urllib3.exceptions.NameResolutionError("dps.example", pool, cause)   # urllib3 2.x
    else:
        inner = urllib3.exceptions.NewConnectionError(pool, f"Failed to establish a new connection: {cause}")
    inner.__cause__ = cause          # urllib3 raises these `from` the socket error
    wrapped = requests.exceptions.ConnectionError(urllib3.exceptions.MaxRetryError(pool, "/x", reason=inner))
    assert "HTTPSConnectionPool" in str(wrapped)
    assert diagnostics.network_reason(wrapped) == expected
