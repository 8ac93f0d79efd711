"""Retry delays: exponential back-off with jitter, and a long pause after "not authorized".

The one back-off formula of the package: MQTT reconnects (``Device``) and HTTPS retries after a 429 or
5xx without ``Retry-After`` (the HTTPS core under DPS) both use :class:`Backoff`.
Pure (the random source is a parameter), so the policy is unit-tested without sockets or clocks.

Why not paho's own ``reconnect_delay_set(min, max)``: it doubles without jitter, so a fleet of devices
dropped by one hub restart reconnects in lock-step, and it cannot tell "hub unreachable" (retry soon)
from "CONNACK 4/5 not authorized" (retrying every few seconds only burns the hub's connect quota;
the device needs re-enabling or a new certificate first).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from .exceptions import ConfigError

# 2.0 ** 1100 overflows a float; past this many attempts every delay is `maximum` anyway.
_MAX_EXPONENT = 64


@dataclass(frozen=True)
class Backoff:
    """Delays between reconnect attempts, in seconds.

    Attempt ``n`` (0 for the first retry after a drop) waits
    ``min(maximum, initial * multiplier ** n) * (1 - jitter * r)`` with ``r`` uniform in [0, 1): with the
    defaults 0.5–1 s, 1–2 s, 2–4 s, … up to 30–60 s. After a CONNACK refusal 4 (bad user name or password)
    or 5 (not authorized) the wait is ``not_authorized * (1 - jitter * r)`` instead (150–300 s by default):
    IoT Hub answers 5 for a disabled or unknown device, which only an operator can fix.
    """

    initial: float = 1.0
    maximum: float = 60.0
    multiplier: float = 2.0
    jitter: float = 0.5
    not_authorized: float = 300.0

    def __post_init__(self) -> None:
        for name in ("initial", "maximum", "multiplier", "jitter", "not_authorized"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                raise ConfigError(f"Backoff.{name} must be a number, not {value!r}")
        if self.initial <= 0 or self.not_authorized <= 0:
            raise ConfigError("Backoff.initial and Backoff.not_authorized must be > 0 seconds")
        if self.maximum < self.initial:
            raise ConfigError(f"Backoff.maximum ({self.maximum}) must be at least Backoff.initial ({self.initial})")
        if self.multiplier < 1:
            raise ConfigError(f"Backoff.multiplier must be >= 1 (1 means a constant delay), not {self.multiplier}")
        if not 0 <= self.jitter <= 1:
            raise ConfigError(f"Backoff.jitter is the fraction of a delay drawn at random; give 0..1, not {self.jitter}")

    def delay(self, attempt: int, *, not_authorized: bool = False,
              rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait before reconnect attempt ``attempt`` (0-based count of failures in a row)."""
        if attempt < 0:
            raise ConfigError(f"attempt must be >= 0, not {attempt}")
        if not_authorized:
            base = self.not_authorized
        else:
            base = min(self.maximum, self.initial * self.multiplier ** min(attempt, _MAX_EXPONENT))
        return base * (1.0 - self.jitter * rand())


__all__ = ["Backoff"]
