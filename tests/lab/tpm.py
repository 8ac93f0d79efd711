"""A software TPM 2.0 lab: swtpm, a private D-Bus session bus and tpm2-abrmd, plus TPM keys.

The same set-up as a device with a TPM 2.0 module, minus the hardware:

* :class:`SoftwareTPM` starts ``swtpm socket --tpm2`` on a free loopback port (state in the lab
  directory), a private ``dbus-daemon --session`` on a unix socket in that directory, and
  ``tpm2-abrmd`` on that bus. A resource manager is required: without one every process that
  uses the TPM leaks a transient object and the third one fails with "out of memory for object
  contexts" (on a device, ``/dev/tpmrm0`` is the kernel's resource manager). All three run in the
  foreground as our children and :meth:`SoftwareTPM.stop` ends each one by its PID.
* :class:`Tpm2Pkcs11Token` is a tpm2-pkcs11 token (``tpm2_ptool init``, then the token made with
  PKCS#11 ``C_InitToken``/``C_InitPIN`` and the keys with :func:`lightclient.token.generate_keypair`,
  i.e. exactly what ``lightclient keygen`` does, in a child through :func:`lightclient.token.run_in_child`),
  addressed by label through the libp11 engine.
* :meth:`SoftwareTPM.persistent_key` makes a persistent ``handle:0x81...`` signing key with
  tpm2-tools, and :meth:`SoftwareTPM.tss2_key_file` a TSS2 PEM key file with
  ``openssl genpkey -provider tpm2``; both are used through the tpm2-openssl provider.

PINs reach child processes on stdin, never in their arguments. Debian packages: swtpm,
swtpm-tools, tpm2-tools, libtss2-tcti-swtpm0, tpm2-abrmd, libtss2-tcti-tabrmd0, dbus,
libtpm2-pkcs11-1, libtpm2-pkcs11-tools (tpm2_ptool), tpm2-openssl.
"""
from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Optional

from lightclient.token import run_in_child

from .procs import LabError, executable, free_port, run, stop_process, wait_port

TPM2_PKCS11_MODULE_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/pkcs11/libtpm2_pkcs11.so",
    "/usr/lib/aarch64-linux-gnu/pkcs11/libtpm2_pkcs11.so",
    "/usr/lib/arm-linux-gnueabihf/pkcs11/libtpm2_pkcs11.so",
    "/usr/lib/pkcs11/libtpm2_pkcs11.so",
    "/usr/lib64/pkcs11/libtpm2_pkcs11.so",
)
TABRMD_TCTI = "tabrmd:bus_type=session"


def find_tpm2_pkcs11_module() -> str:
    for path in TPM2_PKCS11_MODULE_CANDIDATES:
        if os.path.exists(path):
            return path
    raise LabError("tpm2-pkcs11 is not installed: apt install libtpm2-pkcs11-1 libtpm2-pkcs11-tools")


def _free_port_pair() -> int:
    """A free loopback port P whose neighbour P+1 is free too (swtpm's control channel)."""
    for _ in range(50):
        port = free_port()
        if port >= 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise LabError("no two adjacent free loopback ports for swtpm")


