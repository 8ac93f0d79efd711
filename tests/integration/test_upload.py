"""File upload (issue 21) against the emulator's hub endpoints and blob storage: real HTTPS on loopback, the
device key in SoftHSM, storage reached with server verification and no client certificate."""
import hashlib
import json
import logging
import os
import ssl
import threading
import tracemalloc
import uuid

import pytest

from lightclient import _native, tls, upload
from lightclient.backoff import Backoff
from lightclient.device import Device
from lightclient.emulator.service import Emulator
from lightclient.exceptions import ConfigError, ServerCertificateError, UploadError
from lightclient.identity import Identity
from tests.lab import free_port

from ..conftest import csr_pem
from .faults import TcpProxy
from .httpservers import OneRequestStorage, Recorder, RedirectingHttps

FAST = Backoff(initial=0.05, maximum=0.2)
KiB, MiB = 1024, 1024 * 1024


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    with Emulator(tmp_path_factory.mktemp("emu"), hostname="localhost", port=free_port()) as emulator:
        emulator.start_file_upload()
        yield emulator


@pytest.fixture(scope="module")
def enrolled(emu, device, tmp_path_factory):
    """A device registered CA-signed whose certificate belongs to the SoftHSM EC key."""
    out = tmp_path_factory.mktemp("upload-dev")
    device_id = f"up-{uuid.uuid4().hex[:8]}"
    (out / "d.csr").write_bytes(csr_pem(_native.sign_csr(device["ec"]["key"], [("CN", device_id)])))
    cert = emu.sign_csr(out / "d.csr", out / "d.pem")
    emu.register_device(device_id)
    ctx = tls.https_context(cert=cert, key=device["ec"]["key"], ca=emu.ca_path)
    enrolled_cert[device_id] = cert
    return device_id, ctx


enrolled_cert = {}


@pytest.fixture
def files(emu):
    service = emu.files
    service.notifications.clear()
    yield service
    service.blob_host = f"localhost:{service.blob.port}"
    with service.blob._lock:
        service.blob._faults.clear()
    with service._lock:
        service._faults.clear()
        service._active.clear()


def _up(files, enrolled, source, name, **kwargs):
    device_id, ctx = enrolled
    kwargs.setdefault("backoff", FAST)
    return upload.upload_file(source, name, device_id=device_id, endpoint=f"localhost:{files.port}",
                              ssl_context=ctx, **kwargs)


def _random_file(path, size, chunk=MiB):
    digest = hashlib.sha256()
    with open(path, "wb") as fh:
        left = size
        while left:
            data = os.urandom(min(chunk, left))
            fh.write(data)
            digest.update(data)
            left -= len(data)
    return digest.hexdigest()


def test_small_file_through_the_device_with_the_token_key(emu, files, enrolled, tmp_path, caplog):
    device_id, ctx = enrolled
    path = tmp_path / "hello.txt"
    path.write_bytes(b"hello from the token\n")
    seen = []
    caplog.set_level(logging.DEBUG)   # urllib3 logs every request line, query included
    dev = Device(Identity("localhost", device_id), ctx, host="localhost", port=emu.port)
    result = dev.upload_file(str(path), "logs/hello.txt", progress=lambda s, t: seen.append((s, t)),
                             endpoint=f"localhost:{files.port}", backoff=FAST)
    assert result.blob_name == f"{device_id}/logs/hello.txt" and result.size == 21 and result.blocks == 0
    assert files.blob.read(result.blob_name) == path.read_bytes()
    assert seen[-1] == (21, 21)
    (note,) = files.wait_for_notification(1)
    assert (note.correlation_id, note.is_success, note.status_code) == (result.correlation_id, True, 201)
    assert files.active(device_id) == 0
    assert "sig=" in caplog.text and "sig=<SAS redacted>" in caplog.text   # the request lines were logged...
    sas_sigs = [r for r in caplog.text.split("sig=")[1:] if not r.startswith("<SAS redacted>")]
    assert sas_sigs == []                                                  # ...without the signature
    assert "sas" not in repr(result).lower()


