"""Device telemetry against a real mosquitto: send_many()/wait_all(), the outbox's group commit on the
wire, and which PUBACK path paho runs (`make test` runs this file with both, see tests/conftest.py)."""
import logging
import threading
import time
import uuid

import pytest
from paho.mqtt.reasoncodes import ReasonCode

from lightclient import tls
from lightclient.backoff import Backoff
from lightclient.device import Device
from lightclient.identity import Identity

from ..conftest import STOCK_PAHO
from .hubside import HubSide


@pytest.fixture(scope="module")
def token_context(device, test_ca):
    return tls.client_context(cert=device["ec"]["cert"], key=device["ec"]["key"], ca=test_ca.cert)


@pytest.fixture
def hub(service_context, broker):
    side = HubSide(service_context, broker.port)
    yield side
    side.close()


@pytest.fixture
def make_device(token_context, broker):
    made = []

    def make(**kwargs):
        dev = Device(Identity("localhost", f"dev-{uuid.uuid4().hex[:8]}"), token_context, port=broker.port,
                     backoff=Backoff(initial=0.05, maximum=0.3), **kwargs)
        made.append(dev)
        return dev

    yield make
    for dev in made:
        dev.close(timeout=0)


def test_send_many_and_wait_all_deliver_every_message_in_order(make_device, hub):
    dev = make_device(max_inflight=8)
    with dev:
        handles = []
        for start in range(0, 300, 50):
            handles += dev.send_many([b"%d" % i for i in range(start, start + 50)], {"batch": str(start)})
        dev.wait_all(handles, timeout=20)
        assert all(h.done() for h in handles) and dev.queued == 0
        prefix = f"devices/{dev.identity.device_id}/messages/events/"
        hub.wait_for(lambda t, p: p == b"299" and t.startswith(prefix))
    got = [(t, p) for t, p in hub.received if t.startswith(prefix)]
    assert [p for _, p in got] == [b"%d" % i for i in range(300)]
    assert all(t.endswith(f"&batch={int(p) // 50 * 50}") for t, p in got)
    assert len({t for t, _ in got}) == 300  # a fresh $.mid each


@pytest.mark.parametrize("debug_log", [False, True])
def test_puback_path_is_the_fast_one_unless_the_stock_one_is_forced(make_device, hub, monkeypatch, caplog,
                                                                    debug_log):
    # paho's own debug log ("Received PUBACK") needs its stock handler: the fast path steps aside for it.
    caplog.set_level(logging.DEBUG if debug_log else logging.INFO, logger="lightclient")
    dev = make_device()
    assert dev._fast_acks is (not STOCK_PAHO)
    made = []
    original = ReasonCode.__init__

    def counting(self, *args, **kwargs):
        made.append(1)
        original(self, *args, **kwargs)

    with dev:
        monkeypatch.setattr(ReasonCode, "__init__", counting)
        dev.wait_all(dev.send_many([b"x"] * 200), timeout=20)
        monkeypatch.undo()
    # paho's stock PUBACK decoding builds a ReasonCode per ack; the fast path builds none.
    assert (len(made) >= 200) if STOCK_PAHO or debug_log else (made == []), len(made)


def test_outbox_senders_on_threads_all_arrive_with_fewer_commits_than_messages(make_device, hub, tmp_path):
    dev = make_device(outbox=tmp_path / "o.db")
    commits = []          # transactions that added messages (those of acknowledged deletions are not counted)
    inserting = []

    def trace(sql):
        if sql.lstrip().upper().startswith("INSERT"):
            inserting.append(1)
        elif sql.strip().upper() == "COMMIT" and inserting:
            commits.append(1)
            inserting.clear()

    dev.outbox._conn.set_trace_callback(trace)
    with dev:
        start = threading.Barrier(4)
        handles = []

        def sender(t):
            start.wait()
            for i in range(100):
                handles.append(dev.send(b"%d-%d" % (t, i)))

        workers = [threading.Thread(target=sender, args=(t,)) for t in range(4)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(60)
        dev.wait_all(handles, timeout=30)
        prefix = f"devices/{dev.identity.device_id}/messages/events/"
        deadline = time.monotonic() + 20
        while hub.count(prefix) < 400 and time.monotonic() < deadline:
            time.sleep(0.02)
    got = [p for t, p in hub.received if t.startswith(prefix)]
    assert sorted(got) == sorted(b"%d-%d" % (t, i) for t in range(4) for i in range(100))
    for t in range(4):
        assert [p for p in got if p.startswith(b"%d-" % t)] == [b"%d-%d" % (t, i) for i in range(100)]
    assert 0 < len(commits) < 400, f"{len(commits)} commits for 400 messages"
    assert len(dev.outbox) == 0
