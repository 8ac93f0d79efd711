"""Every file in examples/ runs here, as a user would run it: a subprocess configured only through
environment variables, against the IoT Hub emulator (with DPS) in this process, with a SoftHSM key
whose certificates the emulator issued from CSRs signed in the token. The test plays the service side
while each example runs, then checks what the hub received, what the example printed, and that the
emulator recorded no protocol deviation. (examples/demo.py has its own test: test_demo.py.)
"""
from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from lightclient import keys
from lightclient.emulator.service import Emulator

from ..conftest import PIN

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
HAS_OWN_TEST = {"demo.py"}
SCOPE = "0ne00000EX"
# Nothing the examples read may leak in from the environment running the tests.
_SCRUB = re.compile(r"^(LIGHTCLIENT_|IOT_HUB_|DEVICE_ID$|PATH_TO_CERTIFICATE_FILE$|KEY_IDENTIFIER$|PROVISIONING_)")


@pytest.fixture(scope="module")
def lab(tmp_path_factory, softhsm, device):
    root = tmp_path_factory.mktemp("examples")
    pin_file = root / "pin"
    pin_file.write_text(PIN + "\n")
    pin_file.chmod(0o600)
    with Emulator(root / "emulator", hostname="localhost") as emu:
        emu.start_dps(0, id_scope=SCOPE, polls=1, retry_after=1)
        # softhsm.activate() put SOFTHSM2_CONF into this environment; the examples inherit it.
        base = {k: v for k, v in os.environ.items() if not _SCRUB.match(k)}
        base.update(KEY_IDENTIFIER=device["ec"]["uri"], LIGHTCLIENT_PIN_FILE=str(pin_file), LIGHTCLIENT_CA=str(emu.ca_path),
                    LIGHTCLIENT_CONNECT_HOST="127.0.0.1", LIGHTCLIENT_PORT=str(emu.port), LIGHTCLIENT_RUN_SECONDS="20",
                    PYTHONUNBUFFERED="1")
        yield SimpleNamespace(emu=emu, root=root, key=device["ec"]["key"], base=base)


def certificate(lab, cn: str) -> Path:
    """A certificate from the emulator's CA for the SoftHSM key, from a CSR the token signed."""
    csr = lab.root / f"{cn.replace('/', '_')}.csr"
    csr.write_bytes(keys.csr_pem(keys.sign_csr(lab.key, cn)))
    return lab.emu.sign_csr(csr, csr.with_suffix(".pem"))


def enroll(lab, device_id: str, module_id: str | None = None, **env) -> dict:
    """Register the identity in the hub and return the example's environment for it."""
    cert = certificate(lab, f"{device_id}/{module_id}" if module_id else device_id)
    lab.emu.register_device(device_id)
    if module_id:
        lab.emu.register_device(device_id, module_id)
        env["LIGHTCLIENT_MODULE_ID"] = module_id
    return {**lab.base, "IOT_HUB_HOSTNAME": "localhost", "DEVICE_ID": device_id, "PATH_TO_CERTIFICATE_FILE": str(cert),
            **{k: str(v) for k, v in env.items()}}


