"""The emulator's certificate authority, server certificate and device certificates.

Everything is made with the ``openssl`` command-line tool, so the emulator needs no crypto library beyond
the standard library's ``ssl``.  Keys are EC P-256 (quick to generate, and what most device stacks use)
unless RSA-2048 is asked for.  This is the project's one certificate authority: the test lab
(``tests/lab/ca.py``) wraps it too, so it stays standard-library only and imports nothing else from
lightclient.

Layout of a state directory::

    ca.pem, ca.key          the emulator's CA (devices must trust ca.pem; device certs are issued by it)
    server.pem, server.key  the hub's TLS certificate, signed by the CA, with SANs for the hub's names
    devices/ID.pem, .key    device certificates issued on request (a ``/`` in a module identity -> ``__``)
"""
from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Tuple

from .errors import EmulatorError

CA_NAME = "lightclient emulator CA"
KEY_TYPES = ("ec", "rsa")

_CLIENT_EXTENSIONS = """\
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
"""


@dataclass(frozen=True)
class CertificateAuthority:
    cert_path: Path
    key_path: Path


def _openssl(*args: str, stdin: Optional[bytes] = None) -> bytes:
    exe = shutil.which("openssl")
    if exe is None:
        raise EmulatorError("the 'openssl' command is needed to create certificates; install OpenSSL "
                            "or pass existing --ca-cert/--server-cert files")
    proc = subprocess.run([exe, *args], input=stdin, capture_output=True)
    if proc.returncode != 0:
        raise EmulatorError(f"openssl {args[0]} failed: {proc.stderr.decode(errors='replace').strip()}")
    return proc.stdout