class SoftwareTPM:
    """swtpm + a private D-Bus session bus + tpm2-abrmd, all state under ``root``."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.state = self.root / "tpmstate"
        self.store = self.root / "tpm2-pkcs11-store"
        self.bus = self.root / "dbus.sock"
        self.port = 0
        self.swtpm: Optional[subprocess.Popen] = None
        self.dbus: Optional[subprocess.Popen] = None
        self.abrmd: Optional[subprocess.Popen] = None
        self._logs: List = []
        self._primary: Optional[Path] = None

    # -------------------------------------------------------------------------- environment

    @property
    def tcti_env(self) -> Dict[str, str]:
        """Only the TPM variables (every TPM user goes through tpm2-abrmd on the private bus)."""
        return {
            "DBUS_SESSION_BUS_ADDRESS": f"unix:path={self.bus}",
            "TPM2TOOLS_TCTI": TABRMD_TCTI,
            "TPM2_PKCS11_TCTI": TABRMD_TCTI,
            "TPM2OPENSSL_TCTI": TABRMD_TCTI,
            "TPM2_PKCS11_STORE": str(self.store),
            # tpm2-pkcs11 logs "ERROR:" lines for expected failures (wrong PIN); keep stderr clean.
            "TPM2_PKCS11_LOG_LEVEL": "0",
        }

    @property
    def env(self) -> Dict[str, str]:
        return {**os.environ, **self.tcti_env}

    def activate(self) -> None:
        """Point this process's TPM users (tpm2-tools, tpm2-pkcs11, tpm2 provider) at this TPM."""
        os.environ.update(self.tcti_env)

    # -------------------------------------------------------------------------- processes

    def _log(self, name: str):
        fh = open(self.root / f"{name}.log", "ab")
        self._logs.append(fh)
        return fh

    def start(self) -> "SoftwareTPM":
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        swtpm = executable("swtpm", "swtpm")
        dbus = executable("dbus-daemon", "dbus")
        abrmd = executable("tpm2-abrmd", "tpm2-abrmd")
        self.state.mkdir(exist_ok=True)
        self.store.mkdir(exist_ok=True)
        # swtpm: the TPM on a free loopback port; the swtpm TCTI expects the control channel on
        # the next port up.
        for attempt in range(5):
            self.port = _free_port_pair()
            self.swtpm = subprocess.Popen(
                [swtpm, "socket", "--tpm2", "--tpmstate", f"dir={self.state}",
                 "--server", f"type=tcp,port={self.port},bindaddr=127.0.0.1",
                 "--ctrl", f"type=tcp,port={self.port + 1},bindaddr=127.0.0.1",
                 "--flags", "not-need-init,startup-clear", "--log", f"file={self.root / 'swtpm.log'},level=1"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._log("swtpm.err"))
            try:
                wait_port(self.port, proc=self.swtpm, timeout=10)
                break
            except LabError:
                stop_process(self.swtpm)
                if attempt == 4:
                    raise
        # A private session bus: tpm2-abrmd registers its name there, and nothing else sees it.
        if self.bus.exists():
            self.bus.unlink()
        self.dbus = subprocess.Popen(
            [dbus, "--session", "--nofork", "--nopidfile", f"--address=unix:path={self.bus}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._log("dbus"))
        deadline = time.monotonic() + 10
        while not self.bus.exists():
            if self.dbus.poll() is not None or time.monotonic() > deadline:
                raise LabError(f"dbus-daemon did not start (see {self.root / 'dbus.log'})")
            time.sleep(0.02)
        # tpm2-abrmd: the resource manager (what /dev/tpmrm0 is on a device). It refuses root
        # without --allow-root. --flush-all starts from an empty TPM context table.
        cmd = [abrmd, "--session", "--flush-all", f"--tcti=swtpm:host=127.0.0.1,port={self.port}"]
        if os.geteuid() == 0:
            cmd.append("--allow-root")
        self.abrmd = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log("abrmd"),
                                      stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + 15
        while True:
            if self.abrmd.poll() is not None:
                raise LabError(f"tpm2-abrmd exited with {self.abrmd.returncode} (see {self.root / 'abrmd.log'})")
            probe = subprocess.run([executable("tpm2_getcap", "tpm2-tools"), "properties-fixed"], env=self.env,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if probe.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise LabError(f"tpm2-abrmd does not answer (see {self.root / 'abrmd.log'})")
            time.sleep(0.1)
        # A fresh simulator locks out after 3 wrong authorisations for 1000 s; tests try wrong
        # PINs on purpose. (A real device keeps its owner's dictionary-attack settings.)
        self.tools("tpm2_dictionarylockout", "--setup-parameters", "--max-tries=1000",
                   "--recovery-time=1", "--lockout-recovery-time=1")

    def pids(self) -> Dict[str, int]:
        return {name: p.pid for name, p in (("swtpm", self.swtpm), ("dbus-daemon", self.dbus),
                                            ("tpm2-abrmd", self.abrmd)) if p is not None}

    def stop(self) -> None:
        # Reverse order: the broker's clients first, the TPM last.
        for proc in (self.abrmd, self.dbus, self.swtpm):
            stop_process(proc)
        for fh in self._logs:
            fh.close()
        self._logs = []

    def __enter__(self) -> "SoftwareTPM":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -------------------------------------------------------------------------- keys

    def tools(self, tool: str, *args: str, input: Optional[str] = None) -> str:
        """Run a tpm2-tools command against this TPM."""
        return run([executable(tool, "tpm2-tools"), *args], input=input, env=self.env, cwd=self.root)

    def _storage_primary(self) -> Path:
        """An ECC storage primary (the TCG template), as a context file for tpm2-tools."""
        if self._primary is None:
            ctx = self.root / "primary-ecc.ctx"
            self.tools("tpm2_createprimary", "-C", "o", "-G", "ecc256:aes128cfb", "-g", "sha256", "-c", str(ctx),
                       "-a", "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|noda|restricted|decrypt")
            self._primary = ctx
        return self._primary

    def persistent_key(self, handle: int, key_type: str = "ec") -> str:
        """A signing key made persistent at ``handle``; returns the reference ``handle:0x81...``."""
        alg = {"ec": "ecc256:null", "rsa": "rsa2048:null:null"}[key_type]
        attrs = "fixedtpm|fixedparent|sensitivedataorigin|userwithauth|sign" + ("|decrypt" if key_type == "rsa" else "")
        base = self.root / f"persistent-{handle:08x}"
        pub, priv, ctx = (base.with_suffix(s) for s in (".pub", ".priv", ".ctx"))
        primary = self._storage_primary()
        self.tools("tpm2_create", "-C", str(primary), "-G", alg, "-g", "sha256", "-u", str(pub), "-r", str(priv),
                   "-a", attrs)
        self.tools("tpm2_load", "-C", str(primary), "-u", str(pub), "-r", str(priv), "-c", str(ctx))
        self.tools("tpm2_evictcontrol", "-C", "o", "-c", str(ctx), f"0x{handle:08x}")
        self.tools("tpm2_flushcontext", "-t")
        return f"handle:0x{handle:08x}"

    def tss2_key_file(self, out: Path, key_type: str = "ec") -> Path:
        """A TSS2 PEM key file (``-----BEGIN TSS2 PRIVATE KEY-----``): the key wrapped by the TPM."""
        opts = ["-algorithm", "EC", "-pkeyopt", "group:P-256"] if key_type == "ec" else \
            ["-algorithm", "RSA", "-pkeyopt", "bits:2048"]
        # tpm2 first: with default first, the key would be generated in software.
        run(["openssl", "genpkey", "-provider", "tpm2", "-provider", "default", *opts, "-out", str(out)],
             env=self.env, cwd=self.root)
        return Path(out)


class Tpm2Pkcs11Token:
    """A tpm2-pkcs11 token on a :class:`SoftwareTPM`, with keys made through PKCS#11 itself."""

    def __init__(self, tpm: SoftwareTPM, module_path: Optional[str] = None):
        self.tpm = tpm
        self.module_path = module_path or find_tpm2_pkcs11_module()
        self._initialised = False

    def init_store(self) -> None:
        """``tpm2_ptool init``: a persistent primary key (0x81000001) under which tokens live."""
        if not self._initialised:
            run([executable("tpm2_ptool", "libtpm2-pkcs11-tools"), "init"], env=self.tpm.env, cwd=self.tpm.root)
            self._initialised = True

    def init_token(self, label: str, pin: str, so_pin: str) -> None:
        """C_InitToken + C_InitPIN on the module's free slot (in a child, PINs on stdin)."""
        self.init_store()
        run_in_child("init-token", module_path=self.module_path, label=label, so_pin=so_pin, pin=pin,
                     env=self.tpm.env)

    def keygen(self, token_label: str, pin: str, key_label: str, key_type: str = "ec-p256") -> dict:
        """A key pair on the token through ``lightclient.token.generate_keypair`` (what ``lightclient
        keygen`` runs), in a child with the PIN on stdin; returns label, id and URI."""
        info = run_in_child("keygen", module_path=self.module_path, token_label=token_label, key_label=key_label,
                            key_type=key_type, pin=pin, env=self.tpm.env)
        info["via"] = "lightclient.token.generate_keypair"
        return info

    def uri(self, info: dict) -> str:
        return f"{info['uri']}?module-path={self.module_path}"
