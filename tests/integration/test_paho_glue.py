"""Level 2: IoT Hub wired into a plain paho application whose own callbacks keep working."""
import json
import queue
import uuid

import pytest

from lightclient import paho as lcpaho
from lightclient import tls
from lightclient.identity import Identity
from lightclient.topics import C2DMessage, DesiredPatch, MethodRequest, TwinResponse

from ..conftest import PIN
from .hubside import HubSide


@pytest.fixture
def hub(service_context, broker):
    side = HubSide(service_context, broker.port)
    yield side
    side.close()


@pytest.fixture(scope="module")
def token_context(device, test_ca):
    return tls.client_context(cert=device["rsa"]["cert"], key=device["rsa"]["uri"], pin=PIN, ca=test_ca.cert)


class PlainApp:
    """An existing paho app: its own on_connect subscribes to its own topic, its own on_message logs."""

    def __init__(self, identity, ssl_context, port):
        self.events = queue.Queue()
        self.client = lcpaho.new_client(identity, ssl_context=ssl_context, userdata="app-state")
        self.client.on_connect = self.on_connect
        self.client.on_message = self.on_message
        self.identity, self.port = identity, port

    def on_connect(self, client, userdata, flags, reason, properties):
        self.events.put(("app-connect", userdata, reason.is_failure))
        client.subscribe([("app/commands", 1)] + lcpaho.subscriptions(self.identity))

    def on_message(self, client, userdata, message):
        self.events.put(("app-message", message.topic, message.payload))

    def start(self):
        self.client.on_subscribe = lambda *a: self.events.put(("subscribed",))
        self.client.connect("localhost", self.port)
        self.client.loop_start()

    def stop(self):
        self.client.disconnect()
        self.client.loop_stop()

    def next(self, kind):
        while True:
            event = self.events.get(timeout=5)
            if event[0] == kind:
                return event


def test_plain_paho_app_gains_iothub_and_keeps_its_callbacks(token_context, broker, hub):
    identity = Identity("localhost", f"app-{uuid.uuid4().hex[:8]}")
    app = PlainApp(identity, token_context, broker.port)
    got = queue.Queue()
    errors = queue.Queue()

    def on_method(request, payload):
        got.put(("method", request, payload))
        lcpaho.answer_method(app.client, request, 200, {"echo": json.loads(payload)})

    routes = lcpaho.route(app.client, identity,
                        on_c2d=lambda m, p: got.put(("c2d", m, p)),
                        on_method=on_method,
                        on_twin_response=lambda r, p: got.put(("twin", r, p)),
                        on_desired=lambda d, p: got.put(("desired", d, p)),
                        on_error=lambda exc, message: errors.put((exc, message.topic)))
    app.start()
    try:
        assert app.next("app-connect") == ("app-connect", "app-state", False)
        app.next("subscribed")

        # The app's own topic still reaches the app's own on_message ...
        hub.publish("app/commands", b"hello app")
        assert app.next("app-message") == ("app-message", "app/commands", b"hello app")

        # ... while IoT Hub topics go to the typed callbacks.
        assert hub.call_method("set-led", b'{"on": true}', rid="m-1") == (200, {"echo": {"on": True}})
        kind, request, payload = got.get(timeout=5)
        assert (kind, request, payload) == ("method", MethodRequest(name="set-led", rid="m-1"), b'{"on": true}')

        rid = lcpaho.request_twin(app.client)
        kind, response, payload = got.get(timeout=5)
        assert (kind, response) == ("twin", TwinResponse(status=200, rid=rid))
        assert json.loads(payload)["desired"] == {"$version": 1}

        rid = lcpaho.patch_reported(app.client, {"led": "on"})
        kind, response, _ = got.get(timeout=5)
        assert (kind, response) == ("twin", TwinResponse(status=204, rid=rid, version=2))
        topic, body = hub.wait_for(lambda t, p: t.startswith("$iothub/twin/PATCH/properties/reported/"))
        assert topic == f"$iothub/twin/PATCH/properties/reported/?$rid={rid}" and json.loads(body) == {"led": "on"}

        hub.patch_desired({"blink": 2})
        kind, patch, payload = got.get(timeout=5)
        assert (kind, patch, json.loads(payload)) == ("desired", DesiredPatch(version=2), {"blink": 2, "$version": 2})

        hub.send_c2d(identity.device_id, {"$.mid": "c-1", "color": "red & blue"}, b"paint")
        kind, message, payload = got.get(timeout=5)
        assert kind == "c2d" and isinstance(message, C2DMessage) and payload == b"paint"
        assert (message.message_id, dict(message.properties)) == ("c-1", {"color": "red & blue"})

        # A malformed topic in the hub's namespace goes to on_error; the loop keeps running.
        hub.publish("$iothub/twin/res/abc/?$rid=1", b"")
        exc, topic = errors.get(timeout=5)
        assert topic == "$iothub/twin/res/abc/?$rid=1" and "not a decimal integer" in str(exc)

        # Once the routes are removed, those topics fall back to the app's own on_message.
        routes.remove()
        hub.patch_desired({"blink": 3})
        kind, topic, _ = app.next("app-message")
        assert topic == "$iothub/twin/PATCH/properties/desired/?$version=3"
        assert got.empty()
    finally:
        app.stop()
    # The broker saw the IoT Hub client id (its username is the certificate: use_identity_as_username).
    assert f"as {identity.device_id} (p2, c0, k60, u'device-rsa')" in broker.log()
