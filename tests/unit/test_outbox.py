"""The durable outbox and the offline queue's full policies, without a network: a Device that never
connects keeps everything it accepts queued, which is exactly the offline state."""
import os
import sqlite3
import ssl
import stat
import threading
import time

import pytest

from lightclient.device import Device
from lightclient.exceptions import ConfigError, MessageDroppedError, OperationTimeout, OutboxError, QueueFullError
from lightclient.identity import Identity
from lightclient.outbox import Outbox, message_cost

CTX = ssl.create_default_context()


def offline_device(**kwargs):
    return Device(Identity("localhost", "d1"), CTX, **kwargs)


# ------------------------------------------------------------------------------------------- queue


def test_every_message_gets_a_unique_mid_unless_one_is_given():
    dev = offline_device()
    handles = [dev.send(b"x", {"k": "v"}) for _ in range(50)]
    ids = {h.message_id for h in handles}
    assert len(ids) == 50 and all(len(i) == 36 for i in ids)
    prefixes = {i.split("-")[0] for i in ids}
    assert len(prefixes) == 1 and len(prefixes.pop()) == 24  # one random prefix per Device, then a counter
    assert offline_device().send(b"x").message_id.split("-")[0] not in {i.split("-")[0] for i in ids}
    assert dev.send(b"x", message_id="mine").message_id == "mine"
    assert dev.send(b"x", message_id=None).message_id not in ids | {"mine"}
    assert dev.queued == 52
    assert repr(handles[0]).endswith("mid=None pending>")


def test_reject_new_refuses_by_count_and_by_bytes():
    dev = offline_device(max_queue=3)
    for i in range(3):
        dev.send(b"%d" % i)
    with pytest.raises(QueueFullError, match="offline queue is full .3 messages"):
        dev.send(b"one too many")
    assert dev.queued == 3

    topic_len = len("devices/d1/messages/events/%24.mid=") + 36
    dev = offline_device(max_queue_bytes=2 * (topic_len + 100))
    dev.send(b"a" * 100)
    dev.send(b"b" * 100)
    with pytest.raises(QueueFullError, match="bytes"):
        dev.send(b"c")
    with pytest.raises(QueueFullError, match="larger than the offline queue's max_bytes"):
        offline_device(max_queue_bytes=100, full_policy="drop_oldest").send(b"z" * 200)


def test_drop_oldest_fails_the_dropped_handles_and_keeps_the_newest():
    dev = offline_device(max_queue=3, full_policy="drop_oldest")
    handles = [dev.send(b"%d" % i) for i in range(5)]
    assert dev.queued == 3
    for dropped in handles[:2]:
        with pytest.raises(MessageDroppedError, match="dropped unsent"):
            dropped.wait(0)
        assert isinstance(dropped.error, MessageDroppedError) and not dropped.done()
        assert "dropped" in repr(dropped)
    for kept in handles[2:]:
        assert kept.error is None
        with pytest.raises(OperationTimeout):
            kept.wait(0.01)


def test_drop_oldest_by_bytes_drops_as_many_as_needed():
    topic_len = len("devices/d1/messages/events/%24.mid=") + 36
    dev = offline_device(max_queue_bytes=3 * (topic_len + 10), full_policy="drop_oldest")
    small = [dev.send(b"s" * 10) for _ in range(3)]
    big = dev.send(b"B" * (2 * 10 + topic_len))  # costs as much as two small ones
    assert [h.error is not None for h in small] == [True, True, False] and big.error is None
    assert dev.queued == 2


@pytest.mark.parametrize("kwargs, match", [
    ({"max_queue": 0}, "max_queue must be a positive int"),
    ({"max_queue": True}, "max_queue must be a positive int"),
    ({"max_queue_bytes": -1}, "max_queue_bytes must be a positive int"),
    ({"full_policy": "drop_newest"}, "full_policy must be 'reject_new' or 'drop_oldest'"),
    ({"outbox": 42}, "outbox must be a file path"),
])
def test_bad_queue_settings_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        offline_device(**kwargs)


