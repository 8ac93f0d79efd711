"""Send telemetry to IoT Hub with the device key in a PKCS#11 token (or TPM).

Configuration comes from the environment (the library itself never reads it):

    IOTHUB_HOSTNAME   myhub.azure-devices.net
    IOTHUB_DEVICE_ID  the device id (= the certificate's CN)
    LC_CERT           device certificate chain (PEM), leaf first
    LC_KEY            key reference, e.g. "pkcs11:token=dev;object=devkey?module-path=/usr/lib/softhsm/libsofthsm2.so"
    LC_PIN_FILE       file holding the token PIN (optional; LC_PIN works too, but lands in your shell history)
    LC_CA             trusted CA for the server (optional; default: the bundled IoT Hub roots)
    LC_CONNECT_HOST   connect here instead of IOTHUB_HOSTNAME, e.g. 127.0.0.1 for the emulator (optional)
    LC_PORT           default 8883
    LC_COUNT          how many messages to send (default 10)
    LC_INTERVAL       seconds between messages (default 1)

Each message is JSON with an application property and content type/encoding, sent with QoS 1;
the example waits for the hub's acknowledgement of each one.
"""
import json
import os
import random
import time

from lightclient import tls
from lightclient.device import Device
from lightclient.identity import Identity

env = os.environ
identity = Identity(env["IOTHUB_HOSTNAME"], env["IOTHUB_DEVICE_ID"])
context = tls.client_context(cert=env["LC_CERT"], key=env["LC_KEY"], ca=env.get("LC_CA"),
                             pin=env.get("LC_PIN"), pin_file=env.get("LC_PIN_FILE"))
device = Device(identity, context, host=env.get("LC_CONNECT_HOST"), port=int(env.get("LC_PORT", "8883")))
count, interval = int(env.get("LC_COUNT", "10")), float(env.get("LC_INTERVAL", "1"))

with device:  # connect (and subscribe) now; disconnect cleanly at the end
    print(f"connected to {identity.hostname} as {identity.client_id}", flush=True)
    for i in range(1, count + 1):
        body = json.dumps({"seq": i, "temperature": round(20 + random.random() * 5, 2)})
        device.send_and_wait(body, {"sensor": "example"}, message_id=f"msg-{i}",
                             content_type="application/json", content_encoding="utf-8", timeout=30)
        print(f"sent and acknowledged {i}/{count}: {body}", flush=True)
        if i < count:
            time.sleep(interval)
print("done", flush=True)
