"""Progress of a long-running command the way people expect it.

On a terminal one live line, redrawn in place at most ten times a second::

    sent 1200/5000  acknowledged 1180  412.3 msg/s  ETA 9 s

Anywhere else (a pipe, a log file, CI) one plain line every ``period`` seconds, so logs stay readable::

    progress: sent 1200/5000, acknowledged 1180, 412.3 msg/s, ETA 9 s

The live line is cleared before anything else is printed (:meth:`Progress.clear`); the summary is the
command's job, also after Ctrl-C.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, Optional, TextIO


def eta_text(seconds: Optional[float]) -> str:
    if seconds is None:
        return "ETA ?"
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"ETA {seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"ETA {minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"ETA {hours} h {minutes:02d} min"


class Progress:
    """Counts toward ``total``; :meth:`update` shows them when due."""

    LIVE_PERIOD = 0.1

    def __init__(self, total: int, *, stream: Optional[TextIO] = None, live: Optional[bool] = None,
                 period: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.total = total
        self.stream = stream or sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.live = live if live is not None else bool(isatty and isatty())
        self.period = period
        self.clock = clock
        self.start = clock()
        self._last = self.start
        self._shown = False

    def line(self, sent: int, acked: int, now: Optional[float] = None) -> str:
        now = self.clock() if now is None else now
        elapsed = now - self.start
        rate = sent / elapsed if elapsed > 0 else 0.0
        eta = (self.total - sent) / rate if rate > 0 else None
        if self.live:
            return f"sent {sent}/{self.total}  acknowledged {acked}  {rate:.1f} msg/s  {eta_text(eta)}"
        return f"progress: sent {sent}/{self.total}, acknowledged {acked}, {rate:.1f} msg/s, {eta_text(eta)}"

    def update(self, sent: int, acked: int) -> None:
        now = self.clock()
        if now - self._last < (self.LIVE_PERIOD if self.live else self.period):
            return
        self._last = now
        text = self.line(sent, acked, now)
        if self.live:
            self.stream.write("\r\x1b[K" + text)
            self._shown = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def clear(self) -> None:
        """Remove the live line (before a summary or an error is printed)."""
        if self.live and self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False
