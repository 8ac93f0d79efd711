"""lightclient.token.run_in_child: the one child-process PKCS#11 runner (token tooling, doctor, the lab).

Against a real SoftHSM2 token of this module's own (the lab makes it through the runner too), plus two
tiny PKCS#11 "modules" compiled here: one that crashes its process and one that prints on stdout
before refusing to load.
"""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from lightclient.exceptions import ConfigError, ModuleLoadError, PinError, TokenNotFoundError
from lightclient.token import run_in_child

from tests import lab

PIN, SO_PIN, TOKEN = "7310-child", "so-7310-child", "runner"


@pytest.fixture(scope="module")
def softhsm(tmp_path_factory):
    hsm = lab.SoftHSM(tmp_path_factory.mktemp("runner-hsm"))
    hsm.init_token(TOKEN, PIN, SO_PIN)
    hsm.keygen(TOKEN, PIN, "eckey", "ec-p256")
    hsm.keygen(TOKEN, PIN, "rsakey", "rsa-2048")
    return hsm


def _module(tmp_path, name: str, body: str) -> str:
    src, lib = tmp_path / f"{name}.c", tmp_path / f"{name}.so"
    src.write_text("#include <stdio.h>\n" + body)
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True, capture_output=True)
    return str(lib)


def test_results_come_back_as_json(softhsm):
    keys = run_in_child("keys", module_path=softhsm.module_path, token_label=TOKEN, pin=PIN, env=softhsm.env)
    assert sorted((k["label"], k["key_type"]) for k in keys) == [("eckey", "EC"), ("rsakey", "RSA")]
    probe = run_in_child("probe", module_path=softhsm.module_path, token_label=TOKEN, env=softhsm.env)
    assert probe["login"] == "no PIN" and TOKEN in probe["tokens"]


def test_typed_errors_are_raised_in_the_parent(softhsm):
    with pytest.raises(PinError, match=f"PIN for token '{TOKEN}' was refused") as exc:
        run_in_child("keys", module_path=softhsm.module_path, token_label=TOKEN, pin="0000-wrong", env=softhsm.env)
    assert "0000-wrong" not in str(exc.value)
    with pytest.raises(TokenNotFoundError, match=f"no token labelled 'nope'.*'{TOKEN}'"):
        run_in_child("keygen", module_path=softhsm.module_path, token_label="nope", key_label="k", pin=PIN,
                     env=softhsm.env)
    with pytest.raises(ConfigError, match="unknown token operation 'format'.*probe"):
        run_in_child("format", module_path=softhsm.module_path)


def test_a_crashing_module_is_a_module_error(tmp_path):
    lib = _module(tmp_path, "crash", "int C_GetFunctionList(void **f) { *(volatile int *)0 = 1; return 0; }\n")
    with pytest.raises(ModuleLoadError, match=f"{lib} crashed the child process running 'tokens' \\(exit -11\\)"):
        run_in_child("tokens", module_path=lib)


def test_module_output_on_stdout_does_not_corrupt_the_answer(tmp_path):
    lib = _module(tmp_path, "chatty", 'int C_GetFunctionList(void **f) { puts("hello from the module"); '
                                      "fflush(stdout); return 5; }\n")
    with pytest.raises(ModuleLoadError, match="cannot load the PKCS#11 module"):
        run_in_child("tokens", module_path=lib)


def test_pins_reach_the_child_on_stdin_only(softhsm, tmp_path):
    """Every Python child records its argv and environment (sitecustomize); no PIN may be in either."""
    record = tmp_path / "seen.jsonl"
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent(f"""
        import json, os, sys
        with open({str(record)!r}, "a") as fh:
            fh.write(json.dumps({{"argv": sys.argv, "env": dict(os.environ)}}) + "\\n")
    """))
    env = {**softhsm.env, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    info = run_in_child("init-token", module_path=softhsm.module_path, label="child-token", so_pin="so-secret-99",
                        pin="user-secret-42", env=env)
    assert info["label"] == "child-token"
    seen = [json.loads(line) for line in record.read_text().splitlines()]
    assert seen and all(s["argv"][-1] == "init-token" for s in seen), seen
    text = record.read_text()
    assert "user-secret-42" not in text and "so-secret-99" not in text
