"""Child process for azure-iot-device 2.x measurements; runs in the SDK's own virtual environment
(benchmarks/.work/sdk-venv: the SDK pins paho-mqtt < 2, lightclient needs paho-mqtt 2).

Reads one JSON spec on stdin, prints one JSON object. The SDK authenticates with
``X509(cert_file, key_file)`` only: it cannot use a key in a token or TPM, so it gets a file key whose
certificate comes from the same test CA. The SDK always connects to port 8883; the only change made to
it here points paho's connect() at the lab broker's port instead.

Tasks: ``throughput`` with ``driver``:
- ``threads``: the synchronous client (``IoTHubDeviceClient``, as in the SDK's samples), ``send_message``
  called from ``workers`` threads at once (each call blocks until its PUBACK, so ``workers`` are in flight);
- ``asyncio``: the asyncio client (``azure.iot.device.aio``), ``workers`` coroutines each awaiting
  ``send_message`` in turn (the same number in flight; starting every send at once was slower);
and ``rss`` (the synchronous client, as in the SDK's samples: connect, 100 messages, disconnect).
The SDK always uses TLS 1.2 (it sets it itself).
"""
import json
import os
import sys
import time

spec = json.load(sys.stdin)
SIZE = spec.get("size", 256)
PAYLOAD = bytes(i & 0xFF for i in range(SIZE)) if SIZE <= 256 else os.urandom(SIZE)


def _redirect_port():
    import paho.mqtt.client as mqtt

    original = mqtt.Client.connect

    def connect(self, host, port=1883, *args, **kwargs):
        return original(self, host, spec["port"] if port == 8883 else port, *args, **kwargs)

    mqtt.Client.connect = connect


def _client(module):
    from azure.iot.device import X509

    with open(spec["ca"]) as fh:
        ca_pem = fh.read()
    return module.IoTHubDeviceClient.create_from_x509_certificate(
        x509=X509(spec["cert"], spec["key"]), hostname="localhost", device_id=f"bench-sdk-{os.getpid()}",
        server_verification_cert=ca_pem)


def _message(Message):
    msg = Message(PAYLOAD)
    msg.custom_properties["sensor"] = "bench"
    return msg


def _shares(n, workers):
    return [n // workers + (1 if i < n % workers else 0) for i in range(workers)]


def throughput_threads():
    import threading

    import azure.iot.device as sdk

    client = _client(sdk)
    client.connect()
    workers = spec.get("workers", 20)
    try:
        def run(n):
            def worker(k):
                for _ in range(k):
                    client.send_message(_message(sdk.Message))

            threads = [threading.Thread(target=worker, args=(k,)) for k in _shares(n, workers)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

        if spec.get("warmup"):
            run(spec["warmup"])
        start, cpu = time.perf_counter(), time.process_time()
        run(spec["count"])
        return time.perf_counter() - start, time.process_time() - cpu
    finally:
        client.shutdown()


def throughput_asyncio():
    import asyncio

    from azure.iot.device import Message
    from azure.iot.device import aio

    workers = spec.get("workers", 20)

    async def main():
        client = _client(aio)
        await client.connect()

        async def run(n):
            async def worker(k):
                for _ in range(k):
                    await client.send_message(_message(Message))

            await asyncio.gather(*(worker(k) for k in _shares(n, workers)))

        try:
            if spec.get("warmup"):
                await run(spec["warmup"])
            start, cpu = time.perf_counter(), time.process_time()
            await run(spec["count"])
            return time.perf_counter() - start, time.process_time() - cpu
        finally:
            await client.shutdown()

    return asyncio.run(main())


def throughput():
    seconds, cpu = (throughput_threads if spec.get("driver") == "threads" else throughput_asyncio)()
    return {"rate": spec["count"] / seconds, "cpu_us": cpu / spec["count"] * 1e6, "seconds": seconds}


def rss():
    import azure.iot.device as sdk

    client = _client(sdk)
    client.connect()
    for _ in range(spec.get("count", 100)):
        client.send_message(_message(sdk.Message))
    client.shutdown()
    import resource

    return {"maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "requests": "requests" in sys.modules,
            "modules": len(sys.modules)}


if __name__ == "__main__":
    _redirect_port()
    print(json.dumps({"throughput": throughput, "rss": rss}[spec["task"]]()))
