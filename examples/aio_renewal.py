"""Keep the device certificate fresh from asyncio code: lightclient.renewal.Renewer with lightclient.aio.

Configuration comes from the environment (the library itself never reads it):

    IOT_HUB_HOSTNAME          myhub.azure-devices.net
    DEVICE_ID                 the device id (= the certificate's CN)
    PATH_TO_CERTIFICATE_FILE  device certificate chain (PEM), leaf first; each renewal rewrites it atomically
    KEY_IDENTIFIER            "pkcs11:token=dev;object=devkey?module-path=/usr/lib/softhsm/libsofthsm2.so"
    LIGHTCLIENT_PIN_FILE      file holding the token PIN (or LIGHTCLIENT_PIN)
    LIGHTCLIENT_CA            trusted CA for the hub and DPS (optional; default: the bundled IoT Hub roots)
    LIGHTCLIENT_CONNECT_HOST  connect here instead of IOT_HUB_HOSTNAME, e.g. 127.0.0.1 for the emulator (optional)
    LIGHTCLIENT_PORT          default 8883
    PROVISIONING_IDSCOPE      optional: renew over DPS too (registration id = DEVICE_ID) ...
    PROVISIONING_HOST         ... at this endpoint (default https://global.azure-devices-provisioning.net)
    LIGHTCLIENT_RENEW_NOW     1: renew once at the start, over the hub's credentials API (to see a hot swap)
    LIGHTCLIENT_RUN_SECONDS   how long to send readings (default 60)
    LIGHTCLIENT_INTERVAL      seconds between readings (default 1)

The Renewer renews when 80 % of the certificate's lifetime has passed (minus a little jitter), first over
the hub's $iothub/credentials API, then over DPS; the Device reconnects with the new certificate without
losing a reading. Its state file sits next to the certificate (CERT.renewal.json, mode 0600).
"""
import asyncio
import json
import os
import time

from lightclient import aio, keys, renewal
from lightclient.identity import Identity


def utc(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


async def main() -> None:
    env = os.environ
    identity = Identity(env["IOT_HUB_HOSTNAME"], env["DEVICE_ID"])
    pin = env.get("LIGHTCLIENT_PIN") or (keys.read_pin_file(env["LIGHTCLIENT_PIN_FILE"])
                                         if env.get("LIGHTCLIENT_PIN_FILE") else None)
    ca = env.get("LIGHTCLIENT_CA")
    dps = None
    if env.get("PROVISIONING_IDSCOPE"):
        dps = renewal.DpsRoute(env["PROVISIONING_IDSCOPE"], identity.device_id,
                               env.get("PROVISIONING_HOST", "https://global.azure-devices-provisioning.net"), ca=ca)
    renewer = renewal.Renewer(cert=env["PATH_TO_CERTIFICATE_FILE"], key=env["KEY_IDENTIFIER"], pin=pin,
                              device_id=identity.device_id, ca=ca, dps=dps,
                              on_failure=lambda error: print(f"renewal failed: {error}", flush=True))

    def make_device(ssl_context):
        return aio.Device(identity, ssl_context, host=env.get("LIGHTCLIENT_CONNECT_HOST"),
                          port=int(env.get("LIGHTCLIENT_PORT", "8883")))

    # Finishes (or rolls back) a renewal a crash interrupted, then connects and attaches the Device.
    device = await renewer.connect_device_async(make_device)

    async def renewed(validity: renewal.Validity) -> None:   # runs on this loop after the swap
        print(f"certificate renewed: valid until {utc(validity.not_after)}", flush=True)

    device.on_certificate_renewed = renewed
    print(f"connected as {identity.client_id}; certificate valid until {utc(renewer.validity().not_after)}, "
          f"renewal due {utc(renewer.renew_at())}", flush=True)
    renewer.start()   # its own thread: token, DPS and files there, the Device's swap on this loop
    try:
        if env.get("LIGHTCLIENT_RENEW_NOW") == "1":
            await asyncio.to_thread(renewer.renew, "hub")   # blocking work: never on the loop itself
        loop = asyncio.get_running_loop()
        deadline = loop.time() + float(env.get("LIGHTCLIENT_RUN_SECONDS", "60"))
        interval = float(env.get("LIGHTCLIENT_INTERVAL", "1"))
        sent = 0
        while loop.time() < deadline:
            sent += 1
            await device.send(json.dumps({"seq": sent}), content_type="application/json")
            await asyncio.sleep(interval)
        print(f"sent and acknowledged {sent} readings", flush=True)
    finally:
        await asyncio.to_thread(renewer.stop)   # joins the renewal thread, which may be waiting for this loop
        await device.close()
    print("done", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
