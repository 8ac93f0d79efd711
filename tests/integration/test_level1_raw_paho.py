"""Level 1 only: a raw paho client plus the pure topic layer (no lightclient.paho, no Device).

This is what a protocol debugger does by hand: every string on the wire comes from
lightclient.identity / lightclient.topics, every received topic goes through topics.parse().
"""
import json
import queue
import threading
import uuid

import paho.mqtt.client as mqtt
import pytest

from lightclient import tls, topics
from lightclient.identity import Identity
from lightclient.topics import MethodRequest, TwinResponse

from .hubside import HubSide


@pytest.fixture
def hub(service_context, broker):
    side = HubSide(service_context, broker.port)
    yield side
    side.close()


def test_raw_paho_with_the_pure_layer(device, test_ca, broker, hub):
    identity = Identity("localhost", f"raw-{uuid.uuid4().hex[:8]}")
    inbox = queue.Queue()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=identity.client_id,
                         protocol=mqtt.MQTTv311, clean_session=False)
    client.username_pw_set(identity.username())
    client.tls_set_context(tls.client_context(cert=device["ec"]["cert"], key=device["ec"]["key"], ca=test_ca.cert))
    client.on_message = lambda c, u, m: inbox.put((topics.parse(m.topic, identity), m.payload))
    subscribed = queue.Queue()
    client.on_subscribe = lambda *a: subscribed.put(True)
    client.connect("localhost", broker.port)
    client.loop_start()
    try:
        client.subscribe([(topics.METHODS_FILTER, 0), (topics.TWIN_RESPONSE_FILTER, 0),
                          (topics.DESIRED_PATCH_FILTER, 1), (topics.c2d_filter(identity), 1)])
        subscribed.get(timeout=5)

        # Telemetry: the exact topic the hub expects.
        topic = topics.telemetry_topic(identity, {"k": "v"}, message_id="m-1", content_type="application/json")
        client.publish(topic, b'{"t": 1}', qos=1).wait_for_publish(5)
        got_topic, body = hub.wait_for(lambda t, p: p == b'{"t": 1}')
        assert got_topic == f"devices/{identity.device_id}/messages/events/%24.mid=m-1&%24.ct=application%2Fjson&k=v"

        # A direct method, answered by hand with the request's $rid.
        answer = queue.Queue()

        def answer_next():
            record, payload = inbox.get(timeout=5)
            assert record == MethodRequest(name="reset", rid="r-9") and json.loads(payload) == {"hard": False}
            client.publish(topics.method_response_topic(200, record.rid), json.dumps({"done": True}), qos=0)
            answer.put(True)

        worker = threading.Thread(target=answer_next)
        worker.start()
        assert hub.call_method("reset", b'{"hard": false}', rid="r-9") == (200, {"done": True})
        worker.join(5)
        assert answer.get_nowait()

        # Twin GET and reported PATCH, correlated by $rid.
        client.publish(topics.twin_get_topic("g-1"), b"", qos=1)
        record, payload = inbox.get(timeout=5)
        assert record == TwinResponse(status=200, rid="g-1") and "desired" in json.loads(payload)
        client.publish(topics.twin_patch_reported_topic("p-1"), json.dumps({"fw": "2"}), qos=1)
        record, _ = inbox.get(timeout=5)
        assert (record.status, record.rid) == (204, "p-1") and record.version is not None
    finally:
        client.disconnect()
        client.loop_stop()
