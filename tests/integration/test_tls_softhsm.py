"""Mutual TLS with a key that never leaves SoftHSM: paho -> mosquitto (require_certificate)."""
import queue
import ssl
import subprocess
import sys
import uuid

import paho.mqtt.client as mqtt
import pytest

from lightclient import _native, keys, tls

from ..conftest import PIN, csr_pem

TLS_VERSIONS = {"tls1.2": ssl.TLSVersion.TLSv1_2, "tls1.3": ssl.TLSVersion.TLSv1_3}


def _connect(ctx, port, client_id):
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
    client.tls_set_context(ctx)
    client.connect("127.0.0.1", port, keepalive=30)
    client.loop_start()
    return client


def _publish_once(ctx, port, client_id, topic):
    """Connect through ``ctx``, publish at QoS 1, and require the PUBACK."""
    client = _connect(ctx, port, client_id)
    try:
        info = client.publish(topic, b"x", qos=1)
        info.wait_for_publish(timeout=5)
        assert info.is_published()
    finally:
        client.disconnect(); client.loop_stop()


def _subscriber(service_context, port, topic):
    got = queue.Queue()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"svc-{uuid.uuid4().hex[:8]}")
    client.tls_set_context(service_context)
    subscribed = queue.Queue()
    client.on_message = lambda c, u, m: got.put((m.topic, m.payload))
    client.on_subscribe = lambda *a: subscribed.put(True)
    client.connect("127.0.0.1", port)
    client.loop_start()
    client.subscribe(topic, qos=1)
    subscribed.get(timeout=5)
    return client, got


@pytest.mark.parametrize("version", sorted(TLS_VERSIONS))
@pytest.mark.parametrize("kind", ["rsa", "ec"])
def test_paho_publishes_through_token_key(kind, version, device, test_ca, broker, service_context):
    dev = device[kind]
    ctx = tls.client_context(cert=dev["cert"], key=dev["uri"], pin=PIN, ca=test_ca.cert,
                             minimum_version=TLS_VERSIONS[version], maximum_version=TLS_VERSIONS[version])
    topic = f"lab/{kind}/{version}"
    sub, got = _subscriber(service_context, broker.port, topic)
    client = _connect(ctx, broker.port, f"{kind}-{version}")
    try:
        info = client.publish(topic, f"hello from {kind}".encode(), qos=1)
        info.wait_for_publish(timeout=5)
        assert info.is_published()
        assert client.socket().version() == {"tls1.2": "TLSv1.2", "tls1.3": "TLSv1.3"}[version]
        assert got.get(timeout=5) == (topic, f"hello from {kind}".encode())
    finally:
        client.disconnect(); client.loop_stop()
        sub.disconnect(); sub.loop_stop()
    # The broker authenticated the client by the certificate the token key proved.
    assert f"u'{dev['cn']}'" in broker.log()


def test_broker_rejects_client_without_certificate(test_ca, broker):
    ctx = ssl.create_default_context(cafile=str(test_ca.cert))
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="nocert")
    client.tls_set_context(ctx)
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        client.connect("127.0.0.1", broker.port)
        # TLS 1.3 reports the missing certificate only on the first read.
        client.loop_read()
        client.loop_read()
        raise ConnectionError("broker closed the connection")


def test_context_defaults_are_strict(device, test_ca):
    ctx = tls.client_context(cert=device["ec"]["cert"], key=device["ec"]["key"], ca=test_ca.cert)
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.check_hostname is True
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2


def test_default_trust_is_the_bundled_iothub_roots(device):
    ctx = tls.client_context(cert=device["ec"]["cert"], key=device["ec"]["key"])
    subjects = {dict(x[0] for x in c["subject"])["commonName"] for c in ctx.get_ca_certs()}
    assert subjects == {"DigiCert Global Root G2", "DigiCert Global Root G3",
                        "Microsoft RSA Root Certificate Authority 2017",
                        "Microsoft ECC Root Certificate Authority 2017"}


