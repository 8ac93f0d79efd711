"""Answer direct methods with lightclient.aio: ``reboot`` (a coroutine) and ``setInterval`` (a plain function).

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
    LIGHTCLIENT_COUNT         stop after answering this many calls (optional)

A coroutine handler runs on the event loop; a plain function runs on a small thread pool (so it may
block). Other names get 404 from lightclient. Try ``az iot hub invoke-device-method --hub-name myhub
--device-id dev1 --method-name setInterval --method-payload '{"seconds": 5}'``, or against the emulator's
service API (``--http-port 8080``)::

    curl -X POST http://127.0.0.1:8080/twins/dev1/methods -d '{"methodName": "setInterval", "payload": {"seconds": 5}, "responseTimeoutInSeconds": 10}'
"""
import asyncio
import os
import threading

from lightclient import aio, tls
from lightclient.identity import Identity


async def main() -> None:
    env = os.environ
    identity = Identity(env["IOT_HUB_HOSTNAME"], env["DEVICE_ID"])
    context = tls.client_context(cert=env["PATH_TO_CERTIFICATE_FILE"], key=env["KEY_IDENTIFIER"],
                                 ca=env.get("LIGHTCLIENT_CA"), pin=env.get("LIGHTCLIENT_PIN"),
                                 pin_file=env.get("LIGHTCLIENT_PIN_FILE"))
    device = aio.Device(identity, context, host=env.get("LIGHTCLIENT_CONNECT_HOST"),
                        port=int(env.get("LIGHTCLIENT_PORT", "8883")))
    limit = int(env["LIGHTCLIENT_COUNT"]) if env.get("LIGHTCLIENT_COUNT") else None
    loop = asyncio.get_running_loop()
    calls, lock, enough = [], threading.Lock(), asyncio.Event()

    def called(name, payload):  # from the loop (coroutine handler) or a pool thread (plain function)
        print(f"method {name}({payload})", flush=True)
        with lock:
            calls.append(name)
            if limit is not None and len(calls) >= limit:
                loop.call_soon_threadsafe(enough.set)

    @device.method("reboot")
    async def reboot(payload):  # payload: the decoded JSON (None if empty); the return value is the 200 answer
        called("reboot", payload)
        await asyncio.sleep(0.1)  # e.g. await shutting down other tasks; the connection keeps running
        return {"rebooting": True, "delay": (payload or {}).get("delay", 0)}

    @device.method("setInterval")
    def set_interval(payload):
        called("setInterval", payload)
        seconds = (payload or {}).get("seconds") if isinstance(payload, dict) else None
        if not isinstance(seconds, int) or seconds <= 0:
            return aio.MethodResponse(400, {"error": "give {\"seconds\": n} with n > 0"})
        return {"interval": seconds}

    async with device:
        print(f"connected as {identity.client_id}; answering direct methods", flush=True)
        try:
            await asyncio.wait_for(enough.wait(), float(env.get("LIGHTCLIENT_RUN_SECONDS", "300")))
        except asyncio.TimeoutError:
            pass
    print(f"answered {len(calls)} call(s)", flush=True)


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
