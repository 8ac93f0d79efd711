"""An asyncio device process with a durable outbox, for test_aio_emulator's SIGKILL test.

usage: python -m tests.integration.aio_outbox_child PORT CA CERT KEY_URI DEVICE_ID OUTBOX COUNT
As outbox_child, with lightclient.aio.Device: the PIN on stdin; COUNT > 0 sends b"0" … and prints
``accepted N`` once send() returned (the message is in the outbox), then waits to be killed; COUNT 0
drains what the outbox holds, prints ``recovered N`` and ``drained``, and exits 0.
"""
import asyncio
import sys

from lightclient import aio, keys, tls
from lightclient.backoff import Backoff
from lightclient.identity import Identity


async def main(argv):
    port, ca, cert, uri, device_id, outbox, count = argv
    pin = sys.stdin.readline().rstrip("\n")
    context = tls.client_context(cert=cert, key=keys.load_key(uri, pin=pin), ca=ca)
    del pin
    device = aio.Device(Identity("localhost", device_id), context, port=int(port), outbox=outbox,
                        backoff=Backoff(initial=0.05, maximum=0.3), max_inflight=10)
    print(f"recovered {len(device.recovered)}", flush=True)
    async with device:
        if int(count) == 0:
            await asyncio.wait_for(asyncio.gather(*device.recovered), 30)
            print("drained" if not device.queued else f"{device.queued} left", flush=True)
            return 0 if not device.queued else 1
        for i in range(int(count)):
            device.send(b"%d" % i)
            print(f"accepted {i}", flush=True)
            if i % 50 == 49:
                await asyncio.sleep(0.01)  # let the loop move acknowledgements along
        await asyncio.sleep(60)  # waits for SIGKILL
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
