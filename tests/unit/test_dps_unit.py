"""DPS request building and response parsing (pure; no sockets)."""
import base64
import json
import os
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightclient import dps
from lightclient.backoff import Backoff
from lightclient.exceptions import ConfigError, ProtocolError, ProvisioningError

VECTORS = json.loads((Path(__file__).parent.parent / "vectors" / "dps.json").read_text())
CSR_DER = bytes.fromhex("3082010a") + b"\x00" * 10  # shape only: a DER SEQUENCE


def test_register_request_exact_wire_format():
    req = dps.register_request("0ne00A1B2C3", "dev-1", payload={"a": 1})
    assert req.method == "PUT"
    assert req.url == ("https://global.azure-devices-provisioning.net/0ne00A1B2C3/registrations/dev-1/register"
                       "?api-version=2021-10-01")
    assert req.headers["Content-Type"] == "application/json; charset=utf-8"
    assert req.headers["Accept"] == "application/json"
    assert "Authorization" not in req.headers
    assert json.loads(req.body) == {"registrationId": "dev-1", "payload": {"a": 1}}


def test_csr_selects_preview_api_and_strips_armour():
    pem = (b"-----BEGIN CERTIFICATE REQUEST-----\n" + base64.encodebytes(CSR_DER)
           + b"-----END CERTIFICATE REQUEST-----\n")
    for csr in (CSR_DER, pem, pem.decode()):
        req = dps.register_request("0ne1", "dev-1", csr=csr, endpoint="127.0.0.1:8443")
        assert req.url.endswith("?api-version=2025-07-01-preview")
        assert req.url.startswith("https://127.0.0.1:8443/0ne1/")
        assert json.loads(req.body)["csr"] == base64.b64encode(CSR_DER).decode()
    assert dps.register_request("0ne1", "d", csr=CSR_DER, api_version="2026-04-01").url.endswith("2026-04-01")


def test_operation_status_request():
    req = dps.operation_status_request("0ne1", "dev:1", "5.ab/c")
    assert req.method == "GET" and req.body is None
    assert req.url == ("https://global.azure-devices-provisioning.net/0ne1/registrations/dev%3A1/operations/"
                       "5.ab%2Fc?api-version=2021-10-01")


@pytest.mark.parametrize("scope, rid, message", [
    ("", "dev", "ID scope"), ("0ne/1", "dev", "ID scope"),
    ("0ne1", "", "registration id"), ("0ne1", "dev.", "registration id"), ("0ne1", "a" * 129, "registration id"),
    ("0ne1", "dév", "registration id"), ("0ne1", "dev 1", "registration id"),
])
def test_invalid_ids(scope, rid, message):
    with pytest.raises(ConfigError, match=message):
        dps.register_request(scope, rid)


def test_bad_csr_and_payload():
    with pytest.raises(ConfigError, match="PKCS#10"):
        dps.register_request("0ne1", "d", csr=b"hello")
    with pytest.raises(ConfigError, match="JSON-serialisable"):
        dps.register_request("0ne1", "d", payload={"x": object()})


@pytest.mark.parametrize("case", VECTORS["operations"], ids=lambda c: c["name"])
def test_parse_operation_vectors(case):
    result = dps.parse_operation(json.dumps(case["body"]).encode())
    for key, value in case["expect"].items():
        assert getattr(result, key) == value, key


def test_issued_chain_decodes_and_renders_pem():
    chain = [base64.b64encode(b"\x30leaf").decode(), base64.b64encode(b"\x30ca").decode()]
    result = dps.parse_operation({"operationId": "1", "status": "assigned", "registrationState": {
        "assignedHub": "h", "deviceId": "d", "issuedCertificateChain": chain}})
    assert result.issued_certificate_chain == (b"\x30leaf", b"\x30ca")
    assert result.chain_pem().count(b"-----BEGIN CERTIFICATE-----") == 2


@pytest.mark.parametrize("body", VECTORS["malformed"])
def test_parse_operation_malformed(body):
    with pytest.raises(ProtocolError):
        dps.parse_operation(body.encode())


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=200), st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["status", "operationId", "registrationState", "assignedHub", "deviceId", "errorCode",
                         "issuedCertificateChain", "payload", "x"]), inner, max_size=5), max_leaves=20)))
def test_parse_operation_never_raises_anything_else(data):
    body = data if isinstance(data, bytes) else json.dumps(data).encode()
    try:
        dps.parse_operation(body)
    except ProtocolError:
        pass


@pytest.mark.parametrize("status, body, expect", [
    (401, b'{"errorCode":401002,"trackingId":"t1","message":"Unauthorized"}', "registration id must equal"),
    (404, b'{"errorCode":404201,"message":"not found"}', "ID scope"),
    (400, b"", "malformed"),
    (503, b"<html>", "DPS failed with 503"),
])
def test_error_from_response(status, body, expect):
    err = dps.error_from_response(status, body, {"x-ms-error-code": "999"}, "dev-1")
    assert isinstance(err, ProvisioningError) and err.status == status
    assert expect in str(err)
    assert err.retryable == (status >= 500)


