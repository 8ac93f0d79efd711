"""A device process with a durable outbox, for test_reliability's SIGKILL test.

usage: python -m tests.integration.outbox_child PORT CA CERT KEY_URI DEVICE_ID OUTBOX COUNT
The PIN comes on stdin (never in argv or the environment). With COUNT > 0 it sends messages
b"0" … b"COUNT-1", printing ``accepted N`` once send() returned for message N (so it is in the outbox),
and then keeps running until killed. With COUNT 0 it only drains what the outbox holds, prints
``recovered N`` and ``drained`` once the hub acknowledged everything, and exits 0.
"""
import sys
import time

from lightclient import keys, tls
from lightclient.backoff import Backoff
from lightclient.device import Device
from lightclient.identity import Identity


def main(argv):
    port, ca, cert, uri, device_id, outbox, count = argv
    pin = sys.stdin.readline().rstrip("\n")
    context = tls.client_context(cert=cert, key=keys.load_key(uri, pin=pin), ca=ca)
    del pin
    device = Device(Identity("localhost", device_id), context, port=int(port), outbox=outbox,
                    backoff=Backoff(initial=0.05, maximum=0.3), max_inflight=10)
    print(f"recovered {len(device.recovered)}", flush=True)
    device.connect(timeout=10)
    if int(count) == 0:
        deadline = time.monotonic() + 30
        while device.queued and time.monotonic() < deadline:
            time.sleep(0.02)
        left = device.queued
        device.close(timeout=5)
        print("drained" if not left else f"{left} left", flush=True)
        return 0 if not left else 1
    for i in range(int(count)):
        device.send(b"%d" % i)
        print(f"accepted {i}", flush=True)
    time.sleep(60)  # waits for SIGKILL
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
