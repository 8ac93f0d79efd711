"""The README's "Try it locally" block, taken from README.md and run verbatim in bash, so it cannot drift.

It runs in a scratch directory under this test's tmp_path (the block makes one with mktemp -d, which
honours TMPDIR), with free loopback ports passed in as MQTT/API/DPS (the block's defaults are the usual
ports), and a time bound; whatever it leaves running is killed with its process group.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

from tests import lab

ROOT = Path(__file__).resolve().parents[2]
_SCRUB = ("IOT_HUB_HOSTNAME", "DEVICE_ID", "PATH_TO_CERTIFICATE_FILE", "KEY_IDENTIFIER", "PKCS11_MODULE_PATH",
          "PROVISIONING_IDSCOPE", "PROVISIONING_REGISTRATION_ID", "PROVISIONING_HOST", "SOFTHSM2_CONF",
          "VIRTUAL_ENV")


def readme_block(title: str = "### Try it locally") -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split(title, 1)[1]
    match = re.search(r"```sh\n(.*?)```", section, re.S)
    assert match, f"no ```sh block under {title!r}"
    return match.group(1)


def test_the_block_starts_from_the_clone_and_creates_its_pin_files():
    block = readme_block()
    assert block.startswith(". .venv/bin/activate")
    assert "> pin" in block and "> so.pin" in block and 'cd "$(mktemp -d)"' in block
    for step in ("init-token", "keygen", "csr", "--sign-csr", "doctor", "provision", "send", "listen", "twin report",
                 "twin get", "trace", "curl -sf -X POST", "messages/deviceBound", "/methods", "curl -sf -X PATCH",
                 "kill $EMULATOR"):
        assert step in block, step


def test_the_readme_walkthrough_runs_as_written(tmp_path):
    block = readme_block()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIGHTCLIENT_") and k not in _SCRUB}
    env.update(TMPDIR=str(tmp_path), MQTT=str(lab.free_port()), API=str(lab.free_port()), DPS=str(lab.free_port()))
    proc = subprocess.Popen(["bash", "-e", "-o", "pipefail", "-c", block], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=240)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)     # anything the block left behind (it should leave nothing)
        except ProcessLookupError:
            pass
        proc.wait()
    assert proc.returncode == 0, out
    assert re.search(r"^initialised token 'dev' \(serial \w+\) in slot \d+ of ", out, re.M), out
    assert "wrote a CSR for CN=dev-1" in out
    assert out.count("\n✗ ") == 0 and "all checks passed" in out, out
    assert "✓ MQTT CONNECT accepted" in out and "✓ SUBSCRIBE to the device's topics" in out
    assert "assigned hub localhost, device id dev-1" in out
    assert re.search(r"^sent 3, acknowledged 3 in ", out, re.M), out
    assert re.search(r"^c2d message .*prio=high: open the door$", out, re.M), out
    assert re.search(r'^method call reboot rid=\S+ payload \{"delay": 0\} -> answered 200', out, re.M), out
    assert '{"status": 200, "payload": {}}' in out
    assert re.search(r'^desired properties version=\d+: \{"interval": 5', out, re.M), out
    assert "3 events: 1 cloud-to-device, 1 method call, 1 desired patch" in out
    assert "reported properties updated (status 204" in out and '"firmware": "1.0"' in out
    assert "→ CONNECT" in out and "← CONNACK" in out and "telemetry" in out and "→ DISCONNECT" in out
    assert "Traceback" not in out
    # The scratch directory was made where TMPDIR pointed.
    assert any(p.is_dir() and (p / "softhsm2.conf").exists() for p in tmp_path.iterdir())