def test_https_context_serves_requests(device, test_ca, tmp_path):
    """requests through the hardware-backed context against a real HTTPS server requiring certs."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            cn = dict(x[0] for x in self.connection.getpeercert()["subject"])["commonName"]
            body = cn.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(str(test_ca.server_cert), str(test_ca.server_key))
    sctx.load_verify_locations(str(test_ca.cert))
    sctx.verify_mode = ssl.CERT_REQUIRED
    server.socket = sctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        ctx = tls.https_context(cert=device["rsa"]["cert"], key=device["rsa"]["key"], ca=test_ca.cert)
        session = tls.https_session(ctx)
        url = f"https://127.0.0.1:{server.server_address[1]}/"
        assert session.get(url, timeout=10).text == "device-rsa"
        from lightclient.exceptions import ConfigError
        with pytest.raises(ConfigError, match="verify"):
            session.get(url, verify=False, timeout=10)
        with pytest.raises(ConfigError, match="cert="):
            session.get(url, cert=(str(test_ca.server_cert), str(test_ca.server_key)), timeout=10)
    finally:
        server.shutdown()
        server.server_close()


def test_csr_signed_by_token_key_verifies(device, tmp_path):
    der = _native.sign_csr(device["ec"]["key"], [("CN", "dev-42"), ("O", "Contoso"), ("C", "DE")],
                           san="DNS:dev-42,IP:127.0.0.1")
    path = tmp_path / "req.pem"
    path.write_bytes(csr_pem(der))
    out = subprocess.run(["openssl", "req", "-in", str(path), "-noout", "-verify", "-subject", "-text"],
                         capture_output=True, text=True, check=True)
    assert "verify OK" in out.stdout + out.stderr
    assert "CN = dev-42" in out.stdout and "O = Contoso" in out.stdout and "C = DE" in out.stdout
    assert "DNS:dev-42" in out.stdout and "IP Address:127.0.0.1" in out.stdout
    # The CSR carries the token key's public key.
    pub = subprocess.run(["openssl", "req", "-in", str(path), "-noout", "-pubkey"], capture_output=True,
                         check=True).stdout
    cert_pub = subprocess.run(["openssl", "x509", "-in", str(device["ec"]["cert"]), "-noout", "-pubkey"],
                              capture_output=True, check=True).stdout
    assert pub == cert_pub


def test_csr_rsa_and_sha384(device, tmp_path):
    der = _native.sign_csr(device["rsa"]["key"], [("CN", "r")], digest="sha384")
    path = tmp_path / "r.pem"
    path.write_bytes(csr_pem(der))
    out = subprocess.run(["openssl", "req", "-in", str(path), "-noout", "-verify", "-text"],
                         capture_output=True, text=True, check=True)
    assert "verify OK" in out.stdout + out.stderr and "sha384WithRSAEncryption" in out.stdout


def test_token_keys_are_sensitive_and_not_extractable(softhsm):


    code = (
        "import sys, pkcs11\n"
        "from pkcs11 import Attribute, ObjectClass\n"
        "lib = pkcs11.lib(sys.argv[1]); tok = lib.get_token(token_label=sys.argv[2])\n"
        "with tok.open(user_pin=sys.stdin.read().strip()) as s:\n"
        "    for k in s.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY}):\n"
        "        print(k.label, k[Attribute.SENSITIVE], k[Attribute.EXTRACTABLE], k[Attribute.NEVER_EXTRACTABLE])\n"
    )
    import sys
    from ..conftest import TOKEN
    out = subprocess.run([sys.executable, "-c", code, softhsm.module_path, TOKEN], input=PIN, text=True,
                         capture_output=True, env=softhsm.env, check=True).stdout.split("\n")
    rows = sorted(line.split() for line in out if line)
    # Other tests (renewal with key rotation) add keys to this token: every one of them must be as
    # locked down as the two made at set-up.
    assert {"eckey", "rsakey"} <= {label for label, *_ in rows}
    assert all(flags == ["True", "False", "True"] for _, *flags in rows), rows


def test_store_backend_with_default_provider(test_ca, tmp_path, broker):
    """The OSSL_STORE path (store:file:...) before any TPM: an encrypted PEM behind the default provider."""
    cert, key = test_ca.issue_file_key("store-device", tmp_path)
    enc = tmp_path / "enc.key"
    subprocess.run(["openssl", "pkey", "-in", str(key), "-out", str(enc), "-aes256", "-passout", "stdin"],
                   input=b"store-secret\n", check=True)
    ctx = tls.client_context(cert=cert, key=f"store:file:{enc}", pin="store-secret", ca=test_ca.cert)
    _publish_once(ctx, broker.port, "store-device", "lab/store")
    plain = keys.load_key(f"provider:default:{key}")
    assert (plain.key_type, plain.bits) == ("EC", 256)


def test_store_refuses_several_keys(test_ca, tmp_path):
    from lightclient.exceptions import KeyNotFoundError

    _, k1 = test_ca.issue_file_key("a", tmp_path)
    _, k2 = test_ca.issue_file_key("b", tmp_path)
    both = tmp_path / "both.pem"
    both.write_bytes(k1.read_bytes() + k2.read_bytes())
    with pytest.raises(KeyNotFoundError, match="more than one private key"):
        keys.load_key(f"store:{both}")


def test_pem_file_backend(test_ca, tmp_path, broker):
    cert, key = test_ca.issue_file_key("file-device", tmp_path, key_type="rsa")
    ctx = tls.client_context(cert=cert, key=str(key), ca=test_ca.cert)
    _publish_once(ctx, broker.port, "file-device", "lab/file")


def test_attach_key_to_users_own_context(device, test_ca):
    ctx = ssl.create_default_context(cafile=str(test_ca.cert))
    ctx.set_ciphers("ECDHE+AESGCM")
    key = tls.attach_key(ctx, cert=device["ec"]["cert"], key=device["ec"]["uri"], pin=PIN)
    assert key.key_type == "EC"
    _native.check_context(ctx)


def test_public_csr_helpers(device, tmp_path):
    der = keys.sign_csr(device["rsa"]["key"], "dev-7", san="DNS:dev-7")
    path = tmp_path / "p.pem"
    path.write_bytes(keys.csr_pem(der))
    out = subprocess.run(["openssl", "req", "-in", str(path), "-noout", "-verify", "-subject"],
                         capture_output=True, text=True, check=True)
    assert "verify OK" in out.stdout + out.stderr and "CN = dev-7" in out.stdout
    from lightclient.exceptions import ConfigError
    with pytest.raises(ConfigError, match="needs a subject"):
        keys.sign_csr(device["rsa"]["key"], [])


def test_certificate_info(device, test_ca):
    import datetime

    info = _native.certificate_info(device["ec"]["cert"].read_bytes())
    assert (info.subject_cn, info.issuer_cn) == ("device-ec", "lightclient lab CA")
    now = datetime.datetime.now(datetime.timezone.utc)
    assert info.not_before <= now < info.not_after
    assert datetime.timedelta(days=29) < info.not_after - info.not_before <= datetime.timedelta(days=31)
    from lightclient.exceptions import CertificateError
    with pytest.raises(CertificateError, match="no readable PEM certificate"):
        _native.certificate_info(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")


def test_file_keys_need_no_shim_and_fail_clearly(test_ca, tmp_path):
    """Development file keys go through Python's own ssl (no native shim in the process), with the
    same typed errors as the token path."""
    cert, key = test_ca.issue_file_key("plain", tmp_path)
    _, other = test_ca.issue_file_key("other", tmp_path)
    enc = tmp_path / "enc.key"
    subprocess.run(["openssl", "pkey", "-in", str(key), "-out", str(enc), "-aes256", "-passout", "stdin"],
                   input=b"s3cret\n", check=True)
    code = f"""
import sys
from lightclient import tls
from lightclient.exceptions import KeyMismatchError, PinError
tls.client_context(cert={str(cert)!r}, key={str(key)!r}, ca={str(test_ca.cert)!r})
tls.client_context(cert={str(cert)!r}, key={str(enc)!r}, pin="s3cret", ca={str(test_ca.cert)!r})
print("SHIM-LOADED", "lightclient._shim" in sys.modules)
for key, pin, error in (({str(other)!r}, None, KeyMismatchError), ({str(enc)!r}, None, PinError),
                        ({str(enc)!r}, "wrong", PinError)):
    try:
        tls.client_context(cert={str(cert)!r}, key=key, pin=pin, ca={str(test_ca.cert)!r})
    except error as exc:
        print("OK", type(exc).__name__, exc)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60).stdout
    assert "SHIM-LOADED False" in out
    assert out.count("OK ") == 3 and "is encrypted: give its pass phrase" in out and "was refused" in out
    assert "s3cret" not in out and "wrong" not in out.replace("OK PinError", "")
