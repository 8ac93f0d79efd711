"""Optional throttling by per-device rates, to exercise a client's back-off (off by default).

IoT Hub meters operations per unit and per device and, over a limit, answers 429 (ThrottlingException)
where the protocol has a status, and otherwise refuses or drops (reference §4: SDKs retry 429 and CONNACK 3
as transient). The emulator models that with one token bucket per identity and kind (``rate`` operations
per second, bursts of ``max(1, rate)``):

    connect     over the rate: CONNACK 3 (server unavailable), which SDKs retry with back-off
    twin        twin GET / reported patch over the rate: ``$iothub/twin/res/429/?$rid=…``
    telemetry   over the rate: the connection is closed without a PUBACK (MQTT 3.1.1 has no negative
                PUBACK; the client sees a drop and must reconnect and resend)

Each throttled operation records a ``throttle.{kind}`` diagnostic. The hub's real quotas are per hub
unit and vary by tier; these per-device rates are a test knob, not a copy of them.
"""
from __future__ import annotations

import time
from typing import Dict, Mapping, Tuple

from .errors import EmulatorError

KINDS = ("connect", "twin", "telemetry")


class Throttle:
    def __init__(self, rates: Mapping[str, float]):
        for kind, rate in rates.items():
            if kind not in KINDS:
                raise EmulatorError(f"unknown throttle kind {kind!r}; known: {', '.join(KINDS)}")
            if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 0:
                raise EmulatorError(f"throttle rate for {kind!r} must be a positive number per second, got {rate!r}")
        self.rates = dict(rates)
        self._buckets: Dict[Tuple[str, str], Tuple[float, float]] = {}   # (identity, kind) -> (tokens, time)

    def allow(self, identity: str, kind: str) -> bool:
        rate = self.rates.get(kind)
        if rate is None:
            return True
        burst = max(1.0, rate)
        now = time.monotonic()
        tokens, then = self._buckets.get((identity, kind), (burst, now))
        tokens = min(burst, tokens + (now - then) * rate)
        if tokens < 1.0:
            self._buckets[(identity, kind)] = (tokens, now)
            return False
        self._buckets[(identity, kind)] = (tokens - 1.0, now)
        return True


def parse_rates(specs) -> Dict[str, float]:
    """``["telemetry=5", "twin=0.5"]`` -> {"telemetry": 5.0, "twin": 0.5}; EmulatorError naming the mistake."""
    rates: Dict[str, float] = {}
    for spec in specs:
        kind, sep, value = str(spec).partition("=")
        try:
            rates[kind.strip()] = float(value)
        except ValueError:
            raise EmulatorError(f"--throttle expects KIND=RATE (KIND one of {', '.join(KINDS)}, RATE per second), "
                                f"got {spec!r}") from None
        if not sep:
            raise EmulatorError(f"--throttle expects KIND=RATE, got {spec!r}")
    Throttle(rates)   # validates
    return rates
