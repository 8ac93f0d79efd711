"""The lab's certificates pass strict X.509 verification, the default of ssl.create_default_context
from Python 3.13 on; checked here with the flag set explicitly, so every Python runs the same check."""
import socket
import ssl


def test_lab_broker_certificate_passes_strict_verification(broker, test_ca, tmp_path):
    cert, key = test_ca.issue_file_key("strict-client", tmp_path)
    ctx = ssl.create_default_context(cafile=str(test_ca.cert))
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.load_cert_chain(str(cert), str(key))
    with socket.create_connection(("127.0.0.1", broker.port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            assert tls.getpeercert()["subject"] == ((("commonName", "localhost"),),)
