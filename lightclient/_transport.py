"""How a paho client reaches the hub: MQTT over TCP (8883) or over WebSockets (443), directly or through a
proxy, and what ``transport="auto"`` remembers.

MQTT over WebSockets, as IoT Hub serves it (protocol notes §8)::

    TLS to {host}:443 (same SNI, same client certificate from the same hardware-backed context)
    GET /$iothub/websocket HTTP/1.1
    Upgrade: websocket / Connection: Upgrade / Sec-WebSocket-Version: 13
    Sec-Websocket-Protocol: mqtt                 (paho's spelling; the C SDK sends "MQTT")

and then the very same MQTT packets in binary frames: client id, username and topics do not change.
X.509 uses the bare path (the ``?iothub-no-client-cert=true`` query is for SAS only).

paho creates every socket itself (``Client._create_socket_connection``); to tunnel through a proxy
without PySocks, the socket factory of one client instance is replaced (see :mod:`lightclient.proxy` for
why). That method is private to paho, so :func:`install_socket_factory` checks it is there and says
which paho is needed otherwise; the tests run against the installed paho.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import socket
import ssl
import tempfile
from typing import Any, Optional, Tuple

from ._files import KiB, prepare_private_file, read_user_file
from .exceptions import ConfigError, ProxyError
from .proxy import Proxy

log = logging.getLogger("lightclient.transport")

TCP = "tcp"
WEBSOCKETS = "websockets"
AUTO = "auto"
TRANSPORTS = (TCP, WEBSOCKETS, AUTO)
#: IoT Hub's WebSocket endpoint path (the same for DPS over MQTT-WS).
WEBSOCKET_PATH = "/$iothub/websocket"
MQTT_PORT = 8883
WEBSOCKET_PORT = 443

_MEMORY_LIMIT = 4 * KiB
#: OSErrors that say "this port is not reachable from here" (a firewall), as opposed to a broken server.
_BLOCKED_ERRNOS = frozenset({errno.ECONNREFUSED, errno.ECONNRESET, errno.ENETUNREACH, errno.EHOSTUNREACH,
                             errno.ETIMEDOUT, errno.EACCES, errno.EPERM})


def check_transport(transport: object, name: str = "transport") -> str:
    if transport not in TRANSPORTS:
        raise ConfigError(f"{name} must be one of {', '.join(repr(t) for t in TRANSPORTS)}, not {transport!r}: "
                          "'tcp' is MQTT on 8883, 'websockets' MQTT over WebSockets on 443, 'auto' tries 8883 "
                          "and falls back to 443")
    return str(transport)


def check_proxy(proxy: object, name: str = "proxy") -> Optional[Proxy]:
    if proxy is None:
        return None
    if not isinstance(proxy, (str, Proxy)):
        raise ConfigError(f"{name} must be a URL string (http://host:port, socks5://host:port) or a "
                          f"lightclient.proxy.Proxy, not {type(proxy).__name__}")
    return Proxy.parse(proxy, what=name)


def set_transport(client: Any, transport: str) -> None:
    """Point an unconnected paho client at ``"tcp"`` or ``"websockets"`` (IoT Hub's path, paho's ``mqtt``
    subprotocol)."""
    if client.transport != transport:
        try:
            client.transport = transport
        except RuntimeError:
            # paho refuses while its state says "connecting", which a connect that failed leaves behind;
            # with no socket there is nothing to update underneath, so switching is safe.
            if client.socket() is not None:
                raise
            client._transport = transport
    if transport == WEBSOCKETS:
        client.ws_set_options(path=WEBSOCKET_PATH)


def install_socket_factory(client: Any, proxy: Optional[Proxy]) -> None:
    """Make ``client`` open its TCP connections through ``proxy`` (or directly when None), for TCP and
    WebSockets alike; TLS and the WebSocket upgrade then run inside the tunnel as usual.

    Direct connections made here also keep paho from consulting ``mqtt_proxy``/``no_proxy`` in the
    environment (it does whenever PySocks happens to be installed).
    """
    if not callable(getattr(client, "_create_socket_connection", None)):
        raise ConfigError("this paho-mqtt has no socket factory to tunnel through a proxy; lightclient needs "
                          "paho-mqtt 2.0 to 2.2 for proxy=")

    def create_socket_connection() -> socket.socket:
        host, port, timeout = client.host, client.port, client.connect_timeout
        source = (client._bind_address, client._bind_port) if getattr(client, "_bind_address", "") else None
        if proxy is None:
            return socket.create_connection((host, port), timeout=timeout, source_address=source)
        return proxy.open(host, port, timeout=timeout, source_address=source)

    client._create_socket_connection = create_socket_connection


def blocked(exc: BaseException) -> bool:
    """Whether a failed connect looks like the port being blocked on the way (refused, reset, timed out,
    unreachable, or a proxy that will not or cannot tunnel to it): the cue for ``auto`` to try the other
    transport. TLS failures, certificate problems and proxy authentication are not: the other transport
    would fail the same way."""
    if isinstance(exc, ProxyError):
        return exc.reason in ("forbidden", "target")
    if isinstance(exc, ssl.SSLError):
        return False
    if isinstance(exc, (socket.timeout, TimeoutError, ConnectionRefusedError, ConnectionResetError)):
        return True
    return isinstance(exc, OSError) and exc.errno in _BLOCKED_ERRNOS


class TransportMemory:
    """What ``auto`` found to work, in memory and (with ``path``) in a small JSON file, mode 0600::

        {"host": "hub.azure-devices.net", "transport": "websockets"}

    A file for another host, or one that cannot be read or parsed, is ignored (and rewritten on success):
    it is a hint that saves one connect timeout, never a setting.
    """

    def __init__(self, path: Optional[str] = None):
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise ConfigError(f"transport_cache must be a file path, not {type(path).__name__}")
        self.path = os.fspath(path) if path is not None else None
        self._known: Optional[Tuple[str, str]] = None

    def recall(self, host: str) -> Optional[str]:
        if self._known is None and self.path is not None and os.path.exists(self.path):
            try:
                data = json.loads(read_user_file(self.path, what=f"the transport cache {self.path!r}",
                                                 limit=_MEMORY_LIMIT))
                if isinstance(data, dict) and data.get("transport") in (TCP, WEBSOCKETS):
                    self._known = (str(data.get("host")), data["transport"])
            except (ConfigError, ValueError) as exc:
                log.warning("ignoring the transport cache %s: %s", self.path, exc)
        if self._known is not None and self._known[0] == host:
            return self._known[1]
        return None

    def remember(self, host: str, transport: str) -> None:
        if self._known == (host, transport):
            return
        self._known = (host, transport)
        if self.path is None:
            return
        try:
            _write_private(self.path, json.dumps({"host": host, "transport": transport}).encode())
        except (ConfigError, OSError) as exc:
            log.warning("could not write the transport cache %s: %s", self.path, exc)


def _write_private(path: str, data: bytes) -> None:
    """Replace ``path`` atomically with ``data``, mode 0600."""
    prepare_private_file(path, what=f"the transport cache {path!r}")
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".transport-", dir=directory)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
