"""lightclient.aio.Device against a real mosquitto (a paho peer plays the hub) with the key in SoftHSM:
the sync Device's scenarios, async. HubSide's calls block, so the tests make them on a thread
(asyncio.to_thread would need 3.9's default executor; _hub() does the same explicitly)."""
import asyncio
import json
import socket
import threading
import time
import uuid

import pytest

from lightclient import aio, tls, topics
from lightclient.backoff import Backoff
from lightclient.device import MethodResponse
from lightclient.exceptions import ConfigError, ConnectRefusedError, OperationTimeout, QueueFullError, ServiceError
from lightclient.identity import Identity
from tests import lab

from .faults import PersistentMosquitto, Receiver, TcpProxy
from .hubside import HubSide
from .test_device import RefusingBroker

FAST = Backoff(initial=0.05, maximum=0.3, not_authorized=1.0)


@pytest.fixture(scope="module")
def token_context(device, test_ca):
    return tls.client_context(cert=device["ec"]["cert"], key=device["ec"]["key"], ca=test_ca.cert)


@pytest.fixture
def hub(service_context, broker):
    side = HubSide(service_context, broker.port)
    yield side
    side.close()


@pytest.fixture(autouse=True)
def no_thread_outlives_a_test():
    """The connect, method and twin pools are shut down with the connection (their threads exit soon after)."""
    yield
    deadline = time.monotonic() + 3
    while True:
        left = [t.name for t in threading.enumerate() if t.name.startswith("lightclient-")]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert left == []


def new_device(token_context, port, **kwargs):
    kwargs.setdefault("backoff", FAST)
    kwargs.setdefault("twin_timeout", 5)
    return aio.Device(Identity("localhost", f"aio-{uuid.uuid4().hex[:8]}"), token_context, port=port, **kwargs)


async def _hub(fn, *args, **kwargs):
    """Run a blocking HubSide call without blocking the loop the device runs on."""
    return await asyncio.get_running_loop().run_in_executor(None, lambda: fn(*args, **kwargs))


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_telemetry_await_and_pipelined_handles(token_context, broker, hub):
    dev = new_device(token_context, broker.port, max_inflight=8)

    async def scenario():
        async with dev:
            assert dev.is_connected
            await dev.send(b'{"t":21.5}', {"unit": "C"}, message_id="m 1", content_type="application/json")
            handles = [dev.send(b"%d" % i) for i in range(200)]
            await asyncio.gather(*handles)
            assert all(h.done() for h in handles) and dev.queued == 0
            many = await dev.send_many([b"a", b"b", b"c"], {"batch": "1"}, timeout=10)
            assert len({h.message_id for h in many}) == 3
        assert not dev.is_connected
        # Accepted while disconnected, delivered after the next connect (a Device can be reused).
        queued = dev.send(b"after reconnect")
        async with dev:
            await queued.wait(5)

    run(scenario())
    topic, _ = hub.wait_for(lambda t, p: p == b'{"t":21.5}')
    assert topic == f"devices/{dev.identity.device_id}/messages/events/%24.mid=m%201&%24.ct=application%2Fjson&unit=C"
    prefix = f"devices/{dev.identity.device_id}/messages/events/"
    hub.wait_for(lambda t, p: p == b"after reconnect")
    numbered = [p for t, p in hub.received if t.startswith(prefix) and p.isdigit()]
    assert numbered == [b"%d" % i for i in range(200)]  # in order
    assert len([p for t, p in hub.received if t.startswith(prefix) and p in (b"a", b"b", b"c")]) == 3


