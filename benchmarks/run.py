"""Run the benchmarks and write benchmarks/results/latest.{md,json,png}.

    python benchmarks/run.py                 # everything (make bench), ~5-10 min on 2 cores
    python benchmarks/run.py --smoke         # every code path with tiny counts, ~1 min (CI)
    python benchmarks/run.py --only NAME     # one benchmark, merged into the existing results

Benchmarks: telemetry, startup, footprint, connect, provisioning, emulator. Each one runs the compared
programs in the same run, alternating their order over several repetitions, and reports medians and
ratios. A benchmark that crashes is reported in the results and makes the exit status 1; a missed
target does not. --smoke writes to benchmarks/.work/smoke unless --out says otherwise, so it never
replaces the real results.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
import report  # noqa: E402

BENCHMARKS = ["telemetry", "startup", "footprint", "connect", "provisioning", "emulator"]
MODULES = {"emulator": "emulator_capacity"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny counts: check that every benchmark still runs")
    parser.add_argument("--only", action="append", choices=BENCHMARKS, metavar="NAME",
                        help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)}")
    parser.add_argument("--out", type=Path, help="results directory (default benchmarks/results; "
                        "with --smoke benchmarks/.work/smoke)")
    args = parser.parse_args(argv)
    out = args.out or (common.WORK / "smoke" if args.smoke else common.RESULTS)
    out.mkdir(parents=True, exist_ok=True)
    names = args.only or BENCHMARKS
    started = time.monotonic()
    mode = "smoke" if args.smoke else "full"
    print(f"lightclient benchmarks ({mode}): {', '.join(names)} -> {out}", flush=True)
    info = common.machine()
    sections, crashed = {}, []
    with tempfile.TemporaryDirectory(prefix="lightclient-bench-") as tmp:
        lab = common.Lab(Path(tmp))
        ctx = common.Context(smoke=args.smoke, lab=lab, log=lambda text: print(text, flush=True))
        try:
            for name in names:
                print(f"== {name}", flush=True)
                t0 = time.monotonic()
                try:
                    module = importlib.import_module(MODULES.get(name, name))
                    section = module.run(ctx)
                except Exception as exc:  # reported, and the exit status says so
                    crashed.append(name)
                    trace = traceback.format_exc().replace(common.PIN, "<pin>")
                    print(trace, file=sys.stderr, flush=True)
                    section = common.Section(name, name, error=f"{type(exc).__name__}: {exc}"[-1500:])
                section.seconds = time.monotonic() - t0
                sections[name] = section.as_dict()
                sections[name]["mode"] = mode
                sections[name]["date"] = info["date"]
                for target in section.targets:
                    state = {True: "met", False: "MISSED", None: "not measured"}[target.met]
                    value = "—" if target.value is None else f"{target.value:.2f}"
                    print(f"   target {target.what}: {value} (want {target.op} {target.limit}) {state}", flush=True)
                print(f"   ({section.seconds:.0f} s)", flush=True)
        finally:
            lab.close()
    results = {"machine": info, "mode": mode, "sections": sections}
    previous = out / "latest.json"
    if args.only and previous.exists():
        try:
            old = json.loads(previous.read_text())
            merged = {**old.get("sections", {}), **sections}
            results["sections"] = {n: merged[n] for n in BENCHMARKS if n in merged}
            results["mode"] = old.get("mode", mode) if mode == "full" else mode
        except (OSError, ValueError):
            pass
    (out / "latest.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    chart = report.write_chart(results, out / "latest.png")
    (out / "latest.md").write_text(report.markdown(results, chart))
    if chart is None and not report.have_matplotlib():
        print("no chart: matplotlib is not installed (pip install -e '.[bench]'); the table is written", flush=True)
    print(f"wrote {out / 'latest.md'}" + (f", {chart.name}" if chart else "")
          + f", latest.json in {time.monotonic() - started:.0f} s", flush=True)
    if crashed:
        print(f"crashed: {', '.join(crashed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