def _new_key(path: Path, key_type: str = "ec") -> None:
    if key_type not in KEY_TYPES:
        raise EmulatorError(f"unknown key type {key_type!r}: choose one of {', '.join(KEY_TYPES)}")
    algorithm = (["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"] if key_type == "ec" else
                 ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"])
    _openssl("genpkey", *algorithm, "-out", str(path))
    os.chmod(path, 0o600)


def _subject_cn(common_name: str) -> str:
    # openssl's -subj syntax treats '/' as an RDN separator, so a module CN "dev/mod" must be escaped.
    return "/CN=" + common_name.replace("\\", "\\\\").replace("/", "\\/")


def ensure_ca(state_dir: Path, name: str = CA_NAME, key_type: str = "ec") -> CertificateAuthority:
    """Return the CA in ``state_dir``, creating it on first use (valid ten years) as ``O=lightclient, CN=name``
    with a ``key_type`` key (``"ec"`` P-256 or ``"rsa"`` 2048)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    ca = CertificateAuthority(state_dir / "ca.pem", state_dir / "ca.key")
    if ca.cert_path.exists() and ca.key_path.exists():
        return ca
    _new_key(ca.key_path, key_type)
    _openssl("req", "-new", "-x509", "-key", str(ca.key_path), "-out", str(ca.cert_path), "-days", "3650",
             "-subj", "/O=lightclient" + _subject_cn(name), "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return ca


def _sign(ca: CertificateAuthority, csr: Path, out: Path, extensions: str, days: int) -> None:
    ext_file = out.with_suffix(".ext")
    ext_file.write_text("[ext]\n" + extensions)
    try:
        # A random serial (not -CAcreateserial) so concurrent issuers never race on a serial file.
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca.cert_path), "-CAkey", str(ca.key_path),
                 "-set_serial", "0x" + secrets.token_hex(12), "-days", str(days), "-sha256",
                 "-extfile", str(ext_file), "-extensions", "ext", "-out", str(out))
    finally:
        ext_file.unlink(missing_ok=True)


def ensure_server_certificate(state_dir: Path, ca: CertificateAuthority, names: Iterable[str],
                              key_type: str = "ec") -> Tuple[Path, Path]:
    """Return (cert, key) for the hub, re-issuing when the set of names changed since last time."""
    names = sorted(set(names))
    dns = [n for n in names if not _is_ip(n)]
    ips = [n for n in names if _is_ip(n)]
    san = ",".join([f"DNS:{n}" for n in dns] + [f"IP:{n}" for n in ips])
    cert, key, record = state_dir / "server.pem", state_dir / "server.key", state_dir / "server.san"
    if cert.exists() and key.exists() and record.exists() and record.read_text() == san:
        return cert, key
    _new_key(key, key_type)
    csr = state_dir / "server.csr"
    _openssl("req", "-new", "-key", str(key), "-subj", _subject_cn(dns[0] if dns else "localhost"),
             "-out", str(csr))
    _sign(ca, csr, cert, f"basicConstraints = critical, CA:FALSE\nkeyUsage = critical, digitalSignature\n"
                         f"extendedKeyUsage = serverAuth\nsubjectAltName = {san}\n", days=825)
    csr.unlink()
    record.write_text(san)
    return cert, key


def _is_ip(name: str) -> bool:
    import ipaddress
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def issue_device_certificate(ca: CertificateAuthority, identity: str, out_dir: Path,
                             days: int = 365, key_type: str = "ec") -> Tuple[Path, Path]:
    """Create a key (``"ec"`` P-256 or ``"rsa"`` 2048) and a CA-signed certificate with ``CN=identity``;
    return (cert_path, key_path).

    For a module identity ``device/module`` the files are named ``device__module.pem``/``.key``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = identity.replace("/", "__")
    key, cert, csr = out_dir / f"{stem}.key", out_dir / f"{stem}.pem", out_dir / f"{stem}.csr"
    _new_key(key, key_type)
    _openssl("req", "-new", "-key", str(key), "-subj", _subject_cn(identity), "-out", str(csr))
    try:
        _sign(ca, csr, cert, _CLIENT_EXTENSIONS, days)
    finally:
        csr.unlink(missing_ok=True)
    return cert, key


def sign_csr(ca: CertificateAuthority, csr_path: Path, out_path: Path, days: int = 365) -> Path:
    """Issue a client certificate for a PEM CSR (the subject is copied as requested); return its path."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    _sign(ca, Path(csr_path), Path(out_path), _CLIENT_EXTENSIONS, days)
    return Path(out_path)


def _sign_window(ca: CertificateAuthority, csr: Path, out: Path, extensions: str, lifetime: float) -> None:
    """Like :func:`_sign` but valid for ``lifetime`` seconds from now: ``openssl ca`` takes exact start and
    end times (``x509 -req`` only whole days). A throw-away database per call, so issuers never race."""
    import datetime
    import tempfile

    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    end = now + datetime.timedelta(seconds=max(1, round(lifetime)))
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "index.txt").write_text("")
        (d / "serial").write_text(secrets.token_hex(12).upper() + "\n")
        (d / "ext.cnf").write_text("[ext]\n" + extensions)
        (d / "ca.cnf").write_text(
            "[ca]\ndefault_ca = CA_default\n[CA_default]\n"
            f"database = {d}/index.txt\nnew_certs_dir = {d}\nserial = {d}/serial\n"
            "default_md = sha256\npolicy = any\nunique_subject = no\ncopy_extensions = none\n"
            "[any]\ncommonName = supplied\n")
        _openssl("ca", "-batch", "-config", str(d / "ca.cnf"), "-cert", str(ca.cert_path), "-keyfile",
                 str(ca.key_path), "-in", str(csr), "-out", str(out), "-notext", "-preserveDN",
                 "-startdate", now.strftime("%Y%m%d%H%M%SZ"), "-enddate", end.strftime("%Y%m%d%H%M%SZ"),
                 "-extfile", str(d / "ext.cnf"), "-extensions", "ext")


def issue_from_csr(ca: CertificateAuthority, csr_der: bytes, common_name: str,
                   lifetime: Optional[float] = None, days: int = 365, what: str = "device id") -> "list[bytes]":
    """Verify a DER PKCS#10 request (self-signature, CN == ``common_name``) and issue a client certificate
    for it, valid ``lifetime`` seconds (else ``days``). Returns the chain as DER, leaf first, ending with the
    CA (the shape DPS and the hub's credentials API return). ValueError says what is wrong with the CSR."""
    import base64
    import re
    import tempfile

    if not csr_der or csr_der[:1] != b"\x30":
        raise ValueError("the CSR is not DER (base64 of a PKCS#10 request, no PEM armour)")
    with tempfile.TemporaryDirectory() as tmp:
        csr = Path(tmp) / "req.pem"
        csr.write_text("-----BEGIN CERTIFICATE REQUEST-----\n" + base64.encodebytes(csr_der).decode()
                       + "-----END CERTIFICATE REQUEST-----\n")
        try:
            subject = _openssl("req", "-in", str(csr), "-noout", "-verify", "-subject",
                               "-nameopt", "multiline").decode()
        except EmulatorError:
            raise ValueError("the CSR is not a valid, self-signed PKCS#10 request") from None
        cn = re.search(r"commonName\s*=\s*(.+)", subject)
        if cn is None or cn.group(1).strip() != common_name:
            raise ValueError(f"the CSR's CN must equal the {what} {common_name!r}")
        out = Path(tmp) / "leaf.pem"
        if lifetime is not None:
            _sign_window(ca, csr, out, _CLIENT_EXTENSIONS, lifetime)
        else:
            _sign(ca, csr, out, _CLIENT_EXTENSIONS, days)
        return [certificate_der(out), certificate_der(ca.cert_path)]


def thumbprints(cert_pem_path: Path) -> Tuple[str, str]:
    """Return the (SHA-1, SHA-256) thumbprints of the first certificate in a PEM file, upper-case hex,
    the way the IoT Hub registry shows them."""
    der = certificate_der(cert_pem_path)
    return hashlib.sha1(der).hexdigest().upper(), hashlib.sha256(der).hexdigest().upper()


def certificate_der(cert_pem_path: Path) -> bytes:
    text = Path(cert_pem_path).read_text()
    end = "-----END CERTIFICATE-----"
    if end not in text:
        raise EmulatorError(f"{cert_pem_path} holds no PEM certificate")
    return ssl.PEM_cert_to_DER_cert(text[:text.index(end) + len(end)][text.index("-----BEGIN"):])


def issued_by(cert_der: bytes, ca: CertificateAuthority) -> bool:
    """Does ``ca`` verify this certificate (directly)?"""
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".pem") as fh:
        fh.write(ssl.DER_cert_to_PEM_cert(cert_der))
        fh.flush()
        exe = shutil.which("openssl")
        if exe is None:
            return False
        proc = subprocess.run([exe, "verify", "-CAfile", str(ca.cert_path), fh.name], capture_output=True)
        return proc.returncode == 0