def test_methods_sync_and_async_handlers_and_a_slow_one_blocks_nothing(token_context, broker, hub):
    dev = new_device(token_context, broker.port)
    release = threading.Event()
    gate = None

    @dev.method("echo")
    async def echo(payload):
        return {"got": payload}

    @dev.method("slow_async")
    async def slow_async(payload):
        await gate.wait()
        return "async done"

    dev.add_method_handler("slow_sync", lambda payload: release.wait(10) and "sync done")
    dev.add_method_handler("fail", lambda payload: 1 / 0)
    dev.add_method_handler("custom", lambda payload: MethodResponse(202, "later"))

    async def scenario():
        nonlocal gate
        gate = asyncio.Event()
        async with dev:
            await _hub(hub.publish, "$iothub/methods/POST/slow_async/?$rid=a1", b"", qos=0)
            await _hub(hub.publish, "$iothub/methods/POST/slow_sync/?$rid=s1", b"", qos=0)
            assert await _hub(hub.call_method, "echo", b'{"x": [1, 2]}') == (200, {"got": {"x": [1, 2]}})
            assert await _hub(hub.call_method, "fail") == (500, {"error": "handler raised ZeroDivisionError"})
            assert await _hub(hub.call_method, "nope") == (404, {"error": "no handler for method 'nope' on this device"})
            assert await _hub(hub.call_method, "echo", b"{not json") == (400, {"error": "the method payload is not valid JSON"})
            assert await _hub(hub.call_method, "custom") == (202, "later")
            await dev.send(b"while slow handlers run")
            assert (await dev.get_twin())["desired"]["$version"] == 1
            assert hub.count("$iothub/methods/res/200/?$rid=a1") == hub.count("$iothub/methods/res/200/?$rid=s1") == 0
            gate.set()
            release.set()
            await _hub(hub.wait_for, lambda t, p: t.endswith("?$rid=a1"))
            await _hub(hub.wait_for, lambda t, p: t.endswith("?$rid=s1"))

    run(scenario())
    assert hub.wait_for(lambda t, p: t.endswith("?$rid=a1")) == ("$iothub/methods/res/200/?$rid=a1", b'"async done"')
    assert hub.wait_for(lambda t, p: t.endswith("?$rid=s1")) == ("$iothub/methods/res/200/?$rid=s1", b'"sync done"')


def test_twin_round_trip_errors_and_desired_in_version_order(token_context, broker, hub):
    hub.desired = {"interval": 5, "$version": 1}
    dev = new_device(token_context, broker.port)

    async def scenario():
        async with dev:
            assert await dev.get_twin() == {"desired": {"interval": 5, "$version": 1}, "reported": {"$version": 1}}
            assert await dev.patch_reported({"fw": "1.2"}) == 2
            patches = dev.desired()
            # The first patch is the whole desired document, read when desired() was first called.
            assert await patches.__anext__() == {"interval": 5, "$version": 1}
            await _hub(hub.patch_desired, {"interval": 10})
            await _hub(hub.publish, "$iothub/twin/PATCH/properties/desired/?$version=1", b'{"interval": 7, "$version": 1}')
            await _hub(hub.patch_desired, {"mode": "eco"})
            assert [await patches.__anext__() for _ in range(2)] == [
                {"interval": 10, "$version": 2}, {"mode": "eco", "$version": 3}]  # the stale version 1 dropped
            hub.twin_status = 429
            with pytest.raises(ServiceError, match="status 429") as err:
                await dev.get_twin(timeout=10)   # the 429 answer comes back at once; 10 s is room under load
            assert err.value.retryable
            hub.twin_status = 400
            with pytest.raises(ServiceError) as err:
                await dev.patch_reported({"a": 1}, timeout=5)
            assert err.value.status == 400
            hub.twin_status, hub.answer_twin = 200, False
            with pytest.raises(OperationTimeout, match="twin GET"):
                await dev.get_twin(timeout=0.3)

    run(scenario())
    assert hub.reported == {"fw": "1.2", "$version": 2}


def test_c2d_messages_are_iterated_with_decoded_properties(token_context, broker, hub):
    dev = new_device(token_context, broker.port)

    async def scenario():
        async with dev:
            device_id = dev.identity.device_id
            # Sent before anyone iterates: buffered, not lost.
            await _hub(hub.send_c2d, device_id, "%24.mid=abc&%24.ct=text%2Fplain&k=v%20w", b"hello")
            await _hub(hub.send_c2d, device_id, {"n": "2"}, b"second")
            got = []
            async for message in dev.c2d():
                got.append(message)
                if len(got) == 2:
                    break
            return got

    first, second = run(scenario())
    assert (first.payload, dict(first.properties), first.message_id, first.content_type) == (
        b"hello", {"k": "v w"}, "abc", "text/plain")
    assert (second.payload, dict(second.properties)) == (b"second", {"n": "2"})


