"""File upload through IoT Hub (Azure Blob Storage), with the same hardware-backed key as MQTT.

Three steps (protocol notes §10), each a pure request builder / answer parser here, plus a small
driver, :func:`upload_file`, on the shared HTTPS core (``lightclient._https``):

1. Ask the hub for a target, over HTTPS with the device's client certificate (no ``Authorization``), or,
   for a symmetric-key device (``sas=``), with server-verified TLS and its SAS token in a header::

       POST https://{hub}/devices/{deviceId}/files?api-version=2020-03-13
       Content-Type: application/json
       [Authorization: SharedAccessSignature sr={hub}%2Fdevices%2F{deviceId}&sig=…&se=…]
       {"blobName": "logs/today.txt"}
       -> 200 {"correlationId": "…", "hostName": "acct.blob.core.windows.net", "containerName": "…",
               "blobName": "{deviceId}/logs/today.txt", "sasToken": "?sv=…&sig=…"}

2. Upload to ``https://{hostName}/{containerName}/{blobName}{sasToken}`` as a block blob, with the SAS
   only: storage is another host, reached with server-verified TLS and NO client certificate (the key
   never meets it). A file up to ``single_put_limit`` goes in one ``PUT`` (``x-ms-blob-type: BlockBlob``);
   a larger one in blocks (``PUT …&comp=block&blockid={id}``), then ``PUT …&comp=blocklist`` with
   ``<BlockList><Latest>{id}</Latest>…</BlockList>``. Each block is retried on its own (429, 5xx, a
   broken connection); before uploading, and after a broken connection, the uncommitted block list
   (``GET …&comp=blocklist&blocklisttype=uncommitted``) says which blocks storage already holds, and
   those are not sent again. A block id names the block's index and a SHA-256 prefix of its content,
   so a block is only ever skipped when storage holds exactly those bytes (also when a later call
   resumes an upload that an earlier one left unfinished).

3. Tell the hub how it ended, on success AND on failure (the hub frees the upload slot)::

       POST https://{hub}/devices/{deviceId}/files/notifications?api-version=2020-03-13
       Content-Type: application/json; charset=utf-8
       [Authorization: SharedAccessSignature … (the same credential; a fresh token if the first is due)]
       {"correlationId": "…", "isSuccess": true, "statusCode": 201, "statusDescription": "…"}

With ``sas=`` (a :class:`lightclient.symkey.SasCredential` for the device, resource
``{hub}/devices/{deviceId}``, protocol notes §9/§10) the token is signed by the credential's key (inside
the PKCS#11 token for a :class:`~lightclient.symkey.TokenKey`) and goes only to the hub: the storage
requests carry storage's own SAS and nothing else.

Both SAS tokens are bearer secrets: they appear in no message, log line (urllib3's debug log is filtered
while an upload runs), ``repr()`` or exception; URLs are shown with the query replaced by
``?<SAS redacted>``. Memory stays bounded: the file is read one block at a time.

UNCERTAIN points in the protocol notes, and what this module does about each:

* The storage service version (``sv`` in the SAS) sets the size limits; what hubs issue today is not
  known. :func:`storage_limits` reads ``sv`` from the token: before 2016-05-31 4 MiB blocks / 64 MiB
  single put; 2016-05-31…2019-07-07 100 MiB / 256 MiB; 2019-12-12 and later 4000 MiB / 5000 MiB;
  a token without ``sv`` gets the oldest (smallest) limits.
* api-version: the SDKs use 2016-11-14 (C) and 2019-10-01 (Python), the docs 2020-03-13 (the default
  here; ``api_version=`` chooses another). The C SDK puts ``/`` before ``?``; this module does not.
* A ``sasToken`` without the documented leading ``?`` is accepted and the ``?`` added.
* The hub SAS of a device key: the SDKs sign ``{hub}/devices/{deviceId}`` (no ``/files``), URL-encoded
  with upper-case escapes and the id's case kept (the docs' lower-cased reading is UNCERTAIN; the
  emulator accepts both, see :mod:`lightclient.emulator.files`). This module sends the SDKs' form.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import re
import ssl
import time
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Dict, List, Mapping, Optional, Tuple, Union
from urllib.parse import parse_qs, quote

from ._https import Exchange, Request, Response, authorized, header, retry_delay
from .backoff import Backoff
from .exceptions import ConfigError, OperationTimeout, ProtocolError, ServiceError, UploadError

API_VERSION = "2020-03-13"
KiB = 1024
MiB = 1024 * KiB
DEFAULT_BLOCK_SIZE = 4 * MiB
#: Storage accepts at most this many blocks in one blob.
MAX_BLOCKS = 50_000
#: The smallest block this module sends (tests use it to make many blocks from a small file).
MIN_BLOCK_SIZE = 1 * KiB
#: A blob name is at most 1024 characters; the hub prefixes ``{deviceId}/``.
MAX_BLOB_NAME = 1024

ProgressCallback = Callable[[int, int], None]
Source = Union[str, "os.PathLike[str]", BinaryIO]


# ------------------------------------------------------------------------------------------ limits


@dataclass(frozen=True)
class StorageLimits:
    """What one storage service version accepts: the largest single PUT, the largest block, and blocks per blob."""

    put_blob: int
    block: int
    blocks: int = MAX_BLOCKS

    @property
    def largest_blob(self) -> int:
        return self.block * self.blocks


_LIMITS = (  # (first sv, limits), newest first (Learn: storage/blobs/scalability-targets)
    ("2019-12-12", StorageLimits(5000 * MiB, 4000 * MiB)),
    ("2016-05-31", StorageLimits(256 * MiB, 100 * MiB)),
    ("", StorageLimits(64 * MiB, 4 * MiB)),
)
#: The largest file any service version takes: files over it are refused before the hub is asked.
LARGEST_FILE = _LIMITS[0][1].largest_blob


def storage_limits(service_version: Optional[str]) -> StorageLimits:
    """The limits for a SAS's ``sv`` (ISO dates compare as strings); the oldest for an unknown or absent one."""
    version = service_version or ""
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", version):
        version = ""
    for first, limits in _LIMITS:
        if version >= first:
            return limits
    return _LIMITS[-1][1]  # pragma: no cover (the last entry matches everything)


