"""Child process for the TPM tests: runs TPM cells where the pytest process cannot.

OpenSSL allows one libp11 engine instance per process (the pytest process binds it to SoftHSM),
and the tpm2 provider, once loaded, serves the whole process. So each TPM chain runs here, in a
fresh interpreter started by tests/integration/test_tpm.py, which owns the services (mosquitto,
the DPS emulator, the TPM) and asserts on the JSON this prints.

Input (stdin, JSON; it carries the PIN, which never appears in argv)::

    {"pin": "...", "ca_root": DIR, "out": DIR, "mqtt_port": N, "dps_endpoint": "127.0.0.1:N",
     "scope": "0ne...", "propq": null | "...", "import_check": null | DIR,
     "errors": [{"name": ..., "key": REF, "pin": ...}],
     "cells": [{"name": ..., "key": REF, "cn": ..., "tls": "1.2"|"1.3", "dps": bool}],
     "timing": {"rounds": N}}

Output (stdout, JSON): {"shim": path, "engine_support": bool, "errors": {...}, "cells": {...},
"timing": {...}}. Every cell reports its own failure instead of ending the run.
"""
from __future__ import annotations

import json
import socket
import ssl
import sys
import time
import traceback
from pathlib import Path

TLS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def _publish(ctx: ssl.SSLContext, port: int, cn: str, tag: str) -> dict:
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{cn}-{tag}", protocol=mqtt.MQTTv311)
    client.tls_set_context(ctx)
    t0 = time.perf_counter()
    client.connect("127.0.0.1", port, keepalive=30)
    connect_ms = (time.perf_counter() - t0) * 1000
    client.loop_start()
    try:
        info = client.publish(f"devices/{cn}/messages/events/", json.dumps({"cell": tag}).encode(), qos=1)
        info.wait_for_publish(timeout=10)
        sock = client.socket()
        return {"puback": bool(info.is_published()), "version": sock.version(), "cipher": sock.cipher()[0],
                "connect_ms": round(connect_ms, 1)}
    finally:
        client.disconnect()
        client.loop_stop()


def _handshakes(ctx: ssl.SSLContext, port: int, rounds: int) -> float:
    """Mean ms per full mutual-TLS handshake (fresh connection each time, no session reuse)."""
    total = 0.0
    for _ in range(rounds):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            t0 = time.perf_counter()
            with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                total += time.perf_counter() - t0
                tls.version()
    return round(total * 1000 / rounds, 1)


def main() -> int:
    spec = json.load(sys.stdin)
    if spec.get("import_check"):
        # The engine-free build must be the shim this process imports.
        sys.path.insert(0, spec["import_check"])
    from lightclient import _native, dps, keys, tls
    from tests import lab
    from lightclient.exceptions import LightClientError

    out = {"shim": _native.shim_path(), "engine_support": _native.engine_support(), "errors": {},
           "cells": {}, "timing": {}}
    pin = spec.get("pin")
    ca = lab.TestCA(Path(spec["ca_root"]))
    work = Path(spec["out"])
    work.mkdir(parents=True, exist_ok=True)
    propq = spec.get("propq")

    # Error cases first: a PIN is only refused on a token this process has not logged in to yet.
    for case in spec.get("errors", []):
        try:
            keys.load_key(case["key"], pin=case.get("pin"), propq=propq)
            out["errors"][case["name"]] = {"raised": None}
        except LightClientError as exc:
            out["errors"][case["name"]] = {"raised": type(exc).__name__,
                                           "mro": [c.__name__ for c in type(exc).__mro__],
                                           "message": str(exc)}

    loaded = {}
    for cell in spec.get("cells", []):
        name, ref, cn = cell["name"], cell["key"], cell["cn"]
        result = out["cells"][name] = {"ok": False}
        try:
            if ref not in loaded:
                t0 = time.perf_counter()
                key = keys.load_key(ref, pin=pin, propq=propq)
                load_ms = (time.perf_counter() - t0) * 1000
                der = _native.sign_csr(key, [("CN", cn)])
                cert = ca.sign_csr(keys.csr_pem(der), work / f"{cn}.pem")
                loaded[ref] = (key, cert, round(load_ms, 1))
            key, cert, load_ms = loaded[ref]
            result.update(key_type=key.key_type, bits=key.bits, load_ms=load_ms)
            version = TLS[cell["tls"]]
            # The reference, not the loaded key: client_context loads it (again) itself.
            ctx = tls.client_context(cert=cert, key=ref, pin=pin, propq=propq, ca=ca.cert,
                                     minimum_version=version, maximum_version=version)
            result.update(_publish(ctx, spec["mqtt_port"], cn, name))
            if cell.get("dps"):
                hctx = tls.https_context(cert=cert, key=key, ca=ca.cert, minimum_version=version,
                                         maximum_version=version)
                reg = dps.provision(spec["scope"], cn, ssl_context=hctx, endpoint=spec["dps_endpoint"],
                                    poll_interval=(0.05, 0.2), timeout=30)
                result["dps"] = {"status": reg.status, "hub": reg.assigned_hub, "device_id": reg.device_id}
            if spec.get("timing", {}).get("rounds"):
                result["handshake_ms"] = _handshakes(ctx, spec["mqtt_port"], spec["timing"]["rounds"])
            result["ok"] = True
        except Exception as exc:  # report per cell; the parent asserts
            result["error"] = f"{type(exc).__name__}: {exc}"
            result["trace"] = traceback.format_exc()[-2000:]

    if spec.get("timing", {}).get("software_rounds"):
        # A file-key context in this same process: what the provider set-up costs unrelated TLS.
        try:
            fcert, fkey = ca.issue_file_key("timing-file-key", work)
            fctx = tls.client_context(cert=fcert, key=str(fkey), ca=ca.cert)
            out["timing"]["software_key_handshake_ms"] = _handshakes(fctx, spec["mqtt_port"],
                                                                     spec["timing"]["software_rounds"])
        except Exception as exc:
            out["timing"]["software_key_error"] = f"{type(exc).__name__}: {exc}"
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
