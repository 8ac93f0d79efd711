"""IoT Plug and Play: a thermostat component of a temperature controller.

Shows the model id (sent when connecting), component telemetry (``$.sub``), a component's reported
property, the writable-property acknowledgement, and a component command (``thermostat1*getMaxMinReport``).

Configuration comes from the environment (the library itself never reads it):

    IOT_HUB_HOSTNAME          myhub.azure-devices.net
    DEVICE_ID                 the device id (= the certificate's CN)
    PATH_TO_CERTIFICATE_FILE  device certificate chain (PEM), leaf first
    KEY_IDENTIFIER            key reference, e.g. "pkcs11:token=dev;object=devkey?module-path=/usr/lib/softhsm/libsofthsm2.so"
    LIGHTCLIENT_PIN_FILE      file holding the token PIN (optional; LIGHTCLIENT_PIN works too, but lands in your shell history)
    LIGHTCLIENT_CA            trusted CA for the server (optional; default: the bundled IoT Hub roots)
    LIGHTCLIENT_CONNECT_HOST  connect here instead of IOT_HUB_HOSTNAME, e.g. 127.0.0.1 for the emulator (optional)
    LIGHTCLIENT_PORT          default 8883
    LIGHTCLIENT_MODEL_ID      default dtmi:com:example:TemperatureController;2
    LIGHTCLIENT_INTERVAL      seconds between temperature readings (default 5)
    LIGHTCLIENT_RUN_SECONDS   how long to run (default 300; Ctrl-C stops earlier)
    LIGHTCLIENT_COUNT         stop after this many writable-property updates and commands (optional)
"""
import os
import random
import threading
import time

from lightclient import pnp, tls
from lightclient.device import Device
from lightclient.identity import Identity

env = os.environ
model_id = env.get("LIGHTCLIENT_MODEL_ID", "dtmi:com:example:TemperatureController;2")
identity = Identity(env["IOT_HUB_HOSTNAME"], env["DEVICE_ID"], model_id=model_id)
context = tls.client_context(cert=env["PATH_TO_CERTIFICATE_FILE"], key=env["KEY_IDENTIFIER"], ca=env.get("LIGHTCLIENT_CA"),
                             pin=env.get("LIGHTCLIENT_PIN"), pin_file=env.get("LIGHTCLIENT_PIN_FILE"))
device = Device(identity, context, host=env.get("LIGHTCLIENT_CONNECT_HOST"), port=int(env.get("LIGHTCLIENT_PORT", "8883")))
limit = int(env["LIGHTCLIENT_COUNT"]) if env.get("LIGHTCLIENT_COUNT") else None
handled, lock, enough = [], threading.Lock(), threading.Event()
COMPONENT = "thermostat1"
readings, target = [22.0], {"targetTemperature": 22.0}


def done(what):
    with lock:
        handled.append(what)
        if limit is not None and len(handled) >= limit:
            enough.set()


def on_desired(patch, version):  # {"thermostat1": {"__t": "c", "targetTemperature": 25}, "$version": 4}
    for name, value in (patch.get(COMPONENT) or {}).items():
        if name in target:  # a writable property of this component: apply it, then acknowledge it
            target[name] = value
            device.patch_reported(pnp.writable_property_ack(name, value, version, component=COMPONENT,
                                                            description="applied"), timeout=30)
            print(f"writable property {COMPONENT}.{name}={value} acknowledged (av={version})", flush=True)
            done(name)


def get_max_min_report(payload):  # "thermostat1*getMaxMinReport"; split with pnp.split_command if shared
    print(f"command {COMPONENT}*getMaxMinReport({payload})", flush=True)
    done("getMaxMinReport")
    return {"maxTemp": max(readings), "minTemp": min(readings), "avgTemp": sum(readings) / len(readings)}


device.on_desired = on_desired
device.add_method_handler(f"{COMPONENT}*getMaxMinReport", get_max_min_report)
with device:
    print(f"connected as {identity.client_id} with model id {model_id}", flush=True)
    device.patch_reported(pnp.component_properties(COMPONENT, {"maxTempSinceLastReboot": max(readings)}), timeout=30)
    deadline = time.monotonic() + float(env.get("LIGHTCLIENT_RUN_SECONDS", "300"))
    try:
        while time.monotonic() < deadline:
            readings.append(round(target["targetTemperature"] + random.uniform(-1, 1), 2))
            device.send_and_wait(f'{{"temperature": {readings[-1]}}}', component=COMPONENT,
                                 content_type="application/json", content_encoding="utf-8", timeout=30)
            print(f"telemetry {COMPONENT}.temperature={readings[-1]}", flush=True)
            if enough.wait(min(float(env.get("LIGHTCLIENT_INTERVAL", "5")), max(0, deadline - time.monotonic()))):
                break
    except KeyboardInterrupt:
        pass
print(f"handled {len(handled)} request(s): {handled}", flush=True)
