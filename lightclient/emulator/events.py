"""The telemetry event log: every device-to-cloud message the hub accepted, queryable by identity."""
from __future__ import annotations

import base64
import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, List, Optional

_sequence = itertools.count(1)


@dataclass(frozen=True)
class Event:
    device_id: str
    module_id: Optional[str]
    body: bytes
    system_properties: Dict[str, Optional[str]]
    """Decoded system properties keyed as on the wire (``"$.ct"``, ``"$.mid"``, …)."""
    properties: Dict[str, Optional[str]]
    """Decoded application properties; None is a null (key sent without ``=``), ``""`` is empty."""
    topic: str
    retain: bool = False
    time: float = field(default_factory=time.time)
    sequence: int = field(default_factory=lambda: next(_sequence))

    @property
    def identity(self) -> str:
        return f"{self.device_id}/{self.module_id}" if self.module_id else self.device_id

    def to_json(self) -> dict:
        """JSON form used by the HTTP API (the body as text when it is UTF-8, else base64)."""
        try:
            body, encoding = self.body.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            body, encoding = base64.b64encode(self.body).decode(), "base64"
        return {"deviceId": self.device_id, "moduleId": self.module_id, "body": body,
                "bodyEncoding": encoding, "systemProperties": self.system_properties,
                "properties": self.properties, "topic": self.topic, "retain": self.retain,
                "enqueuedTime": self.time, "sequenceNumber": self.sequence}


#: Telemetry events kept by default (the newest; older ones drop out).
MAX_EVENTS = 100_000


class EventLog:
    """Thread-safe: the hub appends on its loop thread, tests and the HTTP API read from others. A ring of
    the newest ``max_items`` events, so a long-running emulator does not grow without end."""

    def __init__(self, max_items: int = MAX_EVENTS) -> None:
        self._items: Deque[Event] = deque(maxlen=max_items)
        self._cond = threading.Condition()
        self.listeners: List[Callable[[Event], None]] = []   # called on the hub's loop (the dashboard)

    def add(self, event: Event) -> None:
        with self._cond:
            self._items.append(event)
            self._cond.notify_all()
        for listener in list(self.listeners):
            listener(event)

    def items(self, device_id: Optional[str] = None, module_id: Optional[str] = None) -> List[Event]:
        with self._cond:
            return [e for e in self._items if _matches(e, device_id, module_id)]

    def wait_for(self, count: int, device_id: Optional[str] = None, module_id: Optional[str] = None,
                 timeout: float = 5.0) -> List[Event]:
        """Block until at least ``count`` matching events exist; return them or raise TimeoutError."""
        with self._cond:
            if not self._cond.wait_for(
                    lambda: len([e for e in self._items if _matches(e, device_id, module_id)]) >= count,
                    timeout):
                raise TimeoutError(f"fewer than {count} events from {device_id or 'any device'} "
                                   f"within {timeout} s")
            return [e for e in self._items if _matches(e, device_id, module_id)]


def _matches(event: Event, device_id: Optional[str], module_id: Optional[str]) -> bool:
    return ((device_id is None or event.device_id == device_id)
            and (module_id is None or event.module_id == module_id))
