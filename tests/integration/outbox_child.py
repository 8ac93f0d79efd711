"""A device process with a durable outbox, for test_reliability's SIGKILL test.

usage: python -m tests.integration.outbox_child PORT CA CERT KEY_URI DEVICE_ID OUTBOX COUNT [MODE]
The PIN comes on stdin (never in argv or the environment). With COUNT > 0 it sends messages
b"0" … b"COUNT-1", printing ``accepted N`` once send() returned for every message up to N (so they are
in the outbox), and then keeps running until killed. MODE ``send`` (default) sends them one by one,
``threads`` from 4 threads at once (their sends share group commits), ``many`` with send_many() in
batches of 25. LIGHTCLIENT_TEST_STOCK_PAHO=1 keeps paho's stock PUBACK handling, as in the test run. With COUNT 0 it only drains what the outbox holds, prints
``recovered N`` and ``drained`` once the hub acknowledged everything, and exits 0.
"""
import os
import sys
import threading
import time

from lightclient import _fastpath, keys, tls
from lightclient.backoff import Backoff
from lightclient.device import Device
from lightclient.identity import Identity


def main(argv):
    port, ca, cert, uri, device_id, outbox, count = argv[:7]
    mode = argv[7] if len(argv) > 7 else "send"
    if os.environ.get("LIGHTCLIENT_TEST_STOCK_PAHO") == "1":
        _fastpath.enabled = False
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
    count = int(count)
    if mode == "many":
        for start in range(0, count, 25):
            device.send_many([b"%d" % i for i in range(start, min(start + 25, count))])
            print(f"accepted {min(start + 25, count) - 1}", flush=True)
    elif mode == "threads":
        lock = threading.Lock()
        state = {"next": 0, "frontier": -1, "done": set()}

        def sender():
            while True:
                with lock:
                    i = state["next"]
                    state["next"] += 1
                if i >= count:
                    return
                device.send(b"%d" % i)
                with lock:  # "accepted N" once every message up to N is in the outbox
                    state["done"].add(i)
                    while state["frontier"] + 1 in state["done"]:
                        state["frontier"] += 1
                        state["done"].discard(state["frontier"])
                        print(f"accepted {state['frontier']}", flush=True)

        for _ in range(4):
            threading.Thread(target=sender, daemon=True).start()
    else:
        for i in range(count):
            device.send(b"%d" % i)
            print(f"accepted {i}", flush=True)
    time.sleep(60)  # waits for SIGKILL
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
