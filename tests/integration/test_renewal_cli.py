"""`lightclient status` and `lightclient renew` end to end: the real CLI in a subprocess against the emulator
(hub + DPS) issuing short-lived certificates, keys in SoftHSM, the PIN from a file (never on argv)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightclient import renewal
from lightclient.emulator.service import Emulator
from lightclient.token import run_in_child

from ..conftest import PIN, TOKEN
from .test_renewal import SCOPE, _new_device

ROOT = Path(__file__).resolve().parents[2]
LIFETIME = 40   # long enough that `--if-due` is not due at the start, short enough to read as "short"
_SCRUB = ("IOT_HUB_HOSTNAME", "DEVICE_ID", "PATH_TO_CERTIFICATE_FILE", "KEY_IDENTIFIER", "PKCS11_MODULE_PATH",
          "PROVISIONING_IDSCOPE", "PROVISIONING_REGISTRATION_ID", "PROVISIONING_HOST")


def _cli(env, *args, timeout=90) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "lightclient", *map(str, args)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert PIN not in proc.stdout + proc.stderr
    return proc


def _serial(path: Path) -> str:
    return subprocess.run(["openssl", "x509", "-noout", "-serial", "-in", str(path)], capture_output=True, text=True,
                          check=True).stdout.strip()


def _labels(softhsm):
    return {k["label"] for k in run_in_child("keys", module_path=softhsm.module_path, token_label=TOKEN, pin=PIN,
                                             env=softhsm.env)}


@pytest.fixture
def setup(softhsm, tmp_path):
    """An emulator issuing LIFETIME-second certificates, a device provisioned by it, and the CLI arguments."""
    with Emulator(tmp_path / "emu", hostname="localhost", cert_lifetime=LIFETIME) as emu:
        emu.start_dps(0, polls=0, retry_after=1)
        yield emu, tmp_path


def _device(softhsm, emu, tmp_path, name):
    uri, label, cert, boot = _new_device(softhsm, emu, tmp_path, name)
    os.chmod(cert, 0o600)
    pin_file = tmp_path / "pin"
    pin_file.write_text(PIN + "\n")
    env = {k: v for k, v in softhsm.env.items() if not k.startswith("LIGHTCLIENT_") and k not in _SCRUB}
    common = ["--cert", cert, "--device-id", name, "--key", uri, "--pin-file", pin_file, "--ca", emu.ca_path]
    dps_args = ["--id-scope", SCOPE, "--endpoint", emu.dps.endpoint]
    hub_args = ["--hub", "localhost", "--port", emu.port]
    return uri, label, cert, boot, env, common, dps_args, hub_args


def _assert_replaced(cert: Path, before_serial: str, before_stat: os.stat_result, name: str):
    assert _serial(cert) != before_serial, "the chain was not replaced"
    after = os.stat(cert)
    assert after.st_mode & 0o777 == 0o600 and (after.st_uid, after.st_gid) == (before_stat.st_uid, before_stat.st_gid)
    validity = renewal.certificate_validity(str(cert))
    assert validity.subject == name and validity.not_after > time.time()
    state = renewal.load_state(str(cert) + ".renewal.json")
    assert state is not None and state.pending is None
    assert os.stat(str(cert) + ".renewal.json").st_mode & 0o777 == 0o600
    assert not os.path.exists(str(cert) + ".new")
    assert not [p for p in cert.parent.iterdir() if p.name.startswith(".lightclient-")], "a temporary file was left"
    return state


def test_status_and_renew_if_due_then_over_dps_and_over_the_hub(softhsm, setup):
    emu, tmp_path = setup
    name = "cli-renew"
    uri, _, cert, _, env, common, dps_args, hub_args = _device(softhsm, emu, tmp_path, name)

    status = _cli(env, "status", "--cert", cert)
    assert status.returncode == 0, status.stderr
    for field in ("subject      CN=cli-renew", "issuer       CN=", "valid        ", "time left", "next renewal between"):
        assert field in status.stdout, status.stdout
    as_json = json.loads(_cli(env, "status", "--cert", cert, "--json").stdout)
    assert as_json["subject"] == name and not as_json["expired"] and 0 < as_json["secondsLeft"] <= LIFETIME

    before, serial, st = cert.read_bytes(), _serial(cert), os.stat(cert)
    not_due = _cli(env, "renew", *common, *dps_args, "--if-due")
    assert not_due.returncode == 0, not_due.stderr
    assert "not due" in not_due.stdout and cert.read_bytes() == before

    over_dps = _cli(env, "renew", *common, *dps_args, "--via", "dps")
    assert over_dps.returncode == 0, over_dps.stderr
    assert "renewed" in over_dps.stdout
    state = _assert_replaced(cert, serial, st, name)
    assert state.renewals == 1 and state.key == uri

    serial = _serial(cert)
    issued = emu.certificates_issued(name)
    over_hub = _cli(env, "renew", *common, *hub_args, "--via", "hub")
    assert over_hub.returncode == 0, over_hub.stderr
    state = _assert_replaced(cert, serial, st, name)
    assert state.renewals == 2 and emu.certificates_issued(name) == issued + 1
    assert not emu.diagnostics(name, "connect.")


def test_renew_rotate_key_reports_the_new_key_and_retires_the_old_one(softhsm, setup):
    emu, tmp_path = setup
    name = "cli-rotate"
    uri, label, cert, _, env, common, dps_args, _ = _device(softhsm, emu, tmp_path, name)
    serial, st = _serial(cert), os.stat(cert)

    # Default policy: the old key stays for the grace period (24 h) and is named with its date.
    kept = _cli(env, "renew", *common, *dps_args, "--via", "dps", "--rotate-key", "--key-type", "ec-p256")
    assert kept.returncode == 0, kept.stderr
    state = _assert_replaced(cert, serial, st, name)
    first = state.key.split("?")[0]
    new_label = first.split("object=")[1].split(";")[0]
    assert new_label.startswith(label + "-r") and f"on the new key {first}" in kept.stdout
    assert f"the old key {label!r} stays until" in kept.stdout
    assert {label, new_label} <= _labels(softhsm)

    # --retire-after 0: the next renewal switches to a third key and deletes the one it replaces at once; the
    # first key keeps the grace period it was given.
    serial = _serial(cert)
    now = _cli(env, "renew", *common, *dps_args, "--via", "dps", "--rotate-key", "--retire-after", "0")
    assert now.returncode == 0, now.stderr
    state = _assert_replaced(cert, serial, st, name)
    third = state.key.split("?")[0].split("object=")[1].split(";")[0]
    assert third not in (label, new_label) and state.renewals == 2
    assert f"retired the old key {new_label!r}" in now.stdout
    assert [r.label for r in state.retire] == [label] and f"the old key {label!r} stays until" in now.stdout
    labels = _labels(softhsm)
    assert third in labels and label in labels and new_label not in labels
    # The CLI's --key still names the first key; the state file knows better, and status reads it.
    assert _cli(env, "status", "--cert", cert).returncode == 0


def test_renew_refused_by_dps_or_the_hub_keeps_the_old_chain(softhsm, setup):
    emu, tmp_path = setup
    name = "cli-refused"
    _, _, cert, _, env, common, dps_args, hub_args = _device(softhsm, emu, tmp_path, name)
    before = cert.read_bytes()

    emu.dps.inject(name, 401)
    refused = _cli(env, "renew", *common, *dps_args, "--via", "dps")
    assert refused.returncode == 3, (refused.stdout, refused.stderr)
    assert "certificate renewal failed" in refused.stderr and "401" in refused.stderr
    assert "the current certificate stays in use" in refused.stderr
    assert cert.read_bytes() == before and not os.path.exists(str(cert) + ".new")

    emu.inject_credentials_fault(name, 500)
    refused = _cli(env, "renew", *common, *hub_args, "--via", "hub")
    assert refused.returncode == 4, (refused.stdout, refused.stderr)
    assert "certificate renewal failed" in refused.stderr and "500" in refused.stderr
    assert cert.read_bytes() == before
    state = renewal.load_state(str(cert) + ".renewal.json")
    assert state.pending is None and state.failures == 2 and state.next_attempt > time.time() - 1


def test_renew_an_expired_certificate_names_the_way_out_then_recovers_with_the_onboarding_cert(softhsm, tmp_path):
    with Emulator(tmp_path / "emu", hostname="localhost", cert_lifetime=2) as emu:
        emu.start_dps(0, polls=0, retry_after=1)
        name = "cli-expired"
        _, _, cert, boot, env, common, dps_args, hub_args = _device(softhsm, emu, tmp_path, name)
        time.sleep(3)
        before = cert.read_bytes()
        for via in (["--via", "hub", *hub_args], ["--via", "dps", *dps_args]):
            expired = _cli(env, "renew", *common, *via)
            assert expired.returncode == 3, (expired.stdout, expired.stderr)
            assert "expired" in expired.stderr and "--onboarding-cert" in expired.stderr
            assert cert.read_bytes() == before
        status = _cli(env, "status", "--cert", cert)
        assert status.returncode == 3 and "lightclient renew" in status.stderr
        # The way out it names: DPS with the (long-lived) onboarding certificate (now issuing longer ones).
        emu.dps.cert_lifetime = 600
        back = _cli(env, "renew", *common, *dps_args, "--onboarding-cert", boot)
        assert back.returncode == 0, back.stderr
        assert renewal.certificate_validity(str(cert)).not_after > time.time()
