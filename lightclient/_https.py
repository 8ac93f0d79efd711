"""The private HTTPS core under lightclient's HTTPS features (DPS now, file upload next).

What each feature gets here, so that none can get it wrong on its own:

* a pure :class:`Request` record in (the feature builds it, no I/O) and a :class:`Response` record out;
* every request of one job on ONE ``requests`` session (:class:`Exchange`): with a TPM or a token each
  TLS handshake costs a hardware signature, so a job costs one handshake while the server keeps the
  connection open;
* no redirect is ever followed: a 3xx raises the feature's :class:`~lightclient.exceptions.ServiceError`
  naming the status and the ``Location``, and a plain ``http://`` URL is refused before any connection
  (a redirect to plain HTTP would carry the device's registration, and its answer, unprotected);
* ``Retry-After`` parsed and clamped, otherwise the one :class:`~lightclient.backoff.Backoff`;
* a failed server certificate check as :class:`~lightclient.exceptions.ServerCertificateError`;
* answer bodies read up to :data:`MAX_BODY` bytes, never more.

:func:`new_session` builds the session :func:`lightclient.tls.https_session` returns: besides the
hardware-key adapter for ``https://`` it refuses ``http://`` and raises instead of following a redirect
even for a caller who asks requests to follow. It never reads the environment (``trust_env`` off: no
``HTTPS_PROXY``, ``REQUESTS_CA_BUNDLE`` or ``.netrc``); a proxy is given explicitly (``proxy=``) and
tunnels every connection with :class:`lightclient.proxy.Proxy`, so a proxy failure is a
:class:`~lightclient.exceptions.ProxyError` naming the proxy, as on the MQTT side.
"""
from __future__ import annotations

import functools
import random
import time
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Tuple
from urllib.parse import urlsplit

from ._verify import find_verify_error, server_certificate_error
from .backoff import Backoff
from .exceptions import ConfigError, OperationTimeout, ProxyError, ServiceError, wording

DEFAULT_RETRY_AFTER = 2.0
#: The largest answer body read (after content decoding): a DPS answer with an issued chain is a few KiB,
#: and a server must not be able to fill the device's memory.
MAX_BODY = 1024 * 1024
_SHOW_LIMIT = 200


def network_reason(exc: BaseException) -> str:
    """Why a connection failed, in one short line, from the OS error deep inside requests' and urllib3's
    wrappers (whose own text is ``HTTPSConnectionPool(host=…): Max retries exceeded … NameResolutionError(…)``)."""
    import socket
    import ssl

    seen, stack = set(), [exc]
    while stack:
        current = stack.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, socket.gaierror):
            return f"the host name does not resolve ({current.strerror or current})"
        if isinstance(current, ssl.SSLError):
            return f"TLS error {current.reason or current}"
        if isinstance(current, OSError) and current.strerror and type(current).__module__ == "builtins":
            return current.strerror[:1].lower() + current.strerror[1:]
        stack.extend([current.__cause__, current.__context__, getattr(current, "reason", None),
                      *[a for a in getattr(current, "args", ()) if isinstance(a, BaseException)]])
    text = str(exc)
    if "Name or service not known" in text or "NameResolutionError" in text:
        return "the host name does not resolve"
    if "Connection refused" in text:
        return "connection refused"
    return text.splitlines()[0][:200]


@dataclass(frozen=True)
class Request:
    """One HTTP request, ready to send."""

    method: str
    url: str
    headers: Mapping[str, str]
    body: Optional[bytes] = None


class SecretHeaders(dict):
    """Request headers whose repr hides the Authorization value (a SAS token is a bearer secret)."""

    def __repr__(self) -> str:
        return repr({k: ("<secret>" if k.lower() == "authorization" else v) for k, v in self.items()})


def authorized(request: Request, credential) -> Request:
    """``request`` with ``Authorization: {credential.current().value}`` (a fresh SAS token when the current
    one is due; see :class:`lightclient.symkey.SasCredential`), or unchanged for ``credential=None``."""
    if credential is None:
        return request
    from dataclasses import replace

    return replace(request, headers=SecretHeaders({**request.headers, "Authorization": credential.current().value}))


@dataclass(frozen=True)
class Response:
    """One HTTP answer: the status, the whole body and the headers (use :func:`header` to look one up)."""

    status: int
    body: bytes
    headers: Mapping[str, str]


def header(headers: Mapping[str, str], name: str) -> Optional[str]:
    """The value of header ``name`` (case-insensitive), or None."""
    name = name.lower()
    for key, value in headers.items():
        if key.lower() == name:
            return value
    return None


def retry_after(headers: Mapping[str, str], *, default: float = DEFAULT_RETRY_AFTER,
                minimum: float = 1.0, maximum: float = 60.0) -> float:
    """Seconds to wait from a ``Retry-After`` header (integer seconds), clamped; ``default`` if absent."""
    value = header(headers, "Retry-After")
    try:
        seconds = float(value) if value is not None else default
    except (TypeError, ValueError):
        seconds = default  # an HTTP-date or garbage: the Azure SDKs ignore it too
    if seconds != seconds:  # NaN
        seconds = default
    return min(max(seconds, minimum), maximum)


