"""Certificate lifetime rules of the emulated hub: the credentials API and expired certificates.

* ``$iothub/credentials/POST/issueCertificate/?$rid={rid}`` with ``{"id", "csr"[, "replace"]}``:
  ``res/202`` (``correlationId``, ``operationExpires``), then ``res/200`` with ``certificates`` (base64 DER,
  leaf first, ending with the CA), or an error status with the documented error body (protocol reference
  section 7.3). Error codes follow CS-SCEN (400004 field, 400006 JSON, 400037 CSR verification after the
  202, 409004 conflict, 412001 nothing to replace); that list is UNCERTAIN (another source ships 400040/409005).
  Answers go to the connection the request came on; an answer for a device that went offline is dropped
  (the real hub keeps it for a persistent session: not emulated).
* A certificate past its notAfter (or before its notBefore) is refused at CONNECT with CONNACK 5 and a
  ``connect.certificate-expired`` diagnostic (section 7.1: "hub refuses the connection"); the TLS handshake
  itself ignores validity times so the refusal can be reported. Whether the hub also drops a connection
  whose certificate expires while connected is not documented (UNCERTAIN): off by default (the live session
  continues, as UNI describes after a renewal), on with ``disconnect_on_expiry``.
"""
from __future__ import annotations

import asyncio
import base64
import datetime
import json
import ssl
import time
import uuid
from typing import Callable, Dict, List, Optional, Tuple

REQUEST_PATH = "$iothub/credentials/POST/issueCertificate/"
_KEYS = {"id", "csr", "replace"}


def _now_iso(offset: float = 0.0) -> str:
    when = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=offset)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def validity(decoded_peer: dict) -> Optional[Tuple[float, float]]:
    """(notBefore, notAfter) in epoch seconds from ``getpeercert()``, None if absent."""
    try:
        return (ssl.cert_time_to_seconds(decoded_peer["notBefore"]),
                ssl.cert_time_to_seconds(decoded_peer["notAfter"]))
    except (KeyError, ValueError):
        return None


def expiry_refusal(decoded_peer: dict, now: Optional[float] = None) -> Optional[str]:
    """Why the hub refuses this certificate on time grounds, or None."""
    window = validity(decoded_peer)
    if window is None:
        return None
    now = time.time() if now is None else now
    if now >= window[1]:
        return (f"the device certificate expired at {decoded_peer['notAfter']}; renew it before notAfter, or "
                f"register again with DPS using the onboarding credential and a new CSR")
    if now < window[0]:
        return f"the device certificate is not valid before {decoded_peer['notBefore']}"
    return None


def _error(status: int, code: int, message: str, **info) -> bytes:
    body = {"errorCode": code, "message": message, "trackingId": uuid.uuid4().hex, "timestampUtc": _now_iso()}
    if info:
        body["info"] = info
    if status == 429 or status >= 500:
        body["retryAfter"] = 1
    return json.dumps(body).encode()


class CredentialsService:
    """Issues certificates for ``$iothub/credentials`` requests. ``issue(csr_der, cn)`` returns the DER chain
    (ValueError for a bad CSR); ``inject(identity, *statuses)`` makes the next requests fail."""

    def __init__(self, issue: Callable[[bytes, str], List[bytes]], delay: float = 0.2):
        self.issue = issue
        self.delay = delay
        self.faults: Dict[str, List[int]] = {}
        self.pending: Dict[str, str] = {}          # identity -> rid of the request being processed
        self.issued: Dict[str, int] = {}           # identity -> certificates issued

    def inject(self, identity: str, *statuses: int) -> None:
        self.faults.setdefault(identity, []).extend(statuses)

    def handle(self, connection, rid: Optional[str], payload: bytes) -> None:
        """Runs on the hub's loop for one request (PUBACK already sent)."""
        identity = connection.identity
        respond = lambda status, body: connection.hub.deliver(  # noqa: E731
            connection.session, f"$iothub/credentials/res/{status}/?$rid={rid}", body, 1)
        if not rid:
            connection.diag("credentials.rid", "certificate request without '$rid': the hub does not answer "
                            "(and may drop the connection)")
            return
        try:
            body = json.loads(payload)
        except (ValueError, UnicodeDecodeError):
            respond(400, _error(400, 400006, "the request body is not JSON"))
            return
        if not isinstance(body, dict) or set(body) - _KEYS or not isinstance(body.get("csr"), str):
            respond(400, _error(400, 400004, "the body must be {\"id\", \"csr\"[, \"replace\"]} and nothing else"))
            return
        if body.get("id") != identity.device_id:
            respond(400, _error(400, 400004, f"id must be the authenticated device {identity.device_id!r}"))
            return
        replace = body.get("replace")
        name = identity.name
        if name in self.pending:
            if replace is None:
                respond(409, _error(409, 409004, "a certificate request is already pending for this device",
                                    requestId=self.pending[name]))
                return
            if replace not in ("*", self.pending[name]):
                respond(412, _error(412, 412001, f"no pending request {replace!r} to replace"))
                return
        elif replace not in (None, "*"):
            respond(412, _error(412, 412001, f"no pending request {replace!r} to replace"))
            return
        faults = self.faults.get(name)
        if faults:
            status = faults.pop(0)
            respond(status, _error(status, status * 1000 + 1, f"injected fault {status}"))
            return
        try:
            csr = base64.b64decode(body["csr"], validate=True)
        except ValueError:
            respond(400, _error(400, 400004, "csr is not base64"))
            return
        correlation = str(uuid.uuid4())
        self.pending[name] = rid
        respond(202, json.dumps({"correlationId": correlation, "operationExpires": _now_iso(3600)}).encode())
        asyncio.get_running_loop().create_task(self._finish(connection, name, rid, csr, correlation))

    async def _finish(self, connection, name: str, rid: str, csr: bytes, correlation: str) -> None:
        hub, session = connection.hub, connection.session
        topic = "$iothub/credentials/res/{}/?$rid=" + rid
        try:
            await asyncio.sleep(self.delay)
            try:
                chain = await asyncio.get_running_loop().run_in_executor(
                    None, self.issue, csr, connection.identity.device_id)
            except ValueError as exc:   # the CSR failed verification after the 202, as CS-SCEN shows
                hub.deliver(session, topic.format(400), _error(400, 400037, str(exc), correlationId=correlation,
                                                               credentialError="400000"), 1)
                return
            self.issued[name] = self.issued.get(name, 0) + 1
            body = {"correlationId": correlation, "certificates": [base64.b64encode(d).decode() for d in chain]}
            if not hub.deliver(session, topic.format(200), json.dumps(body).encode(), 1):
                hub.diag("credentials.undelivered", "issued certificate dropped: the device went offline or "
                         "unsubscribed from $iothub/credentials/res/#", identity=name)
        finally:
            if self.pending.get(name) == rid:
                del self.pending[name]


def watch_expiry(connection, decoded_peer: dict) -> Optional[asyncio.TimerHandle]:
    """With ``disconnect_on_expiry``: drop the connection when its certificate expires."""
    window = validity(decoded_peer)
    if window is None:
        return None

    def expire() -> None:
        if not connection.closed:
            connection.diag("connect.certificate-expired", "the device certificate expired while connected; "
                            "the connection is closed (disconnect_on_expiry)")
            connection.abort()

    return asyncio.get_running_loop().call_later(max(0.0, window[1] - time.time()), expire)
