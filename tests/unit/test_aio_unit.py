"""lightclient.aio without sockets: awaitable send handles over the shared pipeline, bad input."""
import asyncio
import ssl
import threading

import pytest

from lightclient import aio
from lightclient._pipeline import MessageMaker, Pipeline
from lightclient.exceptions import ConfigError, MessageDroppedError, OperationTimeout, QueueFullError
from lightclient.identity import Identity


def offline_pipeline(max_messages=10, policy="reject_new"):
    # Offline, the pipeline never touches the client: messages wait in its queue.
    return Pipeline(None, 5, max_messages, 1 << 20, policy, None)


def put(pipeline, payload, message_id):
    """Accept one message as both Devices do: built by the shared MessageMaker, then put."""
    return pipeline.put(MessageMaker(Identity("localhost", "d1"), pipeline).message(
        payload, None, {"message_id": message_id}))


def acknowledge_first(pipeline):
    with pipeline.lock:
        message = pipeline.queue.popleft()
        pipeline._done(message)


def test_awaiting_a_handle_returns_on_the_acknowledgement_and_many_may_wait():
    async def scenario():
        pipeline = offline_pipeline()
        handle = aio.AsyncSendHandle(put(pipeline, b"x", "m1"))
        waiters = [asyncio.ensure_future(handle.wait()) for _ in range(3)]
        await asyncio.sleep(0)
        assert not any(w.done() for w in waiters) and not handle.done()
        acknowledge_first(pipeline)
        await asyncio.gather(*waiters)
        assert handle.done() and pipeline.count == 0
        await handle  # done already: returns at once
    asyncio.run(scenario())


def test_a_timed_out_or_cancelled_wait_keeps_the_message():
    async def scenario():
        pipeline = offline_pipeline()
        handle = aio.AsyncSendHandle(put(pipeline, b"x", "m1"))
        with pytest.raises(OperationTimeout, match="'m1' was not acknowledged within 0.01 s; it stays queued"):
            await handle.wait(0.01)
        waiter = asyncio.ensure_future(handle.wait())
        await asyncio.sleep(0)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert pipeline.count == 1 and list(pipeline.queue)[0] is handle._handle
        assert handle._handle._waker.futures == []  # the cancelled waiter is forgotten
        late = asyncio.ensure_future(handle.wait())
        await asyncio.sleep(0)
        acknowledge_first(pipeline)
        await late
        assert handle.done()
    asyncio.run(scenario())


def test_a_dropped_message_raises_in_its_waiter():
    async def scenario():
        pipeline = offline_pipeline(max_messages=1, policy="drop_oldest")
        first = aio.AsyncSendHandle(put(pipeline, b"1", "m1"))
        waiter = asyncio.ensure_future(first.wait())
        await asyncio.sleep(0)
        put(pipeline, b"2", "m2")
        with pytest.raises(MessageDroppedError, match="'m1' was dropped"):
            await waiter
        assert isinstance(first.error, MessageDroppedError)
        with pytest.raises(MessageDroppedError):
            await first
    asyncio.run(scenario())


def test_bad_options_and_input_are_typed_errors():
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    identity = Identity("localhost", "d1")
    with pytest.raises(ConfigError, match="identity must be a lightclient Identity"):
        aio.Device("d1", ctx)
    with pytest.raises(ConfigError, match="keepalive must be an int from 1 to 1177"):
        aio.Device(identity, ctx, keepalive=0)
    with pytest.raises(ConfigError, match="max_queue"):
        aio.Device(identity, ctx, max_queue=0)
    with pytest.raises(ConfigError, match="twin_timeout"):
        aio.Device(identity, ctx, twin_timeout=0)
    with pytest.raises(ConfigError, match="sas must be a lightclient.symkey.SasCredential, not str"):
        aio.Device(identity, ctx, sas="SharedAccessSignature sr=x")
    with pytest.raises(ConfigError, match="file upload is for device identities"):
        asyncio.run(aio.Device(Identity("localhost", "d1", "m1"), ctx).upload_file(b"x", "a.bin"))
    device = aio.Device(identity, ctx, max_queue=1)
    with pytest.raises(ConfigError, match="payload must be bytes or str"):
        device.send(1.5)
    with pytest.raises(ConfigError, match="system properties are"):
        device.send(b"x", colour="red")
    handle = device.send(b"x")  # accepted while not connected
    assert device.queued == 1 and len(handle.message_id) == 36
    with pytest.raises(QueueFullError):
        device.send(b"y")
    with pytest.raises(ConfigError, match="must be callable"):
        device.add_method_handler("m", 42)
    with pytest.raises(ConfigError, match="drop message_id"):
        asyncio.run(device.send_many([b"a"], message_id="same"))
    assert repr(device) == "<aio.Device 'd1' on localhost:8883 disconnected>"


