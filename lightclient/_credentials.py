"""Certificate requests over the hub's MQTT credentials API (``$iothub/credentials``, preview; protocol
reference section 7.3): subscribe and wait for the SUBACK, publish the CSR with QoS 1 and a fresh
``$rid``, then wait for ``res/202`` (accepted) and ``res/200`` (the chain) or an error status.

One :class:`CredentialsChannel` per :class:`~lightclient.device.Device`, created on first use; the
answers arrive on paho's network thread and only wake the waiting caller.
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from . import topics
from .exceptions import OperationTimeout, ProtocolError, RenewalError
from .topics import CredentialsAnswer

log = logging.getLogger("lightclient.renewal")


class CredentialsChannel:
    def __init__(self, client: Any, device_id: str, subscriptions: List[Tuple[str, int]],
                 connected: threading.Event):
        self._client = client
        self._device_id = device_id
        self._subscriptions = subscriptions      # the Device's list: later (re)connects subscribe too
        self._connected = connected
        self._lock = threading.Lock()
        self._waiters: Dict[str, "List[CredentialsAnswer]"] = {}
        self._wake = threading.Condition(self._lock)
        self._suback_mid: Optional[int] = None
        self._early_subacks: Set[int] = set()
        self._subscribed = threading.Event()
        client.message_callback_add(topics.CREDENTIALS_RESPONSE_FILTER, self._on_message)

    # --------------------------------------------------------------------- network thread

    def suback(self, mid: int) -> bool:
        """True if ``mid`` was this channel's SUBSCRIBE (the Device's on_subscribe asks first)."""
        with self._lock:
            if self._suback_mid is None:
                # The SUBACK can beat subscribe()'s return to the caller's thread: keep it for then.
                self._early_subacks.add(mid)
                return False
            if mid != self._suback_mid:
                return False
        self._subscribed.set()
        return True

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        try:
            response = topics.parse_credentials_response(message.topic)
            if response is None:
                return
            answer = topics.parse_credentials_body(response.status, message.payload)
        except ProtocolError as exc:
            log.warning("ignored a credentials answer: %s", exc)
            return
        with self._lock:
            queue = self._waiters.get(response.rid)
            if queue is None:
                log.info("a credentials answer %d for unknown $rid %r (an earlier request)", response.status,
                         response.rid)
                return
            queue.append(answer)
            self._wake.notify_all()

    # --------------------------------------------------------------------- caller's thread

    def _ensure_subscribed(self, deadline: float) -> None:
        entry = (topics.CREDENTIALS_RESPONSE_FILTER, 1)
        if entry not in self._subscriptions:
            self._subscriptions.append(entry)
            _, mid = self._client.subscribe([entry])
            with self._lock:
                self._suback_mid = mid
                if mid in self._early_subacks:
                    self._subscribed.set()
                self._early_subacks.clear()
        elif self._suback_mid is None:
            self._subscribed.set()   # part of the Device's own subscriptions, acknowledged before connected
        if not self._connected.wait(max(0.0, deadline - time.monotonic())):
            raise OperationTimeout("the device is not connected, so it cannot ask the hub for a certificate")
        if not self._subscribed.wait(max(0.0, deadline - time.monotonic())):
            raise OperationTimeout("the hub did not acknowledge the subscription to $iothub/credentials/res/#")

    def request(self, csr_der: bytes, *, replace: Optional[str] = None, timeout: float = 120.0,
                on_accepted: Optional[Callable[[CredentialsAnswer], None]] = None) -> CredentialsAnswer:
        """Send one CSR and return the 200 answer (its ``certificates``); raise :class:`RenewalError` on an
        error status (``retry_after`` from the body when sent), :class:`OperationTimeout` after ``timeout``."""
        body = topics.credentials_request_body(self._device_id, csr_der, replace)
        deadline = time.monotonic() + timeout
        self._ensure_subscribed(deadline)
        rid = str(uuid.uuid4())
        with self._lock:
            self._waiters[rid] = []
        try:
            info = self._client.publish(topics.credentials_request_topic(rid), body, qos=1)
            if info.rc != 0:
                raise RenewalError(f"could not publish the certificate request (paho rc {info.rc})", route="hub")
            while True:
                with self._lock:
                    queue = self._waiters[rid]
                    if not self._wake.wait_for(lambda: bool(queue), max(0.0, deadline - time.monotonic())):
                        raise OperationTimeout(f"the hub did not issue a certificate within {timeout:g} s "
                                               f"(request $rid={rid})")
                    answer = queue.pop(0)
                if answer.accepted:
                    log.info("the hub accepted the certificate request (correlation %s, expires %s)",
                             answer.correlation_id, answer.operation_expires)
                    if on_accepted is not None:
                        on_accepted(answer)
                    continue
                if answer.issued:
                    return answer
                text = f"the hub refused the certificate request: {answer.status}"
                if answer.error_code:
                    text += f" (errorCode {answer.error_code})"
                if answer.message:
                    text += f": {answer.message}"
                raise RenewalError(text, answer.status, route="hub", retry_after=answer.retry_after)
        finally:
            with self._lock:
                self._waiters.pop(rid, None)
