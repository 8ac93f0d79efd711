"""An existing paho-mqtt application gains Azure IoT Hub in a few lines (level 2: lightclient.paho).

The app keeps its own client, its own on_connect and on_message; lightclient only sets the IoT Hub
username and TLS (with the key in a PKCS#11 token) and routes IoT Hub's topics to typed callbacks.

Configuration comes from the environment (the library itself never reads it):

    IOT_HUB_HOSTNAME          myhub.azure-devices.net
    DEVICE_ID                 the device id (= the certificate's CN)
    PATH_TO_CERTIFICATE_FILE  device certificate chain (PEM), leaf first
    KEY_IDENTIFIER            key reference, e.g. "pkcs11:token=dev;object=devkey?module-path=/usr/lib/softhsm/libsofthsm2.so"
    LIGHTCLIENT_PIN_FILE      file holding the token PIN (optional; LIGHTCLIENT_PIN works too, but lands in your shell history)
    LIGHTCLIENT_CA            trusted CA for the server (optional; default: the bundled IoT Hub roots)
    LIGHTCLIENT_CONNECT_HOST  connect here instead of IOT_HUB_HOSTNAME, e.g. localhost for the lab broker (optional)
    LIGHTCLIENT_PORT          default 8883

Run ``python examples/embed_in_existing_paho_app.py`` and call the ``blink`` method from the cloud.
"""
import json
import logging
import os
import signal
import threading

from lightclient import paho as lcpaho
from lightclient import tls, topics
from lightclient.identity import Identity

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
env = os.environ

identity = Identity(env["IOT_HUB_HOSTNAME"], env["DEVICE_ID"])
context = tls.client_context(cert=env["PATH_TO_CERTIFICATE_FILE"], key=env["KEY_IDENTIFIER"], ca=env.get("LIGHTCLIENT_CA"),
                             pin=env.get("LIGHTCLIENT_PIN"), pin_file=env.get("LIGHTCLIENT_PIN_FILE"))

# --- the existing application, unchanged apart from the marked lines -------------------------------
client = lcpaho.new_client(identity, ssl_context=context)               # + IoT Hub client id/username/TLS


def on_connect(client, userdata, flags, reason, properties):
    logging.info("connected: %s", reason)
    # IoT Hub is not a general broker: it refuses (SUBACK 0x80) any filter but its own.
    client.subscribe(lcpaho.subscriptions(identity))            # + IoT Hub filters, not the app's own
    lcpaho.request_twin(client)                                           # + read the twin once connected


def on_message(client, userdata, message):  # still sees every non-IoT Hub topic
    logging.info("app message on %s: %r", message.topic, message.payload)


client.on_connect = on_connect
client.on_message = on_message


# --- the IoT Hub part ------------------------------------------------------------------------------
def on_method(request, payload):
    logging.info("method %s(%s)", request.name, payload.decode() or "-")
    if request.name == "blink":
        lcpaho.answer_method(client, request, 200, {"blinked": True})
    else:
        lcpaho.answer_method(client, request, 404, {"error": f"unknown method {request.name!r}"})


def on_twin_response(response, payload):
    logging.info("twin answer %d for $rid=%s: %s", response.status, response.rid, payload.decode() or "-")


def on_desired(patch, payload):
    desired = json.loads(payload)
    logging.info("desired patch $version=%d: %s", patch.version, desired)
    lcpaho.patch_reported(client, {k: v for k, v in desired.items() if not k.startswith("$")})


lcpaho.route(client, identity, on_method=on_method, on_twin_response=on_twin_response, on_desired=on_desired,
             on_c2d=lambda message, payload: logging.info("C2D %s: %r", dict(message.properties), payload))

stop = threading.Event()
signal.signal(signal.SIGINT, lambda *a: stop.set())
signal.signal(signal.SIGTERM, lambda *a: stop.set())
client.connect(env.get("LIGHTCLIENT_CONNECT_HOST", identity.hostname), int(env.get("LIGHTCLIENT_PORT", "8883")))
client.loop_start()
client.publish(topics.telemetry_topic(identity, {"source": "example"}, content_type="application/json"),
               b'{"hello": "from an existing paho app"}', qos=1)
stop.wait()
client.disconnect()
client.loop_stop()
