"""Child process for lightclient and raw paho measurements (runs in the project's virtual environment).

Reads one JSON spec on stdin (it may carry the lab PIN, which never appears in argv) and prints one
JSON object. Tasks: csr, throughput, rss, connect, provision. ``client`` is ``lightclient`` (Device)
or ``paho`` (a raw paho client with the same window). ``key`` is a key reference for lightclient
(pkcs11: URI, handle:, a TSS2 or PEM file); raw paho with a plain PEM key loads it with the ssl module
so that the process never imports lightclient.
"""
import json
import os
import ssl
import sys
import time

# Only what every task needs is imported here: the rss task measures what a client imports itself.
spec = json.load(sys.stdin)
task = spec["task"]

PAYLOAD = bytes(range(256))
PROPERTIES = {"sensor": "bench"}


def lc_context():
    from lightclient import tls

    version = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}.get(spec.get("tls"))
    return tls.client_context(cert=spec["cert"], key=spec["key"], pin=spec.get("pin"), ca=spec["ca"],
                              minimum_version=version or ssl.TLSVersion.TLSv1_2, maximum_version=version)


def plain_context():
    ctx = ssl.create_default_context(cafile=spec["ca"])
    ctx.load_cert_chain(spec["cert"], spec["key"])
    return ctx


def device(ctx, client_id, **kwargs):
    from lightclient.device import Device
    from lightclient.identity import Identity

    return Device(Identity("localhost", client_id), ctx, port=spec["port"], max_inflight=spec.get("window", 20),
                  **kwargs)


def paho_client(ctx, client_id):
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311,
                         clean_session=False)
    client.tls_set_context(ctx)
    client.max_inflight_messages_set(spec.get("window", 20))
    return client


def payload():
    size = spec.get("size", 256)
    return bytes(i & 0xFF for i in range(size)) if size <= 256 else os.urandom(size)