# ------------------------------------------------------------------------------------------ outbox


def test_send_persists_before_it_returns_and_a_new_device_recovers_in_order(tmp_path):
    path = tmp_path / "outbox.db"
    dev = offline_device(outbox=path)
    handles = [dev.send(b"msg %d" % i, {"i": str(i)}) for i in range(20)]
    # A second connection sees every message at once: it was committed before send() returned.
    with sqlite3.connect(path) as peer:
        rows = peer.execute("SELECT topic, payload FROM messages ORDER BY id").fetchall()
    assert [bytes(p) for _, p in rows] == [b"msg %d" % i for i in range(20)]
    assert all(f"%24.mid={h.message_id}&" in t for h, (t, _) in zip(handles, rows))
    dev.close()

    again = offline_device(outbox=path)
    assert again.queued == 20
    assert [h.message_id for h in again.recovered] == [h.message_id for h in handles]
    again.close()


def test_outbox_file_is_private_and_in_wal_mode(tmp_path):
    path = tmp_path / "o.db"
    with Outbox(path) as box:
        box.add("t", b"x")
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        for extra in ("-wal", "-shm"):
            if os.path.exists(f"{path}{extra}"):
                assert stat.S_IMODE(os.stat(f"{path}{extra}").st_mode) & 0o077 == 0
        with sqlite3.connect(path) as peer:
            assert peer.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    # An existing file readable by others is narrowed to 0600.
    loose = tmp_path / "loose.db"
    loose.touch()
    os.chmod(loose, 0o644)
    Outbox(loose).close()
    assert stat.S_IMODE(os.stat(loose).st_mode) == 0o600


def test_outbox_refuses_unsafe_places_and_foreign_files(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(OutboxError, match="world-writable"):
        Outbox(shared / "o.db")
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)  # like /tmp: allowed, other users cannot replace our file
    Outbox(sticky / "o.db").close()

    target = tmp_path / "target.db"
    target.touch()
    (tmp_path / "link.db").symlink_to(target)
    with pytest.raises(OutboxError, match="cannot open"):
        Outbox(tmp_path / "link.db")
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(OutboxError, match="not a usable lightclient outbox"):
        Outbox(garbage)
    with pytest.raises(OutboxError, match="not usable"):
        Outbox(tmp_path / "missing-dir" / "o.db")
    with pytest.raises(OutboxError, match="not a regular file|cannot open"):
        Outbox(tmp_path)


def test_outbox_bounds_and_policies(tmp_path):
    with Outbox(tmp_path / "a.db", max_messages=2) as box:
        first = box.add("t", b"1")
        box.add("t", b"2")
        with pytest.raises(QueueFullError, match="outbox is full"):
            box.add("t", b"3")
        third = box.add("t", b"3", drop=[first])  # what Device does for drop_oldest
        assert [p for _, _, p in box.pending()] == [b"2", b"3"] and third > first
    with Outbox(tmp_path / "b.db", max_bytes=message_cost("t", b"12345")) as box:
        box.add("t", b"12345")
        with pytest.raises(QueueFullError):
            box.add("t", b"")
        assert box.bytes == 6 and len(box) == 1
    with pytest.raises(ConfigError, match="full_policy"):
        Outbox(tmp_path / "c.db", full_policy="block")
    with pytest.raises(ConfigError, match="synchronous"):
        Outbox(tmp_path / "c.db", synchronous="OFF")


def test_device_with_outbox_drop_oldest_deletes_from_the_file(tmp_path):
    box = Outbox(tmp_path / "o.db", max_messages=3, full_policy="drop_oldest")
    dev = offline_device(outbox=box)
    handles = [dev.send(b"%d" % i) for i in range(5)]
    assert [h.error is not None for h in handles] == [True, True, False, False, False]
    assert [p for _, _, p in box.pending()] == [b"2", b"3", b"4"]
    with pytest.raises(ConfigError, match="set max_messages"):
        offline_device(outbox=box, max_queue=5)
    box.close()
    with pytest.raises(OutboxError, match="closed"):
        box.add("t", b"x")
    box.close()  # twice is fine


