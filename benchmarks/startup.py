"""Start-up and memory: import time of the client path, and the peak RSS of a process that connects
and sends 100 QoS 1 messages: lightclient vs azure-iot-device vs bare paho.

Import time is measured inside a fresh interpreter around the import statement an application
writes (interpreter start-up, the same for all, is left out), after one untimed run that compiles
the .pyc files. Peak RSS is the child's own ``ru_maxrss`` after it connected to the local mosquitto,
sent 100 messages and disconnected. Every program runs in a fresh process per round, rounds
alternate the order, the median counts.

Targets: lightclient's import <= 0.5 x the SDK's; peak RSS <= 0.8 x the SDK's and within 10 % of
bare paho's (and requests is not imported unless DPS is used).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (BenchError, Context, Section, Target, child_env, fmt, fmt_ratio, lc_child, median, orders,
                    ratio, sdk_child)
from common import sdk_env as common_sdk_env

NAME = "startup"
TITLE = "Start-up and memory"

IMPORTS = {
    "lightclient": "from lightclient.device import Device; from lightclient.tls import client_context",
    "bare paho": "import ssl, paho.mqtt.client",
    "azure-iot-device": "from azure.iot.device import IoTHubDeviceClient, Message, X509",
}
#: The top package alone, and its lazy names (PEP 562): `import lightclient` must stay nearly free.
PACKAGE_IMPORTS = {
    "import lightclient": "import lightclient",
    "from lightclient import Device": "from lightclient import Device",
}
TIMER = ("import time; t = time.perf_counter(); {stmt}; t = time.perf_counter() - t; import sys, json; "
         "print(json.dumps({{'ms': t * 1000, 'requests': 'requests' in sys.modules, 'modules': len(sys.modules)}}))")


def _import_ms(python: str, stmt: str, env) -> dict:
    import json

    proc = subprocess.run([python, "-c", TIMER.format(stmt=stmt)], capture_output=True, text=True, env=env,
                          timeout=60)
    if proc.returncode != 0:
        raise BenchError(f"import {stmt!r} failed: {proc.stderr.strip()[-800:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(ctx: Context) -> Section:
    lab = ctx.lab
    sdk = ctx.sdk_python()
    section = Section(NAME, TITLE, header=["client", "import (ms, median)", "peak RSS (MiB, median)",
                                           "requests imported", "lightclient's import is", "lightclient's RSS is"])
    # ------------------------------------------------------------------ import time
    env = child_env()
    sdk_env = common_sdk_env()
    pythons = {"lightclient": (sys.executable, env), "bare paho": (sys.executable, env)}
    if sdk:
        pythons["azure-iot-device"] = (sdk, sdk_env)
    for name, (python, e) in pythons.items():
        _import_ms(python, IMPORTS[name], e)   # compiles the .pyc files; not counted
    imports = {name: [] for name in pythons}
    for order in orders(list(pythons), ctx.n(15, 1)):
        for name in order:
            python, e = pythons[name]
            imports[name].append(_import_ms(python, IMPORTS[name], e))
    imp = {name: median(r["ms"] for r in rs) for name, rs in imports.items()}
    ctx.log("   import ms: " + ", ".join(f"{n} {v:.0f}" for n, v in imp.items()))
    package_runs = {name: [] for name in PACKAGE_IMPORTS}
    for stmt in PACKAGE_IMPORTS.values():
        _import_ms(sys.executable, stmt, env)   # compiles the .pyc files; not counted
    for order in orders(list(PACKAGE_IMPORTS), ctx.n(15, 1)):
        for name in order:
            package_runs[name].append(_import_ms(sys.executable, PACKAGE_IMPORTS[name], env))
    package_ms = {name: median(r["ms"] for r in rs) for name, rs in package_runs.items()}
    ctx.log("   package import ms: " + ", ".join(f"{n} {v:.2f}" for n, v in package_ms.items()))

    # ------------------------------------------------------------------ peak RSS
    broker = lab.broker
    file_key = {**lab.file_key_spec(), "port": broker.port, "count": 100}
    programs = {
        "lightclient": lambda: lc_child({"task": "rss", "client": "lightclient", **file_key}),
        "lightclient + SoftHSM key": lambda: lc_child({"task": "rss", "client": "lightclient", "port": broker.port,
                                                       "count": 100, **lab.hsm_key()}, env=lab.hsm_env),
        "bare paho": lambda: lc_child({"task": "rss", "client": "paho", **file_key}),
    }
    if sdk:
        programs["azure-iot-device"] = lambda: sdk_child(sdk, {"task": "rss", **file_key})
    for program in programs.values():
        program()   # writes the bytecode cache; not counted
    rss_runs = {name: [] for name in programs}
    for order in orders(list(programs), ctx.n(5, 1)):
        for name in order:
            rss_runs[name].append(programs[name]())
    rss = {name: median(r["maxrss_kb"] / 1024 for r in rs) for name, rs in rss_runs.items()}
    ctx.log("   peak RSS MiB: " + ", ".join(f"{n} {v:.1f}" for n, v in rss.items()))

    lc = "lightclient"
    for name in programs:
        req = rss_runs[name][0]["requests"]
        imp_name = name if name in imp else None
        section.rows.append([
            name, fmt(imp.get(imp_name), 0) if imp_name else "(as above)", fmt(rss[name], 1), "yes" if req else "no",
            "—" if name.startswith(lc) or not imp_name else f"{fmt_ratio(ratio(imp[lc], imp[name]))} of it",
            "—" if name.startswith(lc) else f"{fmt_ratio(ratio(rss[lc], rss[name]))} of it"])
    section.targets += [
        Target("import time: lightclient / azure-iot-device", ratio(imp[lc], imp.get("azure-iot-device")), 0.5, "<=",
               "" if sdk else ctx.sdk_note),
        Target("peak RSS: lightclient / azure-iot-device", ratio(rss[lc], rss.get("azure-iot-device")), 0.8, "<=",
               "" if sdk else ctx.sdk_note),
        Target("peak RSS: lightclient / bare paho", ratio(rss[lc], rss["bare paho"]), 1.1, "<="),
        Target("requests imported without DPS (1 = yes)", float(rss_runs[lc][0]["requests"]), 0, "<="),
        Target("import lightclient / from lightclient.device import Device (lazy top-level names)",
               ratio(package_ms["import lightclient"], imp[lc]), 0.05, "<="),
    ]
    section.notes += [
        f"Import: `{IMPORTS['lightclient']}` vs `{IMPORTS['bare paho']}` vs `{IMPORTS['azure-iot-device']}`, "
        f"each in a fresh interpreter, {len(imports[lc])} alternating rounds (interpreter start-up not counted), "
        f"bytecode cached as after a pip install.",
        f"Top package: `import lightclient` {package_ms['import lightclient']:.2f} ms (its names Device, Identity, "
        f"tls, dps, exceptions are imported on first use, PEP 562); `from lightclient import Device` "
        f"{package_ms['from lightclient import Device']:.1f} ms.",
        f"Peak RSS: a fresh process that imports the client, connects over TLS to the local mosquitto, sends 100 "
        f"QoS 1 messages, waits for their PUBACKs and disconnects; {len(rss_runs[lc])} alternating rounds. "
        f"lightclient, bare paho and the SDK use the same kind of key (a PEM file, the only kind the SDK takes); "
        f"'lightclient + SoftHSM key' shows what loading the PKCS#11 engine and the token library adds.",
    ]
    if sdk:
        section.notes.append(f"{ctx.sdk_note}; the synchronous client as in its samples (send_message() waits for "
                             f"each PUBACK).")
    else:
        section.notes.append(ctx.sdk_note)
    section.chart("Import time of the client", "ms", [(n, imp[n]) for n in imp], better="lower")
    section.chart("Peak RSS: connect + 100 messages", "MiB", [(n, rss[n]) for n in programs], better="lower")
    section.raw = {"import_runs": imports, "import_ms": imp, "package_import_runs": package_runs,
                   "package_import_ms": package_ms, "rss_runs": rss_runs, "rss_mib": rss}
    return section


if __name__ == "__main__":
    import run as runner

    sys.exit(runner.main(["--only", NAME, *sys.argv[1:]]))
