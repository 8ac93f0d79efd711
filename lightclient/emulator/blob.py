"""A small local Azure Blob Storage for the hub's file upload: HTTPS (server certificate from the emulator's
CA, no client certificate), block blobs only, authorized by the SAS the hub issued. Standard library only.

Operations (``/{container}/{blob}`` plus the SAS query)::

    PUT  …                                 x-ms-blob-type: BlockBlob   Put Blob          -> 201
    PUT  …&comp=block&blockid={b64}                                    Put Block         -> 201
    PUT  …&comp=blocklist   <BlockList><Latest>{id}</Latest>…</BlockList> Put Block List -> 201
    GET  …&comp=blocklist[&blocklisttype=committed|uncommitted|all]    Get Block List    -> 200 XML
    GET  …                                                             Get Blob          -> 200 bytes

Errors are storage's: an XML ``<Error><Code>…</Code><Message>…</Message></Error>`` body and the code in
``x-ms-error-code`` (AuthenticationFailed 403, InvalidBlockId 400, InvalidBlockList 400,
RequestBodyTooLarge 413, BlobNotFound 404, MissingContentLengthHeader 411).

The SAS is checked like storage checks a service SAS: ``sv``, ``sr=b``, ``sp`` (``c``/``w`` to write,
``r`` to read), ``se`` (expiry, UTC) and ``sig`` (HMAC-SHA256 with this account's key over the
permissions, times, the canonical resource ``/blob/{account}/{container}/{blob}``, ``sv`` and ``sr``,
one per line). The string-to-sign is this emulator's own (no real storage key exists here to match);
what matters to a client is the same: a SAS works only for its blob, for its lifetime, unaltered.
Limits follow the token's ``sv`` (see :data:`LIMITS`); every block id of a blob must have one length.

Data goes to disk under ``{root}`` as it arrives (64 KiB at a time), so memory stays small for any size.
Fault injection (:meth:`BlobStore.inject`): answer a chosen request with a status (503 with
``Retry-After``, 403, 500 …); ``"drop"``: read half of its body, then reset the connection; ``"lost"``:
carry it out, then reset the connection instead of answering.
"""
from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import os
import re
import secrets
import shutil
import socket
import ssl
import struct
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Union
from urllib.parse import parse_qs, quote, unquote, urlsplit

from .tls_http import ServerThread, TlsHttpServer

MiB = 1024 * 1024
#: (first service version, largest Put Blob, largest block) newest first (Learn: scalability targets).
LIMITS = (("2019-12-12", 5000 * MiB, 4000 * MiB), ("2016-05-31", 256 * MiB, 100 * MiB), ("", 64 * MiB, 4 * MiB))
MAX_BLOCKS = 50_000
MAX_UNCOMMITTED = 100_000
#: The SAS service version the hub hands out here by default: the one in the docs' example answer.
DEFAULT_SERVICE_VERSION = "2018-03-28"
_CHUNK = 64 * 1024


def limits_for(sv: str) -> Tuple[int, int]:
    """(largest Put Blob, largest block) in bytes for service version ``sv``."""
    for first, put, block in LIMITS:
        if sv >= first:
            return put, block
    return LIMITS[-1][1], LIMITS[-1][2]


def _utc(ts: datetime.datetime) -> str:
    return ts.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class _Fault:
    action: Union[int, str]     # an HTTP status, or "drop"
    op: str                     # put | block | blocklist | getblocklist | get | any
    skip: int


