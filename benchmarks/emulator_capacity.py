"""Emulator capacity: how many connected devices and how many telemetry messages per second the
IoT Hub emulator (lightclient.emulator) sustains on this machine.

The emulator runs in its own process (benchmarks/clients/emulator_host.py); one load-generator
process (benchmarks/clients/loader.py, asyncio with raw MQTT packets) connects the devices over TLS
with client certificates (all devices share one self-signed certificate registered by thumbprint),
holds them, checks every one with a PINGREQ, and then publishes QoS 1 telemetry from 1 and from 100
of them (window 10 each) while all stay connected. Emulator and load generator share the 2 cores, so
this is a floor for the emulator alone.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import CLIENTS, BenchError, Context, Section, child_env, fmt, run_child

NAME = "emulator"
TITLE = "Emulator capacity"


def run(ctx: Context) -> Section:
    devices = ctx.n(2000, 20)
    seconds = ctx.n(5, 1)
    phases = [{"publishers": 1, "window": 10, "seconds": seconds},
              {"publishers": min(100, devices), "window": 10, "seconds": seconds}]
    host = subprocess.Popen([sys.executable, str(CLIENTS / "emulator_host.py")], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
    try:
        host.stdin.write(json.dumps({"state_dir": str(ctx.lab.root / "emulator"), "devices": devices}) + "\n")
        host.stdin.flush()
        line = host.stdout.readline()
        if not line:
            raise BenchError(f"the emulator did not start: {host.stderr.read()[-1500:]}")
        info = json.loads(line)

        def stats():
            host.stdin.write("stats\n")
            host.stdin.flush()
            return json.loads(host.stdout.readline())

        before = stats()
        load = run_child([sys.executable, str(CLIENTS / "loader.py")],
                         {**info, "devices": devices, "concurrency": 50, "hold": ctx.n(3, 1), "phases": phases},
                         timeout=600)
        after = stats()
        host.stdin.write("quit\n")
        host.stdin.flush()
        host.wait(30)
    finally:
        if host.poll() is None:
            host.kill()
            host.wait(10)
    if load["connected"] == 0:
        raise BenchError(f"no device could connect to the emulator: {load['failures']}")
    rate = load["connected"] / load["connect_seconds"]
    ctx.log(f"   {load['connected']}/{devices} connected ({rate:.0f}/s), {load['alive_after_hold']} alive; "
            + ", ".join(f"{p['publishers']} publishers {p['rate']:.0f} msg/s" for p in load["phases"]))
    section = Section(NAME, TITLE, header=["measure", "result"])
    section.rows += [
        ["devices connected (TLS + client certificate + CONNECT)", f"{load['connected']:,} of {devices:,} "
         f"({load['failed']} failed)"],
        ["connect rate", fmt(rate, 0, "devices/s")],
        ["still answering PINGREQ after the hold and the load phases",
         f"{load['phases'][-1]['alive_after'] if load['phases'] else load['alive_after_hold']:,}"],
        ["emulator peak RSS with all devices connected", fmt(after["maxrss_kb"] / 1024, 0, "MiB")],
    ]
    for p in load["phases"]:
        section.rows.append([f"telemetry QoS 1 from {p['publishers']} device(s), window {p['window']} each, "
                             f"{load['connected']:,} connected", fmt(p["rate"], 0, "msg/s")])
    section.rows.append(["emulator CPU during the run", fmt(after["cpu_s"] - before["cpu_s"], 1, "s")])
    held = load["phases"][-1]["alive_after"] if load["phases"] else load["alive_after_hold"]
    verdict = ("all connected and stayed connected, so it is not a limit that was found" if held == devices else
               f"only {held:,} were still connected at the end: that is the limit on this machine")
    section.notes.append(f"{devices:,} devices is the number this benchmark asks for; {verdict}. Messages per second are PUBACKs counted by the load "
                         f"generator over {seconds} s; the emulator validates and records every message (its event "
                         "log keeps them all in memory). Both processes are Python and share this machine's cores.")
    if load["failures"]:
        section.notes.append(f"First connect failures: {load['failures']}")
    section.chart("Emulator: telemetry it sustains", "msg/s",
                  [(f"{p['publishers']} device(s)", p["rate"]) for p in load["phases"]], better="higher")
    section.raw = {"load": load, "emulator_before": before, "emulator_after": after, "connect_rate": rate}
    return section


if __name__ == "__main__":
    import run as runner

    sys.exit(runner.main(["--only", NAME, *sys.argv[1:]]))
