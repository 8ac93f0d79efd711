"""Telemetry throughput: lightclient Device (sync and asyncio) vs raw paho (same window) vs azure-iot-device 2.x.

Each program sends N QoS 1 messages (256-byte payload, one application property) over TLS to a local
mosquitto that requires client certificates, in a fresh child process per round; the time runs from
the first send to the last PUBACK (after an untimed warm-up of 200 messages on the same connection).
Rounds alternate the order of the programs; the median round counts. lightclient and raw paho use
the same SoftHSM key (it signs only the handshake); the SDK needs a key file.

Targets: lightclient >= 0.9 x raw paho and >= 5 x azure-iot-device.

    python benchmarks/telemetry.py [--smoke]      (same as: python benchmarks/run.py --only telemetry)
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import WINDOW, Context, Section, Target, fmt, fmt_ratio, lc_child, median, orders, ratio, sdk_child

NAME = "telemetry"
TITLE = "Telemetry throughput"


def run(ctx: Context) -> Section:
    lab = ctx.lab
    count, rounds = ctx.n(5000, 200), ctx.n(5, 1)
    warmup = ctx.n(200, 20)
    broker = lab.broker
    hsm = lab.hsm_key()
    sdk = ctx.sdk_python()
    programs = {
        "lightclient": lambda: lc_child({"task": "throughput", "client": "lightclient", "port": broker.port,
                                         "count": count, "warmup": warmup, "window": WINDOW, **hsm},
                                        env=lab.hsm_env),
        "lightclient aio": lambda: lc_child({"task": "throughput", "client": "aio", "port": broker.port,
                                             "count": count, "warmup": warmup, "window": WINDOW, **hsm},
                                            env=lab.hsm_env),
        "raw paho": lambda: lc_child({"task": "throughput", "client": "paho", "port": broker.port, "count": count,
                                      "warmup": warmup, "window": WINDOW, **hsm}, env=lab.hsm_env),
    }
    if sdk:
        programs["azure-iot-device"] = lambda: sdk_child(sdk, {"task": "throughput", "port": broker.port,
                                                               "count": count, "warmup": warmup,
                                                               **lab.file_key_spec()})
    runs = {name: [] for name in programs}
    for order in orders(list(programs), rounds):
        for name in order:
            runs[name].append(programs[name]())
            ctx.log(f"   {name:17s} {runs[name][-1]['rate']:8.0f} msg/s")
    rate = {name: median(r["rate"] for r in rs) for name, rs in runs.items()}
    cpu = {name: median(r["cpu_us"] for r in rs) for name, rs in runs.items()}
    lc = "lightclient"
    section = Section(NAME, TITLE, header=["client", "msg/s (median)", "CPU µs/msg", "lightclient is", "rounds (msg/s)"])
    for name in programs:
        section.rows.append([name, fmt(rate[name]), fmt(cpu[name]),
                             "—" if name == lc else f"{fmt_ratio(ratio(rate[lc], rate[name]))} as fast",
                             ", ".join(f"{r['rate']:.0f}" for r in runs[name])])
    section.targets.append(Target("throughput: lightclient / raw paho", ratio(rate[lc], rate["raw paho"]), 0.9, ">="))
    sdk_target = Target("throughput: lightclient / azure-iot-device", ratio(rate[lc], rate.get("azure-iot-device")),
                        5.0, ">=")
    if not sdk:
        sdk_target.note = ctx.sdk_note
    section.targets.append(sdk_target)
    section.notes.append(f"{count} QoS 1 messages per round × {rounds} rounds (alternating order), 256-byte payload, "
                         f"1 application property, {WINDOW} messages in flight, TLS to a local mosquitto that "
                         f"requires client certificates; lightclient and raw paho use the same SoftHSM EC key, "
                         f"azure-iot-device a key file (it cannot use a token). The client and the broker share "
                         f"this machine's cores.")
    if sdk:
        section.notes.append(f"{ctx.sdk_note}; asyncio client with every send_message() started at once (its "
                             f"paho keeps {WINDOW} in flight): the fastest way to drive it.")
    else:
        section.notes.append(ctx.sdk_note)
    section.chart("Telemetry throughput", "msg/s", [(n, rate[n]) for n in programs], better="higher")
    section.raw = {"count": count, "rounds": rounds, "window": WINDOW, "runs": runs, "rate": rate, "cpu_us": cpu}
    return section


if __name__ == "__main__":
    import run as runner

    sys.exit(runner.main(["--only", NAME, *sys.argv[1:]]))
