"""The shim under valgrind (no memory errors or leaks in its frames) and a 1,000-round RSS check."""
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from ..conftest import PIN

ROOT = Path(__file__).resolve().parents[2]


def _args(device, test_ca, n, *extra):
    return [sys.executable, "-m", "tests.integration.native_child", device["ec"]["uri"], str(device["ec"]["cert"]),
            str(test_ca.cert), str(n), *extra]


def _ours(error: ET.Element) -> bool:
    """Does this valgrind error involve the shim's functions (or OpenSSL/libp11 called from them)?

    cffi's one-time module set-up (_cffi_init) and CPython's own noise are not the shim's."""
    for frame in error.iter("frame"):
        fn = frame.findtext("fn") or ""
        if fn.startswith(("lc_", "_cffi_f_lc_")):
            return True
    return False


def test_shim_is_clean_under_valgrind(softhsm, device, test_ca, tmp_path):
    xml = tmp_path / "vg.xml"
    cmd = ["valgrind", "--error-exitcode=0", "--num-callers=40", "--leak-check=full", "--show-leak-kinds=definite",
           "--errors-for-leak-kinds=definite", "--xml=yes", f"--xml-file={xml}", *_args(device, test_ca, 3)]
    env = {**softhsm.env, "PYTHONMALLOC": "malloc"}  # let valgrind see every allocation
    proc = subprocess.run(cmd, input=PIN + "\n", capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert "CHILD-OK" in proc.stdout, proc.stderr[-2000:]
    errors = ET.parse(xml).getroot().findall("error")
    ours = [(e.findtext("kind"), e.findtext("what") or e.findtext("xwhat/text")) for e in errors if _ours(e)]
    assert ours == []


def test_thousand_rounds_do_not_grow_memory(softhsm, device, test_ca):
    proc = subprocess.run(_args(device, test_ca, 1000, "rss"), input=PIN + "\n", capture_output=True, text=True,
                          cwd=ROOT, env=softhsm.env, timeout=300)
    assert "CHILD-OK" in proc.stdout, proc.stderr[-2000:]
    values = dict(line.split() for line in proc.stdout.splitlines() if line.startswith("RSS-"))
    growth_kib = int(values["RSS-END"]) - int(values["RSS-WARM"])
    # 900 rounds after warm-up: a leak of even 1 KiB per round would show as ~900 KiB.
    assert growth_kib < 512, f"RSS grew by {growth_kib} KiB over 900 rounds"
