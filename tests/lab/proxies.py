"""Real proxies on loopback for the connect-from-anywhere tests: tinyproxy (HTTP CONNECT) and microsocks
(SOCKS5), both from Debian (``apt install tinyproxy microsocks``), each started in the foreground as a
child of the test and stopped by PID.

    with TinyProxy(tmp_path, connect_ports=[emu.ws_port], user="alice", password="s3cret") as proxy:
        proxy.url            # http://alice:s3cret@127.0.0.1:PORT
    with MicroSocks(user="bob", password="hunter2") as socks:
        socks.url            # socks5://bob:hunter2@127.0.0.1:PORT
"""
from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Iterable, Optional

from .procs import executable, free_port, stop_process, wait_port


class _Proxy:
    scheme = ""
    proc: Optional[subprocess.Popen] = None

    def __init__(self, user: Optional[str], password: Optional[str]):
        self.user, self.password = user, password
        self.port = free_port()

    @property
    def url(self) -> str:
        auth = f"{self.user}:{self.password}@" if self.user is not None else ""
        return f"{self.scheme}://{auth}127.0.0.1:{self.port}"

    @property
    def bare_url(self) -> str:
        """The URL without credentials (what a misconfigured client would use)."""
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self):
        raise NotImplementedError

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None


class TinyProxy(_Proxy):
    """tinyproxy allowing CONNECT to ``connect_ports`` only (as corporate proxies allow only 443);
    Basic authentication when ``user`` is given. Its log is ``{directory}/tinyproxy.log``."""

    scheme = "http"

    def __init__(self, directory: Path, *, connect_ports: Iterable[int], user: Optional[str] = None,
                 password: Optional[str] = None):
        super().__init__(user, password)
        self.directory = Path(directory)
        self.connect_ports = list(connect_ports)
        self.log = self.directory / "tinyproxy.log"

    def start(self) -> "TinyProxy":
        binary = executable("tinyproxy", "tinyproxy")
        self.directory.mkdir(parents=True, exist_ok=True)
        lines = [f"Port {self.port}", "Listen 127.0.0.1", "Timeout 60", "LogLevel Info", "MaxClients 100",
                 "Allow 127.0.0.1"]
        lines += [f"ConnectPort {port}" for port in self.connect_ports]
        if self.user is not None:
            lines.append(f"BasicAuth {self.user} {self.password}")
        conf = self.directory / "tinyproxy.conf"
        conf.write_text("\n".join(lines) + "\n")
        conf.chmod(0o600)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([binary, "-d", "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
        wait_port(self.port, proc=self.proc)
        return self


class MicroSocks(_Proxy):
    """microsocks, a SOCKS5 server; user/password authentication (RFC 1929) when ``user`` is given."""

    scheme = "socks5"

    def __init__(self, *, user: Optional[str] = None, password: Optional[str] = None):
        super().__init__(user, password)

    def start(self) -> "MicroSocks":
        binary = executable("microsocks", "microsocks")
        cmd = [binary, "-i", "127.0.0.1", "-p", str(self.port)]
        if self.user is not None:
            # microsocks takes them only as arguments; these are throw-away lab credentials on loopback.
            cmd += ["-u", self.user, "-P", self.password or ""]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port, proc=self.proc)
        return self
