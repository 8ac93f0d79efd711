"""Answer direct methods: ``reboot`` and ``setInterval`` (other names get 404 from lightclient).

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
    LC_COUNT          stop after answering this many calls (optional)

Try ``az iot hub invoke-device-method --hub-name myhub --device-id dev1 --method-name setInterval
--method-payload '{"seconds": 5}'``.
"""
import os
import threading

from lightclient import tls
from lightclient.device import Device, MethodResponse
from lightclient.identity import Identity

env = os.environ
identity = Identity(env["IOTHUB_HOSTNAME"], env["IOTHUB_DEVICE_ID"])
context = tls.client_context(cert=env["LC_CERT"], key=env["LC_KEY"], ca=env.get("LC_CA"),
                             pin=env.get("LC_PIN"), pin_file=env.get("LC_PIN_FILE"))
device = Device(identity, context, host=env.get("LC_CONNECT_HOST"), port=int(env.get("LC_PORT", "8883")))
limit = int(env["LC_COUNT"]) if env.get("LC_COUNT") else None
calls, lock, enough = [], threading.Lock(), threading.Event()


def called(name, payload):  # handlers run on a small thread pool, so count under a lock
    print(f"method {name}({payload})", flush=True)
    with lock:
        calls.append(name)
        if limit is not None and len(calls) >= limit:
            enough.set()


@device.method("reboot")
def reboot(payload):  # payload: the decoded JSON (None if empty); the return value is the 200 answer
    called("reboot", payload)
    return {"rebooting": True, "delay": (payload or {}).get("delay", 0)}


@device.method("setInterval")
def set_interval(payload):
    called("setInterval", payload)
    seconds = (payload or {}).get("seconds") if isinstance(payload, dict) else None
    if not isinstance(seconds, int) or seconds <= 0:
        return MethodResponse(400, {"error": "give {\"seconds\": n} with n > 0"})
    return {"interval": seconds}


with device:
    print(f"connected as {identity.client_id}; answering direct methods", flush=True)
    try:
        enough.wait(float(env.get("LC_RUN_SECONDS", "300")))
    except KeyboardInterrupt:
        pass
print(f"answered {len(calls)} call(s)", flush=True)