def retry_delay(headers: Mapping[str, str], attempt: int, *, backoff: Backoff, minimum: float, maximum: float,
                rand: Callable[[], float] = random.random) -> float:
    """The wait before retrying a 429/5xx: the server's ``Retry-After`` (clamped) if it sent one, else
    ``backoff``'s delay for failure number ``attempt`` (0-based)."""
    if header(headers, "Retry-After") is not None:
        return retry_after(headers, minimum=minimum, maximum=maximum)
    return backoff.delay(attempt, rand=rand)


def _show(text: str) -> str:
    """Server-chosen text fit for a message: printable, and not endless."""
    shown = "".join(c if c.isprintable() else "?" for c in text[:_SHOW_LIMIT])
    return shown + ("…" if len(text) > _SHOW_LIMIT else "")


def redirect_message(service: str, status: int, location: Optional[str]) -> str:
    where = f"redirecting to {_show(location)}" if location else "(a redirect without a Location)"
    return (f"{service} answered {status} {where}: lightclient never follows redirects; "
            "check the endpoint")


def require_https(method: str, url: str) -> None:
    """Refuse anything but an ``https://`` URL, before any connection is made."""
    if not isinstance(url, str) or urlsplit(url).scheme.lower() != "https":
        raise _plaintext_refused(method, url)


def _plaintext_refused(method: str, url: object) -> ConfigError:
    return ConfigError(
        f"refusing to send {method} to {_show(str(url))}: lightclient speaks only HTTPS with the device key "
        "(plain HTTP would expose the request and let anyone on the path answer it); give an https:// URL")


class Exchange:
    """The requests of one job (one provisioning, one upload) to one ``service``, on one session.

    ``error`` is the feature's ServiceError class (called as ``error(message, status=...)``);
    ``timeout_text(status)`` says what did not finish when the job's ``timeout`` runs out (``status``
    is the last HTTP status). ``sleep`` and ``rand`` are injectable for tests.
    """

    def __init__(self, session, *, service: str, timeout: float, timeout_text: Callable[[Optional[int]], str],
                 error: Callable[..., ServiceError] = ServiceError, request_timeout: float = 30.0,
                 backoff: Optional[Backoff] = None, retry_bounds: Tuple[float, float] = (1.0, 60.0),
                 sleep: Callable[[float], None] = time.sleep, rand: Callable[[], float] = random.random,
                 clock: Callable[[], float] = time.monotonic, max_body: int = MAX_BODY):
        self.session = session
        self.service = service
        self.error = error
        self.request_timeout = request_timeout
        self.backoff = backoff or Backoff()
        self.retry_bounds = retry_bounds
        self.timeout_text = timeout_text
        self._sleep, self._rand, self._clock = sleep, rand, clock
        self.max_body = max_body
        self.deadline = clock() + timeout

    def send(self, request: Request) -> Response:
        """One request, one answer (any status but 3xx); transport failures raise typed errors."""
        import requests

        require_https(request.method, request.url)
        remaining = self.deadline - self._clock()
        if remaining <= 0:
            raise OperationTimeout(f"the {self.service} request timed out before it could be sent")
        try:
            resp = self.session.request(request.method, request.url, headers=dict(request.headers),
                                        data=request.body, timeout=min(self.request_timeout, remaining),
                                        allow_redirects=False, stream=True)
            try:
                body = self._read_body(resp, request.method)
            finally:
                resp.close()  # after a whole body this returns the connection to the pool for the next request
        except requests.exceptions.SSLError as exc:
            verify = find_verify_error(exc)
            if verify is not None:
                where = urlsplit(request.url)
                raise server_certificate_error(verify, where.hostname or "?", where.port or 443) from None
            raise self.error(wording(
                f"the TLS handshake with {self.service} failed: {network_reason(exc)}. Check the trusted roots "
                "({ca}) and that the device certificate is accepted", ca="ca=")) from None
        except requests.exceptions.Timeout:
            raise OperationTimeout(
                f"{self.service} did not answer {request.method} within {self.request_timeout:g} s") from None
        except requests.exceptions.ConnectionError as exc:
            proxy_error = find_proxy_error(exc)
            if proxy_error is not None:  # the proxy's own words name it, never its credentials
                raise ProxyError(f"{self.service}: {proxy_error}", proxy=proxy_error.proxy,
                                 reason=proxy_error.reason, status=proxy_error.status) from None
            raise self.error(f"cannot reach {self.service} at {urlsplit(request.url).netloc}: "
                             f"{network_reason(exc)}") from None
        except requests.exceptions.RequestException as exc:
            # e.g. a body cut short or an undecodable encoding: the answer is unusable, say so typed
            raise self.error(f"{self.service} sent an unusable answer to {request.method}: {exc}") from None
        response = Response(resp.status_code, body, resp.headers)  # requests: case-insensitive names
        if 300 <= response.status < 400:
            raise self.error(redirect_message(self.service, response.status, header(response.headers, "Location")),
                             status=response.status)
        return response

    def _read_body(self, resp, method: str) -> bytes:
        chunks, size = [], 0
        for chunk in resp.iter_content(64 * 1024):
            size += len(chunk)
            if size > self.max_body:
                raise self.error(f"{self.service} answered {method} with more than {self.max_body} bytes; "
                                 "refused unread (check the endpoint)", status=resp.status_code)
            chunks.append(chunk)
        return b"".join(chunks)

    def send_retrying(self, request: Request) -> Response:
        """:meth:`send`, retrying 429 and 5xx (``Retry-After`` or back-off) until the job's timeout."""
        attempt = 0
        while True:
            response = self.send(request)
            if response.status != 429 and response.status < 500:
                return response
            lo, hi = self.retry_bounds
            self.pause(retry_delay(response.headers, attempt, backoff=self.backoff, minimum=lo, maximum=hi,
                                   rand=self._rand), response.status)
            attempt += 1

    def pause(self, seconds: float, status: Optional[int]) -> None:
        """Sleep ``seconds`` before the next request, or raise OperationTimeout if that passes the deadline."""
        if self._clock() + seconds > self.deadline:
            raise OperationTimeout(self.timeout_text(status))
        self._sleep(seconds)