def test_aio_device_uploads_off_the_loop_with_progress_on_it(emu, files, enrolled, tmp_path):
    """lightclient.aio.Device.upload_file: the same upload, awaited; the loop keeps running meanwhile and
    progress() is called on the loop's thread, every call before the await returns."""
    import asyncio

    from lightclient import aio

    device_id, ctx = enrolled
    path = tmp_path / "aio.bin"
    digest = _random_file(path, 5 * KiB + 7)
    loop_thread, seen, ticks = [], [], []

    async def scenario():
        loop_thread.append(threading.get_ident())
        dev = aio.Device(Identity("localhost", device_id), ctx, host="localhost", port=emu.port)

        async def tick():
            while True:
                ticks.append(1)
                await asyncio.sleep(0.001)

        ticker = asyncio.ensure_future(tick())
        try:
            return await dev.upload_file(str(path), "logs/aio.bin", block_size=KiB, single_put_limit=KiB,
                                         progress=lambda s, t: seen.append((s, t, threading.get_ident())),
                                         endpoint=f"localhost:{files.port}", backoff=FAST)
        finally:
            ticker.cancel()

    result = asyncio.run(scenario())
    assert result.blob_name == f"{device_id}/logs/aio.bin" and result.size == 5 * KiB + 7 and result.blocks == 6
    assert hashlib.sha256(files.blob.read(result.blob_name)).hexdigest() == digest
    assert seen[-1][:2] == (5 * KiB + 7, 5 * KiB + 7) and len(seen) == 6
    assert {thread for _, _, thread in seen} == set(loop_thread)
    assert len(ticks) > 1  # the loop ran other tasks during the upload
    (note,) = files.wait_for_notification(1)
    assert note.correlation_id == result.correlation_id and note.is_success


def test_empty_file(files, enrolled, tmp_path):
    path = tmp_path / "empty"
    path.write_bytes(b"")
    result = _up(files, enrolled, str(path), "empty.bin")
    assert result.size == 0 and files.blob.read(result.blob_name) == b""
    assert files.wait_for_notification(1)[0].is_success


def test_file_object_source(files, enrolled):
    import io

    result = _up(files, enrolled, io.BytesIO(b"x" * 5000), "obj.bin", block_size=KiB, single_put_limit=KiB)
    assert result.blocks == 5 and files.blob.read(result.blob_name) == b"x" * 5000


def test_50_mb_in_blocks_with_bounded_memory(files, enrolled, tmp_path):
    path = tmp_path / "big.bin"
    digest = _random_file(path, 50 * MiB)
    calls = []
    tracemalloc.start()
    try:
        result = _up(files, enrolled, str(path), "big.bin", block_size=2 * MiB,
                     progress=lambda s, t: calls.append(s))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.blocks == 25 and result.blocks_skipped == 0 and result.size == 50 * MiB
    assert files.blob.digest(result.blob_name) == digest
    assert calls == sorted(calls) and calls[-1] == 50 * MiB and len(calls) == 25
    # The client holds a block (plus a copy or two in the HTTP layers) and the emulator 64 KiB chunks
    # in this same process: far below the 50 MiB a whole-file read would take.
    assert peak < 16 * MiB, f"peak Python memory {peak / MiB:.1f} MiB while uploading 50 MiB"


def test_connection_cut_mid_upload_resumes_without_resending_blocks(files, enrolled, tmp_path):
    path = tmp_path / "cut.bin"
    digest = _random_file(path, 3 * MiB)
    proxy = TcpProxy(files.blob.port)
    files.blob_host = f"localhost:{proxy.port}"
    cut_at = []

    def progress(sent, total):
        if sent >= 1 * MiB and not cut_at:
            cut_at.append(sent)
            proxy.black_hole()   # the open connection carries nothing more, ever: the next block is lost on it
    try:
        result = _up(files, enrolled, str(path), "cut.bin", block_size=128 * KiB, progress=progress,
                     request_timeout=1.5)
    finally:
        proxy.close()
    assert files.blob.digest(result.blob_name) == digest
    assert proxy.connections >= 2, "the upload did not go on over a new connection"
    puts = files.blob.block_puts[result.blob_name]
    assert len(puts) == 24 and set(puts.values()) == {1}, "a finished block was sent again"


def test_drop_mid_block_is_retried_and_a_later_call_resumes(files, enrolled, tmp_path):
    path = tmp_path / "drop.bin"
    digest = _random_file(path, 10 * 64 * KiB)
    files.blob.inject("drop", op="block", skip=4)   # block 4 is cut in half on every attempt of the first call
    files.blob.inject("drop", op="block")
    files.blob.inject("drop", op="block")
    with pytest.raises(UploadError) as exc:
        _up(files, enrolled, str(path), "drop.bin", block_size=64 * KiB, block_attempts=3)
    assert exc.value.stage == "storage" and exc.value.notified is True
    (note,) = files.wait_for_notification(1)
    assert note.is_success is False and note.correlation_id == exc.value.correlation_id
    first = dict(files.blob.block_puts[note.blob_name])
    assert len(first) == 4
    result = _up(files, enrolled, str(path), "drop.bin", block_size=64 * KiB)
    assert result.blocks == 10 and result.blocks_skipped == 4
    assert files.blob.digest(result.blob_name) == digest
    assert set(files.blob.block_puts[result.blob_name].values()) == {1}


