"""Telemetry: lightclient Device (sync and asyncio) vs raw paho (same window) vs azure-iot-device 2.x, payload
sizes, the outbox, memory per queued message, and where lightclient's time goes.

Every program sends N QoS 1 messages (one application property) over TLS 1.2 (the SDK forces 1.2, so
all use it for the headline) to a local mosquitto that requires client certificates, in a fresh child
process per round; the time runs from the first send to the last PUBACK, after an untimed warm-up on
the same connection. Rounds interleave the programs (rotated, reversed every other round) so that the
load of a shared machine hits them alike; every figure is the median with the spread (min–max) of the
rounds beside it, and the CPU time per message (the whole process, all threads), which contention
disturbs less than the rate. lightclient and raw paho use the same SoftHSM key (it signs only the
handshake); the SDK needs a key file.

How each is driven (its fastest documented way):
- lightclient: ``Device.send()`` per message, then ``Device.wait_all()`` (the outbox rows use
  ``send_many()`` in batches of 100, or 4 threads calling ``send()``);
- raw paho: ``publish(qos=1)`` per message with the topic built once, then ``wait_for_publish()`` on each;
- azure-iot-device: both the synchronous client with 20 threads calling ``send_message`` (each call
  blocks until its PUBACK) and the asyncio client with 20 coroutines awaiting ``send_message``; the
  faster of the two is the SDK's figure.

Targets: lightclient >= 1.0 x raw paho (msg/s) with CPU/msg <= raw paho's; >= 5 x the SDK; outbox on
(send_many) >= 0.8 x outbox off; <= 250 B per queued message at 100,000 queued.

    python benchmarks/telemetry.py [--smoke]      (same as: python benchmarks/run.py --only telemetry)
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Dict, List

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (WINDOW, WORK, Context, Section, Target, fmt, fmt_ratio, lc_child, median, orders, ratio,
                    sdk_child)

NAME = "telemetry"
TITLE = "Telemetry throughput"
SIZES = [("16 B", 16), ("1 KB", 1024), ("16 KB", 16 * 1024), ("256 KB", 256 * 1024 - 1024)]
SWEEP_BYTES = 256 * 1024 * 1024     # per round at most: the 256 KB row sends fewer messages
OUTBOX_BATCH = 100


def _load() -> float:
    return os.getloadavg()[0]


def _spread(values: List[float], digits: int = 0) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    return f"{fmt(min(values), digits)}–{fmt(max(values), digits)}"


def _interleaved(ctx: Context, programs: Dict[str, Callable[[], dict]], rounds: int, label: str = "") -> dict:
    """Run every program ``rounds`` times in interleaved order; {name: [result, ...]} (+ load averages)."""
    runs: Dict[str, list] = {name: [] for name in programs}
    loads = []
    for order in orders(list(programs), rounds):
        loads.append(_load())
        for name in order:
            result = programs[name]()
            runs[name].append(result)
            ctx.log(f"   {label}{name:34s} {result['rate']:9.0f} msg/s {result['cpu_us']:7.1f} µs CPU/msg")
    runs["_load"] = loads  # type: ignore[assignment]
    return runs


def _stats(rs: List[dict]) -> dict:
    rates = [r["rate"] for r in rs]
    cpus = [r["cpu_us"] for r in rs]
    return {"rate": median(rates), "rates": rates, "cpu": median(cpus), "cpus": cpus}


def run(ctx: Context) -> Section:
    lab = ctx.lab
    count, rounds, warmup = ctx.n(20000, 150), ctx.n(5, 1), ctx.n(500, 20)
    broker = lab.broker
    hsm = lab.hsm_key()
    sdk = ctx.sdk_python()
    base = {"task": "throughput", "port": broker.port, "warmup": warmup, "window": WINDOW, "tls": "1.2", **hsm}

    def lc(**extra):
        return lambda: lc_child({**base, "client": "lightclient", "count": count, **extra}, env=lab.hsm_env)

    def paho(**extra):
        return lambda: lc_child({**base, "client": "paho", "count": count, **extra}, env=lab.hsm_env)

    section = Section(NAME, TITLE, header=["what", "client, driven as", "msg/s median (min–max)",
                                           "CPU µs/msg median (min–max)", "lightclient is"])

    # ------------------------------------------------------------------ headline: 256 B, TLS 1.2, all three
    programs = {"lightclient": lc(), "raw paho": paho(),
                "lightclient aio": lambda: lc_child({**base, "client": "aio", "count": count}, env=lab.hsm_env)}
    if sdk:
        for driver in ("threads", "asyncio"):
            programs[f"azure-iot-device ({driver})"] = (
                lambda driver=driver: sdk_child(sdk, {"task": "throughput", "port": broker.port, "count": count,
                                                      "warmup": warmup, "driver": driver, "workers": WINDOW,
                                                      **lab.file_key_spec()}, timeout=600))
    head = _interleaved(ctx, programs, rounds)
    head_load = head.pop("_load")
    st = {name: _stats(rs) for name, rs in head.items()}
    sdk_names = [n for n in st if n.startswith("azure-iot-device")]
    sdk_best = max(sdk_names, key=lambda n: st[n]["rate"]) if sdk_names else None
    driven = {"lightclient": "Device.send() each, wait_all()", "raw paho": "publish(qos=1) each, wait_for_publish()",
              "lightclient aio": "aio.Device.send() each accepted, then awaited together (asyncio.gather)",
              "azure-iot-device (threads)": "sync client, 20 threads × send_message()",
              "azure-iot-device (asyncio)": "asyncio client, 20 coroutines × await send_message()"}
    for name in programs:
        versus = "—" if name == "lightclient" else f"{fmt_ratio(ratio(st['lightclient']['rate'], st[name]['rate']))} as fast"
        best = " ← the SDK's figure" if name == sdk_best and len(sdk_names) > 1 else ""
        section.rows.append(["256 B, TLS 1.2 (headline)", f"{name}: {driven[name]}{best}",
                             f"{fmt(st[name]['rate'])} ({_spread(st[name]['rates'])})",
                             f"{fmt(st[name]['cpu'], 1)} ({_spread(st[name]['cpus'], 1)})", versus])
    lc_rate, paho_rate = st["lightclient"]["rate"], st["raw paho"]["rate"]
    section.targets.append(Target("throughput: lightclient / raw paho", ratio(lc_rate, paho_rate), 1.0, ">="))
    section.targets.append(Target("CPU per message: lightclient / raw paho",
                                  ratio(st["lightclient"]["cpu"], st["raw paho"]["cpu"]), 1.0, "<="))
    sdk_target = Target("throughput: lightclient / azure-iot-device (its faster driver)",
                        ratio(lc_rate, st[sdk_best]["rate"] if sdk_best else None), 5.0, ">=")
    if not sdk:
        sdk_target.note = ctx.sdk_note
    section.targets.append(sdk_target)

    # ------------------------------------------------------------------ payload sizes: lightclient vs raw paho
    sweep = {}
    for label, size in SIZES:
        n = max(ctx.n(20000, 50), 1) if size * 20000 <= SWEEP_BYTES or ctx.smoke else SWEEP_BYTES // size
        progs = {"lightclient": (lambda size=size, n=n: lc_child({**base, "client": "lightclient", "count": n,
                                                                   "size": size}, env=lab.hsm_env)),
                 "raw paho": (lambda size=size, n=n: lc_child({**base, "client": "paho", "count": n, "size": size},
                                                              env=lab.hsm_env))}
        runs = _interleaved(ctx, progs, rounds, label=f"{label:6s} ")
        load = runs.pop("_load")
        s2 = {name: _stats(rs) for name, rs in runs.items()}
        sweep[label] = {"count": n, "size": size, "stats": s2, "load": load}
        for name in progs:
            versus = "—" if name == "lightclient" else \
                f"{fmt_ratio(ratio(s2['lightclient']['rate'], s2[name]['rate']))} as fast"
            section.rows.append([f"{label} payload ({n:,} per round)", name,
                                 f"{fmt(s2[name]['rate'])} ({_spread(s2[name]['rates'])})",
                                 f"{fmt(s2[name]['cpu'], 1)} ({_spread(s2[name]['cpus'], 1)})", versus])
    worst = min((ratio(v["stats"]["lightclient"]["rate"], v["stats"]["raw paho"]["rate"]) or 0, k)
                for k, v in sweep.items())
    section.targets.append(Target(f"throughput at every payload size: lightclient / raw paho (lowest: {worst[1]})",
                                  worst[0], 1.0, ">="))

    # ------------------------------------------------------------------ outbox on / off
    outdir = WORK / "outbox"   # on the disk (not a tmpfs /tmp), so every commit is a real fsync
    outdir.mkdir(parents=True, exist_ok=True)
    os.chmod(outdir, 0o700)

    def with_outbox(**extra):
        def go():
            path = outdir / f"bench-{os.getpid()}-{len(os.listdir(outdir))}.db"
            try:
                return lc_child({**base, "client": "lightclient", "count": count, "outbox": str(path), **extra},
                                env=lab.hsm_env)
            finally:
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{path}{suffix}").unlink(missing_ok=True)
        return go

    outbox_programs = {
        f"outbox off, send_many({OUTBOX_BATCH})": lc(mode="send_many", batch=OUTBOX_BATCH),
        f"outbox on, send_many({OUTBOX_BATCH})": with_outbox(mode="send_many", batch=OUTBOX_BATCH),
        "outbox on, 4 threads × send()": with_outbox(mode="threads", threads=4),
        "outbox on, 1 thread × send()": with_outbox(mode="send", count=max(count // 4, 1)),
    }
    ob = _interleaved(ctx, outbox_programs, rounds)
    ob_load = ob.pop("_load")
    so = {name: _stats(rs) for name, rs in ob.items()}
    off = so[f"outbox off, send_many({OUTBOX_BATCH})"]["rate"]
    for name in outbox_programs:
        section.rows.append(["256 B, outbox (synchronous=FULL)", f"lightclient, {name}",
                             f"{fmt(so[name]['rate'])} ({_spread(so[name]['rates'])})",
                             f"{fmt(so[name]['cpu'], 1)} ({_spread(so[name]['cpus'], 1)})",
                             "—" if "off" in name else f"{fmt_ratio(ratio(so[name]['rate'], off))} of outbox off"])
    section.targets.append(Target(f"outbox on / off (send_many({OUTBOX_BATCH}))",
                                  ratio(so[f"outbox on, send_many({OUTBOX_BATCH})"]["rate"], off), 0.8, ">="))

    # ------------------------------------------------------------------ memory per queued message
    queued = ctx.n(100000, 2000)
    mem = {size: lc_child({"task": "queue_memory", "count": queued, "size": size}) for size in (16, 256)}
    for size, m in mem.items():
        section.rows.append([f"memory, {queued:,} queued offline", f"lightclient, {size} B payload",
                             f"{m['bytes_per_message']:.0f} B per message",
                             f"{m['overhead_per_message']:.0f} B beyond the payload object ({m['payload_object']} B)",
                             "raw paho: 65,535 at most (packet ids)"])
    section.targets.append(Target(f"memory per queued message at {queued:,} (16 B payload, all included)",
                                  mem[16]["bytes_per_message"], 250, "<="))

    # ------------------------------------------------------------------ where the time goes
    prof = lc_child({**base, "task": "profile", "client": "lightclient", "count": ctx.n(20000, 100), "top": 15},
                    env=lab.hsm_env)

    loads = head_load + [x for v in sweep.values() for x in v["load"]] + ob_load
    section.notes.append(f"{count:,} QoS 1 messages per round × {rounds} interleaved rounds, {warmup} untimed first; "
                         f"{WINDOW} in flight; TLS 1.2 for every client; one application property; a local "
                         "mosquitto requiring client certificates on the same cores. lightclient and raw paho use "
                         "one SoftHSM EC key, azure-iot-device a key file (it cannot use a token).")
    section.notes.append(f"Load average (1 min) at the start of each round: {min(loads):.2f}–{max(loads):.2f} "
                         f"(median {median(loads):.2f}) on {os.cpu_count()} cores; the machine was shared, so "
                         "rates are noisy and CPU µs/msg (all threads of the client process) is the steadier figure.")
    section.notes.append("Payload sweep: the 256 KB row carries a 255 KiB body (IoT Hub's limit counts the "
                         f"properties too) and sends {SWEEP_BYTES // (256 * 1024 - 1024):,} messages per round "
                         f"({SWEEP_BYTES >> 20} MB); the others {ctx.n(20000, 50):,}.")
    section.notes.append("Outbox rows: the file on disk (not tmpfs), WAL with synchronous=FULL: send()/send_many() "
                         "return only after the commit is on disk; the senders waiting at one moment share one "
                         "commit (group commit), so a commit covers a send_many() batch, or one message per thread "
                         "waiting in send(): 4 threads get at most 4 messages per fsync, and one thread calling "
                         f"send() after send() shares nothing (every message is its own fsync; that row sends "
                         f"{max(count // 4, 1):,} per round).")
    if sdk:
        section.notes.append(f"{ctx.sdk_note}; both of its drivers are measured and the faster is its figure "
                             f"({sdk_best}).")
    else:
        section.notes.append(ctx.sdk_note)
    section.notes.append(f"Profile of lightclient (cProfile, every thread, {ctx.n(20000, 100):,} messages, own time; "
                         "the top lines):\n\n```\n" + "\n".join(prof["profile"]) + "\n```")
    section.chart("Telemetry, 256 B, TLS 1.2", "msg/s", [(n, st[n]["rate"]) for n in programs], better="higher")
    section.chart("CPU per message, 256 B", "µs", [(n, st[n]["cpu"]) for n in programs], better="lower")
    section.chart("Payload sizes: lightclient / raw paho", "×",
                  [(k, ratio(v["stats"]["lightclient"]["rate"], v["stats"]["raw paho"]["rate"])) for k, v in sweep.items()],
                  better="higher")
    section.chart("Outbox (256 B)", "msg/s", [(n, so[n]["rate"]) for n in outbox_programs], better="higher")
    section.raw = {"count": count, "rounds": rounds, "window": WINDOW, "headline": head, "load": loads,
                   "sweep": {k: {"count": v["count"], "size": v["size"], "stats": v["stats"]} for k, v in sweep.items()},
                   "outbox": ob, "memory": mem, "profile": prof["profile"]}
    return section


if __name__ == "__main__":
    import run as runner

    sys.exit(runner.main(["--only", NAME, *sys.argv[1:]]))