class StorageError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class BlobStore:
    """The storage account. ``start()`` serves HTTPS on a thread; ``stop()`` ends it. Thread-safe."""

    def __init__(self, root: Path, *, server_cert: Path, server_key: Path, host: str = "127.0.0.1", port: int = 0,
                 account: str = "emulatorstore", container: str = "uploads",
                 service_version: str = DEFAULT_SERVICE_VERSION, max_bytes: int = 4096 * MiB):
        self.root = Path(root)
        self.account = account
        self.container = container
        self.service_version = service_version
        self.max_bytes = max_bytes
        self._key = secrets.token_bytes(32)
        self._lock = threading.Lock()
        self._faults: List[_Fault] = []
        self._blobs: Dict[str, List[Tuple[str, int]]] = {}        # blob -> committed blocks (id, size)
        self._sizes: Dict[str, int] = {}                          # blob -> committed size
        self._uncommitted: Dict[str, Dict[str, int]] = {}         # blob -> id -> size
        self._stored = 0
        #: blob -> block id -> how often a Put Block for it completed (a resumed upload sends none twice).
        self.block_puts: Dict[str, Dict[str, int]] = {}
        #: (method, operation, blob, status) of every request answered, oldest first.
        self.requests: List[Tuple[str, str, str, int]] = []
        self.drops = 0
        if self.root.exists():
            shutil.rmtree(self.root)   # a fresh account per run: uncommitted blocks do not outlive it
        self.root.mkdir(parents=True)
        self._ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self._ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self._ctx.load_cert_chain(str(server_cert), str(server_key))
        self._serving = ServerThread(_Server((host, port), _Handler, self), "blob-emulator")

    # ------------------------------------------------------------------ setup

    @property
    def port(self) -> int:
        return self._serving.server.server_address[1]

    def start(self) -> "BlobStore":
        self._serving.start()
        return self

    def stop(self) -> None:
        self._serving.stop()

    def inject(self, action: Union[int, str], *, op: str = "any", skip: int = 0) -> None:
        """Answer the next request of kind ``op`` (after ``skip`` such requests) with status ``action``;
        ``"drop"``: take half of its body, then reset the connection; ``"lost"``: carry the request out,
        then reset the connection instead of answering (the client cannot know it worked)."""
        if op not in ("any", "put", "block", "blocklist", "getblocklist", "get"):
            raise ValueError(f"unknown operation {op!r}")
        if not (action in ("drop", "lost") or (isinstance(action, int) and 400 <= action < 600)):
            raise ValueError(f"a fault is an error status (400-599), 'drop' or 'lost', not {action!r}")
        with self._lock:
            self._faults.append(_Fault(action, op, skip))

    # ------------------------------------------------------------------ SAS

    def _string_to_sign(self, sp: str, st: str, se: str, blob: str, sv: str, sr: str) -> bytes:
        return "\n".join((sp, st, se, f"/blob/{self.account}/{self.container}/{blob}", sv, sr)).encode()

    def issue_sas(self, blob: str, *, permissions: str = "rcw", ttl: float = 3600.0,
                  service_version: Optional[str] = None) -> str:
        """A service SAS (``?sv=…&sig=…``) for ``blob`` in the container, valid ``ttl`` seconds."""
        now = datetime.datetime.now(datetime.timezone.utc)
        st = _utc(now - datetime.timedelta(minutes=5))
        se = _utc(now + datetime.timedelta(seconds=ttl))
        sv = service_version or self.service_version
        sig = base64.b64encode(hmac.new(self._key, self._string_to_sign(permissions, st, se, blob, sv, "b"),
                                        hashlib.sha256).digest()).decode()
        query = {"sv": sv, "st": st, "se": se, "sr": "b", "sp": permissions, "sig": sig}
        return "?" + "&".join(f"{k}={quote(v, safe='')}" for k, v in query.items())

    def _authorize(self, query: Dict[str, str], blob: str, need: str) -> str:
        missing = [k for k in ("sv", "se", "sr", "sp", "sig") if not query.get(k)]
        if missing:
            raise StorageError(403, "AuthenticationFailed", f"the SAS lacks {', '.join(missing)}")
        expected = hmac.new(self._key, self._string_to_sign(query["sp"], query.get("st", ""), query["se"], blob,
                                                            query["sv"], query["sr"]), hashlib.sha256).digest()
        try:
            given = base64.b64decode(query["sig"], validate=True)
        except ValueError:
            given = b""
        if not hmac.compare_digest(expected, given):
            raise StorageError(403, "AuthenticationFailed", "the SAS signature does not match (wrong blob, "
                               "altered fields or another account)")
        now = _utc(datetime.datetime.now(datetime.timezone.utc))
        if query["se"] < now:
            raise StorageError(403, "AuthenticationFailed", f"the SAS expired at {query['se']}")
        if query["sr"] != "b" or not any(p in query["sp"] for p in need):
            raise StorageError(403, "AuthorizationPermissionMismatch",
                               f"the SAS does not allow this operation (sp={query['sp']})")
        return query["sv"]

    # ------------------------------------------------------------------ storage

    def _dir(self, blob: str) -> Path:
        return self.root / hashlib.sha256(blob.encode()).hexdigest()[:40]

    def _block_path(self, blob: str, block: str) -> Path:
        return self._dir(blob) / "blocks" / hashlib.sha256(block.encode()).hexdigest()

    def read(self, blob: str) -> bytes:
        """A committed blob's content (for tests and the service side)."""
        with self._lock:
            if blob not in self._blobs:
                raise KeyError(blob)
        return (self._dir(blob) / "blob").read_bytes()

    def size(self, blob: str) -> Optional[int]:
        with self._lock:
            return self._sizes.get(blob)

    def digest(self, blob: str) -> str:
        """SHA-256 of a committed blob, read in chunks (for large blobs in tests)."""
        h = hashlib.sha256()
        with open(self._dir(blob) / "blob", "rb") as fh:
            for chunk in iter(lambda: fh.read(_CHUNK), b""):
                h.update(chunk)
        return h.hexdigest()

    def blobs(self) -> List[str]:
        with self._lock:
            return sorted(self._blobs)

    def _reserve(self, length: int) -> None:
        with self._lock:
            if self._stored + length > self.max_bytes:
                raise StorageError(413, "RequestBodyTooLarge", f"this emulator's account is full "
                                   f"({self.max_bytes} bytes)")
            self._stored += length

    def put_block(self, blob: str, block: str, tmp: Path, length: int) -> None:
        with self._lock:
            blocks = self._uncommitted.setdefault(blob, {})
            lengths = {len(b) for b in blocks}
            if lengths and len(block) not in lengths:
                tmp.unlink()
                raise StorageError(400, "InvalidBlobOrBlock", "every block id of a blob must have the same length")
            if len(blocks) >= MAX_UNCOMMITTED and block not in blocks:
                tmp.unlink()
                raise StorageError(409, "BlockCountExceedsLimit", f"more than {MAX_UNCOMMITTED} uncommitted blocks")
            path = self._block_path(blob, block)
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, path)
            blocks[block] = length
            per = self.block_puts.setdefault(blob, {})
            per[block] = per.get(block, 0) + 1

    def put_blob(self, blob: str, tmp: Path, length: int) -> None:
        with self._lock:
            target = self._dir(blob) / "blob"
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, target)
            self._blobs[blob] = []
            self._sizes[blob] = length
            self._drop_uncommitted(blob)

    def _drop_uncommitted(self, blob: str) -> None:
        self._uncommitted.pop(blob, None)
        shutil.rmtree(self._dir(blob) / "blocks", ignore_errors=True)

    def put_block_list(self, blob: str, entries: List[Tuple[str, str]]) -> None:
        if len(entries) > MAX_BLOCKS:
            raise StorageError(400, "InvalidBlockList", f"more than {MAX_BLOCKS} blocks")
        with self._lock:
            uncommitted = self._uncommitted.get(blob, {})
            committed = dict(self._blobs.get(blob, []))
            sources = []
            for kind, block in entries:
                if kind in ("Latest", "Uncommitted") and block in uncommitted:
                    sources.append((block, uncommitted[block], self._block_path(blob, block)))
                elif kind in ("Latest", "Committed") and block in committed:
                    sources.append((block, committed[block], self._dir(blob) / "committed" / block_file(block)))
                else:
                    raise StorageError(400, "InvalidBlockList", f"block {block!r} ({kind}) is not stored")
            out_dir = self._dir(blob)
            out_dir.mkdir(parents=True, exist_ok=True)
            tmp = out_dir / "blob.new"
            with open(tmp, "wb") as out:
                for _, _, path in sources:
                    with open(path, "rb") as part:
                        shutil.copyfileobj(part, out, _CHUNK)
            # Keep the committed blocks' bytes so a later list may name them (Committed/Latest).
            kept = out_dir / "committed.new"
            kept.mkdir(exist_ok=True)
            for block, _, path in sources:
                if path.exists() and not (kept / block_file(block)).exists():
                    os.link(path, kept / block_file(block))
            shutil.rmtree(out_dir / "committed", ignore_errors=True)
            os.replace(kept, out_dir / "committed")
            os.replace(tmp, out_dir / "blob")
            self._blobs[blob] = [(b, size) for b, size, _ in sources]
            self._sizes[blob] = sum(size for _, size, _ in sources)
            self._drop_uncommitted(blob)

    def block_list(self, blob: str, kind: str) -> str:
        with self._lock:
            committed = list(self._blobs.get(blob, []))
            uncommitted = list(self._uncommitted.get(blob, {}).items())
            if blob not in self._blobs and not uncommitted:
                raise StorageError(404, "BlobNotFound", "the specified blob does not exist")

        def section(name: str, blocks) -> str:
            return f"<{name}>" + "".join(f"<Block><Name>{b}</Name><Size>{s}</Size></Block>" for b, s in blocks) \
                + f"</{name}>"

        parts = []
        if kind in ("committed", "all"):
            parts.append(section("CommittedBlocks", committed))
        if kind in ("uncommitted", "all"):
            parts.append(section("UncommittedBlocks", uncommitted))
        return '<?xml version="1.0" encoding="utf-8"?><BlockList>' + "".join(parts) + "</BlockList>"

    def _fault_for(self, op: str) -> Optional[Union[int, str]]:
        with self._lock:
            for fault in self._faults:
                if fault.op in ("any", op):
                    if fault.skip > 0:
                        fault.skip -= 1
                        return None
                    self._faults.remove(fault)
                    return fault.action
        return None

    def _record(self, method: str, op: str, blob: str, status: int) -> None:
        with self._lock:
            self.requests.append((method, op, blob, status))