def test_error_code_from_body_or_header():
    assert dps.error_from_response(401, b'{"errorCode":401002,"trackingId":"t"}', {}).error_code == 401002
    assert dps.error_from_response(401, b'{"errorCode":401002,"trackingId":"t"}', {}).tracking_id == "t"
    assert dps.error_from_response(429, b"", {"x-ms-error-code": "429001"}).error_code == 429001


@pytest.mark.parametrize("headers, expect", [
    ({}, 2.0), ({"Retry-After": "3"}, 3.0), ({"retry-after": "0"}, 1.0), ({"Retry-After": "9999"}, 60.0),
    ({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}, 2.0), ({"Retry-After": "nan"}, 2.0),
])
def test_retry_after(headers, expect):
    assert dps.retry_after(headers) == expect


def test_backoff_grows_with_jitter_and_cap():
    # The one Backoff (lightclient.backoff) with the old DPS formula's numbers: base 1 s, cap 30 s,
    # delays drawn from the upper half; rand=1 gives the shortest delay, rand=0 the longest.
    backoff = Backoff(initial=1.0, maximum=30.0)
    assert backoff.delay(0, rand=lambda: 1.0) == 0.5
    assert backoff.delay(3, rand=lambda: 0.0) == 8.0
    assert backoff.delay(20, rand=lambda: 0.0) == 30.0
    assert not hasattr(dps, "backoff_delay")  # one back-off formula in the package, not two


def test_provision_needs_a_context():
    with pytest.raises(ConfigError, match="ssl_context"):
        dps.provision("0ne1", "d")


@pytest.mark.parametrize("endpoint, message", [
    ("hub?x=1", "contains '?'"), ("hub#", "contains '#'"), ("hub/x", "contains '/'"),
    ("https://dps.example", "contains a scheme"), ("user@dps.example", "contains '@'"),
    ("a..b", "empty label"), (".dps.example", "empty label"), ("dps.example.", "empty label"),
    ("-dps.example", "starting or ending with '-'"), ("d" * 64 + ".example", "label of 64 characters"),
    (".".join(["d" * 60] * 5), "characters long"), ("1.2.3", "neither an IP address"),
    ("256.1.1.1:443", "neither an IP address"), ("", "endpoint is empty"),
    ("dps:0", "port must be"), ("dps:65536", "port must be"), ("dps:", "port must be"), ("dps:https", "port must be"),
    ("::1", "brackets"), ("dps:1:2", "brackets"), ("[::1", "brackets"), ("[dps]:443", "brackets"),
    ("[::1]x", "brackets"), ("[fe80::1%eth0]:443", "brackets"),
])
def test_invalid_endpoint_names_the_argument_and_the_form(endpoint, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as exc:
        dps.register_request("0ne1", "dev", endpoint=endpoint)
    assert "endpoint" in str(exc.value)


def test_endpoint_not_a_str():
    with pytest.raises(ConfigError, match="endpoint .*must be a str"):
        dps.operation_status_request("0ne1", "dev", "op", endpoint=8443)


@pytest.mark.parametrize("endpoint, prefix", [
    ("global.azure-devices-provisioning.net", "https://global.azure-devices-provisioning.net/"),
    ("127.0.0.1:8443", "https://127.0.0.1:8443/"), ("localhost:1", "https://localhost:1/"),
    ("[::1]:8443", "https://[::1]:8443/"), ("[::1]", "https://[::1]/"), ("dps_lab.local:65535", "https://dps_lab.local:65535/"),
])
def test_valid_endpoints(endpoint, prefix):
    assert dps.register_request("0ne1", "dev", endpoint=endpoint).url.startswith(prefix)


def test_the_provisioning_cache_reads_bounded_and_treats_a_missing_or_damaged_file_as_none(tmp_path):
    missing = dps.ProvisioningCache(str(tmp_path / "nope.json"))
    assert missing.load("0ne00000001", "d") is None
    damaged = tmp_path / "damaged.json"
    damaged.write_bytes(b"{not json")
    assert dps.ProvisioningCache(str(damaged)).load("0ne00000001", "d") is None
    with pytest.raises(ConfigError, match="directory"):
        dps.ProvisioningCache(str(tmp_path)).load("0ne00000001", "d")


def test_read_csr_refuses_what_is_not_a_small_regular_file(tmp_path):
    fifo = tmp_path / "csr.fifo"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="FIFO"):
        dps.read_csr(fifo)
    big = tmp_path / "big.csr"
    big.write_bytes(b"0" * (64 * 1024 + 1))
    with pytest.raises(ConfigError, match="too large"):
        dps.read_csr(big)
    pem = tmp_path / "ok.csr"
    pem.write_bytes(b"-----BEGIN CERTIFICATE REQUEST-----\nMAA=\n-----END CERTIFICATE REQUEST-----\n")
    assert dps.read_csr(str(pem)) == pem.read_bytes()
