"""Errors the emulator's service-side API raises.

The emulator is standalone (standard library only), so it keeps its own small tree instead of importing
the client's exceptions::

    EmulatorError                 bad configuration or a failed setup step (certificates, ports)
    └── HubError                  the hub refused a service request; ``status`` is the HTTP status the
                                  real service returns and ``error_code`` its six-digit code (404103, …)
"""
from __future__ import annotations


class EmulatorError(Exception):
    """The emulator could not do what was asked (configuration, certificates, not started, …)."""


class HubError(EmulatorError):
    """A service-side request failed the way IoT Hub fails it (device offline, timeout, not found…)."""

    def __init__(self, status: int, error_code: int, message: str):
        super().__init__(f"{status} ({error_code}): {message}")
        self.status = status
        self.error_code = error_code
        self.message = message

    def body(self) -> dict:
        """The JSON error body the service REST API returns for this error."""
        return {"errorCode": self.error_code, "message": self.message, "Message": self.message}
