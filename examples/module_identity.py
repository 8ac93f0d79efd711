"""A module identity (``{device}/{module}``) sending telemetry and reporting to its module twin.

A module has its own identity, twin and direct methods inside a device; its certificate's CN is
``{device_id}/{module_id}`` (or the module uses a certificate registered by thumbprint).

Configuration comes from the environment (the library itself never reads it):

    IOT_HUB_HOSTNAME          myhub.azure-devices.net
    DEVICE_ID                 the device id
    LIGHTCLIENT_MODULE_ID     the module id
    PATH_TO_CERTIFICATE_FILE  the module's certificate chain (PEM), leaf first
    KEY_IDENTIFIER            key reference, e.g. "pkcs11:token=dev;object=modkey?module-path=/usr/lib/softhsm/libsofthsm2.so"
    LIGHTCLIENT_PIN_FILE      file holding the token PIN (optional; LIGHTCLIENT_PIN works too, but lands in your shell history)
    LIGHTCLIENT_CA            trusted CA for the server (optional; default: the bundled IoT Hub roots)
    LIGHTCLIENT_CONNECT_HOST  connect here instead of IOT_HUB_HOSTNAME, e.g. 127.0.0.1 for the emulator (optional)
    LIGHTCLIENT_PORT          default 8883
    LIGHTCLIENT_COUNT         how many messages to send (default 10)
    LIGHTCLIENT_INTERVAL      seconds between messages (default 1)
    LIGHTCLIENT_OUTPUT_NAME   output name for the messages (optional; used for routing, e.g. on IoT Edge)
"""
import json
import os
import time

from lightclient import tls
from lightclient.device import Device
from lightclient.identity import Identity

env = os.environ
identity = Identity(env["IOT_HUB_HOSTNAME"], env["DEVICE_ID"], module_id=env["LIGHTCLIENT_MODULE_ID"])
context = tls.client_context(cert=env["PATH_TO_CERTIFICATE_FILE"], key=env["KEY_IDENTIFIER"], ca=env.get("LIGHTCLIENT_CA"),
                             pin=env.get("LIGHTCLIENT_PIN"), pin_file=env.get("LIGHTCLIENT_PIN_FILE"))
device = Device(identity, context, host=env.get("LIGHTCLIENT_CONNECT_HOST"), port=int(env.get("LIGHTCLIENT_PORT", "8883")))
count, interval = int(env.get("LIGHTCLIENT_COUNT", "10")), float(env.get("LIGHTCLIENT_INTERVAL", "1"))
extra = {"output_name": env["LIGHTCLIENT_OUTPUT_NAME"]} if env.get("LIGHTCLIENT_OUTPUT_NAME") else {}

with device:
    print(f"connected as module {identity.client_id}", flush=True)
    version = device.patch_reported({"status": "running"}, timeout=30)
    print(f"module twin: reported status=running ($version {version})", flush=True)
    handles = []
    for i in range(1, count + 1):  # queue them all; paho sends them in order, acknowledged later
        body = json.dumps({"seq": i, "module": identity.module_id})
        handles.append(device.send(body, {"origin": "module"}, content_type="application/json",
                                   content_encoding="utf-8", **extra))
        if i < count:
            time.sleep(interval)
    for handle in handles:
        handle.wait(30)
    print(f"sent {count} message(s), all acknowledged", flush=True)
