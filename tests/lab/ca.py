"""The lab's certificate authority: the emulator's openssl-CLI CA (lightclient.emulator.certs) in a directory.

It plays the cloud side, so its own keys are plain files: the CA, a server certificate for ``localhost`` /
``127.0.0.1`` (mosquitto, the DPS emulator and test servers present it) and file-key client certificates.
"""
from __future__ import annotations

from pathlib import Path
from typing import Tuple

from lightclient.emulator import certs
from lightclient.emulator.errors import EmulatorError

from .procs import LabError

LAB_CA_NAME = "lightclient lab CA"
# RSA for the CA and the server, as the lab always had: TLS 1.2 through the tpm2 provider with a
# provider-wide property query (test_tpm's comparison cell) fails the handshake against an EC server key.
LAB_KEY_TYPE = "rsa"
SERVER_NAMES = ("localhost", "127.0.0.1")
DAYS = 30  # lab certificates are short-lived; tests assert on this validity period


class TestCA:
    """A throwaway CA with a server certificate for localhost; files ``ca.pem``/``ca.key`` and
    ``server.pem``/``server.key`` in ``root`` (reused when they exist)."""

    __test__ = False  # not a pytest test class

    def __init__(self, root: Path, name: str = LAB_CA_NAME):
        self.root = Path(root)
        try:
            self.authority = certs.ensure_ca(self.root, name, LAB_KEY_TYPE)
            self.server_cert, self.server_key = certs.ensure_server_certificate(self.root, self.authority,
                                                                               SERVER_NAMES, LAB_KEY_TYPE)
        except EmulatorError as exc:
            raise LabError(f"cannot set up the lab CA in {self.root}: {exc}") from exc
        self.cert, self.key = self.authority.cert_path, self.authority.key_path

    def sign_csr(self, csr_pem: bytes, out: Path, days: int = DAYS) -> Path:
        """Issue a client certificate for a PEM CSR (its subject is kept); the CSR is kept beside ``out``."""
        csr_path = Path(out).with_suffix(".csr")
        csr_path.write_bytes(csr_pem)
        try:
            return certs.sign_csr(self.authority, csr_path, Path(out), days)
        except EmulatorError as exc:
            raise LabError(f"the lab CA could not sign {csr_path}: {exc}") from exc

    def issue_file_key(self, cn: str, out_dir: Path, key_type: str = "ec") -> Tuple[Path, Path]:
        """A file key (``"ec"`` P-256 or ``"rsa"`` 2048) and its certificate ``out_dir/CN.pem``, ``CN.key``
        (for peers that play the service side in tests); returns (cert, key)."""
        try:
            return certs.issue_device_certificate(self.authority, cn, Path(out_dir), days=DAYS, key_type=key_type)
        except EmulatorError as exc:
            raise LabError(f"the lab CA could not issue a certificate for {cn!r}: {exc}") from exc
