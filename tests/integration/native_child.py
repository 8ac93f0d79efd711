"""Exercised by test_native_memory.py in a child process (under valgrind, or for RSS growth).

usage: python -m tests.integration.native_child KEY_URI CERT CA PIN ITERATIONS [rss]
Loads the key, builds a context, signs a CSR and walks the error paths ITERATIONS times. With
``rss``, prints the resident set size after the first tenth of the iterations and at the end.
"""
import sys

from lightclient import _native, keys, tls
from lightclient.exceptions import LightClientError


def rss_kib() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def one_round(uri, cert, ca, pin) -> None:
    key = keys.load_key(uri, pin=pin)
    tls.client_context(cert=cert, key=key, ca=ca)
    _native.sign_csr(key, [("CN", "x"), ("O", "y")], san="DNS:a,IP:127.0.0.1")
    # No token= attribute: the token-label diagnosis (a child process) is not the subject here.
    missing = "pkcs11:object=no-such-key;type=private?" + uri.split("?")[1]
    for bad in (
        lambda: tls.client_context(cert=ca, key=key, ca=ca),               # certificate/key mismatch
        lambda: keys.load_key(missing, pin=pin),                            # no such object
        lambda: _native.install(object(), key, b"x"),                       # not an SSLContext
        lambda: _native.install(tls.ssl.SSLContext(tls.ssl.PROTOCOL_TLS_CLIENT), key, b"-----BEGIN CERTIFICATE-----\nAA\n"),
    ):
        try:
            bad()
        except (LightClientError, TypeError):
            pass
        else:
            raise AssertionError("a bad input was accepted")


def main(argv) -> int:
    uri, cert, ca, n = argv[:4]
    pin = sys.stdin.readline().rstrip("\n")  # on stdin: a PIN never goes into process arguments
    n = int(n)
    measure = len(argv) > 4 and argv[4] == "rss"
    warm = max(1, n // 10)
    for i in range(n):
        one_round(uri, cert, ca, pin)
        if measure and i + 1 == warm:
            print(f"RSS-WARM {rss_kib()}")
    if measure:
        print(f"RSS-END {rss_kib()}")
    print("CHILD-OK")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
