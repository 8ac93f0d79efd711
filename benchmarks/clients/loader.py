"""Child process: a load generator for the emulator, on asyncio with raw MQTT 3.1.1 packets (encoded
by lightclient.emulator.codec), so that one process can hold thousands of TLS connections.

Spec (JSON on stdin): {"port", "ca", "cert", "key", "devices", "concurrency", "hold",
"phases": [{"publishers": P, "window": W, "seconds": T}, ...]}. Connects ``devices`` devices (at
most ``concurrency`` handshakes at a time), holds them for ``hold`` seconds, checks each with a
PINGREQ, then for each phase lets P of them publish QoS 1 telemetry (256 bytes, one property) with W
in flight for T seconds while all stay connected, and counts PUBACKs. Prints one JSON object.
"""
import asyncio
import json
import resource
import ssl
import sys
import time

from lightclient.emulator import codec

PAYLOAD = bytes(range(256))
API = "2021-04-12"


async def read_packet(reader):
    first = (await reader.readexactly(1))[0]
    length, shift = 0, 0
    while True:
        byte = (await reader.readexactly(1))[0]
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    return first >> 4, await reader.readexactly(length)


class Device:
    def __init__(self, i):
        self.id = f"dev-{i}"
        self.reader = self.writer = None

    async def connect(self, ctx, port):
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx,
                                                                 server_hostname="localhost")
        self.writer.write(codec.encode(codec.Connect(self.id, clean_session=True, keep_alive=600,
                                                     username=f"localhost/{self.id}/?api-version={API}")))
        kind, body = await asyncio.wait_for(read_packet(self.reader), 30)
        if kind != 2 or body[1] != 0:
            raise ConnectionError(f"{self.id}: CONNACK {body!r}")

    async def ping(self):
        self.writer.write(codec.encode(codec.Pingreq()))
        kind, _ = await asyncio.wait_for(read_packet(self.reader), 30)
        return kind == 13

    async def publish(self, window, stop, counter):
        topic = f"devices/{self.id}/messages/events/sensor=bench"
        slots = asyncio.Semaphore(window)
        inflight = set()

        async def acks():
            while True:
                kind, body = await read_packet(self.reader)
                if kind == 4:
                    pid = int.from_bytes(body[:2], "big")
                    if pid in inflight:
                        inflight.discard(pid)
                        counter[0] += 1
                        slots.release()

        reader = asyncio.ensure_future(acks())
        pid = 0
        try:
            while not stop.is_set():
                await slots.acquire()
                pid = pid % 65535 + 1
                inflight.add(pid)
                self.writer.write(codec.encode(codec.Publish(topic, PAYLOAD, qos=1, packet_id=pid)))
                await self.writer.drain()
            deadline = time.monotonic() + 10
            while inflight and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        finally:
            reader.cancel()


async def main(spec):
    ctx = ssl.create_default_context(cafile=spec["ca"])
    ctx.load_cert_chain(spec["cert"], spec["key"])
    devices = [Device(i) for i in range(spec["devices"])]
    gate = asyncio.Semaphore(spec.get("concurrency", 50))
    failures = []

    async def connect(dev):
        async with gate:
            try:
                await dev.connect(ctx, spec["port"])
            except (OSError, ConnectionError, asyncio.TimeoutError, asyncio.IncompleteReadError) as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
                dev.writer = None

    cpu0 = time.process_time()
    t0 = time.perf_counter()
    await asyncio.gather(*(connect(d) for d in devices))
    connect_s = time.perf_counter() - t0
    connected = [d for d in devices if d.writer is not None]
    await asyncio.sleep(spec.get("hold", 2))
    alive = sum(await asyncio.gather(*(d.ping() for d in connected), return_exceptions=False))
    out = {"devices": spec["devices"], "connected": len(connected), "failures": failures[:5],
           "failed": len(failures), "connect_seconds": connect_s, "alive_after_hold": alive, "phases": []}
    for phase in spec.get("phases", []):
        publishers = connected[:phase["publishers"]]
        stop, counter = asyncio.Event(), [0]
        tasks = [asyncio.ensure_future(d.publish(phase["window"], stop, counter)) for d in publishers]
        await asyncio.sleep(phase.get("warmup", 0.5))
        c0, t1, cpu1 = counter[0], time.perf_counter(), time.process_time()
        await asyncio.sleep(phase["seconds"])
        acked, elapsed = counter[0] - c0, time.perf_counter() - t1
        cpu = time.process_time() - cpu1
        stop.set()
        await asyncio.gather(*tasks)
        alive = sum(await asyncio.gather(*(d.ping() for d in connected)))
        out["phases"].append({**phase, "acked": acked, "seconds_measured": elapsed, "rate": acked / elapsed,
                              "loader_cpu_share": cpu / elapsed, "alive_after": alive})
    for d in connected:
        d.writer.write(codec.encode(codec.Disconnect()))
        d.writer.close()
    out["loader_cpu_s"] = time.process_time() - cpu0
    out["loader_maxrss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return out


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(json.load(sys.stdin)))))
