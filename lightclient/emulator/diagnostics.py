"""Readable records of protocol deviations, the emulator's main debugging aid.

Each record names the rule that was broken and quotes what was received, e.g.::

    [d1] telemetry.property-encoding: system property key '$.ct' sent unencoded; encode '$' as '%24'
         (received topic 'devices/d1/messages/events/$.ct=application%2Fjson')
"""
from __future__ import annotations

import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, List, Optional


@dataclass(frozen=True)
class Diagnostic:
    rule: str
    """Short dotted rule name, e.g. ``connect.client-id``, ``publish.qos2``, ``twin.rid``."""
    message: str
    """What the hub expects, in plain words."""
    received: str = ""
    """What the device actually sent (topic, username, packet summary)."""
    identity: Optional[str] = None
    """Device or ``device/module`` identity, or None before the CONNECT was understood."""
    peer: str = ""
    """Remote address, so connections that never authenticated can still be told apart."""
    time: float = field(default_factory=time.time)

    def __str__(self) -> str:
        who = self.identity or self.peer or "?"
        text = f"[{who}] {self.rule}: {self.message}"
        if self.received:
            text += f" (received {self.received})"
        return text


#: Records kept by default; older ones drop out of the ring, their counts stay.
MAX_DIAGNOSTICS = 10_000


class DiagnosticLog:
    """Thread-safe ring of the most recent diagnostics plus a count per rule of all of them, with listeners
    (``--verbose`` prints through one). Bounded, so a flood of failed handshakes costs no memory over time."""

    def __init__(self, max_items: int = MAX_DIAGNOSTICS) -> None:
        if max_items < 1:
            raise ValueError(f"max_items must be at least 1, got {max_items}")
        self._items: Deque[Diagnostic] = deque(maxlen=max_items)
        self._counts: Counter = Counter()
        self._cond = threading.Condition()
        self.listeners: List[Callable[[Diagnostic], None]] = []

    def add(self, diagnostic: Diagnostic, count: bool = True) -> None:
        """Record ``diagnostic``; ``count=False`` when the caller already counted it (see :meth:`count`)."""
        with self._cond:
            self._items.append(diagnostic)
            if count:
                self._counts[diagnostic.rule] += 1
            self._cond.notify_all()
        for listener in list(self.listeners):
            listener(diagnostic)

    def count(self, rule: str) -> None:
        """Count one occurrence of ``rule`` without keeping a record (for events too frequent to keep)."""
        with self._cond:
            self._counts[rule] += 1

    def counts(self) -> Dict[str, int]:
        """Occurrences per rule since the start, including records that left the ring."""
        with self._cond:
            return dict(self._counts)

    def items(self, identity: Optional[str] = None, rule: Optional[str] = None) -> List[Diagnostic]:
        with self._cond:
            return [d for d in self._items if _matches(d, identity, rule)]

    def wait_for(self, rule: str, identity: Optional[str] = None, timeout: float = 5.0) -> Diagnostic:
        """Block until a diagnostic whose rule starts with ``rule`` exists; raise TimeoutError if not."""
        with self._cond:
            found: List[Diagnostic] = []

            def ready() -> bool:
                found[:] = [d for d in self._items if _matches(d, identity, rule)]
                return bool(found)

            if not self._cond.wait_for(ready, timeout):
                raise TimeoutError(f"no diagnostic {rule!r} for {identity or 'any identity'} "
                                   f"within {timeout} s; have: {[str(d) for d in self._items]}")
            return found[0]


def _matches(d: Diagnostic, identity: Optional[str], rule: Optional[str]) -> bool:
    return (identity is None or d.identity == identity) and (rule is None or d.rule.startswith(rule))
