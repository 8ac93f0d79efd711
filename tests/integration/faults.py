"""Fault injection for the reliability tests: a mosquitto that keeps sessions across restarts, a loopback
TCP proxy that cuts, stalls, black-holes and refuses connections, a receiving-side counter, and a TLS
server with a chosen certificate. Every thread and process started here is stopped by its owner."""
import select
import socket
import threading
import time
import urllib.parse
import uuid
from collections import Counter

import paho.mqtt.client as mqtt

from tests import lab


def PersistentMosquitto(root, test_ca, port=None):
    """mosquitto with persistence on: a persistent subscriber's session (and its queued messages)
    survives a restart, so the receiving side can count across broker restarts."""
    return lab.Mosquitto(root, test_ca, port=port or 0, quiet=True, persistent=True)


def message_id(topic):
    """The $.mid of a telemetry topic."""
    bag = topic.split("/messages/events/", 1)[1]
    for pair in bag.split("&"):
        key, _, value = pair.partition("=")
        if key == "%24.mid":
            return urllib.parse.unquote(value)
    return None


class Receiver:
    """A test-side paho subscriber with a persistent session: counts telemetry by payload and $.mid."""

    def __init__(self, service_context, port, device_id):
        self.counts = Counter()      # payload -> times received
        self.mids = {}               # payload -> set of $.mid seen
        self.cond = threading.Condition()
        self.subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"rx-{uuid.uuid4().hex[:8]}",
                                  clean_session=False, protocol=mqtt.MQTTv311)
        self.client.tls_set_context(service_context)
        self.client.reconnect_delay_set(0.05, 0.2)
        self.client.max_inflight_messages_set(100)
        self.client.on_connect = lambda c, *a: c.subscribe(f"devices/{device_id}/messages/events/#", qos=1)
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("localhost", port, keepalive=30)
        self.client.loop_start()
        assert self.subscribed.wait(10), "the receiver could not subscribe"

    def _on_message(self, client, userdata, message):
        with self.cond:
            self.counts[message.payload] += 1
            self.mids.setdefault(message.payload, set()).add(message_id(message.topic))
            self.cond.notify_all()

    def distinct(self):
        with self.cond:
            return len(self.counts)

    def wait_distinct(self, n, timeout):
        with self.cond:
            return self.cond.wait_for(lambda: len(self.counts) >= n, timeout)

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


class TcpProxy:
    """A loopback TCP proxy (threads) in front of ``upstream_port`` with faults on demand:

    * ``cut()``: close every current connection (RST), as a dropped link or a hub closing the socket;
    * ``stall(seconds)``: forward nothing for a while, then carry on with the same connections;
    * ``black_hole()``: current connections stay open but nothing gets through, ever (a dead NAT
      entry): only keep-alive can notice;
    * ``refuse(seconds)``: close new connections at once for a while (a hub throttling connects).
    """

    def __init__(self, upstream_port):
        self.upstream = ("127.0.0.1", upstream_port)
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.links = []              # [client socket, upstream socket, state] with state in pass/stall/dead
        self.refuse_until = 0.0
        self.stall_until = 0.0
        self.connections = 0
        self.closed = threading.Event()
        self.threads = [threading.Thread(target=self._accept, name="proxy-accept", daemon=True)]
        self.threads[0].start()

    def _accept(self):
        while not self.closed.is_set():
            ready, _, _ = select.select([self.listener], [], [], 0.05)
            if not ready:
                continue
            try:
                client, _ = self.listener.accept()
            except OSError:
                continue
            if time.monotonic() < self.refuse_until:
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self.upstream, timeout=2)
            except OSError:
                _reset(client)
                continue
            link = [client, upstream, "pass"]
            with self.lock:
                self.links.append(link)
                self.connections += 1
            thread = threading.Thread(target=self._pump, args=(link,), name="proxy-link", daemon=True)
            self.threads.append(thread)
            thread.start()

    def _pump(self, link):
        client, upstream, _ = link
        peers = {client: upstream, upstream: client}
        try:
            while not self.closed.is_set() and link[2] != "closed":
                if link[2] == "dead" or time.monotonic() < self.stall_until:
                    time.sleep(0.02)
                    continue
                ready, _, _ = select.select([client, upstream], [], [], 0.05)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    peers[sock].sendall(data)
        except OSError:
            pass
        finally:
            _reset(client)
            _reset(upstream)
            with self.lock:
                if link in self.links:
                    self.links.remove(link)

    def cut(self):
        with self.lock:
            for link in self.links:
                link[2] = "closed"

    def stall(self, seconds):
        self.stall_until = time.monotonic() + seconds

    def black_hole(self):
        with self.lock:
            for link in self.links:
                link[2] = "dead"

    def refuse(self, seconds):
        self.refuse_until = time.monotonic() + seconds
        self.cut()

    def close(self):
        self.closed.set()
        for thread in self.threads:
            thread.join(5)
        self.listener.close()


def _reset(sock):
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


class TlsServer:
    """Accepts TLS connections with a chosen server certificate, handshakes, then closes (a thread)."""

    def __init__(self, context):
        self.context = context
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._serve, name="tls-server", daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.closed.is_set():
            ready, _, _ = select.select([self.listener], [], [], 0.05)
            if not ready:
                continue
            try:
                raw, _ = self.listener.accept()
            except OSError:
                continue
            raw.settimeout(2)
            try:
                with self.context.wrap_socket(raw, server_side=True) as tls:
                    tls.recv(1)
            except OSError:
                pass
            finally:
                raw.close()

    def close(self):
        self.closed.set()
        self.thread.join(5)
        self.listener.close()
