"""Cloud-to-device expiry (``$.exp``) and delivery feedback, as IoT Hub does them.

A message whose absolute expiry time (``iothub-expiry`` / ``$.exp``, ISO 8601) has passed is never
delivered: it leaves the queue the next time the queue is looked at (a device subscribing, a new message,
the service reading the queue or the feedback). With ``iothub-ack`` the service asked for feedback:

    ack        feedback records
    positive   Success when the device completes the message (its PUBACK)
    negative   Expired when the message expires undelivered
    full       both

The real hub delivers feedback in batches over AMQP (``/messages/servicebound/feedback``); the emulator
keeps the records (``Emulator.c2d_feedback()``, ``GET /emulator/feedback``) with the same fields:
``originalMessageId``, ``deviceId``, ``statusCode`` (``Success``/``Expired``), ``description``,
``enqueuedTimeUtc``.
"""
from __future__ import annotations

import datetime
import time
from typing import Any, Dict, List, Optional

from .errors import HubError

#: Feedback records kept (the oldest drop out).
MAX_FEEDBACK = 10_000


def parse_expiry(text: Optional[str]) -> Optional[float]:
    """``$.exp`` as seconds since the epoch; HubError 400 when it is not an ISO 8601 time."""
    if text is None:
        return None
    value = text.strip()
    if value.endswith("Z"):
        value = value[:-1] + "+00:00"
    if "." in value:  # Python 3.9's fromisoformat takes 3 or 6 fraction digits only
        head, _, rest = value.partition(".")
        digits = rest[:len(rest) - len(rest.lstrip("0123456789"))]   # the fraction only, not the offset
        value = f"{head}.{(digits + '000000')[:6]}{rest[len(digits):]}"
    try:
        moment = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise HubError(400, 400004, f"expiry {text!r} is not an ISO 8601 time such as "
                       f"'2030-01-01T00:00:00Z'") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment.timestamp()


def _utc(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def record(store: List[Dict[str, Any]], message, status: str) -> None:
    """Add a feedback record for ``message`` if its ``iothub-ack`` asks for ``status``."""
    ack = dict(message.pairs).get("iothub-ack")
    wanted = {"positive": ("Success",), "negative": ("Expired",), "full": ("Success", "Expired")}.get(ack or "", ())
    if status not in wanted:
        return
    store.append({"originalMessageId": message.message_id, "deviceId": message.device_id, "statusCode": status,
                  "description": {"Success": "Success", "Expired": "Message expired"}[status],
                  "enqueuedTimeUtc": _utc(time.time())})
    del store[:-MAX_FEEDBACK]
