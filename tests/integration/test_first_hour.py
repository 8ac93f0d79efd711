"""Issue 14, "the first hour": honest exit codes, errors in CLI terms, doctor's MQTT checks, progress and
Ctrl-C, and the small things a newcomer trips over. One test (or one row) per item; the README
walk-through itself is run by test_readme_walkthrough.py.

The hub is `lightclient emulator` run as a user runs it (a subprocess with a state directory and a
service API), the key a file key it issued, or a SoftHSM key where the token matters; loopback only.
"""
from __future__ import annotations

import os
import pty
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests import lab
from lightclient.commands import common

from ..conftest import PIN, SO_PIN

ROOT = Path(__file__).resolve().parents[2]
_SCRUB = ("IOT_HUB_HOSTNAME", "DEVICE_ID", "PATH_TO_CERTIFICATE_FILE", "KEY_IDENTIFIER", "PKCS11_MODULE_PATH",
          "PROVISIONING_IDSCOPE", "PROVISIONING_REGISTRATION_ID", "PROVISIONING_HOST")
CLI = [sys.executable, "-m", "lightclient"]


def _base_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIGHTCLIENT_") and k not in _SCRUB}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def cli(*args, env, timeout=60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, **kw)


class RunningEmulator:
    """`lightclient emulator` in a subprocess; its ports and the device files come from its banner."""

    def __init__(self, state: Path, *extra: str):
        self.state = state
        self.proc = subprocess.Popen([*CLI, "emulator", "--state-dir", str(state), "--port", "0", "--http-port", "0",
                                      "--dps-port", "0", "--device", "dev-1", *extra], cwd=ROOT, env=_base_env(),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        banner = []
        for line in self.proc.stdout:
            banner.append(line)
            if line.strip() == "ready":
                break
        text = "".join(banner)
        assert "ready" in text, text
        self.port = int(re.search(r"mqtts://127\.0\.0\.1:(\d+)", text).group(1))
        self.api = re.search(r"service API: (\S+)", text).group(1)
        self.dps_port = int(re.search(r"DPS: https://127\.0\.0\.1:(\d+)", text).group(1))
        m = re.search(r"device dev-1: CA-signed, cert (\S+) key (\S+)", text)
        self.cert, self.key = m.group(1), m.group(2)
        self.ca = state / "ca.pem"
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()

    def env(self, **extra) -> dict:
        settings = dict(IOT_HUB_HOSTNAME="localhost", DEVICE_ID="dev-1", PATH_TO_CERTIFICATE_FILE=self.cert,
                        KEY_IDENTIFIER=self.key, LIGHTCLIENT_CA=self.ca, LIGHTCLIENT_PORT=self.port)
        return _base_env(**{**settings, **extra})

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    e = RunningEmulator(tmp_path_factory.mktemp("first-hour") / ".emu")
    yield e
    e.stop()


@pytest.fixture
def silent_server():
    """A TCP port that accepts connections and never says a word (a server that hangs)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    yield srv.getsockname()[1]
    srv.close()


def _one_line_error(proc, code: int) -> str:
    assert proc.returncode == code, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


# ------------------------------------------------------------------------------ item 1: exit codes by class


def _provision(emu, *extra):
    return ["provision", "--id-scope", "0ne00000001", "--device-id", "dev-1", "--cert", emu.cert, "--key", emu.key,
            *extra]


@pytest.mark.parametrize("case", ["usage", "credentials-refused", "connection-refused", "mqtt-timeout",
                                  "provision-timeout", "server-untrusted-send", "server-untrusted-provision",
                                  "doctor-problem"])
def test_exit_code_follows_the_readme_table(emu, silent_server, case):
    """One row per class of the README's exit-code table (130, Ctrl-C, is test_ctrl_c_…)."""
    env = emu.env()
    if case == "usage":
        line = _one_line_error(cli("send", "x", "--prop", "=v", env=env), 2)
        assert "--prop" in line
    elif case == "credentials-refused":
        line = _one_line_error(cli("send", "x", "--device-id", "nobody", env=env), 3)
        assert "CONNACK 5 (not authorized)" in line and "'nobody' is not registered in this hub" in line
    elif case == "connection-refused":
        line = _one_line_error(cli("send", "x", "--port", lab.free_port(), env=env), 4)
        assert re.search(r"cannot connect to localhost:\d+: connection refused\. Check --hub and --port", line), line
    elif case == "mqtt-timeout":
        # TLS to a server that never answers: the handshake times out (--timeout bounds the CONNECT).
        proc = cli("send", "x", "--port", silent_server, "--timeout", "1", env=env)
        line = _one_line_error(proc, 4)
        assert "Unspecified error" not in line
    elif case == "provision-timeout":
        proc = cli(*_provision(emu, "--endpoint", f"127.0.0.1:{silent_server}", "--ca", emu.ca, "--timeout", "0.5"),
                   env=_base_env())
        line = _one_line_error(proc, 4)      # was 2: OperationTimeout is also an OSError
        assert "did not answer" in line or "timed out" in line, line
    elif case == "server-untrusted-send":
        line = _one_line_error(cli("send", "x", env=emu.env(LIGHTCLIENT_CA="")), 4)
        assert "failed verification: untrusted" in line and "--hub" in line and "--ca" in line
        assert "ca=" not in line and "host=" not in line and "client_context" not in line, line
    elif case == "server-untrusted-provision":
        proc = cli(*_provision(emu, "--endpoint", f"localhost:{emu.dps_port}"), env=_base_env())
        line = _one_line_error(proc, 4)      # was 2 here while send said 4
        assert "failed verification: untrusted" in line and "--endpoint" in line and "--ca" in line
        assert "ca=" not in line and "client_context" not in line, line
    else:
        proc = cli("doctor", "--device-id", "someone-else", "--cert", emu.cert, "--key", emu.key, "--ca", emu.ca,
                   env=_base_env())
        assert proc.returncode == 1 and proc.stdout.rstrip().endswith("1 problem found"), proc.stdout


def test_send_with_the_hub_gone_mid_run_says_so_and_exits_4(tmp_path):
    hub = RunningEmulator(tmp_path / ".emu")
    try:
        proc = subprocess.Popen([*CLI, "send", "m{n}", "--count", "200", "--interval", "0.05"], cwd=ROOT,
                                env=hub.env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        first = proc.stderr.readline()
        assert first.startswith("progress: sent "), first
        hub.stop()
        out, err = proc.communicate(timeout=60)
    finally:
        hub.stop()
    err = first + err
    assert proc.returncode == 4, err
    assert re.search(r"^sent \d+, acknowledged \d+ in ", out, re.M), out
    line = next(line for line in err.splitlines() if line.startswith("error: "))
    assert re.search(r"error: \d+ of 200 messages were not acknowledged: the connection to localhost:\d+ dropped "
                     r"\((the connection was lost|the server closed the connection)", line), line
    assert "Unspecified error" not in err


# ------------------------------------------------------------------------------ item 2: wrong --hub, doctor MQTT


def test_a_wrong_hub_is_named_as_a_likely_cause_not_blamed_on_the_device(emu):
    # 127.0.0.1 is in the emulator's server certificate, so TLS passes and the hub refuses the user name.
    line = _one_line_error(cli("send", "x", "--hub", "127.0.0.1", env=emu.env()), 3)
    assert "CONNACK 5 (not authorized)" in line and "IoT Hub does not say which" in line
    assert "(1) --hub 127.0.0.1 is not the name of the hub the device is registered in" in line
    assert "(2) the device 'dev-1' is not registered in this hub, or it is disabled" in line
    assert "(3) the certificate is not the registered one" in line


def test_doctor_connect_does_mqtt_and_shows_the_emulators_diagnostic(emu):
    args = ["doctor", "--device-id", "dev-1", "--cert", emu.cert, "--key", emu.key, "--ca", emu.ca]
    proc = cli(*args, "--hub", "127.0.0.1", "--connect", f"127.0.0.1:{emu.port}", env=_base_env())
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout
    assert re.search(r"^✓ TLS handshake with 127\.0\.0\.1:\d+", out, re.M), out   # TLS alone would have passed
    row = next(line for line in out.splitlines() if "MQTT CONNECT accepted" in line)
    assert row.startswith("✗") and "refused, CONNACK 5 (not authorized)" in row
    assert "the emulator says: [dev-1] connect.username: CONNACK 5: username must start with this hub's host name " \
           "'localhost/'" in row, row
    assert "fix: give --hub the hub's own host name" in out.split(row, 1)[1].splitlines()[1]
    assert re.search(r"^– SUBSCRIBE to the device's topics +not connected", out, re.M)
    # An unknown device: the emulator names that instead.
    proc = cli(*args[:1], "--device-id", "ghost", *args[3:], "--connect", f"localhost:{emu.port}", env=_base_env())
    assert "the emulator says: [ghost] connect.client-id" in proc.stdout, proc.stdout


# ------------------------------------------------------------------------------ item 6: errors in CLI terms


def test_errors_name_cli_flags_and_network_errors_are_one_clean_line(emu, tmp_path):
    # An encrypted key file without its pass phrase: the CLI names its PIN flags, not pin=/pin_file=.
    enc = tmp_path / "enc.pem"
    subprocess.run(["openssl", "pkey", "-in", emu.key, "-aes256", "-passout", "pass:secret-pass", "-out", enc],
                   check=True, capture_output=True)
    line = _one_line_error(cli("send", "x", "--key", enc, env=emu.env()), 3)
    assert "--pin-file FILE or --pin-env VAR" in line and "pin=" not in line and "pin_file" not in line, line
    # A pkcs11: key without a module: --module-path, not module_path=.
    line = _one_line_error(cli("csr", "--key", "pkcs11:token=t;object=k", "--device-id", "d", env=_base_env()), 2)
    assert "--module-path" in line and "module_path=" not in line, line
    # DPS unreachable: one line, no urllib3 internals.
    line = _one_line_error(cli(*_provision(emu, "--endpoint", f"127.0.0.1:{lab.free_port()}", "--ca", emu.ca),
                               env=_base_env()), 4)
    assert re.fullmatch(r"error: cannot reach DPS at 127\.0\.0\.1:\d+: connection refused", line), line


# ------------------------------------------------------------------------------ item 8: doctor without python-pkcs11


@pytest.fixture(scope="module")
def token_key(tmp_path_factory, emu):
    root = tmp_path_factory.mktemp("token")
    hsm = lab.SoftHSM(root / "hsm")
    hsm.init_token("fh", PIN, SO_PIN)
    (root / "pin").write_text(PIN + "\n")
    env = _base_env(**hsm.env, LIGHTCLIENT_MODULE_PATH=hsm.module_path)
    out = cli("keygen", "--token", "fh", "--label", "k", "--pin-file", root / "pin", env=env).stdout
    uri = next(line for line in out.splitlines() if line.startswith("pkcs11:"))
    assert cli("csr", "--key", uri, "--device-id", "dev-1", "--pin-file", root / "pin", "--out", root / "d.csr",
               env=env).returncode == 0
    assert cli("emulator", "--state-dir", emu.state, "--sign-csr", root / "d.csr", "--out", root / "d.pem",
               env=env).returncode == 0
    return SimpleNamespace(root=root, env=env, uri=uri, pin=root / "pin", cert=root / "d.pem")


def test_doctor_without_python_pkcs11_still_checks_the_key_through_openssl(token_key, emu):
    # python-pkcs11 "not installed": a package of that name that fails to import, first on the path.
    blocker = token_key.root / "no-pkcs11" / "pkcs11"
    blocker.mkdir(parents=True, exist_ok=True)
    (blocker / "__init__.py").write_text("raise ImportError(\"No module named 'pkcs11'\")\n")
    env = {**token_key.env, "PYTHONPATH": f"{blocker.parent}:{ROOT}"}
    proc = cli("doctor", "--device-id", "dev-1", "--cert", token_key.cert, "--key", token_key.uri, "--pin-file",
               token_key.pin, "--ca", emu.ca, "--connect", f"localhost:{emu.port}", env=env)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    row = next(line for line in out.splitlines() if "PKCS#11 module loads" in line)
    assert row.startswith("!") and "python-pkcs11 is not installed" in row
    assert "fix: pip install 'lightclient[token]'" in out
    assert "give the path of a PKCS#11 module" not in out
    assert re.search(r"^✓ key loads through OpenSSL +EC-256 from pkcs11:token=fh", out, re.M), out
    assert "✓ MQTT CONNECT accepted" in out and out.endswith("all checks passed\n")


# ------------------------------------------------------------------------------ item 9: the emulator's first impression


def test_emulator_on_a_busy_port_says_so_in_one_line(tmp_path):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        port = busy.getsockname()[1]
        proc = cli("emulator", "--state-dir", tmp_path / "s", "--port", port, env=_base_env())
    finally:
        busy.close()
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr == (f"emulator: error: a port is already in use on 127.0.0.1 (MQTT {port}): is another "
                           "emulator running? Stop it, or pick other ports (0 picks free ones)\n")
    help_out = cli("emulator", "--help", env=_base_env()).stdout
    assert help_out.startswith("usage: lightclient emulator ")


# ------------------------------------------------------------------------------ item 10: progress, Ctrl-C, slots, files


def test_ctrl_c_during_send_prints_the_summary_and_exits_130(emu):
    proc = subprocess.Popen([*CLI, "send", "m{n}", "--count", "500", "--interval", "0.05"], cwd=ROOT, env=emu.env(),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = proc.stderr.readline()
    assert first.startswith("progress: sent "), first
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, out + err
    m = re.fullmatch(r"sent (\d+), acknowledged (\d+) in \d+\.\d\d s \(\d+\.\d msg/s\); interrupted, (\d+) not sent\n",
                     out)
    assert m, out
    sent, acked, unsent = map(int, m.groups())
    assert sent + unsent == 500 and 0 < acked <= sent < 500
    assert "Traceback" not in err


def test_send_progress_is_a_live_line_on_a_terminal(emu):
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([*CLI, "send", "m{n}", "--count", "12", "--interval", "0.1"], cwd=ROOT,
                                env=emu.env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave)
        os.close(slave)
        seen = b""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(master, 4096)
            except OSError:     # EIO: the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        out = proc.communicate(timeout=30)[0].decode()
    finally:
        os.close(master)
    assert proc.returncode == 0, seen
    text = seen.decode()
    assert re.search(r"\r\x1b\[Ksent \d+/12  acknowledged \d+  \d+\.\d msg/s  ETA \d+ s", text), repr(text)
    assert "progress:" not in text                      # no log lines on a terminal
    assert text.endswith("\r\x1b[K")                    # the live line is cleared before the summary
    assert out.startswith("sent 12, acknowledged 12 in ")


def test_init_token_reports_the_slot_that_tokens_lists(tmp_path):
    hsm = lab.SoftHSM(tmp_path / "hsm")
    env = _base_env(**hsm.env)
    (tmp_path / "pin").write_text(PIN + "\n")
    (tmp_path / "so").write_text(SO_PIN + "\n")
    out = cli("init-token", "--module-path", hsm.module_path, "--label", "slotted", "--so-pin-file", tmp_path / "so",
              "--pin-file", tmp_path / "pin", env=env).stdout
    slot = re.search(r"initialised token 'slotted' \(serial \w+\) in slot (\d+) ", out).group(1)
    listed = cli("tokens", "--module-path", hsm.module_path, env=env).stdout
    assert re.search(rf"^slot {slot}  token 'slotted'", listed, re.M), (out, listed)


def test_newcomer_files_and_claims():
    ignored = (ROOT / ".gitignore").read_text().split()
    assert ".emu/" in ignored
    readme = (ROOT / "README.md").read_text()
    assert "It takes a few seconds" not in readme          # the first `make demo` took 98 s
    for names in common.ENV.values():                      # the README names every variable the CLI reads
        for name in names:
            if name not in ("LIGHTCLIENT_HUB", "LIGHTCLIENT_DEVICE_ID", "LIGHTCLIENT_CERT", "LIGHTCLIENT_KEY",
                            "LIGHTCLIENT_ID_SCOPE", "LIGHTCLIENT_REGISTRATION_ID", "LIGHTCLIENT_DPS_ENDPOINT"):
                assert name in readme, name


# ------------------------------------------------------------------------------ item 7: packaging


def test_building_the_wheel_is_quiet_and_ships_the_roots(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path), str(ROOT)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "is absent from the `packages` configuration" not in proc.stdout + proc.stderr
    import zipfile

    (wheel,) = tmp_path.glob("lightclient-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "lightclient/roots/iothub-roots.pem" in names and "lightclient/py.typed" in names
    assert not [n for n in names if "__pycache__" in n]