class Example:
    """One example running in a subprocess; its output lines are collected as they come."""

    def __init__(self, name: str, env: dict):
        self.name = name
        self.proc = subprocess.Popen([sys.executable, str(EXAMPLES / name)], cwd=ROOT, env=env, text=True,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lines: queue.Queue = queue.Queue()
        self.out: list = []
        self.err: list = []
        self.readers = [threading.Thread(target=self._read, args=(self.proc.stdout, self.out), daemon=True),
                        threading.Thread(target=self._read, args=(self.proc.stderr, self.err), daemon=True)]
        for reader in self.readers:
            reader.start()

    def _read(self, stream, into: list) -> None:
        for line in stream:
            into.append(line)
            self.lines.put(line)

    def transcript(self) -> str:
        return f"{self.name}\nstdout:\n{''.join(self.out)}\nstderr:\n{''.join(self.err)}"

    def expect(self, text: str, timeout: float = 15.0) -> str:
        """Wait for an output line (stdout or stderr) containing ``text``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no line with {text!r} within {timeout} s\n{self.transcript()}") from None
            if text in line:
                return line

    def finish(self, timeout: float = 25.0) -> str:
        """Wait for a clean exit; return stdout."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"did not finish within {timeout} s\n{self.transcript()}") from None
        for reader in self.readers:
            reader.join(5)
        assert self.proc.returncode == 0, f"exit {self.proc.returncode}\n{self.transcript()}"
        assert "Traceback" not in "".join(self.err), self.transcript()
        assert PIN not in "".join(self.out + self.err)
        return "".join(self.out)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        for stream in (self.proc.stdout, self.proc.stderr):
            stream.close()


@pytest.fixture
def run_example():
    started = []

    def run_example(name: str, env: dict) -> Example:
        example = Example(name, env)
        started.append(example)
        return example

    yield run_example
    for example in started:
        example.stop()


def no_deviations(lab, *identities: str) -> None:
    for identity in identities:
        assert lab.emu.diagnostics(identity) == []


def wait_until(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return result


# ------------------------------------------------------------------------------------------------ tests


def test_telemetry(lab, run_example):
    env = enroll(lab, "ex-telemetry", LIGHTCLIENT_COUNT=3, LIGHTCLIENT_INTERVAL=0)
    out = run_example("telemetry.py", env).finish()
    assert "connected to localhost as ex-telemetry" in out and "sent and acknowledged 3/3" in out
    events = lab.emu.events("ex-telemetry")
    assert [json.loads(e.body)["seq"] for e in events] == [1, 2, 3]
    for i, event in enumerate(events, 1):
        assert event.properties == {"sensor": "example"}
        assert event.system_properties == {"$.mid": f"msg-{i}", "$.ct": "application/json", "$.ce": "utf-8"}
    no_deviations(lab, "ex-telemetry")


def test_aio_telemetry(lab, run_example):
    env = enroll(lab, "ex-aio", LIGHTCLIENT_COUNT=3, LIGHTCLIENT_INTERVAL=0)
    out = run_example("aio_telemetry.py", env).finish()
    assert "connected to localhost as ex-aio" in out and "sent and acknowledged 3/3" in out
    assert "batch of 3 acknowledged" in out and "done" in out
    events = lab.emu.events("ex-aio")
    assert [json.loads(e.body).get("seq") for e in events[:3]] == [1, 2, 3]
    assert sorted(json.loads(e.body)["batch"] for e in events[3:]) == [0, 1, 2]
    assert all(e.properties == {"sensor": "example"} for e in events)
    assert [e.system_properties["$.mid"] for e in events[:3]] == ["msg-1", "msg-2", "msg-3"]
    assert len({e.system_properties["$.mid"] for e in events}) == 6
    no_deviations(lab, "ex-aio")


def test_c2d(lab, run_example):
    example = run_example("c2d.py", enroll(lab, "ex-c2d", LIGHTCLIENT_COUNT=2))
    example.expect("waiting for cloud-to-device messages")
    lab.emu.send_c2d("ex-c2d", b"hello device", message_id="c-1", content_type="text/plain",
                     properties={"priority": "high"})
    lab.emu.send_c2d("ex-c2d", "second", message_id="c-2")
    out = example.finish()
    assert ("C2D #1: 'hello device' message_id=c-1 content_type=text/plain properties={'priority': 'high'}"
            in out)
    assert "C2D #2: 'second' message_id=c-2" in out and "received 2 message(s)" in out
    assert lab.emu.queued_c2d("ex-c2d") == 0  # both acknowledged
    no_deviations(lab, "ex-c2d")


def test_methods(lab, run_example):
    example = run_example("methods.py", enroll(lab, "ex-methods", LIGHTCLIENT_COUNT=3))
    example.expect("answering direct methods")
    call = lambda name, payload: lab.emu.invoke_method("ex-methods", name, payload, timeout=10)  # noqa: E731
    reboot = call("reboot", {"delay": 5})
    assert (reboot.status, reboot.payload) == (200, {"rebooting": True, "delay": 5})
    unknown = call("selfDestruct", None)
    assert (unknown.status, unknown.payload) == (404, {"error": "no handler for method 'selfDestruct' on this device"})
    refused = call("setInterval", {"seconds": 0})
    assert (refused.status, refused.payload) == (400, {"error": 'give {"seconds": n} with n > 0'})
    interval = call("setInterval", {"seconds": 10})
    assert (interval.status, interval.payload) == (200, {"interval": 10})
    out = example.finish()  # LIGHTCLIENT_COUNT=3: the 404 is lightclient's, not a handler's, so it does not count
    assert "method reboot({'delay': 5})" in out and "method setInterval({'seconds': 0})" in out
    assert "answered 3 call(s)" in out
    no_deviations(lab, "ex-methods")


def test_twin(lab, run_example):
    env = enroll(lab, "ex-twin", LIGHTCLIENT_COUNT=2)
    lab.emu.update_desired("ex-twin", {"mode": "eco"})  # set while offline: arrives right after connecting
    example = run_example("twin.py", env)
    example.expect("waiting for desired changes")
    assert lab.emu.get_twin("ex-twin")["reported"]["firmware"] == "1.0.0"
    version = lab.emu.update_desired("ex-twin", {"interval": 10})
    out = example.finish()
    assert "twin desired={'mode': 'eco'" in out
    assert f"desired change $version={version}: {{'interval': 10, '$version': {version}}}" in out
    assert "applied and reported {'interval': 10}" in out and "handled 2 desired change(s)" in out
    assert lab.emu.get_twin("ex-twin")["reported"]["interval"] == 10
    no_deviations(lab, "ex-twin")


def test_aio_c2d(lab, run_example):
    example = run_example("aio_c2d.py", enroll(lab, "ex-aio-c2d", LIGHTCLIENT_COUNT=2))
    example.expect("waiting for cloud-to-device messages")
    lab.emu.send_c2d("ex-aio-c2d", b"hello device", message_id="c-1", content_type="text/plain",
                     properties={"priority": "high"})
    lab.emu.send_c2d("ex-aio-c2d", "second", message_id="c-2")
    out = example.finish()
    assert ("C2D #1: 'hello device' message_id=c-1 content_type=text/plain properties={'priority': 'high'}"
            in out)
    assert "C2D #2: 'second' message_id=c-2" in out and "received 2 message(s)" in out
    assert lab.emu.queued_c2d("ex-aio-c2d") == 0  # both acknowledged
    no_deviations(lab, "ex-aio-c2d")


def test_aio_methods(lab, run_example):
    example = run_example("aio_methods.py", enroll(lab, "ex-aio-methods", LIGHTCLIENT_COUNT=3))
    example.expect("answering direct methods")
    call = lambda name, payload: lab.emu.invoke_method("ex-aio-methods", name, payload, timeout=10)  # noqa: E731
    reboot = call("reboot", {"delay": 5})  # the coroutine handler
    assert (reboot.status, reboot.payload) == (200, {"rebooting": True, "delay": 5})
    unknown = call("selfDestruct", None)
    assert (unknown.status, unknown.payload) == (404, {"error": "no handler for method 'selfDestruct' on this device"})
    refused = call("setInterval", {"seconds": 0})  # the plain function, on the pool
    assert (refused.status, refused.payload) == (400, {"error": 'give {"seconds": n} with n > 0'})
    interval = call("setInterval", {"seconds": 10})
    assert (interval.status, interval.payload) == (200, {"interval": 10})
    out = example.finish()
    assert "method reboot({'delay': 5})" in out and "method setInterval({'seconds': 0})" in out
    assert "answered 3 call(s)" in out
    no_deviations(lab, "ex-aio-methods")


def test_aio_twin(lab, run_example):
    env = enroll(lab, "ex-aio-twin", LIGHTCLIENT_COUNT=2)
    lab.emu.update_desired("ex-aio-twin", {"mode": "eco"})  # set while offline: the first patch is the document
    example = run_example("aio_twin.py", env)
    example.expect("waiting for desired changes")
    assert lab.emu.get_twin("ex-aio-twin")["reported"]["firmware"] == "1.0.0"
    # The whole document first; a change made before it was read would be folded into it.
    assert "'mode': 'eco'" in example.expect("desired change $version=")
    version = lab.emu.update_desired("ex-aio-twin", {"interval": 10})
    out = example.finish()
    assert "twin desired={'mode': 'eco'" in out
    assert f"desired change $version={version}: {{'interval': 10, '$version': {version}}}" in out
    assert "applied and reported {'interval': 10}" in out and "handled 2 desired change(s)" in out
    assert lab.emu.get_twin("ex-aio-twin")["reported"]["interval"] == 10
    no_deviations(lab, "ex-aio-twin")


def test_aio_renewal(lab, run_example):
    env = enroll(lab, "ex-aio-renew", LIGHTCLIENT_RENEW_NOW=1, LIGHTCLIENT_RUN_SECONDS=2, LIGHTCLIENT_INTERVAL=0.2)
    cert = Path(env["PATH_TO_CERTIFICATE_FILE"])
    before = cert.read_bytes()
    out = run_example("aio_renewal.py", env).finish(40)
    assert "connected as ex-aio-renew; certificate valid until" in out
    assert "certificate renewed: valid until" in out and "renewal failed" not in out
    sent = int(re.search(r"sent and acknowledged (\d+) readings", out).group(1))
    assert cert.read_bytes() != before and lab.emu.certificates_issued("ex-aio-renew") == 1
    assert [json.loads(e.body)["seq"] for e in lab.emu.events("ex-aio-renew")] == list(range(1, sent + 1))
    assert oct(os.stat(f"{cert}.renewal.json").st_mode & 0o777) == "0o600"
    no_deviations(lab, "ex-aio-renew")


def test_module_identity(lab, run_example):
    env = enroll(lab, "ex-edge", "filter", LIGHTCLIENT_COUNT=3, LIGHTCLIENT_INTERVAL=0, LIGHTCLIENT_OUTPUT_NAME="temperature")
    out = run_example("module_identity.py", env).finish()
    assert "connected as module ex-edge/filter" in out and "sent 3 message(s), all acknowledged" in out
    events = lab.emu.events("ex-edge", "filter")
    assert [json.loads(e.body) for e in events] == [{"seq": i, "module": "filter"} for i in (1, 2, 3)]
    assert all(e.system_properties["$.on"] == "temperature" and e.properties == {"origin": "module"}
               for e in events)
    assert lab.emu.events("ex-edge") == events  # nothing sent as the device itself
    assert lab.emu.get_twin("ex-edge", "filter")["reported"]["status"] == "running"
    assert lab.emu.model_id("ex-edge", "filter") is None
    no_deviations(lab, "ex-edge/filter")


def test_pnp(lab, run_example):
    example = run_example("pnp.py", enroll(lab, "ex-pnp", LIGHTCLIENT_COUNT=2, LIGHTCLIENT_INTERVAL=0.2))
    example.expect("with model id dtmi:com:example:TemperatureController;2")
    assert lab.emu.model_id("ex-pnp") == "dtmi:com:example:TemperatureController;2"  # what the hub saw
    report = lab.emu.invoke_method("ex-pnp", "thermostat1*getMaxMinReport", {"since": "2024-01-01"}, timeout=10)
    assert report.status == 200 and set(report.payload) == {"maxTemp", "minTemp", "avgTemp"}
    version = lab.emu.update_desired("ex-pnp", {"thermostat1": {"__t": "c", "targetTemperature": 25}})
    out = example.finish()
    assert f"writable property thermostat1.targetTemperature=25 acknowledged (av={version})" in out
    reported = lab.emu.get_twin("ex-pnp")["reported"]["thermostat1"]
    assert reported["__t"] == "c" and reported["maxTempSinceLastReboot"] == 22.0
    assert reported["targetTemperature"] == {"value": 25, "ac": 200, "av": version, "ad": "applied"}
    events = lab.emu.events("ex-pnp")
    assert events and all(e.system_properties["$.sub"] == "thermostat1" for e in events)
    assert "temperature" in json.loads(events[0].body)
    no_deviations(lab, "ex-pnp")


def test_provision_then_connect(lab, run_example):
    registration_id = "ex-dps"
    bootstrap = certificate(lab, registration_id)  # DPS knows it through the CA group enrollment
    issued, cache = lab.root / "dps-issued.pem", lab.root / "dps-cache.json"
    env = {**lab.base, "PROVISIONING_IDSCOPE": SCOPE, "PROVISIONING_REGISTRATION_ID": registration_id,
           "PROVISIONING_HOST": lab.emu.dps.endpoint, "PATH_TO_CERTIFICATE_FILE": str(bootstrap), "LIGHTCLIENT_ISSUED_CERT": str(issued),
           "LIGHTCLIENT_PROVISIONING_CACHE": str(cache), "LIGHTCLIENT_COUNT": "2"}

    out = run_example("provision_then_connect.py", env).finish()
    assert f"DPS assigned: hub localhost, device {registration_id}" in out
    assert "sent and acknowledged message 2 to localhost" in out
    assert issued.read_text().startswith("-----BEGIN CERTIFICATE-----") and cache.exists()
    assert lab.emu.dps.handshakes[registration_id] == 1  # one TLS connection for register + polls
    assert len(lab.emu.events(registration_id)) == 2

    out = run_example("provision_then_connect.py", env).finish()  # again: from the cache, no DPS
    assert f"cached assignment: hub localhost, device {registration_id}" in out
    assert lab.emu.dps.handshakes[registration_id] == 1 and len(lab.emu.events(registration_id)) == 4
    no_deviations(lab, registration_id)

    lab.emu.unregister(registration_id)  # the hub no longer knows the device: provision again
    out = run_example("provision_then_connect.py", env).finish()
    assert "the hub refused the cached assignment; provisioning again" in out
    assert lab.emu.dps.handshakes[registration_id] == 2 and len(lab.emu.events(registration_id)) == 6
    (refusal,) = lab.emu.diagnostics(registration_id)  # the refused CONNECT, and nothing else
    assert refusal.rule == "connect.client-id"


def test_embed_in_existing_paho_app(lab, run_example):
    example = run_example("embed_in_existing_paho_app.py", enroll(lab, "ex-paho"))
    example.expect("connected: Success")
    assert example.expect("twin answer 200")
    blink = lab.emu.invoke_method("ex-paho", "blink", None, timeout=10)
    assert (blink.status, blink.payload) == (200, {"blinked": True})
    assert lab.emu.invoke_method("ex-paho", "nope", None, timeout=10).status == 404
    lab.emu.update_desired("ex-paho", {"led": "green"})
    wait_until(lambda: lab.emu.get_twin("ex-paho")["reported"].get("led") == "green", what="the reported led")
    lab.emu.send_c2d("ex-paho", b"ping", properties={"k": "v"})
    example.expect("C2D {'k': 'v'}: b'ping'")
    (event,) = lab.emu.wait_for_events(1, "ex-paho")
    assert event.body == b'{"hello": "from an existing paho app"}' and event.properties == {"source": "example"}
    example.proc.send_signal(signal.SIGTERM)  # it runs until stopped, like a service
    example.finish()
    no_deviations(lab, "ex-paho")


def test_every_example_is_run_here():
    """A new example without a test here fails this test."""
    examples = {p.name for p in EXAMPLES.glob("*.py")} - HAS_OWN_TEST
    run_here = set(re.findall(r'run_example\(\s*"([\w.]+)"', Path(__file__).read_text()))
    assert examples - run_here == set(), "examples without a test in test_examples.py"
    assert run_here - examples == set(), "test_examples.py runs examples that do not exist"
