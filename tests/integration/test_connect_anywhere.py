"""Connect from anywhere (issue 16), with real components on loopback: the emulator serving MQTT over
WebSockets, tinyproxy (HTTP CONNECT) and microsocks (SOCKS5) from Debian, a SoftHSM key, a second emulator
acting as an IoT Edge gateway with its own CA, and the DPS emulator behind the HTTP proxy."""
import logging
import os
import queue
import socket
import stat
import threading
import uuid

import pytest

from lightclient import dps, tls
from lightclient.backoff import Backoff
from lightclient.device import Device
from lightclient.emulator import certs
from lightclient.emulator.service import Emulator
from lightclient.exceptions import OperationTimeout, ProxyError, ServerCertificateError
from lightclient.identity import Identity
from tests import lab

from .test_device_emulator import _enroll

FAST = Backoff(initial=0.05, maximum=0.3, not_authorized=1.0)
USER, PASSWORD = "alice", "pr0xy-s3cret-9931"   # distinctive, so a leak into any text is easy to spot


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    with Emulator(tmp_path_factory.mktemp("anywhere"), hostname="localhost", port=lab.free_port(),
                  ws_port=0) as hub:
        yield hub


@pytest.fixture(scope="module")
def http_proxy(emu, tmp_path_factory):
    """tinyproxy with Basic auth that, like a corporate proxy, tunnels only to the "443" (WebSocket) port."""
    with lab.TinyProxy(tmp_path_factory.mktemp("tinyproxy"), connect_ports=[emu.ws_port], user=USER,
                       password=PASSWORD) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def socks_proxy():
    with lab.MicroSocks(user=USER, password=PASSWORD) as proxy:
        yield proxy


@pytest.fixture
def make_device(emu, device, tmp_path):
    made = []

    def make(**kwargs):
        device_id = kwargs.pop("device_id", None) or f"any-{uuid.uuid4().hex[:8]}"
        ctx = kwargs.pop("ssl_context", None) or _enroll(emu, device, tmp_path, device_id)
        kwargs.setdefault("backoff", FAST)
        kwargs.setdefault("twin_timeout", 5)
        kwargs.setdefault("port", emu.port)
        kwargs.setdefault("websocket_port", emu.ws_port)
        dev = Device(Identity("localhost", device_id), ctx, host="127.0.0.1", **kwargs)
        made.append(dev)
        return dev

    yield make
    for dev in made:
        dev.disconnect(timeout=0)


def _every_feature(emu, dev):
    """Telemetry, a direct method, the twin both ways and a C2D message, checked on the hub's side."""
    c2d, desired = queue.Queue(), queue.Queue()
    dev.on_c2d = lambda message, payload: c2d.put(payload)
    dev.on_desired = lambda patch, version: desired.put(patch)
    dev.method("echo")(lambda payload: {"echo": payload})
    with dev:
        dev.send_and_wait(b'{"t": 1}', {"via": "ws"}, timeout=10)
        (event,) = emu.wait_for_events(1, dev.identity.device_id)
        assert (event.body, event.properties) == (b'{"t": 1}', {"via": "ws"})
        result = emu.invoke_method(dev.identity.device_id, "echo", {"n": 7}, timeout=10)
        assert (result.status, result.payload) == (200, {"echo": {"n": 7}})
        assert dev.patch_reported({"fw": "2.0"}, timeout=10) >= 1
        assert emu.get_twin(dev.identity.device_id)["reported"]["fw"] == "2.0"
        emu.update_desired(dev.identity.device_id, {"rate": 5})
        assert desired.get(timeout=10)["rate"] == 5
        emu.send_c2d(dev.identity.device_id, b"down-the-tunnel")
        assert c2d.get(timeout=10) == b"down-the-tunnel"
        assert emu.is_connected(dev.identity.device_id)
    assert emu.diagnostics(dev.identity.device_id) == []


def test_every_feature_over_websockets_directly(emu, make_device):
    dev = make_device(transport="websockets")
    _every_feature(emu, dev)
    assert dev.port == emu.ws_port