# ------------------------------------------------------------------------------------------ session


def new_session(https_adapter, proxy=None):
    """A ``requests.Session`` sending ``https://`` through ``https_adapter`` (and through ``proxy``, a
    :class:`lightclient.proxy.Proxy`, when given), refusing ``http://``, raising :class:`ServiceError`
    instead of following a redirect, and reading nothing from the environment."""
    session = _session_class()()
    session.trust_env = False
    if proxy is not None:
        tunnel_through(https_adapter, proxy)
    session.mount("https://", https_adapter)
    session.mount("http://", _plaintext_adapter_class()())
    return session


def tunnel_through(https_adapter, proxy) -> None:
    """Make ``https_adapter`` open its TCP connections with ``proxy.open()``; TLS then runs end to end
    inside the tunnel with the adapter's own context, exactly as without a proxy.

    The hook is urllib3's ``HTTPSConnection._new_conn`` on a pool class of our own, the way urllib3's
    own SOCKS support (``urllib3.contrib.socks``) plugs in; requests' ``proxies=`` is not used, so the
    same code and the same typed errors serve HTTP CONNECT and SOCKS5 without PySocks.
    """
    from urllib3.connection import HTTPSConnection
    from urllib3.connectionpool import HTTPSConnectionPool

    class TunnelHTTPSConnection(HTTPSConnection):
        def _new_conn(self):
            return proxy.open(self.host, self.port, timeout=_seconds(self.timeout),
                              source_address=self.source_address)

    class TunnelHTTPSConnectionPool(HTTPSConnectionPool):
        ConnectionCls = TunnelHTTPSConnection

    manager = https_adapter.poolmanager
    manager.pool_classes_by_scheme = dict(manager.pool_classes_by_scheme, https=TunnelHTTPSConnectionPool)
    manager.clear()  # no pool made before this may keep connecting directly


def _seconds(timeout) -> Optional[float]:
    """urllib3 hands a connection its connect timeout as a number, None, or a sentinel object."""
    return float(timeout) if isinstance(timeout, (int, float)) else 30.0


def find_proxy_error(exc: BaseException) -> Optional[ProxyError]:
    """The ProxyError somewhere inside the wrappers requests and urllib3 put around it, or None."""
    seen = set()
    todo = [exc]
    while todo:
        item = todo.pop()
        if item is None or id(item) in seen or len(seen) > 32:
            continue
        seen.add(id(item))
        if isinstance(item, ProxyError):
            return item
        todo.extend([getattr(item, "__cause__", None), getattr(item, "__context__", None),
                     getattr(item, "reason", None) if isinstance(getattr(item, "reason", None), BaseException)
                     else None])
        todo.extend(arg for arg in getattr(item, "args", ()) if isinstance(arg, BaseException))
    return None


@functools.lru_cache(maxsize=None)
def _session_class():
    import requests

    class NoRedirectSession(requests.Session):
        """A Session that raises on a redirect even when the caller asks requests to follow it."""

        def resolve_redirects(self, resp, req, *args, yield_requests=False, **kwargs):
            # With allow_redirects=False requests still asks for the next request (yield_requests=True)
            # only to offer it as Response.next: give none, and send none.
            location = self.get_redirect_target(resp)
            if location and not yield_requests:
                host = urlsplit(req.url).hostname or "the server"
                raise ServiceError(redirect_message(host, resp.status_code, location), status=resp.status_code)
            return iter(())

    return NoRedirectSession


@functools.lru_cache(maxsize=None)
def _plaintext_adapter_class():
    from requests.adapters import BaseAdapter

    class RefusePlaintext(BaseAdapter):
        """Mounted for ``http://``: the hardware-key session never speaks plain HTTP."""

        def send(self, request, *args, **kwargs):
            raise _plaintext_refused(request.method, request.url)

        def close(self):
            pass

    return RefusePlaintext
