"""Child process for the kill -9 renewal tests: ``python -m tests.integration.renewal_child renew|resume``
with the settings (and PIN) as JSON on stdin.

``renew``: connect, then renew with key rotation over DPS, and SIGKILL itself right after ``kill_at``.
``resume``: what a restart does: recover, connect, send one message; prints a JSON report.
"""
from __future__ import annotations

import json
import os
import signal
import sys

from lightclient import renewal
from lightclient.device import Device
from lightclient.identity import Identity


def run(cfg) -> int:
    """Provision (DPS, CSR), then send telemetry while the Renewer renews in the background (hub, then DPS
    after the parent injects a hub error) until two renewals are done and the old keys are retired."""
    import time
    from pathlib import Path

    from lightclient import dps, keys, tls
    from lightclient.emulator import certs

    name, tmp = cfg["device_id"], Path(cfg["dir"])
    key = keys.load_key(cfg["key"], pin=cfg["pin"])
    csr = tmp / "boot.csr"
    csr.write_bytes(keys.csr_pem(keys.sign_csr(key, [("CN", name)])))
    boot = certs.sign_csr(certs.CertificateAuthority(Path(cfg["ca"]), Path(cfg["ca_key"])), csr, tmp / "boot.pem")
    dps.provision(cfg["scope"], name, ssl_context=tls.https_context(cert=str(boot), key=key, ca=cfg["ca"]),
                  endpoint=cfg["dps"], csr=keys.sign_csr(key, [("CN", name)]), cert_out=cfg["cert"],
                  poll_interval=(0.05, 1.0), timeout=30)
    renewed = []
    renewer = renewal.Renewer(
        cert=cfg["cert"], key=cfg["key"], pin=cfg["pin"], device_id=name, ca=cfg["ca"], state=cfg["state"],
        rotate_keys=cfg.get("rotate", True), routes=("hub", "dps"), rand=lambda: 0.5,
        policy=renewal.RenewalPolicy(fraction=0.5, jitter=0.1, grace=1.0),
        backoff=renewal.Backoff(initial=0.5, maximum=2.0),
        dps=renewal.DpsRoute(cfg["scope"], name, cfg["dps"], ca=cfg["ca"], timeout=30, poll_interval=(0.05, 1.0)))
    device = renewer.connect_device(lambda ctx: Device(Identity("localhost", name), ctx, host="127.0.0.1",
                                                       port=cfg["port"]))
    device.on_certificate_renewed = renewed.append
    renewer.start()
    handles = []
    try:
        deadline = time.monotonic() + cfg["duration"]
        while time.monotonic() < deadline and not (len(renewed) >= 2 and not renewer.state.retire):
            handles.append(device.send(json.dumps({"n": len(handles)}).encode()))
            time.sleep(0.1)
        for handle in handles:
            handle.wait(30)
    finally:
        renewer.stop()
        device.close()
    state = renewer.state
    from lightclient import _native

    # The certificate in use belongs to the key the state file names (the last one made in the token).
    ref = keys.parse_key_ref(state.key).with_options(module_path=keys.parse_key_ref(cfg["key"]).module_path)
    matches = _native.cert_matches_key(Path(state.cert).read_bytes(), keys.load_key(ref, pin=cfg["pin"]))
    print(json.dumps({"sent": len(handles), "renewed": len(renewed), "renewals": state.renewals,
                      "key": state.key, "retire": len(state.retire), "cert_matches_key": matches}))
    return 0


def main(argv) -> int:
    cfg = json.loads(sys.stdin.read())
    if argv[0] == "run":
        return run(cfg)
    kill_at = cfg["kill_at"] if argv[0] == "renew" else None

    def on_step(step: str) -> None:
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    renewer = renewal.Renewer(
        cert=cfg["cert"], key=cfg["key"], pin=cfg["pin"], device_id=cfg["device_id"], ca=cfg["ca"],
        state=cfg["state"], rotate_keys=True, routes=("dps",), on_step=on_step,
        policy=renewal.RenewalPolicy(grace=0.0),
        dps=renewal.DpsRoute(cfg["scope"], cfg["device_id"], cfg["dps"], ca=cfg["ca"], timeout=20,
                             poll_interval=(0.05, 1.0)))
    identity = Identity("localhost", cfg["device_id"])
    action = renewer.recover() if argv[0] == "resume" else None
    if action == "try":
        pass   # connect_device() below tries the written chain first
    device = renewer.connect_device(lambda ctx: Device(identity, ctx, host="127.0.0.1", port=cfg["port"]))
    try:
        if argv[0] == "renew":
            renewer.renew("dps")
            return 1   # not killed: the test fails on the exit code
        device.send_and_wait(b'{"after": "restart"}', timeout=10)
        state = renewer.state
        print(json.dumps({"action": action, "sent": True, "pending": state.pending and state.pending.step,
                          "key": state.key, "renewals": state.renewals}))
        return 0
    finally:
        device.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
