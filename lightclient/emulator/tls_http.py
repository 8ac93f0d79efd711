"""Threaded HTTPS servers for the emulator's HTTP endpoints (file upload, blob storage): the TLS wrapping of
each accepted connection, and serving on a daemon thread. Standard library only."""
from __future__ import annotations

import ssl
import threading
from http.server import ThreadingHTTPServer
from typing import Callable, Optional


class TlsHttpServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer whose connections are TLS with ``context()``, asked per connection (a context
    may change while serving, e.g. start accepting clients without a certificate). The handshake happens
    on the handler's thread (``do_handshake_on_connect=False``), so one slow client cannot stall accept()."""

    daemon_threads = True

    def __init__(self, address, handler, context: Callable[[], ssl.SSLContext]):
        self._context = context
        super().__init__(address, handler)

    def get_request(self):
        sock, addr = self.socket.accept()
        return self._context().wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr


class ServerThread:
    """``server.serve_forever`` on a named daemon thread; :meth:`stop` shuts it down, closes and joins."""

    def __init__(self, server: ThreadingHTTPServer, name: str, poll_interval: float = 0.1):
        self.server = server
        self.name = name
        self.poll_interval = poll_interval
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": self.poll_interval},
                                        name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        if self._thread is not None:
            self._thread.join(5)