def test_removals_from_another_thread_and_concurrent_adds_stay_consistent(tmp_path):
    box = Outbox(tmp_path / "o.db", synchronous="NORMAL")
    keys, lock = [], threading.Lock()

    def adder(n):
        for i in range(200):
            key = box.add("t", b"%d-%d" % (n, i))
            with lock:
                keys.append(key)

    threads = [threading.Thread(target=adder, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    removed = 0
    while any(t.is_alive() for t in threads) or removed < len(keys):
        with lock:
            batch = keys[removed:]
        for key in batch:
            box.remove(key)  # as the network thread does on PUBACK
        removed += len(batch)
        if not batch:
            time.sleep(0.001)
    for t in threads:
        t.join()
    assert len(box) == 0 and box.bytes == 0
    box.close()
    with sqlite3.connect(tmp_path / "o.db") as peer:
        assert peer.execute("SELECT count(*) FROM messages").fetchone()[0] == 0
    assert not [t for t in threading.enumerate() if t.name == "lightclient-outbox-delete"]


def test_rows_with_text_payloads_are_recovered_as_their_utf8_bytes(tmp_path):
    # An older writer or a hand edit can leave payloads stored as TEXT (or numbers) instead of BLOBs.
    path = tmp_path / "outbox.db"
    dev = offline_device(outbox=path)
    handles = [dev.send(b"blob %d" % i) for i in range(4)]
    dev.close()
    with sqlite3.connect(path) as peer:
        ids = [row[0] for row in peer.execute("SELECT id FROM messages ORDER BY id")]
        peer.execute("UPDATE messages SET payload = 'abc' WHERE id = ?", (ids[0],))
        peer.execute("UPDATE messages SET payload = 'température 21 °C' WHERE id = ?", (ids[1],))
        peer.execute("UPDATE messages SET payload = 42 WHERE id = ?", (ids[2],))
        assert [r[0] for r in peer.execute("SELECT typeof(payload) FROM messages ORDER BY id")] == [
            "text", "text", "integer", "blob"]
    with Outbox(path) as box:
        topics = [topic for _, topic, _ in box.pending()]
        assert [payload for _, _, payload in box.pending()] == [
            b"abc", "température 21 °C".encode("utf-8"), b"42", b"blob 3"]
        assert box.bytes == sum(message_cost(t, p) for _, t, p in box.pending())
    again = offline_device(outbox=path)
    assert [h.message_id for h in again.recovered] == [h.message_id for h in handles]
    with again._acks.lock:
        queued = [(m.topic, m.payload) for m in again._acks.queue]
    assert queued == list(zip(topics, [b"abc", "température 21 °C".encode("utf-8"), b"42", b"blob 3"]))
    again.close()


def test_a_row_whose_topic_is_not_text_is_refused_naming_the_row(tmp_path):
    path = tmp_path / "outbox.db"
    with Outbox(path) as box:
        box.add("devices/d1/messages/events/", b"fine")
        bad = box.add("devices/d1/messages/events/", b"bad topic")
    with sqlite3.connect(path) as peer:
        peer.execute("UPDATE messages SET topic = x'ff00fe' WHERE id = ?", (bad,))
    with Outbox(path) as box:
        with pytest.raises(OutboxError, match=f"row {bad} of the outbox .* not UTF-8 text.*DELETE FROM messages "
                                              f"WHERE id = {bad}"):
            box.pending()
    with pytest.raises(OutboxError, match=f"row {bad} "):
        offline_device(outbox=path)
    with sqlite3.connect(path) as peer:  # nothing was deleted: the operator decides
        assert peer.execute("SELECT count(*) FROM messages").fetchone()[0] == 2
