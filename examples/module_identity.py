"""A module identity (``{device}/{module}``) sending telemetry and reporting to its module twin.

A module has its own identity, twin and direct methods inside a device; its certificate's CN is
``{device_id}/{module_id}`` (or the module uses a certificate registered by thumbprint).

Configuration comes from the environment (the library itself never reads it):

    IOTHUB_HOSTNAME   myhub.azure-devices.net
    IOTHUB_DEVICE_ID  the device id
    IOTHUB_MODULE_ID  the module id
    LC_CERT           the module's certificate chain (PEM), leaf first
    LC_KEY            key reference, e.g. "pkcs11:token=dev;object=modkey?module-path=/usr/lib/softhsm/libsofthsm2.so"
    LC_PIN_FILE       file holding the token PIN (optional; LC_PIN works too, but lands in your shell history)
    LC_CA             trusted CA for the server (optional; default: the bundled IoT Hub roots)
    LC_CONNECT_HOST   connect here instead of IOTHUB_HOSTNAME, e.g. 127.0.0.1 for the emulator (optional)
    LC_PORT           default 8883
    LC_COUNT          how many messages to send (default 10)
    LC_INTERVAL       seconds between messages (default 1)
    LC_OUTPUT_NAME    output name for the messages (optional; used for routing, e.g. on IoT Edge)
"""
import json
import os
import time

from lightclient import tls
from lightclient.device import Device
from lightclient.identity import Identity

env = os.environ
identity = Identity(env["IOTHUB_HOSTNAME"], env["IOTHUB_DEVICE_ID"], module_id=env["IOTHUB_MODULE_ID"])
context = tls.client_context(cert=env["LC_CERT"], key=env["LC_KEY"], ca=env.get("LC_CA"),
                             pin=env.get("LC_PIN"), pin_file=env.get("LC_PIN_FILE"))
device = Device(identity, context, host=env.get("LC_CONNECT_HOST"), port=int(env.get("LC_PORT", "8883")))
count, interval = int(env.get("LC_COUNT", "10")), float(env.get("LC_INTERVAL", "1"))
extra = {"output_name": env["LC_OUTPUT_NAME"]} if env.get("LC_OUTPUT_NAME") else {}

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