def send_lightclient(ctx, count, warmup):
    """(seconds, CPU seconds) for ``count`` messages after ``warmup`` untimed ones.

    ``mode``: ``send`` (one send() per message, then wait_all()), ``send_many`` (batches of ``batch``),
    ``threads`` (``threads`` threads each calling send() for its share). ``outbox``: a file path."""
    from lightclient import _fastpath

    if spec.get("stock_paho"):
        _fastpath.enabled = False
    mode, batch, body = spec.get("mode", "send"), spec.get("batch", 100), payload()
    outbox = spec.get("outbox")
    # Room for the whole run (raw paho's queue is unbounded): the sender outruns the network.
    kwargs = {"outbox": outbox, "max_queue": max(count, 10000) + warmup, "max_queue_bytes": 2 ** 40}
    if not outbox:
        del kwargs["outbox"]
    with device(ctx, f"bench-lc-{os.getpid()}", **kwargs) as dev:
        def run(n):
            if mode == "send_many":
                handles = []
                for start in range(0, n, batch):
                    handles += dev.send_many([body] * min(batch, n - start), PROPERTIES)
            elif mode == "threads":
                import threading

                handles, parts = [], []

                def sender(k):
                    mine = [dev.send(body, PROPERTIES) for _ in range(k)]
                    parts.append(mine)

                share = [n // spec["threads"] + (1 if i < n % spec["threads"] else 0) for i in range(spec["threads"])]
                threads = [threading.Thread(target=sender, args=(k,)) for k in share]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                handles = [h for part in parts for h in part]
            else:
                handles = [dev.send(body, PROPERTIES) for _ in range(n)]
            dev.wait_all(handles, timeout=120)

        run(warmup)
        start, cpu = time.perf_counter(), time.process_time()
        run(count)
        return time.perf_counter() - start, time.process_time() - cpu


def send_aio(ctx, count, warmup):
    """As send_lightclient, with lightclient.aio.Device on an asyncio loop (every send accepted, then awaited)."""
    import asyncio

    from lightclient import aio
    from lightclient.identity import Identity

    async def run():
        # Room for the whole run, as for the sync Device (raw paho's queue is unbounded).
        dev = aio.Device(Identity("localhost", f"bench-aio-{os.getpid()}"), ctx, port=spec["port"],
                         max_inflight=spec.get("window", 20), max_queue=max(count, 10000) + warmup,
                         max_queue_bytes=2 ** 40)
        async with dev:
            await asyncio.gather(*[dev.send(PAYLOAD, PROPERTIES) for _ in range(warmup)])
            start, cpu = time.perf_counter(), time.process_time()
            await asyncio.gather(*[dev.send(PAYLOAD, PROPERTIES) for _ in range(count)])
            return time.perf_counter() - start, time.process_time() - cpu

    return asyncio.run(run())


def send_paho(ctx, count, warmup, client_id="bench-paho"):
    # What a careful raw-paho app does: the topic computed once, the same window, waiting for PUBACKs.
    topic = f"devices/{client_id}/messages/events/sensor=bench"
    body = payload()
    client = paho_client(ctx, client_id)
    client.connect("localhost", spec["port"])
    client.loop_start()
    try:
        for info in [client.publish(topic, body, qos=1) for _ in range(warmup)]:
            info.wait_for_publish(60)
        start, cpu = time.perf_counter(), time.process_time()
        infos = [client.publish(topic, body, qos=1) for _ in range(count)]
        for info in infos:
            info.wait_for_publish(120)
            if not info.is_published():
                raise RuntimeError("paho: a message was not acknowledged within 120 s")
        return time.perf_counter() - start, time.process_time() - cpu
    finally:
        client.disconnect()
        client.loop_stop()


def queue_memory(count, size):
    """Bytes per message queued in an offline Device (tracemalloc), with and without the payload object."""
    import ssl as _ssl
    import tracemalloc

    from lightclient.device import Device
    from lightclient.identity import Identity

    dev = Device(Identity("localhost", "bench-queue"), _ssl.create_default_context(), max_queue=count + 1,
                 max_queue_bytes=2 ** 40)
    body = bytes(size)
    dev.send(body, PROPERTIES)  # caches the topic form
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for _ in range(count):
        dev.send(bytes(bytearray(body)), PROPERTIES)  # a new payload object per message, as an app would have
    total = (tracemalloc.get_traced_memory()[0] - before) / count
    tracemalloc.stop()
    return {"bytes_per_message": total, "payload_object": sys.getsizeof(body),
            "overhead_per_message": total - sys.getsizeof(body), "queued": dev.queued}


def profile_send(ctx, count):
    """cProfile of every thread while ``count`` messages are sent: the top functions by own time."""
    import cProfile
    import io
    import pstats
    import threading

    profiles = []

    def trace(*args):
        profile = cProfile.Profile()
        profiles.append(profile)
        profile.enable()
        return None

    threading.setprofile(trace)  # each thread started from now on profiles itself
    main = cProfile.Profile()
    main.enable()
    seconds, cpu = send_lightclient(ctx, count, spec.get("warmup", 0))
    main.disable()
    threading.setprofile(None)
    for p in profiles:
        p.disable()
    stats = pstats.Stats(main)
    for p in profiles:
        stats.add(p)
    out = io.StringIO()
    stats.stream = out
    stats.sort_stats("tottime").print_stats(spec.get("top", 18))
    lines = [line for line in out.getvalue().splitlines() if line.strip()]
    start = next(i for i, line in enumerate(lines) if "ncalls" in line)
    return {"rate": count / seconds, "profile": lines[start:start + 1 + spec.get("top", 18)]}


def handshake_ms(ctx, port):
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        t0 = time.perf_counter()
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls_sock:
            ms = (time.perf_counter() - t0) * 1000
            return ms, tls_sock.version()


def paho_connack_ms(ctx, i):
    """Raw paho: connect() until CONNACK (on_connect), the same TLS context."""
    import threading

    done = threading.Event()
    client = paho_client(ctx, f"bench-paho-connect-{os.getpid()}-{i}")
    client.on_connect = lambda *args: done.set()
    t0 = time.perf_counter()
    client.connect("localhost", spec["port"])
    client.loop_start()
    if not done.wait(30):
        raise RuntimeError("raw paho: no CONNACK within 30 s")
    ms = (time.perf_counter() - t0) * 1000
    client.disconnect()
    client.loop_stop()
    return ms


def connect_ms(ctx, i):
    dev = device(ctx, f"bench-connect-{os.getpid()}-{i}")
    t0 = time.perf_counter()
    dev.connect(timeout=30)
    ms = (time.perf_counter() - t0) * 1000
    dev.disconnect(timeout=1)
    return ms


def main():
    if task == "csr":
        from lightclient import keys

        key = keys.load_key(spec["key"], pin=spec.get("pin"))
        return {"csr": keys.csr_pem(keys.sign_csr(key, spec["cn"])).decode()}

    if task == "queue_memory":
        return queue_memory(spec["count"], spec.get("size", 16))

    if task == "profile":
        return profile_send(lc_context(), spec["count"])

    if task == "throughput":
        ctx = lc_context()
        fn = {"lightclient": send_lightclient, "aio": send_aio}.get(spec["client"], send_paho)
        seconds, cpu = fn(ctx, spec["count"], spec.get("warmup", 0))
        return {"rate": spec["count"] / seconds, "cpu_us": cpu / spec["count"] * 1e6, "seconds": seconds}

    if task == "rss":
        # Connect, send 100 QoS 1 messages, disconnect; the peak RSS of the whole process.
        count = spec.get("count", 100)
        if spec["client"] == "paho":
            ctx = plain_context()
            seconds, _ = send_paho(ctx, count, 0)
        else:
            ctx = lc_context()
            with device(ctx, f"bench-rss-{time.time_ns()}") as dev:
                dev.wait_all([dev.send(PAYLOAD, PROPERTIES) for _ in range(count)], timeout=60)
        import resource
        return {"maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                "requests": "requests" in sys.modules, "modules": len(sys.modules)}

    if task == "connect":
        ctx = lc_context()
        handshake_ms(ctx, spec["port"])  # warm-up: first use of the key in this process, lazy imports
        hs, conn, paho, version = [], [], [], None
        for i in range(spec.get("rounds", 3)):
            # Against the benchmark's handshake timer (it times the server side, as for s_client).
            ms, version = handshake_ms(ctx, spec["hs_port"])
            hs.append(ms)
            if i % 2:
                paho.append(paho_connack_ms(ctx, i))
                conn.append(connect_ms(ctx, i))
            else:
                conn.append(connect_ms(ctx, i))
                paho.append(paho_connack_ms(ctx, i))
        return {"handshake_ms": hs, "connect_ms": conn, "paho_connack_ms": paho, "version": version}

    if task == "provision":
        return provision()
    raise SystemExit(f"unknown task {task!r}")


def provision():
    """``count`` DPS registrations; each one's wall time and the Retry-After waits in it."""
    import time as _time

    walls, waits = [], []
    if spec["client"] == "lightclient":
        from lightclient import dps, tls

        ctx = tls.https_context(cert=spec["cert"], key=spec["key"], pin=spec.get("pin"), ca=spec["ca"])
        for _ in range(spec["count"]):
            slept = []

            def sleep(seconds):
                slept.append(seconds)
                _time.sleep(seconds)

            t0 = _time.perf_counter()
            reg = dps.provision(spec["scope"], spec["cn"], ssl_context=ctx, endpoint=spec["endpoint"],
                                poll_interval=(0.05, 60), timeout=60, sleep=sleep)
            walls.append((_time.perf_counter() - t0) * 1000)
            waits.append(sum(slept) * 1000)
            assert reg.status == "assigned", reg
        return {"wall_ms": walls, "wait_ms": waits, "requests": "requests" in sys.modules}
    # The naive script: plain requests calls, the key from a file, a new connection for every request.
    import requests

    base = f"https://{spec['endpoint']}/{spec['scope']}/registrations/{spec['cn']}"
    kw = {"cert": (spec["cert"], spec["key"]), "verify": spec["ca"], "timeout": 30,
          "headers": {"Content-Type": "application/json; charset=utf-8", "Accept": "application/json"}}
    for _ in range(spec["count"]):
        t0, slept = _time.perf_counter(), 0.0
        resp = requests.put(f"{base}/register?api-version=2021-10-01", data=json.dumps({"registrationId": spec["cn"]}), **kw)
        body = resp.json()
        while body.get("status") == "assigning":
            delay = max(0.05, float(resp.headers.get("Retry-After", 2)))
            slept += delay
            _time.sleep(delay)
            resp = requests.get(f"{base}/operations/{body['operationId']}?api-version=2021-10-01", **kw)
            body = resp.json()
        walls.append((_time.perf_counter() - t0) * 1000)
        waits.append(slept * 1000)
        assert body.get("status") == "assigned", body
    return {"wall_ms": walls, "wait_ms": waits}


if __name__ == "__main__":
    print(json.dumps(main()))