@pytest.mark.parametrize("thread_first", [True, False])
def test_a_thread_and_a_coroutine_waiting_for_the_same_handle_both_wake(thread_first):
    # The handle's lazily made wait lock is shared: whichever waiter makes it, the other must wake too.
    import threading

    async def scenario():
        pipeline = offline_pipeline()
        handle = aio.AsyncSendHandle(put(pipeline, b"x", "m1"))
        woke = threading.Event()

        def blocking_wait():
            handle._handle.wait(30)
            woke.set()

        thread = threading.Thread(target=blocking_wait)
        if thread_first:
            thread.start()
            while handle._handle._waker is None:  # the thread made its lock and is blocked on it
                await asyncio.sleep(0.001)
        waiter = asyncio.ensure_future(handle.wait())
        await asyncio.sleep(0)
        if not thread_first:
            thread.start()
        assert not waiter.done() and not woke.is_set()
        await asyncio.get_running_loop().run_in_executor(None, acknowledge_first, pipeline)
        await asyncio.wait_for(waiter, 30)
        await asyncio.get_running_loop().run_in_executor(None, thread.join, 30)
        assert woke.is_set() and handle.done()
    asyncio.run(scenario())


def test_send_many_accepts_the_whole_batch_or_nothing():
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    device = aio.Device(Identity("localhost", "d1"), ctx, max_queue=2)
    with pytest.raises(QueueFullError, match="batch of 3 messages"):
        asyncio.run(device.send_many([b"a", b"b", b"c"]))
    assert device.queued == 0
    with pytest.raises(ConfigError, match="payload must be bytes or str"):
        asyncio.run(device.send_many([b"a", 1.5]))
    assert device.queued == 0
    with pytest.raises(ConfigError, match="a list of payloads, not one payload"):
        asyncio.run(device.send_many(b"abc"))
    with pytest.raises(OperationTimeout):  # accepted (offline), then waited for in vain
        asyncio.run(device.send_many([b"a", b"b"], timeout=0.01))
    assert device.queued == 2


def test_certificate_renewal_calls_check_their_input_and_where_they_run():
    from lightclient import renewal

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    renewed_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    device = aio.Device(Identity("localhost", "d1"), ctx)
    with pytest.raises(ConfigError, match="ssl_context must be an ssl.SSLContext with the renewed certificate"):
        asyncio.run(device.replace_context("cert.pem"))
    asyncio.run(device.replace_context(renewed_ctx, certificate="v"))  # not started: kept for the next connect
    assert device._ssl_context is renewed_ctx and device._client._ssl_context is renewed_ctx
    # A Renewer keeps a blocking face of the aio Device, bound to the loop it was attached on ...
    renewer = renewal.Renewer(cert="device.pem", key="device.key", device_id="d1", routes=("hub",))
    with pytest.raises(ConfigError, match="from a coroutine on its event loop"):
        renewer.attach(device)

    async def on_the_loop():
        renewer.attach(device)
        assert renewer.device.device is device and not renewer.device.is_connected
        # ... whose calls wait for that loop, so making one on the loop itself is an error, not a hang.
        with pytest.raises(ConfigError, match="asyncio.to_thread"):
            renewer.device.replace_context(renewed_ctx)
    asyncio.run(on_the_loop())
    sync = object()
    renewer.attach(sync)   # anything else is kept as it is
    assert renewer.device is sync



def test_a_call_the_blocked_loop_never_runs_is_a_typed_timeout_naming_it(monkeypatch):
    # A worker thread (the credentials channel, a twin request) hands paho calls to the loop; a blocked
    # loop must give it OperationTimeout (a LightClientError a Renewer handles), and the call must not run
    # late, after the caller gave up.
    monkeypatch.setattr(aio, "_LOOP_CALL_TIMEOUT", 0.2)
    device = aio.Device(Identity("localhost", "d1"), ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT))
    calls = []
    monkeypatch.setattr(device._client, "subscribe", lambda *a, **kw: calls.append(a))
    loop = asyncio.new_event_loop()
    bound, gate = threading.Event(), threading.Event()

    async def bind_then_block():
        device._bind(asyncio.get_running_loop())
        bound.set()
        gate.wait(30)   # blocking the loop, as a blocking call in a coroutine would

    runner = threading.Thread(target=loop.run_until_complete, args=(bind_then_block(),))
    runner.start()
    try:
        assert bound.wait(10)
        with pytest.raises(OperationTimeout, match=r"did not run the certificate request's subscribe to "
                                                   r"\$iothub/credentials within 0.2 s: the loop is blocked"):
            aio._PahoOnLoop(device).subscribe("$iothub/credentials/res/#", qos=1)
    finally:
        gate.set()
        runner.join(10)
    loop.run_until_complete(asyncio.sleep(0.05))   # whatever was handed over runs now, if it still may
    loop.close()
    assert calls == []
