"""``lightclient upload FILE [--name BLOB]``: upload a file through IoT Hub to its linked storage."""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Optional, TextIO

from .. import tls, upload
from ..exceptions import ConfigError
from .common import (EXIT_OK, add_identity_options, add_key_options, env_help, identity, load_key,
                     refuse_x509_flags_with_sas, sas_credential, setting)
from .progress import eta_text

MiB = 1024 * 1024


def register(sub) -> None:
    p = sub.add_parser("upload", help="upload a file to the hub's linked storage (HTTPS, the device's key)",
                       description="Upload FILE through IoT Hub: the hub hands out a storage target over HTTPS "
                                   "authenticated by the certificate and the key in its token (or, with "
                                   "--sas-key, by a SAS token signed in the token), the file goes to "
                                   "storage as a block blob (large files in blocks, each retried, an interrupted "
                                   "upload resumed), and the hub is told how it ended. The blob is named "
                                   "{device id}/BLOB.")
    p.add_argument("file", metavar="FILE", help="the file to upload (a regular file)")
    p.add_argument("--name", metavar="BLOB", help="the blob name, e.g. logs/today.txt (default: FILE's base name)")
    add_identity_options(p)
    g = p.add_argument_group("connection")
    g.add_argument("--cert", help=env_help("cert", "device certificate chain (PEM, leaf first)"))
    g.add_argument("--ca", help=env_help("ca", "trusted roots for the hub and storage (default: the bundled roots)"))
    g.add_argument("--https-port", type=int, default=443, metavar="PORT",
                   help="the hub's HTTPS port (default 443; the emulator prints its own)")
    g.add_argument("--block-size", type=int, default=upload.DEFAULT_BLOCK_SIZE, metavar="BYTES",
                   help=f"bytes per block for files larger than that (default {upload.DEFAULT_BLOCK_SIZE})")
    g.add_argument("--content-type", help="the blob's content type, e.g. text/plain")
    g.add_argument("--timeout", type=float, default=3600.0,
                   help="give up after this many seconds in all (default 3600: the hub's SAS lasts 1 h)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    add_key_options(p)
    p.set_defaults(func=run)


class ByteProgress:
    """A live line on a terminal (``uploaded 12.0/50.0 MiB  31.2 MiB/s  ETA 2 s``), nothing elsewhere."""

    def __init__(self, stream: Optional[TextIO] = None):
        self.stream = stream or sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.live = bool(isatty and isatty())
        self.start = time.monotonic()
        self._last = 0.0
        self._shown = False

    def __call__(self, sent: int, total: int) -> None:
        now = time.monotonic()
        if not self.live or (now - self._last < 0.1 and sent < total):
            return
        self._last = now
        elapsed = now - self.start
        rate = sent / elapsed if elapsed > 0 else 0.0
        eta = (total - sent) / rate if rate > 0 else None
        width = 24
        filled = int(width * sent / total) if total else width
        self.stream.write(f"\r\x1b[K[{'#' * filled}{'.' * (width - filled)}] uploaded {sent / MiB:.1f}/"
                          f"{total / MiB:.1f} MiB  {rate / MiB:.1f} MiB/s  {eta_text(eta)}")
        self.stream.flush()
        self._shown = True

    def clear(self) -> None:
        if self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False


def run(args) -> int:
    ident = identity(args)
    if ident.module_id:
        raise ConfigError("file upload is for device identities: drop --module-id (IoT Hub offers it to no module)")
    if not 0 < args.https_port < 65536:
        raise ConfigError(f"--https-port must be from 1 to 65535, not {args.https_port}")
    name = args.name if args.name is not None else os.path.basename(args.file)
    try:
        upload.check_blob_name(name, ident.device_id)
    except ConfigError as exc:
        raise ConfigError(f"--name: {exc}" if args.name is not None else
                          f"FILE's base name does not make a blob name ({exc}); give --name BLOB") from None
    if not args.block_size or args.block_size < upload.MIN_BLOCK_SIZE:
        raise ConfigError(f"--block-size must be at least {upload.MIN_BLOCK_SIZE} bytes")
    ca = setting(args, "ca")
    sas = None
    if setting(args, "sas_key") is not None:
        refuse_x509_flags_with_sas(args)
        sas = sas_credential(args, ident)
        ctx = tls.server_context(ca=ca, alpn=["http/1.1"])   # no client certificate: the SAS authenticates
    else:
        cert = setting(args, "cert", required=True, what="the device certificate")
        ctx = tls.https_context(cert=cert, key=load_key(args), ca=ca)
    endpoint = ident.hostname if args.https_port == 443 else f"{ident.hostname}:{args.https_port}"
    progress = ByteProgress()
    try:
        result = upload.upload_file(args.file, name, device_id=ident.device_id, endpoint=endpoint, ssl_context=ctx,
                                    storage_ca=ca, progress=progress, block_size=args.block_size,
                                    content_type=args.content_type, timeout=args.timeout, sas=sas)
    finally:
        progress.clear()
    if args.json:
        print(json.dumps({"blobName": result.blob_name, "container": result.container_name, "url": result.url,
                          "size": result.size, "blocks": result.blocks, "blocksSkipped": result.blocks_skipped,
                          "correlationId": result.correlation_id}))
        return EXIT_OK
    how = f"in {result.blocks} blocks" if result.blocks else "in one request"
    resumed = f", {result.blocks_skipped} already in storage" if result.blocks_skipped else ""
    print(f"uploaded {args.file} ({result.size} bytes, {how}{resumed}) as {result.blob_name}: {result.url}")
    return EXIT_OK
