"""Proxies: HTTP CONNECT and SOCKS5 tunnels, for MQTT (TCP and WebSockets) and for DPS over HTTPS.

A :class:`Proxy` is parsed from a URL::

    http://proxy.corp:3128                 HTTP CONNECT
    http://user:pass@proxy.corp:3128       HTTP CONNECT with Proxy-Authorization: Basic (RFC 7617)
    socks5://proxy.corp:1080               SOCKS5 (RFC 1928), the client resolves the hub's name
    socks5h://user:pass@proxy.corp:1080    SOCKS5, the proxy resolves it; user/password auth (RFC 1929)

:meth:`Proxy.open` returns a connected TCP socket to the target through the proxy; TLS (and the WebSocket
upgrade) then run inside that tunnel end to end, so the proxy sees neither the device key's signatures
nor any MQTT. What goes on the wire to an HTTP proxy::

    CONNECT hub.azure-devices.net:443 HTTP/1.1
    Host: hub.azure-devices.net:443
    Proxy-Authorization: Basic dXNlcjpwYXNz      (only with credentials)

Why our own ~200 lines rather than PySocks (what paho's ``proxy_set`` and ``requests[socks]`` use):
PySocks is unmaintained since 2019, and installing it silently makes paho read ``mqtt_proxy`` and
``no_proxy`` from the environment for every client; here every failure is a typed
:class:`~lightclient.exceptions.ProxyError` that names the proxy and never its credentials, and the same
code serves MQTT and DPS, so one proxy setting behaves the same everywhere. requests' own HTTP CONNECT
would only cover DPS and not SOCKS.

The credentials never appear in ``repr()``, ``str()``, log lines or error messages: a proxy shows as
``http://proxy.corp:3128`` (with ``(with credentials)`` when it has some). The library never reads
``HTTPS_PROXY``/``NO_PROXY``; the CLI does (see :func:`from_environment`, which takes the mapping).
"""
from __future__ import annotations

import base64
import ipaddress
import socket
import struct
from dataclasses import dataclass, field
from typing import Mapping, Optional, Union
from urllib.parse import unquote, urlsplit

from .exceptions import ConfigError, ProxyError

SCHEMES = ("http", "socks5", "socks5h")
_DEFAULT_PORTS = {"http": 3128, "socks5": 1080, "socks5h": 1080}
#: The largest CONNECT answer head read; a proxy sending more is not a proxy we can talk to.
_MAX_HEAD = 16 * 1024

_SOCKS_REPLIES = {
    1: "general SOCKS server failure", 2: "connection not allowed by the proxy's rules",
    3: "network unreachable", 4: "host unreachable", 5: "connection refused", 6: "TTL expired",
    7: "command not supported", 8: "address type not supported",
}
#: SOCKS replies that are about the target (the hub), not about the proxy or our request.
_SOCKS_TARGET = (3, 4, 5, 6)


