"""Telemetry throughput: Device.send vs raw paho, same broker, same key, same in-flight window, one run.

Both send N QoS 1 messages (256-byte payload, one application property) over TLS to a local mosquitto
that requires client certificates; the client key is in SoftHSM (it signs only the handshakes). The time
runs from the first publish to the last PUBACK. Rounds alternate between the two (and which goes first)
so drift in the machine hits both; the median round counts. Target: Device >= 0.9 x raw paho.

The process is GIL-bound (paho's network thread and the sending thread share one core's worth of
Python), so the CPU time per message is printed too: it is much less sensitive than msg/s to other
load on a shared machine.

    python benchmarks/telemetry.py [--count 5000] [--window 20] [--rounds 5]

Not part of the test run.
"""
import argparse
import base64
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt

from lightclient import _native, keys, lab, tls, topics
from lightclient.device import Device
from lightclient.identity import Identity

PIN = "bench-pin"
PAYLOAD = bytes(range(256))
PROPERTIES = {"sensor": "bench"}


def lab_setup(root: Path):
    """A SoftHSM EC key, its certificate from a test CA, and a context; returns (ca, context)."""
    hsm = lab.SoftHSM(root / "softhsm")
    hsm.init_token("bench", PIN, "so-" + PIN)
    info = hsm.keygen("bench", PIN, "bench-key", "ec-p256")
    hsm.activate()
    key = keys.load_key(f"{info['uri']}?module-path={hsm.module_path}", pin=PIN)
    der = _native.sign_csr(key, [("CN", "bench-device")])
    ca = lab.TestCA(root / "ca")
    cert = ca.sign_csr(b"-----BEGIN CERTIFICATE REQUEST-----\n" + base64.encodebytes(der)
                       + b"-----END CERTIFICATE REQUEST-----\n", root / "bench-device.pem")
    return ca, tls.client_context(cert=cert, key=key, ca=ca.cert)


def run_device(context, port: int, count: int, window: int) -> "tuple[float, float]":
    """(messages per second, CPU microseconds per message) for Device.send."""
    identity = Identity("localhost", f"bench-{uuid.uuid4().hex[:6]}")
    with Device(identity, context, port=port, max_inflight=window) as device:
        start, cpu = time.perf_counter(), time.process_time()
        handles = [device.send(PAYLOAD, PROPERTIES) for _ in range(count)]
        for handle in handles:
            handle.wait(60)
        return count / (time.perf_counter() - start), (time.process_time() - cpu) / count * 1e6


def run_paho(context, port: int, count: int, window: int) -> "tuple[float, float]":
    identity = Identity("localhost", f"bench-{uuid.uuid4().hex[:6]}")
    # What a careful raw-paho app does: the topic computed once, the same window, waiting for PUBACKs.
    topic = topics.telemetry_topic(identity, PROPERTIES)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=identity.client_id, protocol=mqtt.MQTTv311,
                         clean_session=False)
    client.tls_set_context(context)
    client.max_inflight_messages_set(window)
    client.connect("localhost", port)
    client.loop_start()
    try:
        start, cpu = time.perf_counter(), time.process_time()
        infos = [client.publish(topic, PAYLOAD, qos=1) for _ in range(count)]
        for info in infos:
            info.wait_for_publish(60)
        return count / (time.perf_counter() - start), (time.process_time() - cpu) / count * 1e6
    finally:
        client.disconnect()
        client.loop_stop()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=5000, help="messages per round (default 5000)")
    parser.add_argument("--window", type=int, default=20, help="QoS 1 messages in flight (default 20)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per client, alternating (default 5)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lightclient-bench-") as tmp:
        ca, context = lab_setup(Path(tmp))
        with lab.Mosquitto(Path(tmp) / "mosquitto", ca) as broker:
            run_paho(context, broker.port, min(500, args.count), args.window)  # warm-up: TLS, broker, caches
            runners = {"Device.send": run_device, "raw paho": run_paho}
            results = {name: [] for name in runners}
            for i in range(args.rounds):
                for name in (list(runners) if i % 2 == 0 else list(reversed(runners))):
                    results[name].append(runners[name](context, broker.port, args.count, args.window))
    print(f"{args.count} QoS 1 messages x {args.rounds} rounds, 256-byte payload, 1 property, window {args.window}, "
          "TLS to local mosquitto, key in SoftHSM")
    rate, cpu = {}, {}
    for name, runs in results.items():
        rate[name] = statistics.median(r for r, _ in runs)
        cpu[name] = statistics.median(c for _, c in runs)
        print(f"  {name:12s} {rate[name]:7.0f} msg/s  {cpu[name]:6.1f} CPU us/msg  "
              f"(median; rounds: {', '.join(f'{r:.0f}' for r, _ in runs)} msg/s)")
    ratio = rate["Device.send"] / rate["raw paho"]
    print(f"  ratio Device/raw paho: {ratio:.2f} msg/s (target >= 0.90) {'OK' if ratio >= 0.9 else 'BELOW TARGET'}; "
          f"CPU per message {cpu['Device.send'] / cpu['raw paho']:.2f}x raw paho")
    return 0


if __name__ == "__main__":
    sys.exit(main())
