"""`benchmarks/run.py --smoke` still runs every benchmark (tiny counts) and writes its table.

The full benchmarks are `make bench`; this only keeps their code working. The azure-iot-device
comparison is skipped by the smoke run unless its virtual environment was already installed by a
full run (the smoke run never installs it).
"""
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BENCHMARKS = ("telemetry", "startup", "footprint", "connect", "provisioning", "emulator")


def test_bench_smoke(tmp_path):
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=240, cwd=ROOT)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    table = (tmp_path / "latest.md").read_text()
    results = json.loads((tmp_path / "latest.json").read_text())
    assert results["mode"] == "smoke"
    for name in BENCHMARKS:
        section = results["sections"][name]
        assert section["error"] is None, f"{name}: {section['error']}"
        assert section["rows"], name
        assert f"## {section['title']}" in table
    assert "| lightclient |" in table
    assert results["machine"]["cores"] and results["machine"]["openssl"]
    # A smoke run must never replace the committed results.
    assert str(ROOT / "benchmarks" / "results") not in proc.stdout
    print(f"smoke run: {elapsed:.0f} s")