def choose_block_size(size: int, block_size: int, limits: StorageLimits) -> int:
    """``block_size``, grown if ``size`` would need more than ``limits.blocks`` blocks; ConfigError if even
    the largest block cannot hold it."""
    needed = -(-size // limits.blocks)
    chosen = max(block_size, needed)
    if chosen > limits.block:
        raise ConfigError(f"the file is too large for this storage account ({size} bytes; at most "
                          f"{limits.largest_blob} with {limits.blocks} blocks of {limits.block} bytes)")
    return chosen


def _check_block_size(block_size: Any, name: str = "block_size") -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or not MIN_BLOCK_SIZE <= block_size <= 4000 * MiB:
        raise ConfigError(f"{name} must be a whole number of bytes from {MIN_BLOCK_SIZE} to {4000 * MiB}, e.g. "
                          f"{DEFAULT_BLOCK_SIZE} (4 MiB), not {block_size!r}")
    return block_size


# ------------------------------------------------------------------------------------------ step 1: the target

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def check_blob_name(blob_name: Any, device_id: str = "") -> str:
    """``blob_name`` if storage and the hub take it, else ConfigError saying why.

    The hub stores it as ``{device_id}/{blob_name}``: at most 1024 characters in all, no control
    characters or backslashes, path segments separated by single ``/`` (none empty, ``.`` or ``..``),
    not ending in ``.`` or ``/``.
    """
    if not isinstance(blob_name, str) or not blob_name:
        raise ConfigError(f"blob_name must be a non-empty str naming the file in storage, e.g. 'logs/today.txt', "
                          f"not {blob_name!r}")
    shown = repr(blob_name[:80]) + ("…" if len(blob_name) > 80 else "")
    room = MAX_BLOB_NAME - (len(device_id) + 1 if device_id else 0)
    if len(blob_name) > room:
        raise ConfigError(f"blob_name {shown} is too long ({len(blob_name)} characters; with the device id "
                          f"prefix the hub adds, at most {room})")
    if _CONTROL.search(blob_name) or "\\" in blob_name:
        raise ConfigError(f"blob_name {shown} contains a control character or a backslash; use '/' between "
                          "folders and printable characters only")
    if blob_name.endswith((".", "/")):
        raise ConfigError(f"blob_name {shown} ends in '.' or '/', which storage does not keep; name a file")
    if any(part in ("", ".", "..") for part in blob_name.split("/")):
        raise ConfigError(f"blob_name {shown} has an empty, '.' or '..' path segment; give a plain path such "
                          "as 'logs/today.txt'")
    try:
        blob_name.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"blob_name {shown} is not valid Unicode text") from None
    return blob_name


def _hub_url(endpoint: str, device_id: str, path: str, api_version: str) -> str:
    if not isinstance(endpoint, str) or not endpoint or "/" in endpoint or "?" in endpoint:
        raise ConfigError(f"endpoint must be the hub's host[:port] (no scheme or path), not {endpoint!r}")
    if not isinstance(device_id, str) or not device_id:
        raise ConfigError(f"device_id must be the device's id, not {device_id!r}")
    return (f"https://{endpoint}/devices/{quote(device_id, safe='')}/{path}"
            f"?api-version={quote(api_version, safe='')}")


def _hub_headers(content_type: str) -> Dict[str, str]:
    from .identity import default_client_type

    return {"Content-Type": content_type, "Accept": "application/json", "User-Agent": default_client_type()}


