"""The `make demo` walk-through: a device whose key never leaves a (software) token, end to end.

1. start the local IoT Hub emulator with its Device Provisioning Service (no cloud account);
2. create a SoftHSM2 token and an EC P-256 key on it (sensitive, non-extractable);
3. sign CSRs inside the token: one for a bootstrap certificate, one that DPS turns into the device
   certificate while provisioning over HTTPS with the same key;
4. connect to the assigned hub with lightclient's Device, send telemetry, receive a desired-property
   change, answer a direct method invoked from the service side;
5. print what the hub received.

Everything lives in a temporary directory (removed afterwards; set DEMO_DIR to keep it) and every
process and thread is stopped at the end.
"""
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

from lightclient import dps, keys, tls
from lightclient.keys import csr_pem, sign_csr
from lightclient.device import Device
from lightclient.emulator.service import Emulator
from lightclient.identity import Identity

# The demo's SoftHSM token comes from the test lab (tests/lab), which lives in the checkout, not in the
# installed package: import it from the repository this script sits in.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests import lab  # noqa: E402

PIN = os.environ.get("DEMO_PIN", "1234")
DEVICE_ID = "demo-device"
ID_SCOPE = "0ne00000001"


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def main() -> int:
    if os.environ.get("DEMO_DIR"):
        return run(Path(os.environ["DEMO_DIR"]))
    with tempfile.TemporaryDirectory(prefix="lightclient-demo-") as tmp:
        return run(Path(tmp))


def run(root: Path) -> int:
    started = time.monotonic()
    step("IoT Hub emulator + DPS on loopback")
    with Emulator(root / "emulator", hostname="localhost") as hub:
        hub.start_dps(0, id_scope=ID_SCOPE, polls=1, retry_after=1)
        print(f"hub  mqtts://127.0.0.1:{hub.port}  (trust {hub.ca_path})")
        print(f"DPS  https://{hub.dps.endpoint}  id scope {ID_SCOPE}, group enrollment by the emulator's CA")

        step(f"SoftHSM2 token in {root / 'softhsm'}")
        hsm = lab.SoftHSM(root / "softhsm")
        hsm.init_token("demo", PIN, "so-" + PIN)
        info = hsm.keygen("demo", PIN, "device-key", "ec-p256")
        hsm.activate()
        uri = f"{info['uri']}?module-path={hsm.module_path}"
        key = keys.load_key(uri, pin=PIN)
        print(f"key pair on the token, private key sensitive + non-extractable: {key!r}")

        step("bootstrap certificate from a CSR signed inside the token")
        (root / "bootstrap.csr").write_bytes(csr_pem(sign_csr(key, DEVICE_ID)))
        bootstrap = hub.sign_csr(root / "bootstrap.csr", root / "bootstrap.pem")
        print(f"bootstrap certificate CN={DEVICE_ID}: {bootstrap}")

        step("provision over HTTPS with the same key; DPS issues the device certificate from a CSR")
        https = tls.https_context(cert=bootstrap, key=key, ca=hub.ca_path)
        issued = root / "device.pem"
        result = dps.provision(ID_SCOPE, DEVICE_ID, ssl_context=https, endpoint=hub.dps.endpoint,
                               csr=sign_csr(key, DEVICE_ID), cert_out=str(issued),
                               poll_interval=(0.2, 2.0), timeout=30)
        print(f"assigned to hub {result.assigned_hub!r} as device {result.device_id!r} "
              f"({result.substatus}); certificate chain of {len(result.issued_certificate_chain)} written to {issued}")
        print(f"TLS handshakes DPS saw for the whole provisioning: {hub.dps.handshakes.get(DEVICE_ID)}")

        step("connect to the assigned hub with lightclient's Device (same key, issued certificate)")
        identity = Identity(result.assigned_hub, result.device_id)
        ctx = tls.client_context(cert=issued, key=key, ca=hub.ca_path)
        desired_seen = threading.Event()
        desired_log = []

        def on_desired(patch, version):
            desired_log.append((version, patch))
            if "interval" in patch:
                desired_seen.set()

        device = Device(identity, ctx, host="127.0.0.1", port=hub.port, on_desired=on_desired)

        @device.method("reboot")
        def reboot(payload):
            return {"rebooting": True, "delay": (payload or {}).get("delay", 0)}

        with device:
            print(f"connected as {identity.client_id} (username {identity.username()})")
            for i in range(3):
                device.send_and_wait(json.dumps({"temperature": 21.5 + i}).encode(),
                                     {"sensor": "demo"}, content_type="application/json",
                                     content_encoding="utf-8", timeout=10)
            print("sent 3 telemetry messages, each acknowledged (QoS 1)")
            version = device.patch_reported({"firmware": "1.0.0"}, timeout=10)
            print(f"reported properties patched (reported $version {version})")

            hub.update_desired(DEVICE_ID, {"interval": 30})
            if not desired_seen.wait(10):
                raise SystemExit("the desired-property change did not arrive")
            print(f"desired-property change received: {desired_log[-1][1]} (version {desired_log[-1][0]})")

            answer = hub.invoke_method(DEVICE_ID, "reboot", {"delay": 5}, timeout=10)
            print(f"direct method 'reboot' invoked from the service side -> {answer.status} {answer.payload}")

        step("what the hub received")
        for event in hub.events(DEVICE_ID):
            print(f"  telemetry {event.body.decode()}  properties={dict(event.properties)} "
                  f"system={dict(event.system_properties)}")
        print(f"  twin reported: {hub.get_twin(DEVICE_ID)['reported']}")
        problems = hub.diagnostics(DEVICE_ID)
        print(f"  protocol diagnostics for {DEVICE_ID}: {len(problems) or 'none'}")
        for problem in problems:
            print(f"    {problem}")
    step(f"done in {time.monotonic() - started:.1f} s: the key never left the token")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
