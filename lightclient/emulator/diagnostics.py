"""Readable records of protocol deviations, the emulator's main debugging aid.

Each record names the rule that was broken and quotes what was received, e.g.::

    [d1] telemetry.property-encoding: system property key '$.ct' sent unencoded; encode '$' as '%24'
         (received topic 'devices/d1/messages/events/$.ct=application%2Fjson')
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional


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


class DiagnosticLog:
    """Thread-safe append-only list of diagnostics with listeners (``--verbose`` prints through one)."""

    def __init__(self) -> None:
        self._items: List[Diagnostic] = []
        self._cond = threading.Condition()
        self.listeners: List[Callable[[Diagnostic], None]] = []

    def add(self, diagnostic: Diagnostic) -> None:
        with self._cond:
            self._items.append(diagnostic)
            self._cond.notify_all()
        for listener in list(self.listeners):
            listener(diagnostic)

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
