"""Certificate renewal with the asyncio Device (issues 17 and 20), end to end against the emulator: SoftHSM
keys, DPS-issued certificates of LIFETIME seconds, renewal over $iothub/credentials and over DPS driven by
the same lightclient.renewal.Renewer the sync Device uses, the aio Device hot-swapped on its loop."""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import ssl
import threading
import time

import pytest

from lightclient import aio, keys, renewal, tls
from lightclient.backoff import Backoff
from lightclient.exceptions import ConfigError, ConnectRefusedError, RenewalError
from lightclient.identity import Identity

from ..conftest import PIN
from .test_renewal import LIFETIME, _new_device, _renewer, _token_labels, emu  # noqa: F401  (emu: fixture)

FAST = Backoff(initial=0.2, maximum=1.0)


def _factory(emu, name):
    identity = Identity("localhost", name)
    return lambda ctx: aio.Device(identity, ctx, host="127.0.0.1", port=emu.port, backoff=FAST, twin_timeout=10)


async def _off_loop(fn, *args):
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def test_aio_device_sends_through_renewals_over_hub_and_dps(softhsm, emu, tmp_path):
    name = "aio-renew"
    uri, label, cert, _ = _new_device(softhsm, emu, tmp_path, name)
    steps, renewed, failures = [], [], []
    renewer = _renewer(emu, uri, cert, name, tmp_path, rotate_keys=True, routes=("hub", "dps"),
                       on_step=steps.append, on_failure=failures.append)
    handles = []

    async def scenario():
        device = await renewer.connect_device_async(_factory(emu, name))
        assert isinstance(device, aio.Device) and device.is_connected

        async def on_renewed(validity):   # a coroutine callback, run on the loop
            assert asyncio.get_running_loop() is loop
            renewed.append(validity)
            if len(renewed) == 1:   # the next renewal: the hub refuses, so DPS takes over
                emu.inject_credentials_fault(name, 500)

        loop = asyncio.get_running_loop()
        device.on_certificate_renewed = on_renewed
        patches = device.desired()
        renewer.start()
        try:
            deadline = time.monotonic() + 4 * LIFETIME
            while time.monotonic() < deadline and not (len(renewed) >= 2 and not renewer.state.retire):
                handles.append(device.send(json.dumps({"n": len(handles)}).encode()))
                await asyncio.sleep(0.1)
            await device.wait_all(handles, timeout=30)
            # The twin after the swaps: requests answered, desired patches still delivered.
            assert await device.patch_reported({"renewals": len(renewed)}) >= 1
            assert (await device.get_twin())["reported"]["renewals"] == len(renewed)
            version = await _off_loop(emu.update_desired, name, {"interval": 30})
            assert await asyncio.wait_for(patches.__anext__(), 10) == {"interval": 30, "$version": version}
        finally:
            await _off_loop(renewer.stop)   # joins the renewal thread, which may be waiting for this loop
            await device.close()

    asyncio.run(asyncio.wait_for(scenario(), 5 * LIFETIME + 30))
    assert len(renewed) >= 2, (steps, failures)
    assert all(isinstance(v, renewal.Validity) for v in renewed)
    got = [json.loads(e.body)["n"] for e in emu.events(name)]
    assert set(got) == set(range(len(handles))), "a message was lost"
    # One renewal over the credentials API, one over DPS (after the injected hub error).
    assert emu.certificates_issued(name) >= 1
    assert [r for r in emu.dps.requests if r[0] == "PUT" and f"/registrations/{name}/" in r[1]][1:], \
        "no DPS re-registration"
    assert not failures
    assert not emu.diagnostics(name, "connect.")    # every connection made with a valid certificate
    state = renewer.state
    assert state.pending is None and state.renewals >= 2 and state.key != uri
    assert label not in _token_labels(softhsm), "the first key was not retired"
    assert renewal.validity_of(cert.read_bytes()).not_after > time.time()


