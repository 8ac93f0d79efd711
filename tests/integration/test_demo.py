"""`make demo` runs `examples/demo.py`; run it here too, so CI proves the demo works end to end."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_demo_runs_end_to_end():
    pin = "demo-pin-7c1e"
    proc = subprocess.run([sys.executable, "examples/demo.py"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "DEMO_PIN": pin})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "TLS handshakes DPS saw for the whole provisioning: 1" in out
    assert "sent 3 telemetry messages, each acknowledged" in out
    assert "desired-property change received: {'interval': 30" in out
    assert "direct method 'reboot' invoked from the service side -> 200 {'rebooting': True, 'delay': 5}" in out
    assert out.count('telemetry {"temperature"') == 3
    assert "protocol diagnostics for demo-device: none" in out
    assert pin not in out + proc.stderr  # the PIN is never printed
