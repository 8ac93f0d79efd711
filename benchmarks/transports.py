"""MQTT over TCP vs MQTT over WebSockets (directly and through tinyproxy), side by side in one run.

    .venv/bin/python benchmarks/transports.py [--messages 5000] [--connects 20]

Against the local emulator (one process, loopback), with a software key, so that only the transport
differs: the same Device, the same hub, the same TLS. Per transport, alternating over rounds:

* connect time: ``Device.connect()`` to connected (TCP [+ proxy CONNECT] + TLS + [WebSocket upgrade] +
  MQTT CONNECT/CONNACK + SUBSCRIBE/SUBACK), median of ``--connects``;
* throughput: ``--messages`` QoS 1 telemetry messages of 64 bytes, from the first send() to the last
  PUBACK, as messages per second.

Ratios are against TCP. Each client is driven the fastest way its documentation allows: ``send()`` in a
loop and one wait on the last handle (``max_inflight=20``, the Device default).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightclient import tls  # noqa: E402
from lightclient.device import Device  # noqa: E402
from lightclient.emulator.service import Emulator  # noqa: E402
from lightclient.identity import Identity  # noqa: E402
from tests import lab  # noqa: E402


def _device(emu, ctx, device_id, transport, proxy):
    return Device(Identity("localhost", device_id), ctx, host="127.0.0.1", port=emu.port,
                  websocket_port=emu.ws_port, transport=transport, proxy=proxy)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--connects", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="lc-bench-transports-"))
    with Emulator(root / "emu", port=0, ws_port=0, max_events=args.messages * 4) as emu:
        with lab.TinyProxy(root / "proxy", connect_ports=[emu.ws_port]) as proxy:
            cases = {"tcp": ("tcp", None), "websockets": ("websockets", None),
                     "websockets via tinyproxy": ("websockets", proxy.url)}
            connect_ms = {name: [] for name in cases}
            rate = {name: [] for name in cases}
            for round_no in range(args.rounds):
                order = list(cases) if round_no % 2 == 0 else list(reversed(cases))
                for name in order:
                    transport, via = cases[name]
                    device_id = f"bench-{uuid.uuid4().hex[:8]}"
                    emu.register_device(device_id)
                    cert, key = emu.issue_certificate(device_id)
                    ctx = tls.client_context(cert=str(cert), key=str(key), ca=emu.ca_path)
                    for _ in range(max(1, args.connects // args.rounds)):
                        dev = _device(emu, ctx, device_id, transport, via)
                        t0 = time.perf_counter()
                        dev.connect()
                        connect_ms[name].append((time.perf_counter() - t0) * 1000)
                        dev.disconnect()
                    with _device(emu, ctx, device_id, transport, via) as dev:
                        body = b"x" * 64
                        t0 = time.perf_counter()
                        handle = None
                        for _ in range(args.messages):
                            handle = dev.send(body)
                        handle.wait(120)
                        dev.send_and_wait(b"end", timeout=60)
                        rate[name].append(args.messages / (time.perf_counter() - t0))
    base_c = statistics.median(connect_ms["tcp"])
    base_r = statistics.median(rate["tcp"])
    print(f"{'transport':<26} {'connect ms (median)':>20} {'ratio':>7} {'msgs/s (median)':>16} {'ratio':>7}")
    for name in cases:
        c, r = statistics.median(connect_ms[name]), statistics.median(rate[name])
        print(f"{name:<26} {c:>20.1f} {c / base_c:>7.2f} {r:>16.0f} {r / base_r:>7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
