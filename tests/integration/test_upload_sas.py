"""File upload for a symmetric-key device (protocol notes §9/§10): the hub's HTTPS endpoints are authenticated
by ``Authorization: SharedAccessSignature sr={hub}%2Fdevices%2F{id}&sig=…&se=…`` signed inside a SoftHSM token,
storage gets only its own SAS; the emulator checks signature, expiry and resource (401 + a diagnostic)."""
import asyncio
import base64
import hashlib
import http.client
import json
import logging
import os
import ssl
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import pytest

from lightclient import aio, sas, tls, upload
from lightclient.backoff import Backoff
from lightclient.device import Device
from lightclient.exceptions import ConfigError, UploadError
from lightclient.identity import Identity
from lightclient.symkey import SasCredential, SoftwareKey, TokenKey
from lightclient.token import run_in_child
from tests import lab

from .httpservers import OneRequestStorage
from .test_upload import emu, files  # noqa: F401 (the same emulator and file-upload fixtures)

ROOT = Path(__file__).resolve().parents[2]
PIN, SO_PIN = "sasup-pin-7301", "sasup-so-7302"
KEY = json.loads((ROOT / "tests" / "vectors" / "sas.json").read_text())["key"]
OTHER_KEY = "b3RoZXIta2V5LW90aGVyLWtleS1vdGhlci1rZXktMTI="
FAST = Backoff(initial=0.05, maximum=0.2)
KiB = 1024


@pytest.fixture(scope="module")
def hsm(tmp_path_factory):
    h = lab.SoftHSM(tmp_path_factory.mktemp("sasup-hsm"))
    h.init_token("sasup", PIN, SO_PIN)
    run_in_child("import-secret", module_path=h.module_path, token_label="sasup", key_label="dev", key_b64=KEY,
                 pin=PIN, env=h.env)
    return h


def _register(emu, name, *keys):
    emu.register_device(name, symmetric_keys=keys or (KEY,))
    return Identity("localhost", name)


def _token_key(hsm):
    return TokenKey(f"pkcs11:token=sasup;object=dev?module-path={hsm.module_path}", pin=PIN, env=hsm.env)


def _device(emu, hsm, identity, **cred):
    credential = SasCredential.for_identity(identity, _token_key(hsm), **cred)
    return Device(identity, tls.server_context(ca=emu.ca_path), host="127.0.0.1", port=emu.port, sas=credential)


def _no_secrets(text):
    return PIN not in text and "SharedAccessSignature" not in text and KEY not in text and \
        [r for r in text.split("sig=")[1:] if not r.startswith("<SAS redacted>")] == []


def test_token_key_device_uploads_a_file(emu, files, hsm, tmp_path, caplog):
    identity = _register(emu, "sas-up-1")
    caplog.set_level(logging.DEBUG)   # urllib3 logs each request line, lightclient each token it signs
    path = tmp_path / "hello.txt"
    path.write_bytes(b"hello from a SAS device\n")
    dev = _device(emu, hsm, identity)
    result = dev.upload_file(str(path), "logs/hello.txt", endpoint=f"localhost:{files.port}", backoff=FAST)
    assert result.blob_name == "sas-up-1/logs/hello.txt" and result.size == 24
    assert files.blob.read(result.blob_name) == path.read_bytes()
    (note,) = files.wait_for_notification(1)
    assert (note.correlation_id, note.is_success, note.status_code) == (result.correlation_id, True, 201)
    assert files.active("sas-up-1") == 0
    assert ("sas-up-1", "sas", 200) in files.requests and ("sas-up-1", "notify", 204) in files.requests
    assert not emu.diagnostics("sas-up-1"), emu.diagnostics("sas-up-1")
    assert _no_secrets(caplog.text) and _no_secrets(repr(result))