@pytest.mark.parametrize("kind", ["http", "socks5", "socks5h"])
def test_every_feature_over_websockets_through_a_real_proxy_with_a_softhsm_key(emu, make_device, http_proxy,
                                                                               socks_proxy, kind, caplog):
    caplog.set_level(logging.DEBUG)
    proxy = http_proxy.url if kind == "http" else socks_proxy.url.replace("socks5://", f"{kind}://")
    dev = make_device(transport="websockets", proxy=proxy)
    assert PASSWORD not in repr(dev) and PASSWORD not in str(dev.proxy) and PASSWORD not in repr(dev.proxy)
    _every_feature(emu, dev)
    if kind == "http":
        # The tunnel really went through tinyproxy: it logged the CONNECT to the WebSocket port.
        assert f"127.0.0.1:{emu.ws_port}" in http_proxy.log.read_text()
    assert PASSWORD not in caplog.text


def test_mqtt_over_tcp_through_socks5(emu, make_device, socks_proxy):
    dev = make_device(transport="tcp", proxy=socks_proxy.url)
    with dev:
        dev.send_and_wait(b"tcp-through-socks", timeout=10)
    assert emu.wait_for_events(1, dev.identity.device_id)[0].body == b"tcp-through-socks"


def test_auto_through_a_proxy_that_allows_only_443_falls_back_to_websockets(emu, make_device, http_proxy):
    # tinyproxy answers 403 for CONNECT to the MQTT port: that is "blocked", not a broken proxy.
    dev = make_device(transport="auto", proxy=http_proxy.url)
    with dev:
        dev.send_and_wait(b"auto-through-proxy", timeout=10)
        assert dev.port == emu.ws_port
    assert emu.wait_for_events(1, dev.identity.device_id)[0].body == b"auto-through-proxy"


def test_tcp_through_a_proxy_that_allows_only_443_is_a_typed_error_saying_use_websockets(make_device, http_proxy):
    dev = make_device(transport="tcp", proxy=http_proxy.url)
    with pytest.raises(ProxyError) as info:
        dev.connect(timeout=10)
    assert info.value.reason == "forbidden" and info.value.status == 403
    assert f"127.0.0.1:{http_proxy.port}" in str(info.value) and "websockets" in str(info.value)
    assert PASSWORD not in str(info.value) and PASSWORD not in repr(info.value)


# --------------------------------------------------------------------------------- proxies that refuse


def test_a_proxy_that_wants_credentials_is_a_typed_error_naming_the_proxy(make_device, http_proxy):
    dev = make_device(transport="websockets", proxy=http_proxy.bare_url)
    with pytest.raises(ProxyError) as info:
        dev.connect(timeout=10)
    exc = info.value
    assert (exc.reason, exc.status) == ("auth", 407)
    assert exc.proxy == f"http://127.0.0.1:{http_proxy.port}"
    assert f"proxy http://127.0.0.1:{http_proxy.port}" in str(exc) and "requires credentials" in str(exc)


def test_wrong_proxy_credentials_are_refused_and_never_shown(make_device, http_proxy, socks_proxy):
    for url in (f"http://{USER}:wrong-{PASSWORD}@127.0.0.1:{http_proxy.port}",
                f"socks5://{USER}:wrong-{PASSWORD}@127.0.0.1:{socks_proxy.port}"):
        dev = make_device(transport="websockets", proxy=url)
        with pytest.raises(ProxyError) as info:
            dev.connect(timeout=10)
        assert info.value.reason == "auth"
        assert "refused the credentials" in str(info.value)
        for text in (str(info.value), repr(info.value), repr(dev), info.value.proxy):
            assert PASSWORD not in text and "wrong-" not in text


def test_a_proxy_that_refuses_the_connection_is_a_typed_error_naming_the_proxy_not_the_hub(make_device):
    dead = lab.free_port()   # nothing listens there
    dev = make_device(transport="websockets", proxy=f"http://{USER}:{PASSWORD}@127.0.0.1:{dead}")
    with pytest.raises(ProxyError) as info:
        dev.connect(timeout=1.5)
    exc = info.value
    assert exc.reason == "unreachable" and exc.retryable
    assert f"cannot reach the proxy http://127.0.0.1:{dead}" in str(exc)
    assert "attempts" in str(exc) and PASSWORD not in str(exc)


