"""The `make demo` walk-through: a key that never leaves a (software) token, used for mutual TLS.

1. create a SoftHSM2 token and an EC P-256 key pair on it (sensitive, non-extractable);
2. have lightclient sign a CSR with the token key, and a local test CA issue the certificate;
3. start a local mosquitto that requires client certificates;
4. connect with paho through lightclient's hardware-backed ssl.SSLContext and publish.

Everything lives in a temporary directory (removed afterwards; set DEMO_DIR to keep it) and every
process is stopped at the end.
"""
import base64
import os
import queue
import ssl
import sys
import tempfile
from pathlib import Path

import paho.mqtt.client as mqtt

from lightclient import keys, lab, tls
from lightclient._native import sign_csr

PIN = os.environ.get("DEMO_PIN", "1234")


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def main() -> int:
    if os.environ.get("DEMO_DIR"):
        return run(Path(os.environ["DEMO_DIR"]))
    with tempfile.TemporaryDirectory(prefix="lightclient-demo-") as tmp:
        return run(Path(tmp))


def run(root: Path) -> int:
    step(f"SoftHSM2 token in {root / 'softhsm'}")
    hsm = lab.SoftHSM(root / "softhsm")
    hsm.init_token("demo", PIN, "so-" + PIN)
    info = hsm.keygen("demo", PIN, "device-key", "ec-p256")
    hsm.activate()
    uri = f"{info['uri']}?module-path={hsm.module_path}"
    print(f"key pair created on the token: {info['key_type']}, private key sensitive + non-extractable")
    print(f"key reference: {uri}")

    step("CSR signed inside the token, certificate from a local test CA")
    key = keys.load_key(uri, pin=PIN)
    print(f"loaded {key!r} through the libp11 pkcs11 engine (the private key stays in the token)")
    der = sign_csr(key, [("CN", "demo-device")])
    ca = lab.TestCA(root / "ca")
    cert = ca.sign_csr(b"-----BEGIN CERTIFICATE REQUEST-----\n" + base64.encodebytes(der)
                       + b"-----END CERTIFICATE REQUEST-----\n", root / "demo-device.pem")
    print(f"certificate for CN=demo-device: {cert}")

    step("mosquitto on loopback, require_certificate true")
    with lab.Mosquitto(root / "mosquitto", ca) as broker:
        print(f"broker listening on 127.0.0.1:{broker.port}")

        # The 'cloud side' watches the topic with its own (file-key) certificate.
        svc_cert, svc_key = ca.issue_file_key("demo-service", root)
        svc_ctx = ssl.create_default_context(cafile=str(ca.cert))
        svc_ctx.load_cert_chain(str(svc_cert), str(svc_key))
        got: "queue.Queue" = queue.Queue()
        ready: "queue.Queue" = queue.Queue()
        svc = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="demo-service")
        svc.tls_set_context(svc_ctx)
        svc.on_message = lambda c, u, m: got.put(m)
        svc.on_subscribe = lambda *a: ready.put(True)
        svc.connect("127.0.0.1", broker.port)
        svc.loop_start()
        svc.subscribe("devices/demo-device/#", qos=1)
        ready.get(timeout=10)

        step("paho connects through the hardware-backed context and publishes")
        ctx = tls.client_context(cert=cert, key=key, ca=ca.cert)
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="demo-device", protocol=mqtt.MQTTv311)
        client.tls_set_context(ctx)
        client.connect("127.0.0.1", broker.port)
        client.loop_start()
        try:
            for i in range(3):
                msg = f'{{"temperature": {21.5 + i}}}'.encode()
                pub = client.publish("devices/demo-device/messages/events/", msg, qos=1)
                pub.wait_for_publish(timeout=10)
                received = got.get(timeout=10)
                print(f"published #{i + 1} over {client.socket().version()} {client.socket().cipher()[0]}: "
                      f"PUBACK received; service side got {received.payload.decode()}")
        finally:
            client.disconnect()
            client.loop_stop()
            svc.disconnect()
            svc.loop_stop()
        seen = [line for line in broker.log().splitlines() if "as demo-device" in line]
        print(f"broker authenticated the client by its certificate: {seen[0].split(': ', 1)[1] if seen else '?'}")
    step("done: the device authenticated with a key that never left the token")
    return 0


if __name__ == "__main__":
    sys.exit(main())
