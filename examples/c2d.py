"""Print cloud-to-device messages as they arrive, for a while.

Configuration comes from the environment (the library itself never reads it):

    IOT_HUB_HOSTNAME          myhub.azure-devices.net
    DEVICE_ID                 the device id (= the certificate's CN)
    PATH_TO_CERTIFICATE_FILE  device certificate chain (PEM), leaf first
    KEY_IDENTIFIER            key reference, e.g. "pkcs11:token=dev;object=devkey?module-path=/usr/lib/softhsm/libsofthsm2.so"
    LIGHTCLIENT_PIN_FILE      file holding the token PIN (optional; LIGHTCLIENT_PIN works too, but lands in your shell history)
    LIGHTCLIENT_CA            trusted CA for the server (optional; default: the bundled IoT Hub roots)
    LIGHTCLIENT_CONNECT_HOST  connect here instead of IOT_HUB_HOSTNAME, e.g. 127.0.0.1 for the emulator (optional)
    LIGHTCLIENT_PORT          default 8883
    LIGHTCLIENT_RUN_SECONDS   how long to listen (default 300; Ctrl-C stops earlier)
    LIGHTCLIENT_COUNT         stop after this many messages (optional)

Send one with ``az iot device c2d-message send --hub-name myhub --device-id dev1 --data hello``, or
against the emulator's service API (``--http-port 8080``; see the README)::

    curl -X POST http://127.0.0.1:8080/devices/dev1/messages/deviceBound -d hello
Messages sent while the device was offline arrive when it connects (the session is persistent).
"""
import os
import threading

from lightclient import tls
from lightclient.device import Device
from lightclient.identity import Identity

env = os.environ
identity = Identity(env["IOT_HUB_HOSTNAME"], env["DEVICE_ID"])
context = tls.client_context(cert=env["PATH_TO_CERTIFICATE_FILE"], key=env["KEY_IDENTIFIER"], ca=env.get("LIGHTCLIENT_CA"),
                             pin=env.get("LIGHTCLIENT_PIN"), pin_file=env.get("LIGHTCLIENT_PIN_FILE"))
device = Device(identity, context, host=env.get("LIGHTCLIENT_CONNECT_HOST"), port=int(env.get("LIGHTCLIENT_PORT", "8883")))
limit = int(env["LIGHTCLIENT_COUNT"]) if env.get("LIGHTCLIENT_COUNT") else None
received = []
enough = threading.Event()


def on_c2d(message, payload):  # runs on the device's event thread, one message at a time
    received.append(payload)
    print(f"C2D #{len(received)}: {payload.decode('utf-8', 'replace')!r} message_id={message.message_id} "
          f"content_type={message.content_type} properties={dict(message.properties)}", flush=True)
    if limit is not None and len(received) >= limit:
        enough.set()


device.on_c2d = on_c2d
with device:
    print(f"connected as {identity.client_id}; waiting for cloud-to-device messages", flush=True)
    try:
        enough.wait(float(env.get("LIGHTCLIENT_RUN_SECONDS", "300")))
    except KeyboardInterrupt:
        pass
print(f"received {len(received)} message(s)", flush=True)
