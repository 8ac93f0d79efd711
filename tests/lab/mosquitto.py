"""A mosquitto broker on loopback that requires client certificates from the lab CA."""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .ca import TestCA
from .procs import LabError, free_port, stop_process, wait_port


@dataclass
class Mosquitto:
    """A mosquitto broker on loopback that requires client certificates from the lab CA."""

    root: Path
    ca: TestCA
    port: int = 0
    proc: Optional[subprocess.Popen] = None
    quiet: bool = False   # log errors and warnings only (benchmarks); tests read the full log
    # Keep sessions and their queued messages across restarts (reliability tests count across them).
    persistent: bool = False

    def start(self) -> "Mosquitto":
        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not os.path.exists(exe):
            raise LabError("mosquitto is not installed: apt install mosquitto")
        self.root = Path(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        conf = self.root / "mosquitto.conf"
        user = "root" if os.geteuid() == 0 else ""  # as root, mosquitto would drop to 'mosquitto'
        conf.write_text(
            "per_listener_settings false\n"
            f"listener {self.port} 127.0.0.1\n"
            f"cafile {self.ca.cert}\ncertfile {self.ca.server_cert}\nkeyfile {self.ca.server_key}\n"
            "require_certificate true\nuse_identity_as_username true\nallow_anonymous false\n"
            + (f"persistence true\npersistence_location {self.root}/\nautosave_interval 0\n"
               "max_queued_messages 0\nmax_queued_bytes 0\nmax_inflight_messages 100\n"
               if self.persistent else "persistence false\n")
            # Without it a TLS 1.3 CONNACK waits ~40 ms for the client's delayed ACK (Nagle).
            + "set_tcp_nodelay true\n"
            + f"log_dest file {self.root / 'mosquitto.log'}\n"
            + ("log_type error\nlog_type warning\n" if self.quiet else "log_type all\n")
            + (f"user {user}\n" if user else ""))
        self.proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     stdin=subprocess.DEVNULL)
        wait_port(self.port, proc=self.proc)
        return self

    def stop(self) -> None:
        stop_process(self.proc, timeout=10)  # SIGTERM: a persistent broker saves its sessions first
        self.proc = None

    def restart(self) -> "Mosquitto":
        self.stop()
        return self.start()

    def log(self) -> str:
        path = Path(self.root) / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def __enter__(self) -> "Mosquitto":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