def block_file(block: str) -> str:
    return hashlib.sha256(block.encode()).hexdigest()


_LIST_ENTRY = re.compile(r"<(Latest|Committed|Uncommitted)>([^<]{1,200})</\1>")


class _Server(TlsHttpServer):
    def __init__(self, address, handler, store: BlobStore):
        self.store = store
        super().__init__(address, handler, lambda: store._ctx)


class _Dropped(Exception):
    pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "lightclient-blob-emulator"
    timeout = 30
    server: _Server

    def setup(self) -> None:
        super().setup()
        try:
            self.connection.do_handshake()
            self._ok = True
        except (ssl.SSLError, OSError):
            self._ok = False
            self.close_connection = True

    def handle(self) -> None:
        if self._ok:
            super().handle()

    def log_message(self, *args) -> None:
        pass

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_GET(self) -> None:
        self._serve("GET")

    def _serve(self, method: str) -> None:
        store = self.server.store
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        comp = query.get("comp", "")
        op = {("PUT", ""): "put", ("PUT", "block"): "block", ("PUT", "blocklist"): "blocklist",
              ("GET", "blocklist"): "getblocklist", ("GET", ""): "get"}.get((method, comp), "other")
        blob = ""
        tmp: Optional[Path] = None
        try:
            container, _, blob = unquote(url.path).lstrip("/").partition("/")
            if container != store.container or not blob:
                raise StorageError(404, "ContainerNotFound" if container != store.container else "InvalidUri",
                                   f"no such container or blob: {url.path[:100]}")
            if op == "other":
                raise StorageError(400, "UnsupportedQueryParameter", f"comp={comp!r} is not supported here")
            sv = store._authorize(query, blob, "r" if method == "GET" else "cw")
            fault = store._fault_for(op)
            length = self._length(method)
            if fault == "drop":
                self._drop(length)
            self._lose_answer = fault == "lost"
            if isinstance(fault, int):
                self._discard(length)
                if fault == 503:
                    raise _Busy(fault, {"Retry-After": "1"})
                raise StorageError(fault, "InjectedFault", f"injected fault {fault}")
            put_limit, block_limit = limits_for(sv)
            if op == "put":
                if self.headers.get("x-ms-blob-type") != "BlockBlob":
                    raise StorageError(400, "MissingRequiredHeader", "x-ms-blob-type: BlockBlob is required")
                self._check_size(length, put_limit, "Put Blob")
                tmp = self._receive(length)
                store.put_blob(blob, tmp, length)
                tmp = None
                self._reply(201)
            elif op == "block":
                block = query.get("blockid", "")
                try:
                    raw = base64.b64decode(block, validate=True)
                except ValueError:
                    raw = b""
                if not raw or len(raw) > 64:
                    raise StorageError(400, "InvalidQueryParameterValue", "blockid must be base64 of at most 64 bytes")
                self._check_size(length, block_limit, "Put Block")
                tmp = self._receive(length)
                store.put_block(blob, block, tmp, length)
                tmp = None
                self._reply(201)
            elif op == "blocklist":
                if length > 8 * MiB:
                    raise StorageError(413, "RequestBodyTooLarge", "the block list is too large")
                body = self.rfile.read(length).decode("utf-8", "replace")
                if "<BlockList>" not in body:
                    raise StorageError(400, "InvalidXmlDocument", "the body must be a <BlockList> document")
                store.put_block_list(blob, [(m.group(1), m.group(2)) for m in _LIST_ENTRY.finditer(body)])
                self._reply(201)
            elif op == "getblocklist":
                kind = query.get("blocklisttype", "committed")
                if kind not in ("committed", "uncommitted", "all"):
                    raise StorageError(400, "InvalidQueryParameterValue", f"blocklisttype={kind!r}")
                self._reply(200, store.block_list(blob, kind).encode(), "application/xml")
            else:
                with store._lock:
                    known = blob in store._blobs
                if not known:
                    raise StorageError(404, "BlobNotFound", "the specified blob does not exist")
                self._reply_file(store._dir(blob) / "blob")
            store._record(method, op, blob, 201 if op in ("put", "block", "blocklist") else 200)
        except _Dropped:
            store._record(method, op, blob, 0)
            with store._lock:
                store.drops += 1
        except StorageError as exc:
            self._lose_answer = False
            store._record(method, op, blob, exc.status)
            self.close_connection = self.close_connection or exc.status in (400, 411, 413)
            self._error(exc, getattr(exc, "headers", {}))
        finally:
            if tmp is not None and tmp.exists():
                tmp.unlink()

    def _length(self, method: str) -> int:
        text = self.headers.get("Content-Length")
        if text is None:
            if method == "PUT":
                self.close_connection = True
                raise StorageError(411, "MissingContentLengthHeader", "Content-Length is required")
            return 0
        if not re.fullmatch(r"[0-9]{1,13}", text.strip()):
            self.close_connection = True
            raise StorageError(400, "InvalidHeaderValue", "Content-Length must be a whole number")
        return int(text)

    def _check_size(self, length: int, limit: int, what: str) -> None:
        if length > limit:
            self.close_connection = True
            raise StorageError(413, "RequestBodyTooLarge", f"{what} takes at most {limit} bytes with this "
                               f"service version; got {length}")

    def _receive(self, length: int) -> Path:
        store = self.server.store
        store._reserve(length)
        fd, name = _mkstemp(store.root)
        tmp = Path(name)
        got = 0
        with os.fdopen(fd, "wb") as out:
            while got < length:
                chunk = self.rfile.read(min(_CHUNK, length - got))
                if not chunk:
                    break
                out.write(chunk)
                got += len(chunk)
        if got != length:
            tmp.unlink()
            self.close_connection = True
            raise _Dropped()  # the client went away mid-body: nothing to answer
        return tmp

    def _discard(self, length: int) -> None:
        left = length
        while left > 0:
            chunk = self.rfile.read(min(_CHUNK, left))
            if not chunk:
                break
            left -= len(chunk)

    def _drop(self, length: int) -> None:
        self._discard(length // 2)
        self.close_connection = True
        try:   # a reset, as a broken link looks to the client
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
        raise _Dropped()

    def _reply(self, status: int, body: bytes = b"", content_type: Optional[str] = None,
               headers: Optional[Dict[str, str]] = None) -> None:
        if getattr(self, "_lose_answer", False):
            self._drop(0)
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-ms-version", self.server.store.service_version)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _reply_file(self, path: Path) -> None:
        size = path.stat().st_size
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size))
        self.end_headers()
        with open(path, "rb") as fh:
            shutil.copyfileobj(fh, self.wfile, _CHUNK)

    def _error(self, exc: StorageError, headers: Dict[str, str]) -> None:
        body = (f'<?xml version="1.0" encoding="utf-8"?><Error><Code>{exc.code}</Code>'
                f"<Message>{exc.message}</Message></Error>").encode()
        self._reply(exc.status, body, "application/xml", {"x-ms-error-code": exc.code, **headers})


class _Busy(StorageError):
    def __init__(self, status: int, headers: Dict[str, str]):
        super().__init__(status, "ServerBusy", f"injected fault {status}")
        self.headers = headers


def _mkstemp(root: Path):
    import tempfile

    return tempfile.mkstemp(dir=root, prefix=".part-")
