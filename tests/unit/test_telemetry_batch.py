"""send_many()/wait_all(), the one-object-per-message queue, and the outbox's group commit, without a
network: a Device that never connects keeps everything it accepts queued (the offline state)."""
import ssl
import threading
import tracemalloc

import pytest

from lightclient import _fastpath
from lightclient.device import Device
from lightclient.exceptions import ConfigError, MessageDroppedError, OperationTimeout, OutboxError, QueueFullError
from lightclient.identity import Identity
from lightclient.outbox import Outbox

CTX = ssl.create_default_context()


def offline_device(**kwargs):
    return Device(Identity("localhost", "d1"), CTX, **kwargs)


def commits(outbox):
    """Count the COMMITs the outbox's SQLite connection runs from now on (each one is a disk flush)."""
    seen = []
    outbox._conn.set_trace_callback(lambda sql: seen.append(sql) if sql.strip().upper() == "COMMIT" else None)
    return seen


def test_send_many_returns_one_handle_per_payload_in_order_with_fresh_ids():
    dev = offline_device()
    first = dev.send(b"before")
    handles = dev.send_many([b"a", "b", bytearray(b"c")], {"unit": "C"}, content_type="text/plain")
    assert [h.payload for h in handles] == [b"a", b"b", b"c"]
    assert len({h.message_id for h in handles} | {first.message_id}) == 4
    assert [m.payload for m in dev._acks.queue] == [b"before", b"a", b"b", b"c"]
    assert all(m.topic.endswith("&%24.ct=text%2Fplain&unit=C") or "unit=C" in m.topic for m in handles)
    assert dev.queued == 4 and dev.send_many([]) == []


def test_send_many_refuses_message_id_and_a_single_payload():
    dev = offline_device()
    with pytest.raises(ConfigError, match="message_id"):
        dev.send_many([b"a"], message_id="x")
    with pytest.raises(ConfigError, match="list of payloads"):
        dev.send_many(b"abc")
    with pytest.raises(ConfigError, match="payload must be bytes or str"):
        dev.send_many([b"ok", 5])
    assert dev.queued == 0


def test_send_many_is_all_or_nothing_under_reject_new():
    dev = offline_device(max_queue=5)
    dev.send_many([b"1", b"2", b"3"])
    with pytest.raises(QueueFullError, match="the 3 messages were not accepted"):
        dev.send_many([b"4", b"5", b"6"])
    assert dev.queued == 3
    with pytest.raises(QueueFullError, match="batch of 6 messages"):
        offline_device(max_queue=5, full_policy="drop_oldest").send_many([b"x"] * 6)


def test_send_many_under_drop_oldest_drops_the_oldest_and_fails_their_handles():
    dev = offline_device(max_queue=4, full_policy="drop_oldest")
    old = dev.send_many([b"1", b"2", b"3"])
    new = dev.send_many([b"4", b"5", b"6"])
    assert [m.payload for m in dev._acks.queue] == [b"3", b"4", b"5", b"6"]
    with pytest.raises(MessageDroppedError):
        dev.wait_all(old[:2], timeout=0)
    assert old[2].error is None and all(h.error is None for h in new)

def test_no_lock_is_made_unless_someone_waits_and_a_timed_out_wait_can_be_repeated():
    dev = offline_device()
    handle = dev.send(b"x")
    assert handle._waker is None and not hasattr(handle, "__dict__")
    with pytest.raises(OperationTimeout, match="stays queued"):
        handle.wait(0.01)
    with pytest.raises(OperationTimeout):
        dev.wait_all([handle], timeout=0.01)
    # The ack releases every waiter (two threads on one handle).
    woken = []
    threads = [threading.Thread(target=lambda: (handle.wait(10), woken.append(1))) for _ in range(2)]
    for t in threads:
        t.start()
    with dev._acks.lock:
        dev._acks.queue.popleft()
        dev._acks._done(handle)
    for t in threads:
        t.join(10)
    assert woken == [1, 1] and handle.done() and handle._waker is None
    handle.wait(0)


