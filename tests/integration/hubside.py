"""The test's stand-in for IoT Hub's service side: a plain paho client on the same mosquitto.

mosquitto routes topics but knows nothing of IoT Hub, so this peer does what the hub would: it sees what
the device publishes (telemetry, method responses, twin requests), answers twin requests from a small
in-memory twin, and publishes method calls, desired patches and cloud-to-device messages.
"""
import json
import threading
import time
import uuid

import paho.mqtt.client as mqtt

from lightclient import topics

DEVICE_SIDE = [("devices/#", 1), ("$iothub/methods/res/#", 1), ("$iothub/twin/GET/#", 1),
               ("$iothub/twin/PATCH/properties/reported/#", 1)]


class HubSide:
    def __init__(self, service_context, port, *, answer_twin=True):
        self.received = []                 # (topic, payload) in arrival order
        self.cond = threading.Condition()
        self.answer_twin = answer_twin
        self.twin_status = 200             # what to answer twin requests with
        self.desired = {"$version": 1}
        self.reported = {"$version": 1}
        self.subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"hub-{uuid.uuid4().hex[:8]}",
                                  protocol=mqtt.MQTTv311)
        self.client.tls_set_context(service_context)
        self.client.reconnect_delay_set(0.05, 0.2)  # reconnects quickly when a test restarts the broker
        self.client.on_connect = lambda c, *a: c.subscribe(DEVICE_SIDE)
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("localhost", port, keepalive=30)
        self.client.loop_start()
        assert self.subscribed.wait(5), "the hub side could not subscribe"

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()

    def _on_message(self, client, userdata, message):
        with self.cond:
            self.received.append((message.topic, message.payload))
            self.cond.notify_all()
        if self.answer_twin and message.topic.startswith("$iothub/twin/"):
            self._answer_twin(message.topic, message.payload)

    def _answer_twin(self, topic, payload):
        rid = topic.split("?$rid=", 1)[1]
        if self.twin_status >= 300:
            client_topic = f"$iothub/twin/res/{self.twin_status}/?$rid={rid}"
            self.client.publish(client_topic, b'{"errorCode":429001,"message":"throttled"}')
        elif topic.startswith("$iothub/twin/GET/"):
            body = json.dumps({"desired": self.desired, "reported": self.reported})
            self.client.publish(f"$iothub/twin/res/200/?$rid={rid}", body)
        else:
            patch = json.loads(payload)
            self.reported = {**{k: v for k, v in self.reported.items() if k not in patch},
                             **{k: v for k, v in patch.items() if v is not None},
                             "$version": self.reported["$version"] + 1}
            self.client.publish(f"$iothub/twin/res/204/?$rid={rid}&$version={self.reported['$version']}", b"")

    # -------------------------------------------------------------------------------- assertions

    def wait_for(self, predicate, timeout=5.0, what="a message"):
        """The first received (topic, payload) matching predicate(topic, payload)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for item in self.received:
                    if predicate(*item):
                        return item
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no {what} within {timeout} s; got {[t for t, _ in self.received]}")
                self.cond.wait(remaining)

    def count(self, prefix):
        with self.cond:
            return sum(1 for t, _ in self.received if t.startswith(prefix))

    # ------------------------------------------------------------------------------ hub -> device

    def publish(self, topic, payload=b"", qos=1):
        self.client.publish(topic, payload, qos=qos).wait_for_publish(5)

    def call_method(self, name, payload=b"", rid=None):
        """Invoke a direct method; returns (status, body) of the device's answer."""
        rid = rid or uuid.uuid4().hex[:8]
        self.publish(f"$iothub/methods/POST/{name}/?$rid={rid}", payload, qos=0)
        topic, body = self.wait_for(lambda t, p: t.startswith("$iothub/methods/res/") and t.endswith(f"?$rid={rid}"),
                                    what=f"answer to method {name!r}")
        record_status = int(topic.split("/")[3])
        return record_status, json.loads(body) if body else None

    def patch_desired(self, patch):
        self.desired = {**self.desired, **patch, "$version": self.desired["$version"] + 1}
        body = json.dumps({**patch, "$version": self.desired["$version"]})
        self.publish(f"$iothub/twin/PATCH/properties/desired/?$version={self.desired['$version']}", body)
        return self.desired["$version"]

    def send_c2d(self, device_id, properties, payload):
        bag = topics.encode_property_bag(properties) if not isinstance(properties, str) else properties
        self.publish(f"devices/{device_id}/messages/devicebound/{bag}", payload)
