"""A symmetric-key Device against the emulator: the SAS key lives in a SoftHSM token, every token is
signed there (in a child), and the emulator verifies the signature, the resource URI and the expiry."""
import json
import logging
import queue
import threading
import time
import uuid
from pathlib import Path

import pytest

from lightclient import tls
from lightclient.backoff import Backoff
from lightclient.device import Device
from lightclient.emulator.service import Emulator
from lightclient.exceptions import ConnectRefusedError, ProxyError
from lightclient.identity import Identity
from lightclient.symkey import SasCredential, SoftwareKey, TokenKey, from_connection_string
from lightclient.token import run_in_child
from tests import lab
from tests.lab import free_port

PIN, SO_PIN = "sasdev-pin-5521", "sasdev-so-1"
KEY = json.loads((Path(__file__).parents[1] / "vectors" / "sas.json").read_text())["key"]
OTHER_KEY = "b3RoZXIta2V5LW90aGVyLWtleS1vdGhlci1rZXktMTI="
FAST = Backoff(initial=0.05, maximum=0.5, not_authorized=1.0)


@pytest.fixture(scope="module")
def hsm(tmp_path_factory):
    h = lab.SoftHSM(tmp_path_factory.mktemp("sasdev-hsm"))
    h.init_token("sasdev", PIN, SO_PIN)
    run_in_child("import-secret", module_path=h.module_path, token_label="sasdev", key_label="dev", key_b64=KEY,
                 pin=PIN, env=h.env)
    return h


@pytest.fixture
def emulator(tmp_path):
    with Emulator(tmp_path / "emu", hostname="localhost", port=free_port()) as emu:
        yield emu


def _device(emu, hsm, device_id, lifetime=3600, **kwargs):
    identity = Identity("localhost", device_id)
    key = TokenKey(f"pkcs11:token=sasdev;object=dev?module-path={hsm.module_path}", pin=PIN, env=hsm.env)
    cred = SasCredential.for_identity(identity, key, lifetime=lifetime, **kwargs.pop("cred", {}))
    kwargs.setdefault("backoff", FAST)
    kwargs.setdefault("twin_timeout", 5)
    return Device(identity, tls.server_context(ca=emu.ca_path), host="127.0.0.1", port=emu.port, sas=cred, **kwargs)


def test_token_held_key_connects_sends_twin_method(emulator, hsm, caplog):
    caplog.set_level(logging.DEBUG)
    emulator.register_device("sas-1", symmetric_keys=(OTHER_KEY, KEY))   # the secondary key signs
    dev = _device(emulator, hsm, "sas-1")
    dev.add_method_handler("ping", lambda payload: {"pong": payload})
    with dev:
        dev.send_and_wait(b'{"t": 1}', timeout=10)
        (event,) = emulator.wait_for_events(1, "sas-1")
        assert event.body == b'{"t": 1}'
        assert dev.patch_reported({"fw": "1"}, timeout=5) >= 1
        assert dev.get_twin(timeout=5)["reported"]["fw"] == "1"
        answer = emulator.invoke_method("sas-1", "ping", 7, timeout=5)
        assert (answer.status, answer.payload) == (200, {"pong": 7})
    assert not emulator.diagnostics("sas-1"), emulator.diagnostics("sas-1")
    assert PIN not in caplog.text and "SharedAccessSignature" not in caplog.text and "sig=" not in caplog.text


def test_wrong_key_is_connack_5_with_a_diagnostic(emulator, hsm):
    emulator.register_device("sas-2", symmetric_keys=(OTHER_KEY,))
    dev = _device(emulator, hsm, "sas-2")
    with pytest.raises(ConnectRefusedError) as info:
        dev.connect(timeout=10)
    assert info.value.return_code == 5 and "symmetric key" in str(info.value)
    assert PIN not in str(info.value) and "SharedAccessSignature" not in str(info.value)
    (diag,) = emulator.diagnostics("sas-2", rule="connect.sas-signature")
    assert "CONNACK 5" in str(diag) and "sig=" not in str(diag)


def test_expired_token_is_connack_5(emulator, hsm):
    emulator.register_device("sas-3", symmetric_keys=(KEY,))
    dev = _device(emulator, hsm, "sas-3", cred={"clock": lambda: time.time() - 7200})  # a clock 2 h behind
    with pytest.raises(ConnectRefusedError) as info:
        dev.connect(timeout=10)
    assert info.value.return_code == 5
    assert emulator.diagnostics("sas-3", rule="connect.sas-expired")


def test_token_for_another_device_is_refused(emulator, hsm):
    emulator.register_device("sas-4", symmetric_keys=(KEY,))
    identity = Identity("localhost", "sas-4")
    wrong = SasCredential(SoftwareKey(KEY), "localhost/devices/someone-else")
    dev = Device(identity, tls.server_context(ca=emulator.ca_path), host="127.0.0.1", port=emulator.port,
                 sas=wrong, backoff=FAST)
    with pytest.raises(ConnectRefusedError):
        dev.connect(timeout=10)
    assert emulator.diagnostics("sas-4", rule="connect.sas-resource")