def test_a_queued_message_costs_at_most_250_bytes_beyond_nothing_else():
    dev = offline_device(max_queue=200_000, max_queue_bytes=10**9)
    payload = bytes(16)
    dev.send(payload, {"sensor": "bench"})  # the topic form is cached before measuring
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(20_000):
            dev.send(bytes(bytearray(payload)), {"sensor": "bench"})  # a new payload object, as an app would have
        per_message = (tracemalloc.get_traced_memory()[0] - before) / 20_000
    finally:
        tracemalloc.stop()
    assert per_message <= 250, f"{per_message:.0f} B per queued 16-byte message"


def test_send_many_with_an_outbox_is_one_commit_and_the_file_keeps_the_order(tmp_path):
    dev = offline_device(outbox=tmp_path / "o.db")
    seen = commits(dev.outbox)
    handles = dev.send_many([b"%d" % i for i in range(100)])
    assert len(seen) == 1
    assert [h.key for h in handles] == sorted(h.key for h in handles)
    assert [p for _, _, p in dev.outbox.pending()] == [b"%d" % i for i in range(100)]
    dev.close()


def test_concurrent_sends_share_commits_and_return_only_once_committed(tmp_path):
    dev = offline_device(outbox=tmp_path / "o.db")
    seen = commits(dev.outbox)
    threads, per_thread = 8, 40
    start = threading.Barrier(threads)
    returned = []

    def sender(t):
        start.wait()
        for i in range(per_thread):
            handle = dev.send(b"%d-%d" % (t, i))
            assert handle.key is not None  # committed (a key from the file) before send() returned
            returned.append(handle)

    workers = [threading.Thread(target=sender, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert len(returned) == threads * per_thread
    assert len(seen) < threads * per_thread, "every send was its own commit"
    in_file = [p for _, _, p in dev.outbox.pending()]
    assert in_file == [m.payload for m in dev._acks.queue]  # file order is queue (= wire) order
    for t in range(threads):  # each thread's messages in its own order
        mine = [p for p in in_file if p.startswith(b"%d-" % t)]
        assert mine == [b"%d-%d" % (t, i) for i in range(per_thread)]
    print(f"{threads * per_thread} sends, {len(seen)} commits")
    dev.close()


def test_a_failed_group_commit_fails_every_sender_in_it_and_queues_nothing(tmp_path):
    outbox = Outbox(tmp_path / "o.db")
    dev = offline_device(outbox=outbox)
    dev.send(b"kept")
    outbox.close()  # every later write fails
    with pytest.raises(OutboxError, match="closed"):
        dev.send_many([b"a", b"b"])
    with pytest.raises(OutboxError, match="closed"):
        dev.send(b"c")
    assert [m.payload for m in dev._acks.queue] == [b"kept"] and dev.queued == 1


def test_drop_oldest_with_an_outbox_deletes_the_victims_in_the_batch_transaction(tmp_path):
    dev = offline_device(outbox=tmp_path / "o.db", max_queue=3, full_policy="drop_oldest")
    old = dev.send_many([b"1", b"2", b"3"])
    seen = commits(dev.outbox)
    dev.send_many([b"4", b"5"])
    assert len(seen) == 1
    assert [p for _, _, p in dev.outbox.pending()] == [b"3", b"4", b"5"]
    assert isinstance(old[0].error, MessageDroppedError) and old[2].error is None
    dev.close()


def test_fast_puback_only_with_a_checked_paho_and_mqtt_311(monkeypatch):
    import paho.mqtt as package
    import paho.mqtt.client as mqtt

    assert _fastpath.paho_version() in _fastpath.CHECKED, "the installed paho is not covered by the fast path"
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    assert _fastpath.unavailable(client) is None
    v5 = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    assert "3.1.1" in _fastpath.unavailable(v5) and not _fastpath.install(v5)
    stock = client._handle_pubackcomp
    monkeypatch.setattr(package, "__version__", "2.9.0")
    assert "not one of the versions checked" in _fastpath.unavailable(client)
    assert not _fastpath.install(client) and client._handle_pubackcomp == stock
    monkeypatch.setattr(package, "__version__", "2.1.0")
    monkeypatch.setattr(_fastpath, "enabled", False)
    assert not _fastpath.install(client) and client._handle_pubackcomp == stock
    monkeypatch.setattr(_fastpath, "enabled", True)
    assert _fastpath.install(client) and client._handle_pubackcomp != stock