def test_a_cancelled_send_is_neither_lost_nor_duplicated(token_context, broker, service_context):
    proxy = TcpProxy(broker.port)
    device_id = f"aio-{uuid.uuid4().hex[:8]}"
    receiver = Receiver(service_context, broker.port, device_id)
    dev = aio.Device(Identity("localhost", device_id), token_context, port=proxy.port, backoff=FAST)

    async def scenario():
        async with dev:
            await dev.send(b"warm-up")
            # Cancelled while its PUBACK is still to come: the message stays accounted for and is delivered.
            waiter = asyncio.ensure_future(dev.send(b"cancelled in flight").wait())
            await asyncio.sleep(0)
            waiter.cancel()
            while dev.queued:  # its acknowledgement still arrives and is counted
                await asyncio.sleep(0.01)
            # Cancelled while the link is dead (the message is on the wire, no ack can come back), then the
            # link is cut: after the reconnect paho resends it and the hub acknowledges it.
            proxy.black_hole()
            handle = dev.send(b"cancelled on a dead link")
            waiter = asyncio.ensure_future(handle.wait())
            await asyncio.sleep(0.2)
            assert not handle.done()
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
            assert dev.queued == 1 and handle.mid is not None  # still accounted for, on the wire
            proxy.cut()
            await handle.wait(15)  # awaiting again later is fine
            assert dev.queued == 0

    try:
        run(scenario())
        assert receiver.wait_distinct(3, 10), receiver.counts
        # Once, or twice if the first copy got through before the link went dead (QoS 1: the PUBACK was
        # lost, so paho resends it), then with the same $.mid. Cancelling the wait never sends it again.
        assert receiver.counts[b"cancelled on a dead link"] in (1, 2)
        assert len(receiver.mids[b"cancelled on a dead link"]) == 1
        assert receiver.counts[b"cancelled in flight"] == 1
        assert proxy.connections == 2
    finally:
        receiver.close()
        proxy.close()


def test_a_black_holed_link_is_noticed_by_keepalive_and_nothing_is_lost(token_context, broker, service_context):
    proxy = TcpProxy(broker.port)
    device_id = f"aio-{uuid.uuid4().hex[:8]}"
    receiver = Receiver(service_context, broker.port, device_id)
    # keepalive=1: the loop_misc task notices a dead link after about two keep-alive periods.
    dev = aio.Device(Identity("localhost", device_id), token_context, port=proxy.port, backoff=FAST, keepalive=1)

    async def scenario():
        async with dev:
            await dev.send(b"before")
            proxy.black_hole()
            await asyncio.gather(*[dev.send(b"%d" % i) for i in range(20)])

    try:
        run(scenario())
        assert receiver.wait_distinct(21, 10), receiver.counts
        assert proxy.connections >= 2
    finally:
        receiver.close()
        proxy.close()


def test_a_module_sends_on_its_output_and_iterates_its_inputs(token_context, broker, hub):
    dev = aio.Device(Identity("localhost", f"aio-{uuid.uuid4().hex[:8]}", "filter"), token_context,
                     port=broker.port, backoff=FAST)

    async def scenario():
        async with dev:
            await dev.send(b"m", output_name="out1", message_id="m1")
            await _hub(hub.publish, f"devices/{dev.identity.device_id}/modules/filter/inputs/in1/k=v", b"input")
            return await asyncio.wait_for(dev.c2d().__anext__(), 5)

    message = run(scenario())
    assert isinstance(message.record, topics.InputMessage)
    assert (message.record.input_name, dict(message.properties), message.payload) == ("in1", {"k": "v"}, b"input")
    topic, _ = hub.wait_for(lambda t, p: p == b"m")
    assert topic == f"devices/{dev.identity.device_id}/modules/filter/messages/events/%24.on=out1&%24.mid=m1"


