"""Print cloud-to-device messages with lightclient.aio (``async for message in device.c2d()``), for a while.

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
    LIGHTCLIENT_COUNT         stop after this many messages (optional)

Send one with ``az iot device c2d-message send --hub-name myhub --device-id dev1 --data hello``, or
against the emulator's service API (``--http-port 8080``; see the README)::

    curl -X POST http://127.0.0.1:8080/devices/dev1/messages/deviceBound -d hello

Messages are buffered from the connect on, so none is missed before the ``async for`` starts; those sent
while the device was offline arrive when it connects (the session is persistent).
"""
import asyncio
import os

from lightclient import aio, tls
from lightclient.identity import Identity


async def receive(device: aio.Device, limit, received: list) -> None:
    async for message in device.c2d():
        received.append(message.payload)
        print(f"C2D #{len(received)}: {message.payload.decode('utf-8', 'replace')!r} "
              f"message_id={message.message_id} content_type={message.content_type} "
              f"properties={dict(message.properties)}", flush=True)
        if limit is not None and len(received) >= limit:
            return


async def main() -> None:
    env = os.environ
    identity = Identity(env["IOT_HUB_HOSTNAME"], env["DEVICE_ID"])
    context = tls.client_context(cert=env["PATH_TO_CERTIFICATE_FILE"], key=env["KEY_IDENTIFIER"],
                                 ca=env.get("LIGHTCLIENT_CA"), pin=env.get("LIGHTCLIENT_PIN"),
                                 pin_file=env.get("LIGHTCLIENT_PIN_FILE"))
    limit = int(env["LIGHTCLIENT_COUNT"]) if env.get("LIGHTCLIENT_COUNT") else None
    received: list = []
    async with aio.Device(identity, context, host=env.get("LIGHTCLIENT_CONNECT_HOST"),
                          port=int(env.get("LIGHTCLIENT_PORT", "8883"))) as device:
        print(f"connected as {identity.client_id}; waiting for cloud-to-device messages", flush=True)
        try:
            await asyncio.wait_for(receive(device, limit, received), float(env.get("LIGHTCLIENT_RUN_SECONDS", "300")))
        except asyncio.TimeoutError:
            pass
    print(f"received {len(received)} message(s)", flush=True)


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
