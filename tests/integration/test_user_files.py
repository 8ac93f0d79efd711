"""Files the user names (certificate, key, PIN file) that are not small regular files.

/dev/zero once grew a process to 6.9 GB, a FIFO hung it. Each case runs in its own child process
(with an address-space limit, so the old behaviour fails fast instead of exhausting the machine) that
reports the error, the time taken and how much its peak RSS grew.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightclient import tls

ROOT = Path(__file__).resolve().parents[2]

CHILD = r"""
import json, resource, sys, time
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
from lightclient import keys, tls
import lightclient._native  # loaded before measuring: only the read itself counts
what, path, ref = sys.argv[1:4]
calls = {
    "cert": lambda: tls.client_context(cert=path, key="/nonexistent/key.pem"),
    "key": lambda: keys.load_key(path),
    "pin": lambda: keys.load_key(ref, pin_file=path),
}
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.monotonic()
try:
    calls[what]()
    out = {"error": None}
except BaseException as exc:
    out = {"error": type(exc).__module__ + "." + type(exc).__name__, "message": str(exc)}
out["seconds"] = time.monotonic() - started
out["extra_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps(out))
"""


def _make(kind, tmp_path):
    path = tmp_path / kind
    if kind == "dev-zero":
        return "/dev/zero"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "sparse-2gib":
        with open(path, "wb") as fh:
            fh.truncate(2 << 30)
    return str(path)


@pytest.mark.parametrize("kind", ["dev-zero", "fifo", "directory", "sparse-2gib"])
@pytest.mark.parametrize("what", ["cert", "key", "pin"])
def test_unusable_file_is_a_typed_error_fast_and_small(softhsm, tmp_path, what, kind):
    path = _make(kind, tmp_path)
    ref = f"pkcs11:token=lc-test;object=eckey?module-path={softhsm.module_path}"
    proc = subprocess.run([sys.executable, "-c", CHILD, what, path, ref], capture_output=True, text=True,
                          timeout=60, cwd=ROOT, env=softhsm.env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["error"] == "lightclient.exceptions.ConfigError", out
    assert path in out["message"] and ("regular file" in out["message"] or "too large" in out["message"]), out
    assert out["seconds"] < 1.0, out
    assert out["extra_kb"] < 50 * 1024, out


def test_keylog_file_is_created_owner_only(tmp_path):
    old = os.umask(0o022)
    try:
        path = tmp_path / "keys.log"
        assert tls.private_keylog(path) == str(path)
        assert (path.stat().st_mode & 0o777) == 0o600
        # Python's ssl then appends to it without widening it.
        ctx = tls.ssl.SSLContext(tls.ssl.PROTOCOL_TLS_CLIENT)
        ctx.keylog_filename = str(path)
        assert (path.stat().st_mode & 0o777) == 0o600
    finally:
        os.umask(old)


@pytest.mark.parametrize("setup, match", [
    (lambda p: (p.write_text("old secrets\n"), p.chmod(0o644)), "can be read by other users"),
    (lambda p: p.mkdir(), "regular file|directory"),
    (lambda p: p.symlink_to(p.parent / "elsewhere"), "symbolic link"),
])
def test_keylog_file_others_can_read_is_refused(tmp_path, setup, match):
    path = tmp_path / "keys.log"
    setup(path)
    with pytest.raises(tls.ConfigError, match=match):
        tls.private_keylog(path)
    if path.is_file() and not path.is_symlink():
        assert (path.stat().st_mode & 0o777) == 0o644   # not silently changed
