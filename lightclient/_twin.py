"""The twin side of Device: desired-property bookkeeping, and twin requests waiting for their answers.

:class:`DesiredState` (pure): JSON merge patches, and what changed while offline. The hub sends desired
changes only while a device is connected (``$iothub/twin/PATCH/properties/desired/?$version=n``, body
``{"key": value, …, "$version": n}``, ``null`` deleting a key), so after a reconnect the device reads the
whole twin and works out the patch it missed: :func:`diff` of the desired document it knew and the one it
just read. Patches older than what the device already has are dropped, which also keeps the callback in
version order.

:class:`TwinRequests`: every twin GET / reported PATCH in flight, by ``$rid``, until its
``$iothub/twin/res/{status}/?$rid=…`` answer arrives; retried on 429/5xx, on a lost answer and after a
reconnect.
"""
from __future__ import annotations

import copy
import logging
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from .backoff import Backoff
from .exceptions import LightClientError, OperationTimeout, ServiceError
from .topics import TwinResponse

# Device's logger: twin requests are part of Device as far as anyone configuring logging is concerned.
log = logging.getLogger("lightclient.device")

_VERSION = "$version"


def _strip(doc: Dict[str, Any]) -> Dict[str, Any]:
    """The document without its metadata (``$version``, ``$metadata``): only user properties."""
    return {k: v for k, v in doc.items() if not k.startswith("$")}