def sas_uri_request(device_id: str, blob_name: str, *, endpoint: str, api_version: str = API_VERSION) -> Request:
    """Step 1: ask the hub for an upload target (see the module docstring for the wire format)."""
    check_blob_name(blob_name, device_id)
    body = json.dumps({"blobName": blob_name}, separators=(",", ":")).encode()
    return Request("POST", _hub_url(endpoint, device_id, "files", api_version), _hub_headers("application/json"), body)


@dataclass(frozen=True)
class UploadTarget:
    """Where the hub said to upload. ``sas_token`` is a secret and stays out of ``repr()``."""

    correlation_id: str
    host_name: str
    container_name: str
    blob_name: str
    sas_token: str = field(repr=False)

    @property
    def blob_path(self) -> str:
        return f"/{quote(self.container_name, safe='')}/{quote(self.blob_name, safe='/')}"

    @property
    def url(self) -> str:
        """The blob URL WITH the SAS (a secret: never show it)."""
        return f"https://{self.host_name}{self.blob_path}{self.sas_token}"

    @property
    def redacted_url(self) -> str:
        """The blob URL fit for messages and logs: the SAS query replaced."""
        return f"https://{self.host_name}{self.blob_path}?<SAS redacted>"

    @property
    def service_version(self) -> Optional[str]:
        """The SAS's ``sv``: the storage service version every request is served with."""
        values = parse_qs(self.sas_token[1:]).get("sv")
        return values[0] if values else None

    @property
    def limits(self) -> StorageLimits:
        return storage_limits(self.service_version)

    def redact(self, text: str) -> str:
        """``text`` with the SAS (and its signature alone) taken out."""
        for secret in (self.sas_token, self.sas_token[1:], *parse_qs(self.sas_token[1:]).get("sig", ())):
            if secret:
                text = text.replace(secret, "<SAS redacted>")
                text = text.replace(quote(secret, safe=""), "<SAS redacted>")
        return _SIG_VALUE.sub(r"\1<SAS redacted>", text)   # any signature a server echoed, even partly


_SIG_VALUE = re.compile(r"(sig=)(?!<SAS redacted>)[^&\s\"'<>)]+", re.I)
_HOST_RE = re.compile(r"^[A-Za-z0-9.\-]{1,253}(:[0-9]{1,5})?$|^\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$")


def parse_sas_uri(body: Union[bytes, str, Mapping[str, Any]]) -> UploadTarget:
    """Step 1's answer as an :class:`UploadTarget`; ProtocolError for a malformed one (never showing the SAS)."""
    if isinstance(body, Mapping):
        data: Any = body
    else:
        try:
            data = json.loads(body)
        except (TypeError, ValueError, UnicodeDecodeError):
            raise ProtocolError("the hub answered the file-upload request with something that is not JSON") from None
    if not isinstance(data, dict):
        raise ProtocolError("the hub answered the file-upload request with JSON that is not an object")
    fields = {}
    for key in ("correlationId", "hostName", "containerName", "blobName", "sasToken"):
        value = data.get(key)
        if not isinstance(value, str) or not value:
            raise ProtocolError(f"the hub's file-upload answer lacks {key!r} (a non-empty string); "
                                f"it has {sorted(k for k in data if isinstance(k, str))}")
        fields[key] = value
    if not _HOST_RE.match(fields["hostName"]):
        raise ProtocolError(f"the hub's file-upload answer names a storage host that is not a host name: "
                            f"{fields['hostName'][:80]!r}")
    sas = fields["sasToken"]
    if not sas.startswith("?"):
        sas = "?" + sas  # documented with a leading '?'; take it either way
    if any(c in sas for c in "#\r\n ") or _CONTROL.search(fields["containerName"] + fields["blobName"]):
        raise ProtocolError("the hub's file-upload answer holds characters no blob URL may contain")
    return UploadTarget(fields["correlationId"], fields["hostName"], fields["containerName"], fields["blobName"], sas)


def notification_request(device_id: str, correlation_id: str, *, success: bool, status_code: int,
                         description: str, endpoint: str, api_version: str = API_VERSION) -> Request:
    """Step 3: the upload's outcome for the hub (sent after a failure too: it frees the upload slot)."""
    if not isinstance(correlation_id, str) or not correlation_id:
        raise ConfigError(f"correlation_id must be the one the hub gave for this upload, not {correlation_id!r}")
    body = json.dumps({"correlationId": correlation_id, "isSuccess": bool(success), "statusCode": int(status_code),
                       "statusDescription": str(description)[:1000]}, separators=(",", ":")).encode()
    return Request("POST", _hub_url(endpoint, device_id, "files/notifications", api_version),
                   _hub_headers("application/json; charset=utf-8"), body)


