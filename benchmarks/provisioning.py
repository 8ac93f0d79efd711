"""Provisioning: TLS handshakes and wall time per DPS registration with two "assigning" polls,
against the DPS emulator (lightclient.emulator.dps, HTTPS with client certificates, keep-alive).

Compared: lightclient's ``dps.provision()`` with the SoftHSM key (one HTTPS session for the whole
registration) and the script people write with plain ``requests`` calls and a key file (each request
on a new connection, so each one costs a handshake, i.e. a signature by the device key). The emulator
answers ``Retry-After: 0`` (both clients then wait 50 ms per poll), so wall time shows the clients' and
TLS work rather than the service's pacing; against Azure DPS add its Retry-After (2-3 s) per poll.
Children run alternately, several registrations each; the emulator counts handshakes per device CN.
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Context, Section, fmt, fmt_ratio, lc_child, median, orders, ratio

NAME = "provisioning"
TITLE = "Provisioning (DPS, two polls)"
SCOPE = "0ne0000BE7C"


def run(ctx: Context) -> Section:
    from lightclient.emulator import certs
    from lightclient.emulator.dps import DpsEmulator

    lab = ctx.lab
    ca = lab.ca
    hsm = lab.hsm_key()
    emu = DpsEmulator(ca=certs.CertificateAuthority(ca.cert, ca.key), server_cert=ca.server_cert,
                      server_key=ca.server_key, id_scope=SCOPE, retry_after=0)
    emu.add_group("bench", ca.cert.read_bytes(), assigned_hub="localhost", polls=2)
    rounds, per_child = ctx.n(4, 1), ctx.n(5, 1)
    programs = {
        "lightclient (SoftHSM key, one session)": ("lightclient", lab.hsm_cn, hsm, lab.hsm_env),
        "plain requests (key file, a connection per request)": ("naive", lab.file_cn, lab.file_key_spec(), None),
    }
    runs = {name: {"wall_ms": [], "wait_ms": [], "handshakes": 0, "requests": 0} for name in programs}
    with emu:
        for order in orders(list(programs), rounds):
            for name in order:
                client, cn, key, env = programs[name]
                before_hs, before_req = emu.handshakes.get(cn, 0), len(emu.requests)
                out = lc_child({"task": "provision", "client": client, "cn": cn, "scope": SCOPE,
                                "endpoint": emu.endpoint, "count": per_child, **key}, env=env)
                r = runs[name]
                r["wall_ms"] += out["wall_ms"]
                r["wait_ms"] += out["wait_ms"]
                r["handshakes"] += emu.handshakes.get(cn, 0) - before_hs
                r["requests"] += len(emu.requests) - before_req
    section = Section(NAME, TITLE, header=["client", "TLS handshakes / registration", "HTTP requests / registration",
                                           "wall time (median)", "of which Retry-After waits", "lightclient is"])
    lc = next(iter(programs))
    for name, r in runs.items():
        n = len(r["wall_ms"])
        r["wall"], r["wait"] = median(r["wall_ms"]), median(r["wait_ms"])
        r["handshakes_per"], r["requests_per"] = r["handshakes"] / n, r["requests"] / n
        ctx.log(f"   {name}: {r['handshakes_per']:.1f} handshakes, {r['wall']:.0f} ms")
    for name, r in runs.items():
        section.rows.append([name, fmt(r["handshakes_per"], 1), fmt(r["requests_per"], 1), fmt(r["wall"], 0, "ms"),
                             fmt(r["wait"], 0, "ms"),
                             "—" if name == lc else f"{fmt_ratio(ratio(runs[lc]['wall'], r['wall']))} the time"])
    section.notes.append(f"{rounds * per_child} registrations per client in {rounds} alternating rounds; group enrollment "
                         "by the test CA, 2 polls answered 'assigning' before 'assigned', Retry-After 0.")
    section.notes.append("With a TPM every handshake is a TPM signature (see the connect table for its cost), so "
                         "the handshakes column is what matters on a device; lightclient needs one per registration.")
    section.chart("DPS registration, 2 polls", "ms", [(n.split(" (")[0], r["wall"]) for n, r in runs.items()],
                  better="lower")
    section.chart("TLS handshakes per DPS registration", "handshakes",
                  [(n.split(" (")[0], r["handshakes_per"]) for n, r in runs.items()], better="lower")
    section.raw = runs
    return section


if __name__ == "__main__":
    import run as runner

    sys.exit(runner.main(["--only", NAME, *sys.argv[1:]]))
