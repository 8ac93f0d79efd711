"""The local test lab for tests, benchmarks and the demo: a SoftHSM2 token, the CA, a mosquitto broker and
a software TPM (swtpm + tpm2-abrmd + tpm2-pkcs11). It lives in the checkout, not in the wheel: a device
never needs it.

Everything lives in directories the caller owns; every process started here is stopped by PID. PINs
reach child processes on stdin, never in their arguments. Scripts outside pytest (``examples/demo.py``,
``benchmarks/``) put the repository root on ``sys.path`` to import it.

Modules: :mod:`.procs` (ports, tools, stopping processes), :mod:`.ca` (the emulator's openssl CA as
:class:`TestCA`), :mod:`.softhsm`, :mod:`.mosquitto`, :mod:`.tpm`, :mod:`.proxies` (tinyproxy, microsocks).
"""
from __future__ import annotations

from .ca import TestCA
from .mosquitto import Mosquitto
from .proxies import MicroSocks, TinyProxy
from .procs import LabError, executable, free_port, run, stop_process, wait_port
from .softhsm import SoftHSM, find_softhsm_module
from .tpm import SoftwareTPM, Tpm2Pkcs11Token, find_tpm2_pkcs11_module

__all__ = ["LabError", "MicroSocks", "Mosquitto", "SoftHSM", "SoftwareTPM", "TestCA", "TinyProxy", "Tpm2Pkcs11Token", "executable",
           "find_softhsm_module", "find_tpm2_pkcs11_module", "free_port", "run", "stop_process", "wait_port"]