@dataclass(frozen=True)
class Proxy:
    """A proxy to tunnel through. Build it with :meth:`parse`; the password is kept out of every repr."""

    scheme: str
    host: str
    port: int
    username: Optional[str] = field(default=None, repr=False)
    password: Optional[str] = field(default=None, repr=False)

    @classmethod
    def parse(cls, url: Union[str, "Proxy"], *, what: str = "proxy") -> "Proxy":
        """A :class:`Proxy` from ``http://[user:pass@]host[:port]`` or ``socks5[h]://…``; ConfigError
        naming ``what`` (never the password) if it is not one."""
        if isinstance(url, Proxy):
            return url
        if not isinstance(url, str) or not url.strip():
            raise ConfigError(f"{what} must be a URL such as http://proxy:3128 or socks5://proxy:1080, "
                              f"not {type(url).__name__ if not isinstance(url, str) else 'an empty string'}")
        parts = urlsplit(url.strip())
        shown = _redacted(parts)
        scheme = parts.scheme.lower()
        if scheme == "https":
            raise ConfigError(f"{what} {shown}: TLS to the proxy itself (https://) is not supported; "
                              "give http://host:port (the tunnel inside is TLS end to end)")
        if scheme == "socks":
            scheme = "socks5"
        if scheme not in SCHEMES:
            raise ConfigError(f"{what} {shown}: the scheme must be http://, socks5:// or socks5h://")
        try:
            port = parts.port
        except ValueError:
            raise ConfigError(f"{what} {shown}: the port is not a number from 1 to 65535") from None
        if not parts.hostname:
            raise ConfigError(f"{what} {shown}: no host name; give e.g. {scheme}://proxy.example:"
                              f"{_DEFAULT_PORTS[scheme]}")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ConfigError(f"{what} {shown}: a proxy URL has no path or query; give {scheme}://host:port")
        username = unquote(parts.username) if parts.username is not None else None
        password = unquote(parts.password) if parts.password is not None else None
        if scheme.startswith("socks5") and username is not None and (
                len(username.encode()) > 255 or len((password or "").encode()) > 255):
            raise ConfigError(f"{what} {shown}: SOCKS5 user names and passwords are at most 255 bytes")
        for text in (username, password):
            if text is not None and any(c in text for c in "\r\n\x00"):
                raise ConfigError(f"{what} {shown}: the credentials contain a line break or NUL")
        return cls(scheme, parts.hostname, port or _DEFAULT_PORTS[scheme], username, password)

    @property
    def has_credentials(self) -> bool:
        return self.username is not None

    @property
    def address(self) -> str:
        """``host:port`` of the proxy itself (IPv6 in brackets)."""
        return _host_port(self.host, self.port)

    def __str__(self) -> str:
        return f"{self.scheme}://{self.address}" + (" (with credentials)" if self.has_credentials else "")

    def url(self) -> str:
        """The URL with the credentials, for handing to another client library. Never log it."""
        auth = ""
        if self.username is not None:
            from urllib.parse import quote
            auth = quote(self.username, safe="") + (":" + quote(self.password, safe="")
                                                    if self.password is not None else "") + "@"
        return f"{self.scheme}://{auth}{self.address}"

    # ------------------------------------------------------------------------------ tunnel

    def open(self, host: str, port: int, timeout: Optional[float] = 30.0,
             source_address: Optional[tuple] = None) -> socket.socket:
        """A TCP socket connected to ``host:port`` through this proxy (blocking, with ``timeout``).

        Raises :class:`ProxyError`: ``reason`` is ``unreachable`` (the proxy itself cannot be reached),
        ``auth`` (credentials missing or refused), ``forbidden`` (the proxy does not allow this target,
        e.g. a port other than 443), ``target`` (the proxy could not reach ``host:port``), ``timeout``
        or ``protocol`` (the proxy answered something we cannot use).
        """
        try:
            sock = socket.create_connection((self.host, self.port), timeout=timeout,
                                            source_address=source_address)
        except socket.timeout:
            raise ProxyError(f"the proxy {self} did not accept a connection within {timeout:g} s",
                             proxy=str(self), reason="timeout") from None
        except OSError as exc:
            raise ProxyError(f"cannot reach the proxy {self}: {exc.strerror or exc}; check --proxy / proxy= "
                             "and that the proxy is running", proxy=str(self), reason="unreachable") from None
        try:
            if self.scheme == "http":
                self._http_connect(sock, host, port)
            else:
                self._socks5_connect(sock, host, port)
        except ProxyError:
            sock.close()
            raise
        except socket.timeout:
            sock.close()
            raise ProxyError(f"the proxy {self} did not answer the tunnel request for "
                             f"{_host_port(host, port)} within {timeout:g} s", proxy=str(self),
                             reason="timeout") from None
        except OSError as exc:
            sock.close()
            raise ProxyError(f"the proxy {self} closed the connection while opening a tunnel to "
                             f"{_host_port(host, port)}: {exc.strerror or exc}", proxy=str(self),
                             reason="protocol") from None
        except BaseException:
            sock.close()
            raise
        return sock

    def _fail(self, message: str, reason: str, status: Optional[int] = None) -> ProxyError:
        return ProxyError(message, proxy=str(self), reason=reason, status=status)

    def _http_connect(self, sock: socket.socket, host: str, port: int) -> None:
        target = _host_port(host, port)
        lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}", "User-Agent: lightclient"]
        if self.username is not None:
            token = base64.b64encode(f"{self.username}:{self.password or ''}".encode("utf-8")).decode("ascii")
            lines.append(f"Proxy-Authorization: Basic {token}")
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("utf-8"))
        head = _read_head(sock, self)
        if head is None:
            raise self._fail(f"the proxy {self} closed the connection without answering CONNECT {target}",
                             "protocol")
        status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        bits = status_line.split(" ", 2)
        if len(bits) < 2 or not bits[0].startswith("HTTP/1.") or not bits[1].isdigit():
            raise self._fail(f"the proxy {self} answered CONNECT with {_printable(status_line)!r}, "
                             "which is not HTTP: is it an HTTP proxy (or a SOCKS one: socks5://)?", "protocol")
        status = int(bits[1])
        text = _printable(bits[2]) if len(bits) > 2 else ""
        if 200 <= status < 300:
            return
        if status in (401, 407):  # 407 is the standard; tinyproxy answers wrong credentials with 401
            why = ("refused the credentials in the proxy URL" if self.has_credentials
                   else "requires credentials: give http://user:password@host:port")
            raise self._fail(f"the proxy {self} {why} ({status} {text})", "auth", status)
        if status == 403:
            raise self._fail(f"the proxy {self} does not allow a tunnel to {target} (403 {text}); many proxies "
                             "allow only port 443: use transport=\"websockets\" (--transport websockets)",
                             "forbidden", status)
        if status in (502, 503, 504):
            raise self._fail(f"the proxy {self} could not reach {target} ({status} {text})", "target", status)
        raise self._fail(f"the proxy {self} refused CONNECT {target}: {status} {text}", "protocol", status)

    def _socks5_connect(self, sock: socket.socket, host: str, port: int) -> None:
        target = _host_port(host, port)
        methods = b"\x00\x02" if self.username is not None else b"\x00"
        sock.sendall(b"\x05" + bytes([len(methods)]) + methods)
        version, method = _recv_exact(sock, 2, self)
        if version != 5:
            raise self._fail(f"the proxy {self} did not answer as a SOCKS5 server: is it an HTTP proxy "
                             "(http://)?", "protocol")
        if method == 0xFF:
            why = ("accepts none of our authentication methods" if self.username is not None
                   else "requires a user name and password: give socks5://user:password@host:port")
            raise self._fail(f"the proxy {self} {why}", "auth")
        if method == 2:
            if self.username is None:
                raise self._fail(f"the proxy {self} asked for credentials it was not offered", "protocol")
            user, password = self.username.encode("utf-8"), (self.password or "").encode("utf-8")
            sock.sendall(b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password)
            _, status = _recv_exact(sock, 2, self)
            if status != 0:
                raise self._fail(f"the proxy {self} refused the credentials in the proxy URL", "auth", status)
        elif method != 0:
            raise self._fail(f"the proxy {self} chose SOCKS5 method {method}, which was not offered", "protocol")
        sock.sendall(b"\x05\x01\x00" + self._socks_address(host, target) + struct.pack("!H", port))
        version, reply, _, atyp = _recv_exact(sock, 4, self)
        if version != 5:
            raise self._fail(f"the proxy {self} sent a malformed SOCKS5 reply", "protocol")
        # Read (and drop) the bound address so that nothing of the reply is left for TLS to read.
        if atyp == 1:
            _recv_exact(sock, 4 + 2, self)
        elif atyp == 4:
            _recv_exact(sock, 16 + 2, self)
        elif atyp == 3:
            (length,) = _recv_exact(sock, 1, self)
            _recv_exact(sock, length + 2, self)
        else:
            raise self._fail(f"the proxy {self} sent a SOCKS5 reply with address type {atyp}", "protocol")
        if reply == 0:
            return
        text = _SOCKS_REPLIES.get(reply, f"reply {reply}")
        if reply in _SOCKS_TARGET:
            raise self._fail(f"the proxy {self} could not reach {target}: {text}", "target", reply)
        if reply == 2:
            raise self._fail(f"the proxy {self} does not allow a tunnel to {target}: {text}", "forbidden", reply)
        raise self._fail(f"the proxy {self} refused the tunnel to {target}: {text}", "protocol", reply)

    def _socks_address(self, host: str, target: str) -> bytes:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            ip = None
        if ip is None and self.scheme == "socks5":
            # socks5:// (curl's meaning): the client resolves the name; socks5h:// leaves it to the proxy.
            try:
                ip = ipaddress.ip_address(socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0])
            except (OSError, IndexError) as exc:
                raise self._fail(f"cannot resolve {host} for the SOCKS5 proxy {self} ({exc}); use socks5h:// "
                                 "to let the proxy resolve it", "target") from None
        if ip is None:
            name = host.encode("idna")
            if len(name) > 255:
                raise self._fail(f"the host name {host} is too long for SOCKS5", "protocol")
            return b"\x03" + bytes([len(name)]) + name
        return (b"\x01" if ip.version == 4 else b"\x04") + ip.packed


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _redacted(parts) -> str:
    """A parsed URL as text with user and password left out (for error messages)."""
    try:
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        host, port = parts.hostname or "", ":?"
    auth = "…@" if "@" in parts.netloc else ""
    return f"{parts.scheme}://{auth}{'[' + host + ']' if ':' in host else host}{port}"


