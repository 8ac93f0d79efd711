"""Print cloud-to-device messages as they arrive, for a while.

Configuration comes from the environment (the library itself never reads it):

    IOTHUB_HOSTNAME   myhub.azure-devices.net
    IOTHUB_DEVICE_ID  the device id (= the certificate's CN)
    LC_CERT           device certificate chain (PEM), leaf first
    LC_KEY            key reference, e.g. "pkcs11:token=dev;object=devkey?module-path=/usr/lib/softhsm/libsofthsm2.so"
    LC_PIN_FILE       file holding the token PIN (optional; LC_PIN works too, but lands in your shell history)
    LC_CA             trusted CA for the server (optional; default: the bundled IoT Hub roots)
    LC_CONNECT_HOST   connect here instead of IOTHUB_HOSTNAME, e.g. 127.0.0.1 for the emulator (optional)
    LC_PORT           default 8883
    LC_RUN_SECONDS    how long to listen (default 300; Ctrl-C stops earlier)
    LC_COUNT          stop after this many messages (optional)

Send one with ``az iot device c2d-message send --hub-name myhub --device-id dev1 --data hello``.
Messages sent while the device was offline arrive when it connects (the session is persistent).
"""
import os
import threading

from lightclient import tls
from lightclient.device import Device
from lightclient.identity import Identity

env = os.environ
identity = Identity(env["IOTHUB_HOSTNAME"], env["IOTHUB_DEVICE_ID"])
context = tls.client_context(cert=env["LC_CERT"], key=env["LC_KEY"], ca=env.get("LC_CA"),
                             pin=env.get("LC_PIN"), pin_file=env.get("LC_PIN_FILE"))
device = Device(identity, context, host=env.get("LC_CONNECT_HOST"), port=int(env.get("LC_PORT", "8883")))
limit = int(env["LC_COUNT"]) if env.get("LC_COUNT") else None
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
        enough.wait(float(env.get("LC_RUN_SECONDS", "300")))
    except KeyboardInterrupt:
        pass
print(f"received {len(received)} message(s)", flush=True)