def test_aio_device_uploads_in_blocks_with_the_token_key(emu, files, hsm, tmp_path):
    identity = _register(emu, "sas-up-aio")
    path = tmp_path / "aio.bin"
    data = os.urandom(3 * KiB + 5)
    path.write_bytes(data)

    async def scenario():
        cred = SasCredential.for_identity(identity, _token_key(hsm))
        dev = aio.Device(identity, tls.server_context(ca=emu.ca_path), host="127.0.0.1", port=emu.port, sas=cred)
        return await dev.upload_file(str(path), "aio.bin", block_size=KiB, single_put_limit=KiB,
                                     endpoint=f"localhost:{files.port}", backoff=FAST)

    result = asyncio.run(scenario())
    assert result.blocks == 4 and files.blob.digest(result.blob_name) == hashlib.sha256(data).hexdigest()
    assert files.wait_for_notification(1)[0].is_success


def test_wrong_key_is_a_typed_401_with_a_diagnostic(emu, files, hsm, tmp_path, caplog):
    identity = _register(emu, "sas-up-wrong", OTHER_KEY)
    path = tmp_path / "w.txt"
    path.write_bytes(b"w")
    with pytest.raises(UploadError) as info:
        _device(emu, hsm, identity).upload_file(str(path), "w.txt", endpoint=f"localhost:{files.port}",
                                                backoff=FAST)
    assert (info.value.status, info.value.stage) == (401, "sas")
    assert "SAS token" in str(info.value) and "signature" in str(info.value)
    assert _no_secrets(str(info.value)) and _no_secrets(caplog.text)
    (diag,) = emu.diagnostics("sas-up-wrong", rule="files.sas-signature")
    assert "HTTP 401" in str(diag) and _no_secrets(str(diag))
    assert files.notifications == []   # no target was handed out, so there is nothing to notify


def test_expired_token_is_a_typed_401(emu, files, hsm, tmp_path):
    identity = _register(emu, "sas-up-expired")
    path = tmp_path / "e.txt"
    path.write_bytes(b"e")
    dev = _device(emu, hsm, identity, clock=lambda: time.time() - 7200)   # a clock 2 h behind
    with pytest.raises(UploadError) as info:
        dev.upload_file(str(path), "e.txt", endpoint=f"localhost:{files.port}", backoff=FAST)
    assert info.value.status == 401 and "expired" in str(info.value) and "clock" in str(info.value)
    assert emu.diagnostics("sas-up-expired", rule="files.sas-expired")


def test_credential_for_another_identity_is_refused_before_any_request(emu, files, tmp_path):
    path = tmp_path / "o.txt"
    path.write_bytes(b"o")
    for uri in ("localhost/devices/someone-else", "localhost/devices/sas-up-mod/modules/m"):
        with pytest.raises(ConfigError, match="not for device 'sas-up-mod'"):
            upload.upload_file(str(path), "o.txt", device_id="sas-up-mod", endpoint=f"localhost:{files.port}",
                               ssl_context=tls.server_context(ca=emu.ca_path), sas=SasCredential(SoftwareKey(KEY), uri))
    with pytest.raises(ConfigError, match="SasCredential"):
        upload.upload_file(str(path), "o.txt", device_id="sas-up-mod", endpoint=f"localhost:{files.port}",
                           ssl_context=tls.server_context(ca=emu.ca_path), sas="SharedAccessSignature sr=x")


def _post(emu, files, device_id, authorization=None, context=None):
    """One raw step-1 request, so the emulator's rules can be probed with tokens lightclient would not send."""
    ctx = context or ssl.create_default_context(cafile=str(emu.ca_path))
    conn = http.client.HTTPSConnection("localhost", files.port, context=ctx, timeout=10)
    headers = {"Content-Type": "application/json"}
    if authorization is not None:
        headers["Authorization"] = authorization
    try:
        conn.request("POST", f"/devices/{device_id}/files?api-version=2019-10-01", b'{"blobName":"x.txt"}', headers)
        answer = conn.getresponse()
        return answer.status, json.loads(answer.read() or b"{}")
    finally:
        conn.close()


def _token(uri, key=KEY, expiry=None, policy=None):
    expiry = expiry or int(time.time()) + 600
    return sas.token(uri, sas.hmac_sha256(sas.decode_key(key), sas.string_to_sign(uri, expiry)), expiry, policy).value


