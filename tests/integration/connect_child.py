"""Child process for test_connect_anywhere's TPM case: a Device with a TPM key (tpm2-openssl provider,
``handle:``) uses every feature over WebSockets through each real proxy.

Why a child: the tpm2 provider, once loaded, serves the whole process (even a server's TLS in it), and the
pytest process is bound to SoftHSM (see tpm_child.py). The parent owns the emulator, the proxies and the
TPM and drives the hub's side; the CA key only signs this child's CSR (with the openssl CLI).

Input (stdin, one JSON line; no PIN is needed for a ``handle:`` key)::

    {"key": "handle:0x81…", "ca_cert": PATH, "ca_key": PATH, "work": DIR, "ws_port": N,
     "proxies": {"name": URL, …}}

Output (stdout, one JSON line per step): ``{"connected": name}`` once the device is up and has sent its
telemetry and reported patch (the parent then invokes a method, patches desired and sends C2D), then
``{"result": name, …what arrived…}``; a failure is ``{"result": name, "error": …}``.
"""
from __future__ import annotations

import json
import queue
import sys
import traceback
from pathlib import Path


def _say(obj) -> None:
    print(json.dumps(obj), flush=True)


def main() -> int:
    spec = json.loads(sys.stdin.readline())
    from lightclient import keys, tls
    from lightclient.device import Device
    from lightclient.emulator import certs
    from lightclient.identity import Identity

    work = Path(spec["work"])
    key = keys.load_key(spec["key"])
    ca = certs.CertificateAuthority(Path(spec["ca_cert"]), Path(spec["ca_key"]))
    for name, proxy in spec["proxies"].items():
        device_id = f"tpm-{name}"
        try:
            (work / f"{device_id}.csr").write_bytes(keys.csr_pem(keys.sign_csr(key, [("CN", device_id)])))
            cert = certs.sign_csr(ca, work / f"{device_id}.csr", work / f"{device_id}.pem")
            ctx = tls.client_context(cert=cert, key=spec["key"], ca=spec["ca_cert"])
            c2d, desired, methods = queue.Queue(), queue.Queue(), queue.Queue()
            dev = Device(Identity("localhost", device_id), ctx, host="127.0.0.1", transport="websockets",
                         websocket_port=spec["ws_port"], proxy=proxy, twin_timeout=10,
                         on_c2d=lambda m, p: c2d.put(p.decode()),
                         on_desired=lambda patch, v: desired.put(patch.get("rate")))

            @dev.method("echo")
            def echo(payload):
                methods.put(payload)
                return {"echo": payload}

            with dev:
                dev.send_and_wait(f"tpm-{name}".encode(), timeout=15)
                dev.patch_reported({"fw": name}, timeout=15)
                _say({"connected": name})
                got = {"method": methods.get(timeout=30), "desired": desired.get(timeout=30),
                       "c2d": c2d.get(timeout=30), "port": dev.port}
            _say({"result": name, **got})
        except Exception as exc:  # reported; the parent asserts
            _say({"result": name, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
