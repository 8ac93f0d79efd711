"""Loopback HTTP peers for the HTTPS-core tests: an HTTPS "DPS" that redirects, and a listener that records
whether anything at all reached it. Every thread started here is stopped by its owner's close()."""
import json
import select
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Recorder:
    """A loopback TCP listener that counts every connection and byte it receives, and answers each like a
    hostile plain-HTTP DPS would (200, "assigned" to a hub of its choosing), so that a client that did
    reach it would visibly accept the answer. ``close()`` also counts connections still in the backlog."""

    ANSWER = json.dumps({"operationId": "evil", "status": "assigned", "registrationState": {
        "registrationId": "device-ec", "status": "assigned", "assignedHub": "evil.example",
        "deviceId": "device-ec"}}).encode()

    def __init__(self):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.received = bytearray()
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._serve, name="recorder", daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.closed.is_set():
            ready, _, _ = select.select([self.listener], [], [], 0.05)
            if not ready:
                continue
            try:
                conn, _ = self.listener.accept()
            except OSError:
                continue
            self.connections += 1
            conn.settimeout(2)
            try:
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                self.received += data
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(self.ANSWER), self.ANSWER))
            except OSError:
                pass
            finally:
                conn.close()

    def close(self):
        if self.closed.is_set():
            return
        self.closed.set()
        self.thread.join(5)
        self.listener.setblocking(False)
        while True:  # a connection the kernel completed but nobody accepted yet still counts
            try:
                conn, _ = self.listener.accept()
            except OSError:
                break
            self.connections += 1
            conn.close()
        self.listener.close()


class RedirectingHttps:
    """An HTTPS server on 127.0.0.1 with the lab's server certificate, playing DPS: it answers ``on``
    ("PUT": the registration, "GET": the operation-status poll) with ``status`` and ``Location``; a
    register PUT before that gets 202 "assigning" with an operation id to poll. ``body`` goes with the
    ``on`` answer (without ``location`` this plays a DPS sending an oversized answer)."""

    def __init__(self, test_ca, status, location, on="PUT", body=b""):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(test_ca.server_cert), str(test_ca.server_key))
        self.requests = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_PUT(self):
                self._answer()

            def do_GET(self):
                self._answer()

            def _answer(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.requests.append((self.command, self.path))
                if self.command == on:
                    self.send_response(status)
                    if location:
                        self.send_header("Location", location)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    try:
                        self.wfile.write(body)
                    except OSError:
                        pass  # a client that refused to read it all has gone
                    return
                reply = json.dumps({"operationId": "op-1", "status": "assigning"}).encode()
                self.send_response(202)
                self.send_header("Content-Type", "application/json")
                self.send_header("Retry-After", "1")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def get_request(self):
                sock, addr = super().get_request()
                # The handshake happens in the handler's thread, so one bad client cannot stall accept().
                return ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.endpoint = f"localhost:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       name="redirecting-https", daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


class OneRequestStorage:
    """A loopback TLS "storage" that takes ONE request with a one-byte body ending in ``last_byte``, records
    what the client presented (``peer``: its certificate or None) and sent (``request``: the raw bytes),
    and answers 201. ``ctx`` is the server context (it may ask for a client certificate)."""

    def __init__(self, ctx: ssl.SSLContext, last_byte: bytes):
        self.peer, self.request = [], []
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(4)
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, args=(ctx, b"\r\n\r\n" + last_byte), daemon=True)
        self.thread.start()

    def _serve(self, ctx, end):
        conn, _ = self.listener.accept()
        conn.settimeout(10)
        try:
            with ctx.wrap_socket(conn, server_side=True) as tls_conn:
                self.peer.append(tls_conn.getpeercert())
                request = b""
                while end not in request:        # the headers and the one-byte body
                    request += tls_conn.recv(65536)
                self.request.append(request)
                tls_conn.sendall(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
        except OSError as exc:
            self.peer.append(exc)

    def close(self):
        self.thread.join(5)
        self.listener.close()