def test_aio_refused_renewal_and_a_context_that_cannot_connect_keep_the_old_credential(softhsm, emu, tmp_path):
    name = "aio-renew-refused"
    uri, label, cert, _ = _new_device(softhsm, emu, tmp_path, name)
    failures = []
    renewer = _renewer(emu, uri, cert, name, tmp_path, routes=("hub",), on_failure=failures.append)
    before = cert.read_bytes()
    key = keys.load_key(uri, pin=PIN)
    renewed = []

    async def scenario():
        from lightclient.device import Device

        with pytest.raises(ConfigError, match="needs a factory that returns a lightclient.aio.Device"):
            await renewer.connect_device_async(lambda ctx: Device(Identity("localhost", name), ctx))
        device = await renewer.connect_device_async(_factory(emu, name))
        device.on_certificate_renewed = renewed.append   # a plain function works too
        try:
            # The hub refuses a certificate request: a typed error from the awaitable call itself ...
            emu.inject_credentials_fault(name, 500)
            with pytest.raises(RenewalError, match="500"):
                await device.request_certificate(keys.sign_csr(key, [("CN", name)]), timeout=20)
            # ... and through the Renewer, whose blocking calls reach the Device on this loop.
            emu.inject_credentials_fault(name, 500)
            with pytest.raises(RenewalError, match="500"):
                await asyncio.to_thread(renewer.renew)
            assert len(failures) == 1 and renewer.state.failures == 1
            await device.send(b'{"still": "working"}').wait(10)
            # A context the hub refuses (its CN names another device): back to the old one, error raised.
            csr = tmp_path / "other.csr"
            csr.write_bytes(keys.csr_pem(keys.sign_csr(key, [("CN", "someone-else")])))
            other = emu.sign_csr(csr, tmp_path / "other.pem")
            wrong = tls.client_context(cert=str(other), key=key, ca=str(emu.ca_path))
            with pytest.raises(ConnectRefusedError):
                await device.replace_context(wrong, timeout=10, certificate="never")
            assert device.is_connected
            await device.send(b'{"after": "refusal"}').wait(10)
            assert (await device.get_twin())["reported"]["$version"] >= 1
            # The credentials API works again: a certificate for the same key, swapped in on the loop.
            answer = await device.request_certificate(keys.sign_csr(key, [("CN", name)]), timeout=20)
            chain = "".join(ssl.DER_cert_to_PEM_cert(d) for d in answer.certificates)
            (tmp_path / "fresh.pem").write_text(chain)
            fresh = tls.client_context(cert=str(tmp_path / "fresh.pem"), key=key, ca=str(emu.ca_path))
            # Swapped in on the loop; the caller gives up waiting at once, the swap goes on regardless.
            swap = asyncio.ensure_future(device.replace_context(fresh, timeout=10, certificate="fresh"))
            await asyncio.sleep(0)
            swap.cancel()
            with pytest.raises(asyncio.CancelledError):
                await swap
            for _ in range(400):
                if renewed:
                    break
                await asyncio.sleep(0.05)
            assert device.is_connected
            await device.send(b'{"with": "fresh"}').wait(10)
        finally:
            await device.close()

    asyncio.run(asyncio.wait_for(scenario(), 90))
    assert cert.read_bytes() == before and renewer.state.key == uri and renewer.state.pending is None
    assert [json.loads(e.body) for e in emu.events(name)] == [{"still": "working"}, {"after": "refusal"},
                                                            {"with": "fresh"}]
    assert renewed == ["fresh"]
    assert [d.rule for d in emu.diagnostics(name, "connect.")] == ["connect.certificate-cn"]


@pytest.mark.parametrize("kind", ["sync", "aio"])
def test_a_suback_handled_before_subscribe_returned_still_counts(softhsm, emu, tmp_path, monkeypatch, kind):
    # The credentials channel subscribes on first use; the SUBACK may be handled (paho's network thread,
    # the aio Device's loop) before the asking thread has stored the mid subscribe() returned. A pause
    # right after subscribe() makes that order certain; the request must still go through.
    name = f"suback-{kind}"
    uri, _, cert, _ = _new_device(softhsm, emu, tmp_path, name)
    key = keys.load_key(uri, pin=PIN)
    ctx = tls.client_context(cert=str(cert), key=key, ca=str(emu.ca_path))
    csr = keys.sign_csr(key, [("CN", name)])
    if kind == "sync":
        from lightclient.device import Device

        device = Device(Identity("localhost", name), ctx, host="127.0.0.1", port=emu.port)
        subscribe = device._client.subscribe
        monkeypatch.setattr(device._client, "subscribe", lambda *a, **kw: (subscribe(*a, **kw), time.sleep(1))[0])
        with device:
            assert device.request_certificate(csr, timeout=5).certificates
        return
    subscribe = aio._PahoOnLoop.subscribe
    monkeypatch.setattr(aio._PahoOnLoop, "subscribe", lambda *a, **kw: (subscribe(*a, **kw), time.sleep(1))[0])

    async def scenario():
        async with _factory(emu, name)(ctx) as device:
            assert (await device.request_certificate(csr, timeout=5)).certificates

    asyncio.run(asyncio.wait_for(scenario(), 30))


