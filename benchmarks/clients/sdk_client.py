"""Child process for azure-iot-device 2.x measurements; runs in the SDK's own virtual environment
(benchmarks/.work/sdk-venv: the SDK pins paho-mqtt < 2, lightclient needs paho-mqtt 2).

Reads one JSON spec on stdin, prints one JSON object. The SDK authenticates with
``X509(cert_file, key_file)`` only: it cannot use a key in a token or TPM, so it gets a file key whose
certificate comes from the same test CA. The SDK always connects to port 8883; the only change made to
it here points paho's connect() at the lab broker's port instead.

Tasks: ``throughput`` (the asyncio client, every send_message() started at once so that paho's
in-flight window of 20 is always full: the most favourable way to drive it) and ``rss`` (the
synchronous client, as in the SDK's samples: connect, 100 messages, disconnect).
"""
import json
import os
import sys
import time

spec = json.load(sys.stdin)
PAYLOAD = bytes(range(256))


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


def throughput():
    import asyncio

    from azure.iot.device import Message
    from azure.iot.device import aio

    async def run():
        client = _client(aio)
        await client.connect()
        try:
            if spec.get("warmup"):
                await asyncio.gather(*(client.send_message(_message(Message)) for _ in range(spec["warmup"])))
            start, cpu = time.perf_counter(), time.process_time()
            await asyncio.gather(*(client.send_message(_message(Message)) for _ in range(spec["count"])))
            return time.perf_counter() - start, time.process_time() - cpu
        finally:
            await client.shutdown()

    seconds, cpu = asyncio.run(run())
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