def _printable(text: str, limit: int = 120) -> str:
    shown = "".join(c if c.isprintable() else "?" for c in text[:limit])
    return shown + ("…" if len(text) > limit else "")


def _recv_exact(sock: socket.socket, count: int, proxy: Proxy) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise proxy._fail(f"the proxy {proxy} closed the connection during the SOCKS5 handshake", "protocol")
        data += chunk
    return data


def _read_head(sock: socket.socket, proxy: Proxy) -> Optional[bytes]:
    """The proxy's answer head up to the blank line, and not one byte after it (that belongs to the
    tunnel); None if the proxy closed first. Byte by byte: a head is a few hundred bytes, once per connect."""
    data = bytearray()
    while not data.endswith(b"\r\n\r\n"):
        if len(data) > _MAX_HEAD:
            raise proxy._fail(f"the proxy {proxy} answered CONNECT with a head over {_MAX_HEAD} bytes", "protocol")
        byte = sock.recv(1)
        if not byte:
            return bytes(data) if data else None
        data += byte
    return bytes(data)


def from_environment(environ: Mapping[str, str], host: str) -> Optional[Proxy]:
    """The proxy the conventional variables name for ``host``, or None: ``HTTPS_PROXY``/``https_proxy``,
    else ``ALL_PROXY``/``all_proxy``, unless ``NO_PROXY``/``no_proxy`` lists the host (``*`` = all,
    ``.example.com`` / ``example.com`` = the domain and its subdomains). For the CLI and examples: the
    library itself never reads the environment."""
    value = None
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        if environ.get(name):
            value = environ[name]
            break
    if value is None:
        return None
    no_proxy = environ.get("NO_PROXY") or environ.get("no_proxy") or ""
    if bypassed(host, no_proxy):
        return None
    if "://" not in value:
        value = "http://" + value  # curl's and requests' reading of a bare host:port
    return Proxy.parse(value, what="the proxy in HTTPS_PROXY/ALL_PROXY")


def bypassed(host: str, no_proxy: str) -> bool:
    """Whether ``host`` matches the ``NO_PROXY`` list (comma or space separated)."""
    host = host.lower().rstrip(".")
    for entry in no_proxy.replace(" ", ",").split(","):
        entry = entry.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        entry = entry.lstrip("*").lstrip(".").rstrip(".")
        if ":" in entry and not entry.count(":") > 1:
            entry = entry.split(":", 1)[0]  # host:port entries: the port is ignored, as curl does
        if host == entry or host.endswith("." + entry):
            return True
    return False


__all__ = ["Proxy", "ProxyError", "SCHEMES", "bypassed", "from_environment"]