# --------------------------------------------------------------------------------- auto


class _CountingListener:
    """A TCP port that accepts and at once closes every connection, counting them (a 'broken' 8883)."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._thread = threading.Thread(target=self._run, name="test-counting-listener", daemon=True)
        self._thread.start()

    def _run(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self):
        self.sock.close()
        self._thread.join(5)


def test_auto_falls_back_to_websockets_when_8883_is_closed_and_next_time_goes_straight_there(
        emu, make_device, device, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="lightclient")
    cache = tmp_path / "transport.json"
    closed = lab.free_port()   # the "8883" of this hub: nothing listens, connections are refused
    device_id = f"auto-{uuid.uuid4().hex[:8]}"
    ctx = _enroll(emu, device, tmp_path, device_id)
    first = make_device(device_id=device_id, ssl_context=ctx, transport="auto", port=closed, transport_cache=cache)
    with first:
        first.send_and_wait(b"first", timeout=10)
        assert first.port == emu.ws_port
    assert "trying websockets" in caplog.text
    assert "over WebSockets" in caplog.text            # the log says which transport it uses
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o600
    assert '"transport": "websockets"' in cache.read_text()

    # Next start (a new Device, as after a reboot): straight to WebSockets. If it tried the TCP port
    # first, this listener would count the attempt.
    listener = _CountingListener()
    try:
        caplog.clear()
        second = make_device(device_id=device_id, ssl_context=ctx, transport="auto", port=listener.port,
                             transport_cache=cache)
        with second:
            second.send_and_wait(b"second", timeout=10)
            assert second.port == emu.ws_port
        assert listener.accepted == 0
        assert "trying websockets" not in caplog.text
    finally:
        listener.close()
    bodies = [e.body for e in emu.wait_for_events(2, device_id)]
    assert bodies == [b"first", b"second"]


def test_auto_uses_tcp_when_8883_works(emu, make_device, tmp_path):
    dev = make_device(transport="auto", transport_cache=tmp_path / "t.json")
    with dev:
        dev.send_and_wait(b"tcp", timeout=10)
        assert dev.port == emu.port
    assert '"transport": "tcp"' in (tmp_path / "t.json").read_text()


# --------------------------------------------------------------------------------- gateway


@pytest.fixture(scope="module")
def gateway(emu, tmp_path_factory):
    """An IoT Edge stand-in: a second emulator whose server certificate comes from its OWN CA (as edgeHub's
    comes from the Edge CA), that knows the hub's name and accepts device certificates of the hub's CA."""
    root = tmp_path_factory.mktemp("gateway")
    edge_ca = certs.ensure_ca(root / "edge-ca")
    server_cert, server_key = certs.ensure_server_certificate(root / "edge-ca", edge_ca,
                                                              {"gateway.localhost", "localhost", "127.0.0.1"})
    hub_ca = emu.ca
    with Emulator(root / "state", hostname="localhost", port=lab.free_port(), ws_port=0,
                  ca_cert=hub_ca.cert_path, ca_key=hub_ca.key_path, server_cert=server_cert,
                  server_key=server_key) as gw:
        gw.edge_ca = edge_ca
        yield gw


@pytest.mark.parametrize("transport", ["tcp", "websockets"])
def test_a_device_connects_and_sends_through_a_gateway_with_the_hubs_identity(emu, gateway, device, tmp_path,
                                                                              transport):
    device_id = f"leaf-{uuid.uuid4().hex[:8]}"
    _enroll(emu, device, tmp_path, device_id)      # the hub's CA issues the device certificate
    gateway.register_device(device_id)
    ctx = tls.client_context(cert=tmp_path / f"{device_id}.pem", key=device["ec"]["key"],
                             ca=gateway.edge_ca.cert_path)
    dev = Device(Identity("localhost", device_id), ctx, gateway_hostname="127.0.0.1", port=gateway.port,
                 websocket_port=gateway.ws_port, transport=transport, backoff=FAST, twin_timeout=5)
    with dev:
        dev.send_and_wait(b"via-edge", timeout=10)
        assert dev.host == "127.0.0.1"
    (event,) = gateway.wait_for_events(1, device_id)
    assert event.body == b"via-edge"
    assert emu.events(device_id) == []              # it went to the gateway, not to the hub
    assert gateway.diagnostics(device_id) == []     # the username named the hub, as the gateway expects

    # Trusting only the hub's CA is not enough for a gateway: a typed error says the certificate is untrusted.
    hub_only = tls.client_context(cert=tmp_path / f"{device_id}.pem", key=device["ec"]["key"], ca=emu.ca_path)
    wrong = Device(Identity("localhost", device_id), hub_only, gateway_hostname="127.0.0.1", port=gateway.port,
                   websocket_port=gateway.ws_port, transport=transport, backoff=FAST)
    with pytest.raises(ServerCertificateError) as info:
        wrong.connect(timeout=5)
    assert info.value.reason == "untrusted"


def test_gateway_hostname_and_host_together_are_refused(emu, device, tmp_path):
    ctx = _enroll(emu, device, tmp_path, "gw-both")
    with pytest.raises(Exception) as info:
        Device(Identity("localhost", "gw-both"), ctx, host="a", gateway_hostname="b")
    assert "host= or gateway_hostname=" in str(info.value)


# --------------------------------------------------------------------------------- DPS through the proxy


def test_dps_through_the_http_proxy(emu, device, tmp_path, tmp_path_factory):
    device_id = f"dps-{uuid.uuid4().hex[:8]}"
    ctx_cert = _enroll(emu, device, tmp_path, device_id)  # a certificate from the emulator's CA
    del ctx_cert
    dps_emu = emu.start_dps(0)
    try:
        with lab.TinyProxy(tmp_path_factory.mktemp("dps-proxy"), connect_ports=[dps_emu.port], user=USER,
                           password=PASSWORD) as proxy:
            hctx = tls.https_context(cert=tmp_path / f"{device_id}.pem", key=device["ec"]["key"], ca=emu.ca_path)
            result = dps.provision("0ne00000001", device_id, ssl_context=hctx, endpoint=dps_emu.endpoint,
                                   proxy=proxy.url, poll_interval=(0.05, 0.2), timeout=30)
            assert (result.status, result.device_id) == ("assigned", device_id)
            assert f"127.0.0.1:{dps_emu.port}" in proxy.log.read_text()   # it went through tinyproxy
            # Without credentials: the proxy's 407, typed, naming the proxy.
            with pytest.raises(ProxyError) as info:
                dps.provision("0ne00000001", device_id, ssl_context=hctx, endpoint=dps_emu.endpoint,
                              proxy=proxy.bare_url, poll_interval=(0.05, 0.2), timeout=10)
            assert (info.value.reason, info.value.status) == ("auth", 407)
            assert str(info.value).startswith(f"DPS: the proxy http://127.0.0.1:{proxy.port}")
    finally:
        emu.dps.stop()
        emu.dps = None


def test_dps_does_not_read_proxy_variables_from_the_environment(emu, device, tmp_path, monkeypatch):
    """requests' trust_env would send DPS through HTTPS_PROXY; the library never reads the environment."""
    device_id = f"env-{uuid.uuid4().hex[:8]}"
    _enroll(emu, device, tmp_path, device_id)
    dps_emu = emu.start_dps(0)
    try:
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{lab.free_port()}")   # a dead proxy
        monkeypatch.setenv("NO_PROXY", "")
        hctx = tls.https_context(cert=tmp_path / f"{device_id}.pem", key=device["ec"]["key"], ca=emu.ca_path)
        result = dps.provision("0ne00000001", device_id, ssl_context=hctx, endpoint=dps_emu.endpoint,
                               poll_interval=(0.05, 0.2), timeout=30)
        assert result.status == "assigned"
    finally:
        emu.dps.stop()
        emu.dps = None