def test_block_stored_but_answer_lost_is_not_sent_again(files, enrolled, tmp_path):
    """Storage took block 2 but the connection broke before its answer: the block list shows it, so the
    upload goes on with block 3 instead of sending block 2 again."""
    path = tmp_path / "lost.bin"
    digest = _random_file(path, 6 * 16 * KiB)
    files.blob.inject("lost", op="block", skip=2)
    result = _up(files, enrolled, str(path), "lost.bin", block_size=16 * KiB)
    assert files.blob.digest(result.blob_name) == digest
    assert files.blob.drops >= 1
    assert set(files.blob.block_puts[result.blob_name].values()) == {1}, "block 2 was sent twice"


def test_storage_503_once_is_retried(files, enrolled, tmp_path):
    path = tmp_path / "busy.bin"
    path.write_bytes(b"b" * 3000)
    files.blob.inject(503, op="block", skip=1)
    result = _up(files, enrolled, str(path), "busy.bin", block_size=KiB, single_put_limit=KiB)
    assert files.blob.read(result.blob_name) == b"b" * 3000
    assert [s for m, op, b, s in files.blob.requests if b == result.blob_name and op == "block"].count(503) == 1


@pytest.mark.parametrize("status", [403, 503])
def test_storage_refusal_is_typed_and_the_hub_is_told(files, enrolled, tmp_path, status):
    path = tmp_path / "refused.txt"
    path.write_bytes(b"data")
    for _ in range(2):
        files.blob.inject(status, op="put")
    with pytest.raises(UploadError) as exc:
        _up(files, enrolled, str(path), f"refused-{status}.txt", block_attempts=2)
    assert exc.value.status == status and exc.value.stage == "storage" and exc.value.notified is True
    assert "sig=" not in str(exc.value) and "<SAS redacted>" in str(exc.value)
    (note,) = files.wait_for_notification(1)
    assert (note.is_success, note.status_code) == (False, status)
    assert files.active(enrolled[0]) == 0


def test_hub_refusals(files, enrolled, tmp_path):
    path = tmp_path / "h.txt"
    path.write_bytes(b"h")
    files.inject(enrolled[0], 403, step="sas")
    with pytest.raises(UploadError) as exc:
        _up(files, enrolled, str(path), "h.txt")
    assert exc.value.stage == "sas" and exc.value.status == 403 and exc.value.notified is None
    files.inject(enrolled[0], 403, step="notify")
    with pytest.raises(UploadError) as exc:
        _up(files, enrolled, str(path), "h2.txt")
    assert exc.value.stage == "notify" and exc.value.status == 403
    assert files.blob.read(f"{enrolled[0]}/h2.txt") == b"h"     # the data did arrive


def test_eleventh_open_upload_is_refused(files, enrolled):
    device_id, ctx = enrolled
    session = tls.https_session(ctx)
    try:
        for i in range(10):
            req = upload.sas_uri_request(device_id, f"open-{i}", endpoint=f"localhost:{files.port}")
            assert session.post(req.url, data=req.body, headers=dict(req.headers)).status_code == 200
    finally:
        session.close()
    with pytest.raises(UploadError) as exc:
        _up(files, enrolled, __file__, "eleventh.py")
    assert exc.value.status == 403 and exc.value.error_code == "403006" and "at most 10" in str(exc.value)


@pytest.mark.parametrize("name", ["", "a/../b", "dir/", "x\\y", "a//b", "tab\there", "n" * 1100])
def test_blob_names_the_hub_rejects_are_config_errors(files, enrolled, name):
    with pytest.raises(ConfigError):
        _up(files, enrolled, __file__, name)
    assert files.requests == [] or all(r[1] != "sas" or r[2] != 200 for r in files.requests[-1:])


