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


def main(argv) -> int:
    cfg = json.loads(sys.stdin.read())
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