def test_emulator_sas_rules_for_file_upload(emu, files):
    """Both readings of the resource URI (the SDKs' case-kept sr, the docs' lower-cased one) are accepted;
    every refusal is 401 401002 with a diagnostic naming the rule, and no diagnostic holds the token."""
    _register(emu, "sas-up-Raw")
    good = "localhost/devices/sas-up-Raw"
    assert _post(emu, files, "sas-up-Raw", _token(good))[0] == 200
    sr, se = "localhost%2fdevices%2fsas-up-raw", int(time.time()) + 600     # the docs' reading, signed as sent
    sig = base64.b64encode(sas.hmac_sha256(sas.decode_key(KEY), f"{sr}\n{se}".encode())).decode()
    lowered = f"SharedAccessSignature sr={sr}&sig={quote(sig, safe='')}&se={se}"
    assert _post(emu, files, "sas-up-Raw", lowered)[0] == 200
    cases = [
        (_token(good, key=OTHER_KEY), "files.sas-signature"),
        (_token(good, expiry=int(time.time()) - 5), "files.sas-expired"),
        (_token("localhost/devices/another"), "files.sas-resource"),
        (_token(good, policy="registration"), "files.sas"),
        (None, "files.sas"),
    ]
    for authorization, rule in cases:
        status, body = _post(emu, files, "sas-up-Raw", authorization)
        assert (status, body["errorCode"]) == (401, 401002), (rule, body)
        diag = emu.wait_for_diagnostic(rule, "sas-up-Raw")
        assert "HTTP 401" in diag.message and "sig=" not in str(diag)
    # An X.509 device: a SAS header is refused (it has no key to check it with), and so is no certificate.
    emu.register_device("x509-up")
    assert _post(emu, files, "x509-up", _token("localhost/devices/x509-up"))[0] == 401
    assert emu.wait_for_diagnostic("files.sas", "x509-up")
    assert _post(emu, files, "x509-up")[0] == 401
    assert "sent none" in emu.wait_for_diagnostic("files.certificate", "x509-up").message


def test_storage_never_gets_the_hub_sas(emu, files, hsm, tmp_path):
    """Storage (here a raw TLS listener that records the request) sees its own SAS only: no Authorization
    header and nothing of the device's token."""
    identity = _register(emu, "sas-up-storage")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert, key = emu._server_files
    ctx.load_cert_chain(str(cert), str(key))
    storage = OneRequestStorage(ctx, b"s")
    files.blob_host = f"localhost:{storage.port}"
    path = tmp_path / "s.txt"
    path.write_bytes(b"s")
    try:
        _device(emu, hsm, identity).upload_file(str(path), "s.txt", endpoint=f"localhost:{files.port}",
                                                backoff=FAST, block_attempts=1, request_timeout=10)
    finally:
        storage.close()
    (request,) = storage.request
    assert request.startswith(b"PUT /") and b"sig=" in request       # storage's own SAS, in the query
    assert b"authorization" not in request.lower() and b"SharedAccessSignature" not in request
    assert b"devices%2Fsas-up-storage" not in request


def test_cli_upload_with_sas_key(emu, files, hsm, tmp_path):
    _register(emu, "sas-up-cli")
    path = tmp_path / "report.csv"
    path.write_bytes(os.urandom(40 * KiB))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIGHTCLIENT_")
           and k not in ("IOT_HUB_HOSTNAME", "DEVICE_ID", "PATH_TO_CERTIFICATE_FILE", "KEY_IDENTIFIER")}
    env.update(hsm.env, LIGHTCLIENT_PIN=PIN)
    ref = f"pkcs11:token=sasup;object=dev;type=secret-key?module-path={hsm.module_path}"
    args = [sys.executable, "-m", "lightclient", "upload", str(path), "--name", "reports/r.csv", "--hub", "localhost",
            "--device-id", "sas-up-cli", "--sas-key", ref, "--ca", str(emu.ca_path), "--https-port",
            str(files.port), "--block-size", str(16 * KiB), "--json"]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["blobName"] == "sas-up-cli/reports/r.csv" and out["blocks"] == 3
    assert files.blob.read(out["blobName"]) == path.read_bytes()
    assert _no_secrets(proc.stdout + proc.stderr)
    both = subprocess.run(args + ["--cert", str(path)], env=env, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL, cwd=ROOT)
    assert both.returncode == 2 and "--cert is for X.509 devices" in both.stderr, both.stderr