def test_hub_side_blob_name_refusal_maps_to_config_error(files, enrolled):
    """The hub's own 400 for a blob name (sent past the local check) becomes ConfigError."""
    device_id, ctx = enrolled
    session = tls.https_session(ctx)
    try:
        req = upload.sas_uri_request(device_id, "ok", endpoint=f"localhost:{files.port}")
        resp = session.post(req.url, data=b'{"blobName":"a/../b"}', headers=dict(req.headers))
    finally:
        session.close()
    assert resp.status_code == 400
    err = upload.hub_error(resp.status_code, resp.content, resp.headers, blob_name="a/../b")
    assert isinstance(err, ConfigError) and "a/../b" in str(err)


def test_directories_and_fifos_are_refused(files, enrolled, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for bad in (tmp_path, fifo, "/dev/zero"):
        with pytest.raises(ConfigError, match="regular file"):
            _up(files, enrolled, str(bad), "x.bin")
    with pytest.raises(ConfigError, match="cannot read"):
        _up(files, enrolled, str(tmp_path / "missing"), "x.bin")


@pytest.mark.parametrize("status", [302, 307])
def test_storage_redirect_is_refused_and_not_followed(files, enrolled, test_ca, tmp_path, status):
    recorder = Recorder()
    location = f"https://127.0.0.1:{recorder.port}/elsewhere"
    server = RedirectingHttps(test_ca, status, location, on="PUT")
    files.blob_host = server.endpoint
    path = tmp_path / "r.txt"
    path.write_bytes(b"r")
    try:
        with pytest.raises(UploadError) as exc:
            _up(files, enrolled, str(path), "redirected.txt", storage_ca=test_ca.cert)
    finally:
        server.close()
        recorder.close()
    assert exc.value.status == status and "never follows redirects" in str(exc.value)
    assert exc.value.notified is True and files.wait_for_notification(1)[0].is_success is False
    assert recorder.connections == 0
    assert "sig=" not in str(exc.value)


def test_storage_certificate_is_verified(files, enrolled, test_ca, tmp_path):
    """Storage on a certificate from another CA than the one trusted: refused, typed, hub told."""
    server = RedirectingHttps(test_ca, 201, None, on="PUT")
    files.blob_host = server.endpoint
    path = tmp_path / "v.txt"
    path.write_bytes(b"v")
    try:
        with pytest.raises(ServerCertificateError):
            _up(files, enrolled, str(path), "verify.txt")      # trusts only the emulator CA
    finally:
        server.close()
    assert files.wait_for_notification(1)[0].is_success is False
    assert server.requests == []


def test_storage_never_gets_the_client_certificate(files, enrolled, test_ca, tmp_path):
    """A storage host that asks for a client certificate gets none (the key stays with the hub)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(test_ca.server_cert), str(test_ca.server_key))
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.load_verify_locations(cafile=str(test_ca.cert))
    storage = OneRequestStorage(ctx, b"c")
    files.blob_host = f"localhost:{storage.port}"
    path = tmp_path / "c.txt"
    path.write_bytes(b"c")
    try:
        _up(files, enrolled, str(path), "c.txt", storage_ca=test_ca.cert, request_timeout=10, block_attempts=1)
    finally:
        storage.close()
    assert storage.peer == [None]


def test_cli_upload_with_the_token_key(emu, files, enrolled, device, tmp_path):
    import subprocess
    import sys

    from ..conftest import PIN

    device_id = enrolled[0]
    path = tmp_path / "report.csv"
    digest = _random_file(path, 300 * KiB)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIGHTCLIENT_")
           and k not in ("IOT_HUB_HOSTNAME", "DEVICE_ID", "PATH_TO_CERTIFICATE_FILE", "KEY_IDENTIFIER")}
    env["LIGHTCLIENT_PIN"] = PIN
    args = [sys.executable, "-m", "lightclient", "upload", str(path), "--name", "reports/r.csv", "--hub", "localhost",
            "--device-id", device_id, "--cert", str(enrolled_cert[device_id]), "--key", device["ec"]["uri"],
            "--ca", str(emu.ca_path), "--https-port", str(files.port), "--block-size", str(64 * KiB), "--json"]
    proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["blobName"] == f"{device_id}/reports/r.csv" and out["blocks"] == 5 and out["size"] == 300 * KiB
    assert files.blob.digest(out["blobName"]) == digest
    assert PIN not in proc.stdout + proc.stderr and "sig=" not in proc.stdout + proc.stderr
    bad = subprocess.run(args[:5] + ["--name", "a/../b"] + args[7:], env=env, capture_output=True, text=True,
                         timeout=60, stdin=subprocess.DEVNULL)
    assert bad.returncode == 2 and "--name" in bad.stderr and "'..'" in bad.stderr