def test_a_timeout_not_a_proxy_error_when_the_hub_itself_is_unreachable_over_websockets(make_device):
    dev = make_device(transport="websockets", websocket_port=lab.free_port())
    with pytest.raises(OperationTimeout):
        dev.connect(timeout=1)


# --------------------------------------------------------------------------------- reliability over WebSockets


N_RESTARTS = 3000


def test_qos1_over_websockets_through_three_emulator_restarts_loses_nothing(device, tmp_path):
    """The reliability suite's kill/restart scenario (test_reliability), once over WebSockets."""
    from .test_reliability import no_lost_messages, stream

    hub = Emulator(tmp_path / "emu", hostname="localhost", port=lab.free_port(), ws_port=lab.free_port()).start()
    dev = None
    downs = queue.Queue()
    try:
        device_id = f"relws-{uuid.uuid4().hex[:8]}"
        ctx = _enroll(hub, device, tmp_path, device_id)
        dev = Device(Identity("localhost", device_id), ctx, host="127.0.0.1", transport="websockets",
                     websocket_port=hub.ws_port, backoff=FAST, max_queue=N_RESTARTS,
                     on_connection_state=lambda up, why: up or downs.put(why))
        dev.connect(timeout=10)
        producer, handles = stream(dev, N_RESTARTS, pace_every=100)
        for k in (1, 2, 3):
            hub.wait_for_events(k * N_RESTARTS // 4, device_id, timeout=30)
            hub.stop()   # every connection dropped, mid-stream; the same ports come back
            hub.start()
        producer.join(30)
        for handle in handles:
            handle.wait(30)
        counts, mids = {}, {}
        for event in hub.events(device_id):
            counts[event.body] = counts.get(event.body, 0) + 1
            mids.setdefault(event.body, set()).add(event.system_properties.get("$.mid"))
        no_lost_messages(counts, mids, N_RESTARTS)
        assert downs.qsize() == 3
        assert hub.diagnostics(device_id) == []
        assert hub.diagnostic_counts().get("websocket.framing", 0) == 0
    finally:
        if dev is not None:
            dev.disconnect(timeout=0)
        hub.stop()


# --------------------------------------------------------------------------------- a TPM key


def test_every_feature_over_websockets_through_each_proxy_with_a_tpm_key(emu, tmp_path):
    """swtpm + tpm2-abrmd, the key at a persistent handle through the tpm2-openssl provider, in a child
    process (see connect_child.py) that this test drives: the emulator, proxies and TPM live here."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    names = ("http", "socks5")
    for name in names:
        emu.register_device(f"tpm-{name}")
    with lab.SoftwareTPM(tmp_path / "tpm") as tpm, \
            lab.TinyProxy(tmp_path / "tinyproxy", connect_ports=[emu.ws_port], user=USER, password=PASSWORD) as http, \
            lab.MicroSocks(user=USER, password=PASSWORD) as socks:
        ref = tpm.persistent_key(0x81000021, "ec")
        spec = {"key": ref, "ca_cert": str(emu.ca.cert_path), "ca_key": str(emu.ca.key_path), "work": str(tmp_path),
                "ws_port": emu.ws_port, "proxies": {"http": http.url, "socks5": socks.url}}
        env = {k: v for k, v in tpm.env.items() if k != "SOFTHSM2_CONF"}
        child = subprocess.Popen([sys.executable, "-m", "tests.integration.connect_child"], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=root)
        results = {}
        try:
            child.stdin.write(json.dumps(spec) + "\n")
            child.stdin.flush()
            for line in child.stdout:
                step = json.loads(line)
                if "connected" in step:
                    device_id = f"tpm-{step['connected']}"
                    assert emu.invoke_method(device_id, "echo", {"n": 1}, timeout=15).payload == {"echo": {"n": 1}}
                    emu.update_desired(device_id, {"rate": 3})
                    emu.send_c2d(device_id, f"c2d-{step['connected']}")
                else:
                    results[step["result"]] = step
            child.wait(60)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        stderr = child.stderr.read()
        assert child.returncode == 0, stderr[-3000:]
        assert f"127.0.0.1:{emu.ws_port}" in http.log.read_text()
    for name in names:
        r = results[name]
        assert "error" not in r, f"{name}: {r.get('error')}\n{r.get('trace', '')}"
        device_id = f"tpm-{name}"
        assert [e.body for e in emu.events(device_id)] == [device_id.encode()]
        assert emu.get_twin(device_id)["reported"]["fw"] == name
        assert (r["method"], r["desired"], r["c2d"], r["port"]) == ({"n": 1}, 3, f"c2d-{name}", emu.ws_port)
        assert emu.diagnostics(device_id) == []
    assert PASSWORD not in stderr


# --------------------------------------------------------------------------------- the CLI


@pytest.fixture
def cli_env(emu, device, tmp_path):
    """The environment of a CLI run for a fresh device (key in SoftHSM, PIN from LIGHTCLIENT_PIN)."""
    from ..conftest import PIN
    from .test_cli import _env

    device_id = f"cli-{uuid.uuid4().hex[:8]}"
    _enroll(emu, device, tmp_path, device_id)
    base = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    return _env(base, IOT_HUB_HOSTNAME="localhost", DEVICE_ID=device_id, PATH_TO_CERTIFICATE_FILE=tmp_path / f"{device_id}.pem",
                KEY_IDENTIFIER=device["ec"]["uri"], LIGHTCLIENT_PIN=PIN, LIGHTCLIENT_CA=emu.ca_path,
                LIGHTCLIENT_PORT=emu.port, LIGHTCLIENT_WEBSOCKET_PORT=emu.ws_port, LIGHTCLIENT_GATEWAY="127.0.0.1")


def test_cli_send_over_websockets_through_the_proxy_in_https_proxy(emu, cli_env, http_proxy):
    from .test_cli import _with, ok

    env = _with(cli_env, HTTPS_PROXY=http_proxy.url, NO_PROXY="example.invalid")
    out = ok("send", "via-env-proxy", "--transport", "websockets", env=env)
    assert PASSWORD not in out
    assert emu.wait_for_events(1, cli_env["DEVICE_ID"])[0].body == b"via-env-proxy"
    assert http_proxy.log.read_text().count("CONNECT") >= 1


def test_cli_no_proxy_and_NO_PROXY_bypass_a_dead_proxy(emu, cli_env):
    from .test_cli import _with, ok

    dead = f"http://127.0.0.1:{lab.free_port()}"
    ok("send", "flag", "--transport", "websockets", "--no-proxy", env=_with(cli_env, HTTPS_PROXY=dead))
    ok("send", "list", "--transport", "websockets", env=_with(cli_env, HTTPS_PROXY=dead, NO_PROXY="localhost,127.0.0.1"))
    assert [e.body for e in emu.wait_for_events(2, cli_env["DEVICE_ID"])] == [b"flag", b"list"]


def test_cli_proxy_that_wants_credentials_exits_4_naming_the_proxy(cli_env, http_proxy):
    from .test_cli import _with, fails

    proc = fails(4, "send", "x", "--transport", "websockets", env=_with(cli_env, LIGHTCLIENT_PROXY=http_proxy.bare_url))
    assert f"http://127.0.0.1:{http_proxy.port}" in proc.stderr and "requires credentials" in proc.stderr


def test_cli_auto_falls_back_and_trace_names_the_websocket(emu, cli_env):
    from .test_cli import _with, ok

    out = ok("trace", "--transport", "auto", "--duration", "0.5", "--no-twin",
             env=_with(cli_env, LIGHTCLIENT_PORT=lab.free_port()))
    assert f"WEBSOCKET   wss://127.0.0.1:{emu.ws_port}/$iothub/websocket subprotocol mqtt" in out
    assert "CONNACK" in out and "SUBACK" in out   # the MQTT inside the WebSocket, decoded as usual


def test_doctor_reach_says_which_transport_will_work(emu, cli_env, http_proxy):
    from .test_cli import _with, cli

    closed = lab.free_port()
    proc = cli("doctor", "--reach", "127.0.0.1", "--reach-ports", f"{closed},{emu.ws_port}", "--timeout", "2",
               env=_with(cli_env, HTTPS_PROXY=http_proxy.url))
    out = proc.stdout
    assert f"127.0.0.1:{closed} reachable directly" in out and f"127.0.0.1:{emu.ws_port} reachable directly" in out
    assert f"through http://127.0.0.1:{http_proxy.port} (with credentials)" in out
    assert "transport that will work" in out
    assert f"websockets through http://127.0.0.1:{http_proxy.port}" in out
    assert PASSWORD not in out + proc.stderr


# --------------------------------------------------------------------------------- the asyncio Device


def _aio_device(emu, device, tmp_path, **kwargs):
    from lightclient import aio

    device_id = f"aio-any-{uuid.uuid4().hex[:8]}"
    ctx = _enroll(emu, device, tmp_path, device_id)
    kwargs.setdefault("port", emu.port)
    return aio.Device(Identity("localhost", device_id), ctx, host=kwargs.pop("host", "127.0.0.1"),
                      websocket_port=emu.ws_port, backoff=FAST, twin_timeout=5, **kwargs)


def test_aio_device_over_websockets_through_the_http_proxy(emu, device, tmp_path, http_proxy, caplog):
    import asyncio

    caplog.set_level(logging.DEBUG)
    dev = _aio_device(emu, device, tmp_path, transport="websockets", proxy=http_proxy.url)
    device_id = dev.identity.device_id

    async def scenario():
        async with dev:
            assert dev.port == emu.ws_port
            await dev.send(b"aio-ws", {"via": "proxy"})
            await dev.send_many([b"a", b"b"], timeout=10)
            assert await dev.patch_reported({"fw": "aio"}) >= 1
            assert (await dev.get_twin())["reported"]["fw"] == "aio"
            emu.send_c2d(device_id, b"down")
            message = await asyncio.wait_for(dev.c2d().__anext__(), 10)
            assert message.payload == b"down"

    asyncio.run(scenario())
    assert [e.body for e in emu.wait_for_events(3, device_id)] == [b"aio-ws", b"a", b"b"]
    assert f"127.0.0.1:{emu.ws_port}" in http_proxy.log.read_text()   # it went through tinyproxy
    assert PASSWORD not in caplog.text and PASSWORD not in repr(dev.proxy)


def test_aio_device_auto_falls_back_to_websockets_and_remembers_it(emu, device, tmp_path):
    import asyncio

    cache = tmp_path / "transport.json"
    dev = _aio_device(emu, device, tmp_path, transport="auto", port=lab.free_port(), transport_cache=cache)

    async def scenario():
        async with dev:
            await dev.send(b"auto")
            assert dev.port == emu.ws_port

    asyncio.run(scenario())
    assert '"transport": "websockets"' in cache.read_text()
    assert emu.wait_for_events(1, dev.identity.device_id)[0].body == b"auto"


def test_aio_device_through_a_gateway_and_a_refusing_proxy_is_typed(emu, gateway, device, tmp_path, http_proxy):
    import asyncio

    from lightclient import aio

    device_id = f"aio-leaf-{uuid.uuid4().hex[:8]}"
    _enroll(emu, device, tmp_path, device_id)
    gateway.register_device(device_id)
    ctx = tls.client_context(cert=tmp_path / f"{device_id}.pem", key=device["ec"]["key"],
                             ca=gateway.edge_ca.cert_path)
    dev = aio.Device(Identity("localhost", device_id), ctx, gateway_hostname="127.0.0.1", port=gateway.port,
                     backoff=FAST)

    async def through_gateway():
        async with dev:
            await dev.send(b"via-edge")
    asyncio.run(through_gateway())
    assert gateway.wait_for_events(1, device_id)[0].body == b"via-edge" and emu.events(device_id) == []
    with pytest.raises(Exception, match="host= or gateway_hostname="):
        aio.Device(Identity("localhost", device_id), ctx, host="a", gateway_hostname="b")

    # tinyproxy refuses CONNECT to the MQTT port: a ProxyError naming the proxy, as for the sync Device.
    blocked = _aio_device(emu, device, tmp_path, transport="tcp", proxy=http_proxy.url)
    with pytest.raises(ProxyError):
        asyncio.run(blocked.connect(timeout=5))