def test_x509_identity_without_certificate_is_refused(emulator, hsm):
    emulator.register_device("sas-5", symmetric_keys=(KEY,))  # makes client certificates optional
    emulator.register_device("x509-dev")
    dev = Device(Identity("localhost", "x509-dev"), tls.server_context(ca=emulator.ca_path), host="127.0.0.1",
                 port=emulator.port, backoff=FAST)
    with pytest.raises(ConnectRefusedError):
        dev.connect(timeout=10)
    (diag,) = emulator.diagnostics("x509-dev", rule="connect.certificate")
    assert "sent none" in str(diag)


def test_connection_string_device_and_module(emulator, caplog):
    emulator.register_device("cs-1", "mod", symmetric_keys=(KEY,))
    identity, cred = from_connection_string(f"HostName=localhost;DeviceId=cs-1;ModuleId=mod;SharedAccessKey={KEY}")
    assert "held in software" in caplog.text and KEY not in caplog.text
    with Device(identity, tls.server_context(ca=emulator.ca_path), host="127.0.0.1", port=emulator.port,
                sas=cred, backoff=FAST) as dev:
        dev.send_and_wait(b"m", timeout=10)
    assert emulator.wait_for_events(1, "cs-1", "mod")


def test_renewal_across_several_expiries_loses_nothing(emulator, hsm):
    """15-second tokens over ~40 s: renewed at 80 % by reconnecting, telemetry flowing all the time, every
    message arrives, and the hub never had to drop an expired token."""
    emulator.register_device("sas-renew", symmetric_keys=(KEY,))
    states = queue.Queue()
    dev = _device(emulator, hsm, "sas-renew", lifetime=15, on_connection_state=lambda up, why: states.put(up))
    sent = []
    stop = threading.Event()

    def produce():
        n = 0
        while not stop.is_set():
            sent.append(dev.send(json.dumps({"n": n}).encode(), message_id=f"m-{n}"))
            n += 1
            time.sleep(0.2)

    dev.connect(timeout=20)
    first_expiry = dev._sas.current().expiry
    producer = threading.Thread(target=produce)
    producer.start()
    time.sleep(40)
    stop.set()
    producer.join()
    for handle in sent:
        handle.wait(timeout=20)
    last_expiry = dev._sas.current().expiry
    dev.disconnect()
    assert last_expiry - first_expiry >= 2 * 12  # at least three tokens: renewed across two expiries
    ups = []
    while not states.empty():
        ups.append(states.get())
    assert ups.count(True) >= 3
    events = emulator.events("sas-renew")
    got = {e.system_properties.get("$.mid") for e in events}
    assert got >= {f"m-{i}" for i in range(len(sent))}
    assert len(sent) > 100
    assert not emulator.diagnostics("sas-renew", rule="connect.sas-expired")


# ------------------------------------------------------------------------- lightclient.aio with sas=


def _aio_device(emu, hsm, device_id, lifetime=3600, **kwargs):
    from lightclient import aio

    identity = Identity("localhost", device_id)
    key = TokenKey(f"pkcs11:token=sasdev;object=dev?module-path={hsm.module_path}", pin=PIN, env=hsm.env)
    cred = SasCredential.for_identity(identity, key, lifetime=lifetime)
    kwargs.setdefault("backoff", FAST)
    kwargs.setdefault("twin_timeout", 5)
    return aio.Device(identity, tls.server_context(ca=emu.ca_path), host="127.0.0.1", port=emu.port, sas=cred,
                      **kwargs)


def test_aio_token_held_key_connects_sends_twin_method(emulator, hsm, caplog):
    import asyncio

    caplog.set_level(logging.DEBUG)
    emulator.register_device("aio-sas-1", symmetric_keys=(KEY,))
    dev = _aio_device(emulator, hsm, "aio-sas-1")

    @dev.method("ping")
    async def ping(payload):
        return {"pong": payload}

    async def scenario():
        async with dev:
            await dev.send(b'{"t": 1}').wait(10)
            assert await dev.patch_reported({"fw": "1"}, timeout=5) >= 1
            assert (await dev.get_twin(timeout=5))["reported"]["fw"] == "1"
            answer = await asyncio.get_running_loop().run_in_executor(
                None, lambda: emulator.invoke_method("aio-sas-1", "ping", 7, timeout=5))
            assert (answer.status, answer.payload) == (200, {"pong": 7})

    asyncio.run(scenario())
    (event,) = emulator.wait_for_events(1, "aio-sas-1")
    assert event.body == b'{"t": 1}'
    assert not emulator.diagnostics("aio-sas-1"), emulator.diagnostics("aio-sas-1")
    assert PIN not in caplog.text and "SharedAccessSignature" not in caplog.text and "sig=" not in caplog.text


def test_aio_wrong_key_is_connack_5_with_the_sas_hint(emulator, hsm):
    import asyncio

    emulator.register_device("aio-sas-2", symmetric_keys=(OTHER_KEY,))
    dev = _aio_device(emulator, hsm, "aio-sas-2")
    with pytest.raises(ConnectRefusedError) as info:
        asyncio.run(dev.connect(timeout=10))
    assert info.value.return_code == 5 and "symmetric key" in str(info.value)
    assert "SharedAccessSignature" not in str(info.value)
    assert emulator.diagnostics("aio-sas-2", rule="connect.sas-signature")


