"""Send telemetry to IoT Hub with the device key in a PKCS#11 token (or TPM).

Configuration comes from the environment (the library itself never reads it):

    IOT_HUB_HOSTNAME          myhub.azure-devices.net
    DEVICE_ID                 the device id (= the certificate's CN)
    PATH_TO_CERTIFICATE_FILE  device certificate chain (PEM), leaf first
    KEY_IDENTIFIER            key reference, e.g. "pkcs11:token=dev;object=devkey?module-path=/usr/lib/softhsm/libsofthsm2.so"
    LIGHTCLIENT_PIN_FILE      file holding the token PIN (optional; LIGHTCLIENT_PIN works too, but lands in your shell history)
    LIGHTCLIENT_CA            trusted CA for the server (optional; default: the bundled IoT Hub roots)
    LIGHTCLIENT_CONNECT_HOST  connect here instead of IOT_HUB_HOSTNAME, e.g. 127.0.0.1 for the emulator (optional)
    LIGHTCLIENT_PORT          default 8883
    LIGHTCLIENT_COUNT         how many messages to send (default 10)
    LIGHTCLIENT_INTERVAL      seconds between messages (default 1)

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
identity = Identity(env["IOT_HUB_HOSTNAME"], env["DEVICE_ID"])
context = tls.client_context(cert=env["PATH_TO_CERTIFICATE_FILE"], key=env["KEY_IDENTIFIER"], ca=env.get("LIGHTCLIENT_CA"),
                             pin=env.get("LIGHTCLIENT_PIN"), pin_file=env.get("LIGHTCLIENT_PIN_FILE"))
device = Device(identity, context, host=env.get("LIGHTCLIENT_CONNECT_HOST"), port=int(env.get("LIGHTCLIENT_PORT", "8883")))
count, interval = int(env.get("LIGHTCLIENT_COUNT", "10")), float(env.get("LIGHTCLIENT_INTERVAL", "1"))

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
