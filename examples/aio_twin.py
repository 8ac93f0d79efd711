"""The device twin with lightclient.aio: read it, report properties, and react to desired-property changes.

Configuration comes from the environment (the library itself never reads it):

    IOT_HUB_HOSTNAME          myhub.azure-devices.net
    DEVICE_ID                 the device id (= the certificate's CN)
    PATH_TO_CERTIFICATE_FILE  device certificate chain (PEM), leaf first
    KEY_IDENTIFIER            key reference, e.g. "pkcs11:token=dev;object=devkey?module-path=/usr/lib/softhsm/libsofthsm2.so"
    LIGHTCLIENT_PIN_FILE      file holding the token PIN (optional; LIGHTCLIENT_PIN works too, but lands in your shell history)
    LIGHTCLIENT_CA            trusted CA for the server (optional; default: the bundled IoT Hub roots)
    LIGHTCLIENT_CONNECT_HOST  connect here instead of IOT_HUB_HOSTNAME, e.g. 127.0.0.1 for the emulator (optional)
    LIGHTCLIENT_PORT          default 8883
    LIGHTCLIENT_RUN_SECONDS   how long to listen for desired changes (default 300; Ctrl-C stops earlier)
    LIGHTCLIENT_COUNT         stop after this many desired-property changes (optional)

Change a desired property with ``az iot hub device-twin update --hub-name myhub --device-id dev1
--desired '{"interval": 10}'`` (emulator, ``--http-port 8080``: ``curl -X PATCH
http://127.0.0.1:8080/twins/dev1 -d '{"properties": {"desired": {"interval": 10}}}'``); the device applies it
and reports the value it now uses.
"""
import asyncio
import os

from lightclient import aio, tls
from lightclient.identity import Identity


async def follow(device: aio.Device, settings: dict, limit, changes: list) -> None:
    # In $version order, each patch with its "$version". The first is the whole desired document (if it
    # holds anything); after a reconnect, what changed while offline arrives as one patch.
    async for patch in device.desired():
        version = patch["$version"]
        print(f"desired change $version={version}: {patch}", flush=True)
        applied = {key: patch[key] for key in settings if key in patch and patch[key] is not None}
        settings.update(applied)
        if applied:
            reported_version = await device.patch_reported(applied, timeout=30)  # report what is now in effect
            print(f"applied and reported {applied} (reported $version {reported_version})", flush=True)
        changes.append(version)
        if limit is not None and len(changes) >= limit:
            return


async def main() -> None:
    env = os.environ
    identity = Identity(env["IOT_HUB_HOSTNAME"], env["DEVICE_ID"])
    context = tls.client_context(cert=env["PATH_TO_CERTIFICATE_FILE"], key=env["KEY_IDENTIFIER"],
                                 ca=env.get("LIGHTCLIENT_CA"), pin=env.get("LIGHTCLIENT_PIN"),
                                 pin_file=env.get("LIGHTCLIENT_PIN_FILE"))
    limit = int(env["LIGHTCLIENT_COUNT"]) if env.get("LIGHTCLIENT_COUNT") else None
    settings, changes = {"interval": 60}, []
    async with aio.Device(identity, context, host=env.get("LIGHTCLIENT_CONNECT_HOST"),
                          port=int(env.get("LIGHTCLIENT_PORT", "8883"))) as device:
        twin = await device.get_twin(timeout=30)
        print(f"twin desired={twin['desired']} reported={twin['reported']}", flush=True)
        version = await device.patch_reported({"firmware": "1.0.0", "interval": settings["interval"]}, timeout=30)
        print(f"reported firmware and interval (reported $version {version}); waiting for desired changes", flush=True)
        try:
            await asyncio.wait_for(follow(device, settings, limit, changes),
                                   float(env.get("LIGHTCLIENT_RUN_SECONDS", "300")))
        except asyncio.TimeoutError:
            pass
    print(f"handled {len(changes)} desired change(s); settings now {settings}", flush=True)


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
