"""The CLI's symmetric-key path: import-key (key on stdin, never argv), keygen --type hmac, send --sas-key."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightclient.emulator.service import Emulator
from tests import lab
from tests.lab import free_port

ROOT = Path(__file__).resolve().parents[2]
PIN, SO_PIN = "sascli-pin-77", "sascli-so-78"
KEY = json.loads((ROOT / "tests" / "vectors" / "sas.json").read_text())["key"]


def cli(*args, env, input=None):
    return subprocess.run([sys.executable, "-m", "lightclient", *map(str, args)], env=env, cwd=ROOT, input=input,
                          capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def hsm(tmp_path_factory):
    h = lab.SoftHSM(tmp_path_factory.mktemp("sascli-hsm"))
    h.init_token("cli", PIN, SO_PIN)
    return h


def test_import_key_from_stdin_then_send_with_sas_key(hsm, tmp_path):
    env = {**hsm.env, "LIGHTCLIENT_PIN": PIN}
    out = cli("import-key", "--module-path", hsm.module_path, "--token", "cli", "--label", "dev", "--key-file", "-",
              env=env, input=KEY + "\n")
    assert out.returncode == 0, out.stderr
    assert "now delete the key" in out.stdout and KEY not in out.stdout + out.stderr and PIN not in out.stdout
    uri = [line for line in out.stdout.splitlines() if line.startswith("pkcs11:")][0]
    assert "type=secret-key" in uri
    gen = cli("keygen", "--module-path", hsm.module_path, "--token", "cli", "--label", "gen", "--type", "hmac", env=env)
    assert gen.returncode == 0 and "sign-only" in gen.stdout, gen.stderr
    with Emulator(tmp_path / "emu", hostname="localhost", port=free_port()) as emu:
        emu.register_device("cli-sas", symmetric_keys=(KEY,))
        sent = cli("send", "--hub", "localhost", "--device-id", "cli-sas", "--sas-key", uri, "--ca", emu.ca_path,
                   "--port", emu.port, "hello", env=env)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert emu.wait_for_events(1, "cli-sas")[0].body == b"hello"
        assert PIN not in sent.stdout + sent.stderr and "SharedAccessSignature" not in sent.stdout + sent.stderr


def test_import_key_refuses_a_bad_key_without_showing_it(hsm):
    out = cli("import-key", "--module-path", hsm.module_path, "--token", "cli", "--label", "bad", "--key-file", "-",
              env={**hsm.env, "LIGHTCLIENT_PIN": PIN}, input="c2VjcmV0LXNlY3JldA!!\n")
    assert out.returncode != 0 and "not valid base64" in out.stderr
    assert "c2VjcmV0" not in out.stderr + out.stdout
