"""A Device's SAS credential over time: the password of each CONNECT, and renewal before expiry.

MQTT 3.1.1 cannot re-authenticate a live connection, so (like every SDK, protocol notes §9) the token is
renewed by reconnecting: after 80 % of its lifetime a timer thread asks the Device to reconnect, and the
CONNECT carries a freshly signed token. Every connect attempt (including paho's own reconnects after a
network loss, or after the hub dropped an expired token) takes :meth:`SasCredential.current`, which
signs a new token when the current one is due, so a missed timer never leaves the device locked out.
"""
from __future__ import annotations

import logging
import threading
from typing import Callable, Optional

from .exceptions import ConfigError, LightClientError

log = logging.getLogger("lightclient.device")


def check(credential: object) -> None:
    from .symkey import SasCredential

    if credential is not None and not isinstance(credential, SasCredential):
        raise ConfigError(f"sas must be a lightclient.symkey.SasCredential, not {type(credential).__name__}")


def apply(client, username: str, credential) -> None:
    """Set the CONNECT password to the current token (signing a new one if due). Runs before each attempt."""
    try:
        token = credential.current()
    except LightClientError as exc:  # the token is unreachable: this attempt goes out without a password
        log.error("could not sign a SAS token: %s", exc)
        client.username_pw_set(username, None)
        return
    client.username_pw_set(username, token.value)


class Renewal:
    """Calls ``reconnect()`` on its own thread when the credential's token is due."""

    def __init__(self, credential, reconnect: Callable[[], None], name: str):
        self._credential = credential
        self._reconnect = reconnect
        self._name = name
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(max(0.5, self._credential.seconds_to_renewal())):
            if self._credential.seconds_to_renewal() > 0:
                continue
            log.info("renewing the SAS token for %s: reconnecting with a new one", self._credential.uri)
            try:
                self._reconnect()
            except LightClientError as exc:  # retried on the next round; paho keeps reconnecting meanwhile
                log.error("reconnecting with a renewed SAS token failed: %s", exc)
            except Exception:
                log.exception("reconnecting with a renewed SAS token failed")
            if self._stop.is_set():
                return

    def is_current(self) -> bool:
        """True on the renewal thread itself (its reconnect must not stop it)."""
        return threading.current_thread() is self._thread