def merge_patch(doc: Dict[str, Any], patch: Dict[str, Any]) -> Dict[str, Any]:
    """Apply a twin patch (RFC 7386 merge-patch semantics: ``None`` deletes, objects merge) to a copy."""
    result = copy.deepcopy(doc)
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        elif isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merge_patch(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def diff(old: Dict[str, Any], new: Dict[str, Any]) -> Dict[str, Any]:
    """The merge patch that turns ``old`` into ``new``: ``merge_patch(old, diff(old, new)) == new``."""
    patch: Dict[str, Any] = {}
    for key in old.keys() - new.keys():
        patch[key] = None
    for key, value in new.items():
        if key not in old:
            patch[key] = copy.deepcopy(value)
        elif isinstance(value, dict) and isinstance(old[key], dict):
            sub = diff(old[key], value)
            if sub:
                patch[key] = sub
        elif old[key] != value or type(old[key]) is not type(value):
            patch[key] = copy.deepcopy(value)
    return patch


class DesiredState:
    """The desired properties a device has seen, and their ``$version``. Not thread-safe: one owner thread."""

    def __init__(self) -> None:
        self.doc: Optional[Dict[str, Any]] = None
        self.version: Optional[int] = None

    def apply(self, patch: Dict[str, Any], version: int) -> bool:
        """Take a received patch; False (and no change) if it is not newer than what is known."""
        if self.version is not None and version <= self.version:
            return False
        self.doc = merge_patch(self.doc or {}, _strip(patch))
        self.version = version
        return True

    def reconcile(self, desired: Dict[str, Any]) -> Optional[Tuple[Dict[str, Any], Optional[int]]]:
        """Take the ``desired`` section of a full twin; return ``(missed_patch, version)`` or None.

        The patch carries ``$version`` like one sent by the hub. None when the document is not newer,
        or nothing a user would notice changed. Before anything was known, the whole document is "missed".
        """
        version = desired.get(_VERSION)
        if not isinstance(version, int) or isinstance(version, bool):
            version = None
        if self.version is not None and version is not None and version <= self.version:
            return None
        new_doc = _strip(desired)
        patch = diff(self.doc or {}, new_doc)
        self.doc = new_doc
        if version is not None:
            self.version = version
        if not patch:
            return None
        patch[_VERSION] = version
        return patch, version  # version is None only for a twin without $version (not seen from IoT Hub)


class _Pending:
    """A twin request waiting for its ``$iothub/twin/res/{status}/?$rid=…`` answer."""

    __slots__ = ("event", "record", "payload", "error", "resend")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.record: Optional[TwinResponse] = None
        self.payload = b""
        self.error: Optional[LightClientError] = None
        self.resend = False  # set after a reconnect: the answer is lost, ask again


class TwinRequests:
    """Twin requests of one Device, from publish to answer. Thread-safe.

    ``connected`` and ``stopping`` are the Device's events: a request waits for a reconnect while the
    device is offline, and gives up its back-off sleep when the device is being disconnected.
    """

    def __init__(self, backoff: Backoff, connected: threading.Event, stopping: threading.Event) -> None:
        self._backoff = backoff
        self._connected = connected
        self._stopping = stopping
        self._lock = threading.Lock()
        self._pending: Dict[str, _Pending] = {}

    def request(self, what: str, publish: Callable[[str], Any], rid: str,
                timeout: float) -> Tuple[TwinResponse, bytes]:
        """Publish a twin request (``publish(rid)``) and wait for its answer, retrying until ``timeout`` s have passed.

        Retried: an answer with status 429 or 5xx (after a back-off delay), no answer within an attempt's
        share of the timeout (a third, at least 1 s), and a reconnect while waiting (the answer, QoS 0, is
        lost with the old connection, so the request is sent again at once). The caller gets the first
        success, or the last error once the time is up.
        """
        deadline = time.monotonic() + timeout
        attempt_timeout = max(1.0, timeout / 3)
        attempt = 0
        last: Optional[LightClientError] = None
        while True:
            pending = _Pending()
            with self._lock:
                self._pending[rid] = pending  # before publishing: the answer can beat publish()'s return
            try:
                publish(rid)
            except BaseException:
                with self._lock:
                    self._pending.pop(rid, None)
                raise
            remaining = deadline - time.monotonic()
            answered = pending.event.wait(max(0.0, min(remaining, attempt_timeout)))
            if not answered:
                with self._lock:
                    self._pending.pop(rid, None)
                state = "" if self._connected.is_set() else " (the device is not connected)"
                last = OperationTimeout(f"no answer to the twin {what} ($rid={rid}) within {timeout} s{state}")
                if deadline - time.monotonic() <= 0:
                    raise last
                if self._connected.is_set():
                    attempt += 1
                    log.info("no answer to the twin %s ($rid=%s) yet; asking again", what, rid)
                else:
                    self._connected.wait(max(0.0, deadline - time.monotonic()))
                continue
            if pending.error is not None:
                raise pending.error
            if pending.resend and pending.record is None:
                log.info("reconnected while waiting for the twin %s ($rid=%s); asking again", what, rid)
                continue
            record = pending.record
            assert record is not None
            if record.status < 300:
                return record, pending.payload
            detail = pending.payload[:200].decode("utf-8", "replace").strip()
            retryable = record.status == 429 or record.status >= 500
            last = ServiceError(
                f"the hub answered the twin {what} with status {record.status}"
                f"{': ' + detail if detail else ''}{'; retry later' if retryable else ''}", record.status)
            if not retryable:
                raise last
            delay = self._backoff.delay(attempt)
            attempt += 1
            if time.monotonic() + delay >= deadline:
                raise last
            log.info("the hub answered the twin %s with %d; retrying in %.1f s", what, record.status, delay)
            if self._stopping.wait(delay):
                raise OperationTimeout(f"the device was disconnected while retrying the twin {what}") from last

    def answered(self, response: TwinResponse, payload: bytes) -> None:
        """A ``$iothub/twin/res/…`` message arrived (paho's network thread)."""
        with self._lock:
            pending = self._pending.pop(response.rid, None)
        if pending is None:
            log.debug("twin response for unknown $rid=%s (late, or not ours)", response.rid)
            return
        pending.record, pending.payload = response, payload
        pending.event.set()

    def resend_all(self) -> None:
        """After a (re)connect: wake every request still waiting, so it is sent again at once."""
        for request in self._take_all():
            request.resend = True
            request.event.set()

    def fail_all(self, error: LightClientError) -> None:
        """The device is going away: every waiting request raises ``error``."""
        for request in self._take_all():
            request.error = error
            request.event.set()

    def _take_all(self) -> List[_Pending]:
        with self._lock:
            pending, self._pending = list(self._pending.values()), {}
        return pending


__all__ = ["DesiredState", "TwinRequests", "diff", "merge_patch"]