@pytest.mark.parametrize("kind", ["sync", "aio"])
def test_method_handlers_survive_a_context_swap_and_answer(softhsm, emu, tmp_path, kind):
    # A swap is a reconnect, not a stop: a handler that asks for the swap itself (directly or through the
    # Renewer) answers 200, and a slow handler started before a swap it did not ask for is answered too.
    name = f"swap-methods-{kind}"
    uri, _, cert, _ = _new_device(softhsm, emu, tmp_path, name)
    key = keys.load_key(uri, pin=PIN)
    renewer = _renewer(emu, uri, cert, name, tmp_path, routes=("hub",))
    started, release, swapped = threading.Event(), threading.Event(), []

    def fresh():
        return tls.client_context(cert=str(cert), key=key, ca=str(emu.ca_path))

    def slow(payload):   # a plain function: on the method threads of either Device
        started.set()
        assert release.wait(60)
        return {"slow": payload}

    def invoke(method, payload=None):
        result = emu.invoke_method(name, method, payload, timeout=30)   # HubError 504 if never answered
        return result.status, result.payload

    if kind == "sync":
        from lightclient.device import Device

        def swap_self(payload):
            device.replace_context(fresh(), timeout=10)
            return {"swapped": True}

        def renew_self(payload):
            renewer.renew("hub")
            return {"renewed": True}

        device = renewer.connect_device(lambda ctx: Device(Identity("localhost", name), ctx, host="127.0.0.1",
                                                           port=emu.port, backoff=FAST, twin_timeout=10))
        device.on_certificate_renewed = swapped.append
        for method, handler in (("slow", slow), ("swap", swap_self), ("renew", renew_self)):
            device.add_method_handler(method, handler)
        try:
            assert invoke("swap") == (200, {"swapped": True})
            assert invoke("renew") == (200, {"renewed": True})
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                answer = pool.submit(invoke, "slow", 7)
                assert started.wait(20)
                # The sync Device waits up to 5 s for running handlers before the swap's disconnect.
                threading.Timer(2, release.set).start()
                device.replace_context(fresh(), timeout=10, certificate="outside")
                assert answer.result(40) == (200, {"slow": 7})
            device.send_and_wait(b'{"after": "swaps"}', timeout=10)
        finally:
            release.set()
            device.close()
    else:
        async def scenario():
            device = await renewer.connect_device_async(_factory(emu, name))

            async def swap_self(payload):
                await device.replace_context(fresh(), timeout=10)
                return {"swapped": True}

            async def renew_self(payload):
                await asyncio.to_thread(renewer.renew, "hub")
                return {"renewed": True}

            device.on_certificate_renewed = swapped.append
            for method, handler in (("slow", slow), ("swap", swap_self), ("renew", renew_self)):
                device.add_method_handler(method, handler)
            try:
                assert await asyncio.to_thread(invoke, "swap") == (200, {"swapped": True})
                assert await asyncio.to_thread(invoke, "renew") == (200, {"renewed": True})
                answer = asyncio.ensure_future(asyncio.to_thread(invoke, "slow", 7))
                assert await asyncio.to_thread(started.wait, 20)
                await device.replace_context(fresh(), timeout=10, certificate="outside")
                # The handler is still running after the swap; its answer goes out on the new connection.
                assert not answer.done()
                release.set()
                assert await answer == (200, {"slow": 7})
                await device.send(b'{"after": "swaps"}').wait(10)
            finally:
                release.set()
                await device.close()

        asyncio.run(asyncio.wait_for(scenario(), 120))
    assert [json.loads(e.body) for e in emu.events(name)] == [{"after": "swaps"}]
    assert swapped[-1] == "outside" and renewer.state.renewals == 1
