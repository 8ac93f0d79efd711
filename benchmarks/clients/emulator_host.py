"""Child process: the IoT Hub emulator under load (lightclient.emulator.service.Emulator).

Spec on stdin (one JSON line): {"state_dir": DIR, "devices": N}. Registers N device identities that
all use one self-signed certificate (registered by thumbprint, as IoT Hub allows), prints one JSON line
{"port", "ca", "cert", "key"}, then answers the commands "stats" and "quit" read from stdin, one JSON
line each.
"""
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from lightclient.emulator import certs
from lightclient.emulator.service import Emulator


def main() -> int:
    spec = json.loads(sys.stdin.readline())
    state = Path(spec["state_dir"])
    state.mkdir(parents=True, exist_ok=True)
    cert, key = state / "load.pem", state / "load.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=bench-load"],
                   check=True, capture_output=True)
    with Emulator(state, hostname="localhost") as hub:
        prints = certs.thumbprints(cert)
        hub.register_device("dev-0", certificate=cert)
        for i in range(1, spec["devices"]):
            hub.register_device(f"dev-{i}", thumbprints=prints)
        print(json.dumps({"port": hub.port, "ca": str(hub.ca_path), "cert": str(cert), "key": str(key)}), flush=True)
        for line in sys.stdin:
            command = line.strip()
            if command == "stats":
                usage = resource.getrusage(resource.RUSAGE_SELF)
                print(json.dumps({"events": len(hub.events()), "cpu_s": usage.ru_utime + usage.ru_stime,
                                  "maxrss_kb": usage.ru_maxrss, "time": time.monotonic()}), flush=True)
            elif command == "quit":
                break
    return 0


if __name__ == "__main__":
    sys.exit(main())