def _error_fields(body: bytes, headers: Mapping[str, str]) -> Tuple[Optional[str], Optional[str]]:
    """(error code, message) from a hub JSON error or a storage XML error, if there are any."""
    code = message = None
    text = body[:4096].decode("utf-8", "replace") if body else ""
    try:
        data = json.loads(text) if text.lstrip().startswith("{") else None
    except ValueError:
        data = None
    if isinstance(data, dict):
        code = data.get("errorCode", data.get("ErrorCode"))
        message = data.get("message", data.get("Message"))
    else:
        found = re.search(r"<Code>([^<]{1,100})</Code>", text)
        code = found.group(1) if found else None
        found = re.search(r"<Message>([^<]{1,300})", text)
        message = found.group(1).strip() if found else None
    code = code if code is not None else header(headers, "x-ms-error-code") or header(headers, "iothub-errorcode")
    shown = "".join(c if c.isprintable() else "?" for c in str(message))[:300] if message else None
    return (str(code)[:100] if code is not None else None), shown


_HUB_ADVICE = {
    400: "the hub refused the file-upload request as malformed",
    401: "the hub did not authenticate the device (check its certificate and registration)",
    403: ("the hub refused the file upload: file upload may not be configured for this hub (link a storage "
          "account), the device may be disabled, or it has 10 uploads open (each frees with its notification or "
          "when its SAS expires)"),
    404: "the hub does not know this device, or offers no file upload",
    429: "the hub is throttling file-upload requests",
}
_HUB_401_SAS = ("the hub did not accept the device's SAS token (check that the key is the device's primary or "
                "secondary key, and the device's clock)")


def hub_error(status: int, body: bytes, headers: Mapping[str, str], *, blob_name: Optional[str] = None,
              stage: str = "sas", correlation_id: Optional[str] = None, sas: bool = False) -> Exception:
    """The error for a hub's non-2xx answer: ConfigError when it refused ``blob_name``, else UploadError.
    ``sas``: the device authenticated with a SAS token (a 401 then says to check the key and the clock)."""
    code, message = _error_fields(body, headers)
    detail = (f", errorCode {code}" if code else "") + (f": {message}" if message else "")
    if status == 400 and stage == "sas" and blob_name is not None:
        return ConfigError(f"the hub refused blob name {blob_name[:200]!r} (HTTP 400{detail}); choose a plain "
                           "path such as 'logs/today.txt'")
    if status == 403 and code == "403006":
        advice = ("the device has too many file uploads open (at most 10; each frees with its notification or "
                  "when its SAS expires)")
    else:
        advice = (_HUB_401_SAS if sas and status == 401 else _HUB_ADVICE.get(status)) or (
            f"the hub failed with {status}" if status >= 500 else f"the hub answered {status}")
    what = "the upload notification" if stage == "notify" else "the upload target request"
    return UploadError(f"{advice} ({what}: HTTP {status}{detail})", status, stage=stage, error_code=code,
                       correlation_id=correlation_id)


# ------------------------------------------------------------------------------------------ step 2: storage


def block_id(index: int, data: bytes) -> str:
    """The base64 block id for block ``index`` holding ``data``: every id of a blob has one length, and the
    content's SHA-256 prefix in it makes "storage holds this id" mean "storage holds these bytes"."""
    if not 0 <= index < 1_000_000:
        raise ConfigError(f"block index {index} out of range")
    raw = f"{index:06d}-{hashlib.sha256(data).hexdigest()[:32]}"
    return base64.b64encode(raw.encode()).decode()


def _storage_headers(target: UploadTarget, **extra: str) -> Dict[str, str]:
    from .identity import default_client_type

    headers = {"User-Agent": default_client_type()}
    if target.service_version:
        headers["x-ms-version"] = target.service_version  # ignored with a SAS (sv rules), but consistent
    headers.update({k.replace("_", "-"): v for k, v in extra.items()})
    return headers


def put_blob_request(target: UploadTarget, data: bytes, *, content_type: Optional[str] = None) -> Request:
    """``PUT {blob URL}`` with ``x-ms-blob-type: BlockBlob``: the whole (small) file in one request."""
    extra = {"x_ms_blob_type": "BlockBlob"}
    if content_type:
        extra["x_ms_blob_content_type"] = content_type
    return Request("PUT", target.url, _storage_headers(target, **extra), bytes(data))


def put_block_request(target: UploadTarget, block: str, data: bytes) -> Request:
    """``PUT {blob URL}&comp=block&blockid={id}``: one uncommitted block."""
    return Request("PUT", f"{target.url}&comp=block&blockid={quote(block, safe='')}", _storage_headers(target),
                   bytes(data))


def put_block_list_request(target: UploadTarget, blocks: List[str], *,
                           content_type: Optional[str] = None) -> Request:
    """``PUT {blob URL}&comp=blocklist`` committing ``blocks`` in order."""
    body = ('<?xml version="1.0" encoding="utf-8"?><BlockList>'
            + "".join(f"<Latest>{b}</Latest>" for b in blocks) + "</BlockList>").encode()
    extra = {"Content_Type": "application/xml"}
    if content_type:
        extra["x_ms_blob_content_type"] = content_type
    return Request("PUT", f"{target.url}&comp=blocklist", _storage_headers(target, **extra), body)