def test_aio_renews_the_token_by_reconnecting_and_loses_nothing(emulator, hsm):
    """A 15-second token is renewed at 80 % (12 s) by reconnecting with a new one while telemetry flows:
    every message arrives and the hub never saw an expired token."""
    import asyncio

    emulator.register_device("aio-sas-renew", symmetric_keys=(KEY,))
    ups = []
    dev = _aio_device(emulator, hsm, "aio-sas-renew", lifetime=15,
                      on_connection_state=lambda up, why: ups.append(up))

    async def scenario():
        async with dev:
            first = dev._sas.current()
            sent = []
            while len(ups) < 3 and len(sent) < 150:  # up, down (renewal), up again; or 15 s at most
                sent.append(dev.send(json.dumps({"n": len(sent)}).encode(), message_id=f"m-{len(sent)}"))
                await asyncio.sleep(0.1)
            await dev.wait_all(sent, timeout=20)
            return first, dev._sas.current(), len(sent)

    first, last, count = asyncio.run(scenario())
    assert ups[:3] == [True, False, True], ups
    assert last.expiry > first.expiry and last.issued >= first.renew_at
    got = {e.system_properties.get("$.mid") for e in emulator.events("aio-sas-renew")}
    assert got >= {f"m-{i}" for i in range(count)}
    assert not emulator.diagnostics("aio-sas-renew", rule="connect.sas-expired")


def test_token_held_key_over_websockets(tmp_path, hsm, caplog):
    """MQTT over WebSockets (the hub's port 443) with the SAS in the CONNECT, as over TCP; C2D and desired
    patches reach the device."""
    caplog.set_level(logging.DEBUG)
    c2d, desired = queue.Queue(), queue.Queue()
    with Emulator(tmp_path / "emu-ws", hostname="localhost", port=free_port(), ws_port=0) as emu:
        emu.register_device("sas-ws", symmetric_keys=(KEY,))
        with _device(emu, hsm, "sas-ws", transport="websockets", websocket_port=emu.ws_port,
                     on_c2d=lambda m, p: c2d.put(p), on_desired=lambda patch, v: desired.put(patch)) as dev:
            assert dev.port == emu.ws_port
            dev.send_and_wait(b"over-ws", timeout=10)
            assert dev.patch_reported({"ws": True}, timeout=5) >= 1
            emu.send_c2d("sas-ws", b"to-the-sas-device")
            assert c2d.get(timeout=10) == b"to-the-sas-device"
            emu.update_desired("sas-ws", {"interval": 5})
            while desired.get(timeout=10).get("interval") != 5:
                pass
        (event,) = emu.wait_for_events(1, "sas-ws")
        assert event.body == b"over-ws"
        assert not emu.diagnostics("sas-ws"), emu.diagnostics("sas-ws")
    assert PIN not in caplog.text and "SharedAccessSignature" not in caplog.text


@pytest.mark.parametrize("kind", ["http", "socks5"])
def test_token_held_key_through_a_real_proxy(tmp_path, hsm, caplog, kind):
    """A network that only lets a proxy out: MQTT over WebSockets through tinyproxy (HTTP CONNECT, Basic auth)
    or MQTT over TCP through microsocks (SOCKS5 with a password), the SAS signed in the token as ever. Neither
    the proxy password nor the SAS token reaches a log."""
    caplog.set_level(logging.DEBUG)
    proxy_password = "pr0xy-s3cret-77"
    with Emulator(tmp_path / "emu-px", hostname="localhost", port=free_port(), ws_port=0) as emu:
        emu.register_device("sas-px", symmetric_keys=(KEY,))
        if kind == "http":
            proxy = lab.TinyProxy(tmp_path / "tinyproxy", connect_ports=[emu.ws_port], user="dev",
                                  password=proxy_password)
            options = {"transport": "websockets", "websocket_port": emu.ws_port}
        else:
            proxy = lab.MicroSocks(user="dev", password=proxy_password)
            options = {"transport": "tcp"}
        with proxy:
            # The proxy is really in the path: a wrong proxy password fails the connect, typed.
            wrong = _device(emu, hsm, "sas-px", proxy=proxy.url.replace(proxy_password, "wrong-pass"), **options)
            with pytest.raises(ProxyError):
                wrong.connect(timeout=10)
            wrong.close()
            with _device(emu, hsm, "sas-px", proxy=proxy.url, **options) as dev:
                dev.send_and_wait(b"via-proxy", timeout=10)
                assert dev.patch_reported({"proxied": kind}, timeout=5) >= 1
            if kind == "http":   # the tunnel went through tinyproxy: it logged the CONNECT
                assert f"127.0.0.1:{emu.ws_port}" in proxy.log.read_text()
        (event,) = emu.wait_for_events(1, "sas-px")
        assert event.body == b"via-proxy"
        assert not emu.diagnostics("sas-px"), emu.diagnostics("sas-px")
    assert proxy_password not in caplog.text and "SharedAccessSignature" not in caplog.text and PIN not in caplog.text
