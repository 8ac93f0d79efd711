"""A private SoftHSM2 token directory: tokens and keys are made the way ``lightclient init-token`` /
``keygen`` make them, in a child process with the PINs on stdin (:func:`lightclient.token.run_in_child`).

Why a child: a PKCS#11 module keeps per-process state, and the process that later loads the key through
OpenSSL's engine must be the only one initialising it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Optional

from lightclient.token import run_in_child

from .procs import LabError

SOFTHSM_MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/arm-linux-gnueabihf/softhsm/libsofthsm2.so",
)


def find_softhsm_module() -> str:
    for path in SOFTHSM_MODULE_CANDIDATES:
        if os.path.exists(path):
            return path
    raise LabError("SoftHSM2 is not installed: apt install softhsm2")


class SoftHSM:
    """A private SoftHSM2 token directory with its own config file."""

    def __init__(self, root: Path, module_path: Optional[str] = None):
        self.root = Path(root)
        self.module_path = module_path or find_softhsm_module()
        self.tokendir = self.root / "tokens"
        self.conf = self.root / "softhsm2.conf"
        self.tokendir.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(
            f"directories.tokendir = {self.tokendir}\nobjectstore.backend = file\nlog.level = ERROR\n"
            "slots.removable = false\n")

    @property
    def env(self) -> Dict[str, str]:
        return {**os.environ, "SOFTHSM2_CONF": str(self.conf)}

    def activate(self) -> None:
        """Point this process's SoftHSM at the lab token directory (SoftHSM reads SOFTHSM2_CONF)."""
        os.environ["SOFTHSM2_CONF"] = str(self.conf)

    def init_token(self, label: str, pin: str, so_pin: str) -> None:
        """C_InitToken + C_InitPIN on the first free slot (in a child, PINs on stdin)."""
        run_in_child("init-token", module_path=self.module_path, label=label, so_pin=so_pin, pin=pin,
                     env=self.env)

    def keygen(self, token_label: str, pin: str, key_label: str, key_type: str = "ec-p256") -> dict:
        """A key pair on the token (in a child, PIN on stdin); returns label, id_hex, key_type and uri."""
        return run_in_child("keygen", module_path=self.module_path, token_label=token_label, key_label=key_label,
                            key_type=key_type, pin=pin, env=self.env)