def get_block_list_request(target: UploadTarget) -> Request:
    """``GET {blob URL}&comp=blocklist&blocklisttype=uncommitted``: the blocks storage holds, for a resume."""
    return Request("GET", f"{target.url}&comp=blocklist&blocklisttype=uncommitted", _storage_headers(target))


_BLOCK_RE = re.compile(r"<Block>\s*<Name>([A-Za-z0-9+/=]{1,100})</Name>\s*<Size>([0-9]{1,12})</Size>\s*</Block>")


def parse_block_list(body: bytes) -> Dict[str, int]:
    """The uncommitted blocks (id -> size) in a Get Block List answer.

    Read with a pattern rather than an XML parser: the document's shape is fixed, and no entity or DTD
    in an answer can then cost anything."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("storage answered Get Block List with text that is not UTF-8") from None
    if "<BlockList" not in text:
        raise ProtocolError("storage answered Get Block List without a <BlockList> document")
    start = text.find("<UncommittedBlocks")
    if start < 0:
        return {}
    end = text.find("</UncommittedBlocks>", start)
    section = text[start:] if end < 0 else text[start:end]
    return {name: int(size) for name, size in _BLOCK_RE.findall(section)}


def storage_error(status: int, body: bytes, headers: Mapping[str, str], target: UploadTarget,
                  what: str) -> UploadError:
    code, message = _error_fields(body, headers)
    if status == 403:
        advice = ("storage refused the upload's SAS (it may have expired: the hub's SAS lifetime is 1 h by "
                  "default; or the device's clock is off)")
    elif status == 404:
        advice = "storage does not know the container or blob the hub named"
    elif status == 413:
        advice = "storage refused the data as too large for its service version"
    elif status >= 500 or status == 429:
        advice = f"storage failed with {status} and kept failing"
    else:
        advice = f"storage answered {status}"
    detail = (f", {code}" if code else "") + (f": {message}" if message else "")
    return UploadError(target.redact(f"{advice} ({what} {target.redacted_url}: HTTP {status}{detail})"), status,
                       stage="storage", error_code=code, correlation_id=target.correlation_id)


# ------------------------------------------------------------------------------------------ the source file


class _Source:
    """A regular file (by path, opened as :mod:`lightclient._files` opens user files) or a seekable binary
    file object, read at offsets, one block at a time."""

    def __init__(self, source: Source):
        self._fd: Optional[int] = None
        self._fh: Optional[BinaryIO] = None
        if isinstance(source, (str, os.PathLike)):
            from ._files import open_user_file

            path = os.fspath(source)
            self.name = f"the file {path!r}"
            self._fd = open_user_file(path, what=self.name, limit=LARGEST_FILE)
            os.set_blocking(self._fd, True)
            self.size = os.fstat(self._fd).st_size
        elif hasattr(source, "read") and hasattr(source, "seek"):
            self.name = "the file object"
            if isinstance(source, io.TextIOBase):
                raise ConfigError("the file object is in text mode: open it in binary mode ('rb')")
            try:
                if not source.seekable():
                    raise ConfigError("the file object must be seekable (a regular file opened 'rb', or BytesIO): "
                                      "blocks are re-read to retry and resume")
                self._fh = source
                start = source.tell()
                self.size = source.seek(0, os.SEEK_END) - start
                self._start = start
            except (OSError, ValueError) as exc:
                raise ConfigError(f"cannot use the file object: {exc}") from None
        else:
            raise ConfigError(f"path_or_fileobj must be a file path or a binary file object opened 'rb', "
                              f"not {type(source).__name__}")

    def read(self, offset: int, length: int) -> bytes:
        chunks, got = [], 0
        while got < length:
            try:
                if self._fd is not None:
                    chunk = os.pread(self._fd, length - got, offset + got)
                else:
                    assert self._fh is not None
                    self._fh.seek(self._start + offset + got)
                    chunk = self._fh.read(length - got)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"cannot read {self.name}: {getattr(exc, 'strerror', None) or exc}") from None
            if not isinstance(chunk, (bytes, bytearray)):
                raise ConfigError(f"{self.name} must be opened in binary mode ('rb')")
            if not chunk:
                raise ConfigError(f"{self.name} shrank while it was uploaded (expected {self.size} bytes)")
            chunks.append(bytes(chunk))
            got += len(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# ------------------------------------------------------------------------------------------ the driver


@dataclass(frozen=True)
class UploadResult:
    """A finished upload: the blob as the hub named it (``{deviceId}/{name}``), where it lives, how it went."""

    blob_name: str
    container_name: str
    host_name: str
    correlation_id: str
    size: int
    blocks: int              # 0: one single PUT
    blocks_skipped: int      # blocks storage already held (a resumed upload), not sent again
    status: int              # storage's status for the final PUT

    @property
    def url(self) -> str:
        """The blob's URL without any SAS (reading it needs the service's own credentials)."""
        return f"https://{self.host_name}/{quote(self.container_name, safe='')}/{quote(self.blob_name, safe='/')}"


def storage_context(ca=None, *, trust_from: Optional[ssl.SSLContext] = None) -> ssl.SSLContext:
    """The TLS context for storage: TLS 1.2+, server certificate and host name verified, NO client certificate.

    Its roots: ``ca`` (a file, directory or PEM data, as :func:`lightclient.tls.client_context` takes), else
    the CA certificates loaded in ``trust_from`` (the hub's context: the same trust for the storage host),
    else the bundled roots (Azure Storage chains to them too)."""
    from . import _native, tls

    if ca is not None or trust_from is None:
        return tls._base_context(ca, ssl.TLSVersion.TLSv1_2, None)
    ders = trust_from.get_ca_certs(binary_form=True)
    if not ders:
        raise ConfigError("the hub's TLS context lists no trusted roots to reuse for storage (roots in a CA "
                          "directory load lazily): give storage_ca= (the CA that storage's certificate chains to)")
    _native.tls_prepare()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    for der in ders:
        ctx.load_verify_locations(cadata=der)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


class _SasLogFilter(logging.Filter):
    """urllib3 logs each request line, query included, at DEBUG: keep a SAS signature out of any log."""

    _SIG = re.compile(r"(sig=)[^&\s\"']+", re.I)

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(isinstance(a, str) and "sig=" in a.lower() for a in record.args):
            record.args = tuple(self._SIG.sub(r"\1<SAS redacted>", a) if isinstance(a, str) else a
                                for a in record.args)
        if isinstance(record.msg, str) and "sig=" in record.msg.lower():
            record.msg = self._SIG.sub(r"\1<SAS redacted>", record.msg)
        return True


_LOG_FILTER = _SasLogFilter()


def _guard_logs() -> None:
    for name in ("urllib3.connectionpool", "urllib3.connection", "requests"):
        logger = logging.getLogger(name)
        if _LOG_FILTER not in logger.filters:
            logger.addFilter(_LOG_FILTER)


class _Retryable(Exception):
    def __init__(self, status: Optional[int], headers: Mapping[str, str], cause: Optional[BaseException] = None):
        super().__init__(status)
        self.status, self.headers, self.cause = status, headers, cause


class _Storage:
    """Storage requests on one session, with the SAS scrubbed from every error and per-request retries."""

    def __init__(self, exchange: Exchange, target: UploadTarget, attempts: int):
        self.exchange = exchange
        self.target = target
        self.attempts = attempts

    def send(self, request: Request) -> Response:
        """One request; a broken connection, a per-request timeout, 429 or 5xx raise _Retryable."""
        try:
            response = self.exchange.send(request)
        except OperationTimeout as exc:
            if time.monotonic() >= self.exchange.deadline:
                raise OperationTimeout(self.target.redact(str(exc))) from None
            raise _Retryable(None, {}, OperationTimeout(self.target.redact(str(exc)))) from None
        except ServiceError as exc:
            scrubbed = UploadError(self.target.redact(str(exc)), exc.status, stage="storage",
                                   correlation_id=self.target.correlation_id)
            if exc.status is None:
                raise _Retryable(None, {}, scrubbed) from None
            raise scrubbed from None
        except ConfigError as exc:     # e.g. a server certificate refused: not worth retrying
            exc.args = tuple(self.target.redact(a) if isinstance(a, str) else a for a in exc.args)
            raise
        if response.status == 429 or response.status >= 500:
            raise _Retryable(response.status, response.headers)
        return response

    def retrying(self, request: Request, what: str, landed: Optional[Callable[[], bool]] = None) -> Response:
        """:meth:`send` up to ``attempts`` times with back-off; after a broken connection ``landed()`` may say the
        request took effect anyway (a block storage now holds), and then it is not sent again."""
        attempt = 0
        while True:
            try:
                response = self.send(request)
                if not 200 <= response.status < 300:
                    raise storage_error(response.status, response.body, response.headers, self.target, what)
                return response
            except _Retryable as failure:
                attempt += 1
                if attempt >= self.attempts:
                    if failure.status is not None:
                        raise storage_error(failure.status, b"", failure.headers, self.target,
                                            f"{what} ({attempt} attempts)") from None
                    raise failure.cause from None  # type: ignore[misc]
                ex = self.exchange
                lo, hi = ex.retry_bounds
                ex.pause(retry_delay(failure.headers, attempt - 1, backoff=ex.backoff, minimum=lo, maximum=hi),
                         failure.status)
                if failure.status is None and landed is not None:
                    try:
                        if landed():
                            return Response(201, b"", {})
                    except _Retryable:
                        pass  # storage still unreachable: the next attempt finds out


def _notify(hub: Exchange, device_id: str, endpoint: str, api_version: str, correlation_id: str, success: bool,
            status_code: int, description: str, sas=None) -> None:
    request = authorized(notification_request(device_id, correlation_id, success=success, status_code=status_code,
                                              description=description, endpoint=endpoint, api_version=api_version),
                         sas)
    response = hub.send_retrying(request)
    if not 200 <= response.status < 300:
        raise hub_error(response.status, response.body, response.headers, stage="notify",
                        correlation_id=correlation_id, sas=sas is not None)


def upload_file(path_or_fileobj: Source, blob_name: str, *, device_id: str, endpoint: str,
                ssl_context: Optional[ssl.SSLContext] = None, session=None,
                storage_ca=None, storage_ssl_context: Optional[ssl.SSLContext] = None,
                progress: Optional[ProgressCallback] = None, block_size: int = DEFAULT_BLOCK_SIZE,
                single_put_limit: Optional[int] = None, content_type: Optional[str] = None,
                timeout: float = 3600.0, request_timeout: float = 60.0, block_attempts: int = 6,
                backoff: Optional[Backoff] = None, api_version: str = API_VERSION,
                sleep: Callable[[float], None] = time.sleep, sas: Any = None) -> UploadResult:
    """Upload a file through the hub at ``endpoint`` (``host[:port]``) for ``device_id``; returns an :class:`UploadResult`.

    ``ssl_context`` is the device's context (:func:`lightclient.tls.https_context`; the MQTT one works too), or
    give a ready hub ``session``. A symmetric-key device gives ``sas`` (its
    :class:`~lightclient.symkey.SasCredential`, resource ``{hub}/devices/{device_id}``) and a context without
    client certificate (:func:`lightclient.tls.server_context`): the hub requests then carry its SAS token.
    Storage gets its own context without the client key: ``storage_ssl_context``, else :func:`storage_context`
    built from ``storage_ca`` or the roots in ``ssl_context``. ``progress(sent, total)`` is called after each
    block (bytes; blocks storage already held count as sent). Files over ``single_put_limit`` (default
    ``block_size``) go in blocks of ``block_size`` bytes (grown if the file would need more than 50 000).

    Errors: a bad argument, an unreadable file or a blob name the hub refuses raise ConfigError; a hub or
    storage refusal UploadError (``stage`` says which step); ``timeout`` (the whole job; the hub's SAS
    lasts 1 h by default) OperationTimeout. Once the hub gave a target, it is told of a failure too
    (``UploadError.notified``).
    """
    block_size = _check_block_size(block_size)
    single = _check_block_size(single_put_limit, "single_put_limit") if single_put_limit is not None else block_size
    if isinstance(block_attempts, bool) or not isinstance(block_attempts, int) or not 1 <= block_attempts <= 100:
        raise ConfigError(f"block_attempts must be a whole number from 1 to 100, not {block_attempts!r}")
    if progress is not None and not callable(progress):
        raise ConfigError("progress must be a callable progress(sent_bytes, total_bytes)")
    for name, value in (("timeout", timeout), ("request_timeout", request_timeout)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
            raise ConfigError(f"{name} must be a positive number of seconds, not {value!r}")
    first = sas_uri_request(device_id, blob_name, endpoint=endpoint, api_version=api_version)  # checks the name
    _check_sas(sas, device_id)
    from .tls import https_session

    if session is None and ssl_context is None:
        raise ConfigError("upload_file() needs ssl_context= (lightclient.tls.https_context) or session=")
    if storage_ssl_context is None:
        storage_ssl_context = storage_context(storage_ca, trust_from=ssl_context if storage_ca is None else None)
    source = _Source(path_or_fileobj)
    own_session = session is None
    hub_session = https_session(ssl_context) if session is None else session
    store_session = https_session(storage_ssl_context)
    backoff = backoff or Backoff(initial=1.0, maximum=30.0)
    timeout_text = (lambda status: f"the upload of {source.name} did not finish within {timeout:g} s "
                                   f"(last HTTP status {status})")
    hub = Exchange(hub_session, service="IoT Hub (file upload)", timeout=timeout, timeout_text=timeout_text,
                   error=lambda message, status=None: UploadError(message, status, stage="sas"),
                   request_timeout=request_timeout, backoff=backoff, sleep=sleep)
    _guard_logs()
    try:
        response = hub.send_retrying(authorized(first, sas))
        if not 200 <= response.status < 300:
            raise hub_error(response.status, response.body, response.headers, blob_name=blob_name,
                            sas=sas is not None)
        target = parse_sas_uri(response.body)
        storage = _Storage(_storage_exchange(store_session, target, hub, timeout_text, request_timeout, backoff,
                                             sleep), target, block_attempts)
        try:
            result = _transfer(storage, target, source, block_size, single, progress, content_type)
        except BaseException as exc:
            _report_failure(hub, exc, device_id, endpoint, api_version, target, sas)
            raise
        _notify(hub, device_id, endpoint, api_version, target.correlation_id, True, result.status,
                f"uploaded {result.size} bytes", sas)
        return result
    finally:
        source.close()
        store_session.close()
        if own_session:
            hub_session.close()


def _storage_exchange(store_session, target: UploadTarget, hub: Exchange, timeout_text, request_timeout: float,
                      backoff: Backoff, sleep) -> Exchange:
    exchange = Exchange(store_session, service=f"storage at {target.host_name}", timeout=1.0,
                        timeout_text=timeout_text, request_timeout=request_timeout, backoff=backoff, sleep=sleep,
                        error=lambda message, status=None: UploadError(message, status, stage="storage"))
    exchange.deadline = hub.deadline  # one job, one deadline
    return exchange


def _check_sas(sas: Any, device_id: str) -> None:
    """``sas`` must be a SasCredential for this device (the hub offers file upload to no module)."""
    if sas is None:
        return
    from . import _sas_session

    _sas_session.check(sas)
    if not sas.uri.endswith(f"/devices/{device_id}"):
        raise ConfigError(f"sas is a credential for {sas.uri!r}, not for device {device_id!r}: file upload takes "
                          "the device's own credential (SasCredential.for_identity with no module id)")


def _report_failure(hub: Exchange, exc: BaseException, device_id: str, endpoint: str, api_version: str,
                    target: UploadTarget, sas: Any = None) -> None:
    """Tell the hub the upload failed (it frees the slot); mark ``exc`` with whether that worked."""
    status = getattr(exc, "status", None)
    status_code = status if isinstance(status, int) else (408 if isinstance(exc, OperationTimeout) else 500)
    reason = "interrupted" if isinstance(exc, KeyboardInterrupt) else type(exc).__name__
    description = target.redact(f"upload failed ({reason}): {exc}")[:500]
    # A few seconds more than the job's deadline allows: the notification is what frees the hub's slot.
    hub.deadline = max(hub.deadline, time.monotonic() + min(hub.request_timeout, 30.0))
    try:
        _notify(hub, device_id, endpoint, api_version, target.correlation_id, False, status_code, description, sas)
        notified = True
    except Exception:  # the original failure matters more; say the hub was not told
        logging.getLogger("lightclient.upload").warning(
            "the hub could not be told that upload %s failed; its slot frees when the SAS expires",
            target.correlation_id)
        notified = False
    if isinstance(exc, UploadError):
        exc.notified = notified
        exc.correlation_id = exc.correlation_id or target.correlation_id


def _transfer(storage: _Storage, target: UploadTarget, source: _Source, block_size: int, single: int,
              progress: Optional[ProgressCallback], content_type: Optional[str]) -> UploadResult:
    size = source.size
    limits = target.limits
    report = progress or (lambda sent, total: None)
    if size <= min(single, limits.put_blob):
        response = storage.retrying(put_blob_request(target, source.read(0, size), content_type=content_type),
                                    "Put Blob")
        report(size, size)
        return UploadResult(target.blob_name, target.container_name, target.host_name, target.correlation_id, size,
                            0, 0, response.status)
    block_size = choose_block_size(size, block_size, limits)

    def held() -> Dict[str, int]:
        response = storage.send(get_block_list_request(target))
        if response.status in (403, 404):
            # 404: no blob and no blocks yet. 403: a SAS without read permission (whether hubs grant
            # 'r' is not documented): the blocks cannot be listed, so every block is sent.
            return {}
        if not 200 <= response.status < 300:
            raise storage_error(response.status, response.body, response.headers, target, "Get Block List")
        return parse_block_list(response.body)

    try:
        present = held()
    except _Retryable:
        present = {}  # cannot look now: upload everything; a later retry looks again
    ids: List[str] = []
    skipped = 0
    sent = 0
    for index, offset in enumerate(range(0, size, block_size)):
        length = min(block_size, size - offset)
        data = source.read(offset, length)
        bid = block_id(index, data)
        ids.append(bid)
        if present.get(bid) == length:
            skipped += 1
        else:
            def landed(bid: str = bid, length: int = length) -> bool:
                present.update(held())
                return present.get(bid) == length

            storage.retrying(put_block_request(target, bid, data), f"Put Block {index}", landed)
        del data
        sent += length
        report(sent, size)
    response = storage.retrying(put_block_list_request(target, ids, content_type=content_type), "Put Block List")
    return UploadResult(target.blob_name, target.container_name, target.host_name, target.correlation_id, size,
                        len(ids), skipped, response.status)


__all__ = ["API_VERSION", "DEFAULT_BLOCK_SIZE", "MAX_BLOCKS", "StorageLimits", "UploadResult", "UploadTarget",
           "block_id", "check_blob_name", "choose_block_size", "get_block_list_request", "hub_error",
           "notification_request", "parse_block_list", "parse_sas_uri", "put_blob_request", "put_block_list_request",
           "put_block_request", "sas_uri_request", "storage_context", "storage_error", "storage_limits",
           "upload_file"]
