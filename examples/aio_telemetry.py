"""Send telemetry from asyncio code with lightclient.aio, the device key in a PKCS#11 token (or TPM).

Configuration comes from the environment (the library itself never reads it):

    IOT_HUB_HOSTNAME          myhub.azure-devices.net
    DEVICE_ID                 the device id (= the certificate's CN)
    PATH_TO_CERTIFICATE_FILE  device certificate chain (PEM), leaf first
    KEY_IDENTIFIER            key reference, e.g. "pkcs11:token=dev;object=devkey?module-path=/usr/lib/softhsm/libsofthsm2.so"
    LIGHTCLIENT_PIN_FILE      file holding the token PIN (optional; LIGHTCLIENT_PIN works too)
    LIGHTCLIENT_CA            trusted CA for the server (optional; default: the bundled IoT Hub roots)
    LIGHTCLIENT_CONNECT_HOST  connect here instead of IOT_HUB_HOSTNAME, e.g. 127.0.0.1 for the emulator (optional)
    LIGHTCLIENT_PORT          default 8883
    LIGHTCLIENT_COUNT         how many readings to send one by one (default 10)
    LIGHTCLIENT_INTERVAL      seconds between them (default 1)

Each reading is awaited until the hub acknowledged it (``await device.send(...)``); then a batch of
readings goes out pipelined (``send()`` accepts at once, the handles are awaited together).
"""
import asyncio
import json
import os
import random

from lightclient import aio, tls
from lightclient.identity import Identity


async def main() -> None:
    env = os.environ
    identity = Identity(env["IOT_HUB_HOSTNAME"], env["DEVICE_ID"])
    context = tls.client_context(cert=env["PATH_TO_CERTIFICATE_FILE"], key=env["KEY_IDENTIFIER"],
                                 ca=env.get("LIGHTCLIENT_CA"), pin=env.get("LIGHTCLIENT_PIN"),
                                 pin_file=env.get("LIGHTCLIENT_PIN_FILE"))
    count, interval = int(env.get("LIGHTCLIENT_COUNT", "10")), float(env.get("LIGHTCLIENT_INTERVAL", "1"))
    device = aio.Device(identity, context, host=env.get("LIGHTCLIENT_CONNECT_HOST"),
                        port=int(env.get("LIGHTCLIENT_PORT", "8883")))
    async with device:  # connect (and subscribe) now; disconnect cleanly at the end, even on errors
        print(f"connected to {identity.hostname} as {identity.client_id}", flush=True)
        for i in range(1, count + 1):
            body = json.dumps({"seq": i, "temperature": round(20 + random.random() * 5, 2)})
            await device.send(body, {"sensor": "example"}, message_id=f"msg-{i}",
                              content_type="application/json", content_encoding="utf-8")
            print(f"sent and acknowledged {i}/{count}: {body}", flush=True)
            if i < count:
                await asyncio.sleep(interval)
        batch = [device.send(json.dumps({"batch": n}), {"sensor": "example"}) for n in range(count)]
        await asyncio.wait_for(asyncio.gather(*batch), 30)
        print(f"batch of {len(batch)} acknowledged", flush=True)
    print("done", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