def test_reconnect_after_broker_restart_loses_nothing_and_resyncs_the_twin(
        token_context, test_ca, service_context, tmp_path):
    broker = PersistentMosquitto(tmp_path / "mq", test_ca).start()
    device_id = f"aio-{uuid.uuid4().hex[:8]}"
    receiver = Receiver(service_context, broker.port, device_id)  # a persistent session: counts across restarts
    hub = HubSide(service_context, broker.port)
    hub.desired = {"interval": 5, "$version": 1}
    states = []
    dev = aio.Device(Identity("localhost", device_id), token_context, port=broker.port,
                     backoff=Backoff(initial=0.2, maximum=0.4), twin_timeout=3,
                     on_connection_state=lambda up, why: states.append(up))

    @dev.method("ping")
    async def ping(payload):
        return "pong"

    async def scenario():
        async with dev:
            patches = dev.desired()
            assert await patches.__anext__() == {"interval": 5, "$version": 1}
            await asyncio.gather(*[dev.send(b"before %d" % i) for i in range(50)])
            await _hub(broker.stop)
            offline = [dev.send(b"offline %d" % i) for i in range(50)]  # queued while the hub is away
            hub.desired = {"interval": 9, "extra": True, "$version": 4}  # changed while offline
            hub.subscribed.clear()
            await _hub(broker.start)
            await _hub(hub.subscribed.wait, 10)
            await asyncio.gather(*offline)
            # Only what changed while offline, as one patch.
            assert await asyncio.wait_for(patches.__anext__(), 15) == {"interval": 9, "extra": True, "$version": 4}
            # mosquitto forgot the subscriptions: a method call answered proves the device resubscribed.
            assert await _hub(hub.call_method, "ping") == (200, "pong")

    try:
        run(scenario())
        assert receiver.wait_distinct(100, 10), receiver.distinct()
        assert all(len(mids) == 1 for mids in receiver.mids.values())  # a resent message keeps its $.mid
        assert states[:3] == [True, False, True]
        assert hub.count("$iothub/twin/GET/") >= 2
    finally:
        receiver.close()
        hub.close()
        broker.stop()


def test_connect_errors_are_typed_and_the_handshake_does_not_block_the_loop(token_context, device, broker,
                                                                          test_ca, tmp_path):
    async def closed_port():
        dev = new_device(token_context, lab.free_port())
        with pytest.raises(OperationTimeout, match="could not connect to localhost:.*last error"):
            await dev.connect(timeout=0.5)
        assert not dev.is_connected

    async def untrusted_server():
        strict = tls.client_context(cert=device["ec"]["cert"], key=device["ec"]["key"])  # IoT Hub roots only
        dev = new_device(strict, broker.port)
        with pytest.raises(ConfigError, match="failed verification"):
            await dev.connect(timeout=5)

    async def stalled_handshake():
        # A server that accepts TCP and never answers the ClientHello: the connect waits on its thread
        # while the loop keeps running other tasks.
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen()
        dev = aio.Device(Identity("localhost", "stalled"), token_context, host="127.0.0.1",
                         port=server.getsockname()[1], backoff=FAST)
        dev._client.connect_timeout = 1.0
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.ensure_future(ticker())
        try:
            with pytest.raises(OperationTimeout):
                await dev.connect(timeout=0.8)
        finally:
            task.cancel()
            server.close()
        assert ticks >= 5, "the event loop stood still during the TLS handshake"

    run(closed_port())
    run(untrusted_server())
    run(stalled_handshake())

    port = lab.free_port()
    refusing = RefusingBroker(tmp_path / "refusing", test_ca, port)
    try:
        async def refused():
            dev = aio.Device(Identity("localhost", "disabled"), token_context, port=port, backoff=FAST)
            with pytest.raises(ConnectRefusedError, match="CONNACK 5 .not authorized") as err:
                await dev.connect(timeout=5)
            assert err.value.return_code == 5
        run(refused())
    finally:
        refusing.stop()


def test_bad_input_is_refused_with_typed_errors(token_context, broker):
    with pytest.raises(ConfigError, match="keepalive"):
        aio.Device(Identity("localhost", "d"), token_context, keepalive=1178)
    with pytest.raises(ConfigError, match="ssl_context"):
        aio.Device(Identity("localhost", "d"), "ctx")
    with pytest.raises(ConfigError, match="on_connection_state"):
        aio.Device(Identity("localhost", "d"), token_context, on_connection_state=42)
    dev = new_device(token_context, broker.port, max_queue=2)
    with pytest.raises(ConfigError, match="payload must be bytes or str"):
        dev.send(42)
    with pytest.raises(ConfigError, match="method name"):
        dev.add_method_handler("", lambda p: None)
    with pytest.raises(ConfigError, match="message_id"):
        run(dev.send_many([b"a"], message_id="same"))
    dev.send(b"1")
    dev.send(b"2")
    with pytest.raises(QueueFullError, match="full"):
        dev.send(b"3")  # not connected: the queue of 2 is full

    async def twin_input():
        with pytest.raises(ConfigError, match="reported patch is a dict"):
            await dev.patch_reported([1])
        with pytest.raises(ConfigError, match="timeout"):
            await dev.get_twin(timeout=-1)
    run(twin_input())
    assert dev.queued == 2
