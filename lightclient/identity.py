"""Who the client is to IoT Hub: the MQTT client id and username of a device or module.

Pure: no I/O. Example wire strings (device ``d1`` on ``hub.azure-devices.net``)::

    client_id  d1                         (module: d1/m1)
    username   hub.azure-devices.net/d1/?api-version=2021-04-12&DeviceClientType=lightclient%2F0.1.0
    module     hub.azure-devices.net/d1/m1/?api-version=2021-04-12&DeviceClientType=lightclient%2F0.1.0
    PnP        …&DeviceClientType=lightclient%2F0.1.0&model-id=dtmi%3Acom%3Aexample%3AThermostat%3B1

The hub never percent-decodes the hostname or the ids, but it does decode every query value, so the
ids go on the wire as they are (which is why they are validated here) and the query values are
percent-encoded with an empty safe set.
"""
from __future__ import annotations

import ipaddress
import re
import sys
from dataclasses import dataclass
from typing import Optional
from urllib.parse import quote

from .exceptions import ConfigError

#: The IoT Hub api-version sent in the username. 2021-04-12 is what the current docs and the Node SDK use;
#: the model id (IoT Plug and Play) needs at least 2020-09-30.
API_VERSION = "2021-04-12"

_MIN_API_VERSION_FOR_MODEL_ID = "2020-09-30"
_FALLBACK_VERSION = "0+unknown"
_MAX_ID_LENGTH = 128

# Device and module ids: ASCII alphanumerics plus - . % _ * ? ! ( ) , : = @ $ ' (IoT Hub identity registry
# docs). The docs say + and # are not supported; over MQTT they could not work anyway, because the ids
# appear in SUBSCRIBE filters where + and # are wildcards.
_ID_CHARS = r"A-Za-z0-9\-.%_*?!(),:=@$'"
_ID_RE = re.compile("[%s]{1,%d}" % (_ID_CHARS, _MAX_ID_LENGTH))
_BAD_ID_CHAR_RE = re.compile("[^%s]" % _ID_CHARS)
_HOSTNAME_BAD_RE = re.compile(r"[/\s\x00-\x1f\x7f]")
# Letters, digits, '-' and '.' (RFC 1123), plus '_': not valid in host names, but container and
# LAN names use it and resolvers accept it, and it is no URL or MQTT metacharacter.
_HOST_CHAR_BAD_RE = re.compile(r"[^A-Za-z0-9._\-]")
_HOST_PORT_RE = re.compile(r"[^:]+:[0-9]+")
_MAX_HOST_LENGTH = 253
_MAX_LABEL_LENGTH = 63
_EXAMPLE_HOST = "myhub.azure-devices.net"


def default_client_type() -> str:
    """The default ``DeviceClientType``: ``lightclient/{version}``.

    The version is read lazily from the ``lightclient`` package (or its installed metadata) so this module
    works before, or without, the package's ``__init__`` defining ``__version__``.
    """
    version = getattr(sys.modules.get("lightclient"), "__version__", None)
    if not isinstance(version, str) or not version:
        try:
            from importlib.metadata import PackageNotFoundError, version as dist_version

            try:
                version = dist_version("lightclient")
            except PackageNotFoundError:
                version = _FALLBACK_VERSION
        except ImportError:  # pragma: no cover - importlib.metadata exists on every supported Python
            version = _FALLBACK_VERSION
    return "lightclient/" + version


def _check_id(kind: str, value: object) -> None:
    if not isinstance(value, str):
        raise ConfigError(f"{kind} must be a str, not {type(value).__name__}")
    if not value:
        raise ConfigError(f"{kind} is empty; give the id registered in IoT Hub")
    if _ID_RE.fullmatch(value):
        return
    if len(value) > _MAX_ID_LENGTH:
        raise ConfigError(f"{kind} {value[:20]!r}… is {len(value)} characters long; IoT Hub allows at most 128")
    bad = _BAD_ID_CHAR_RE.search(value).group()  # type: ignore[union-attr]  # fullmatch failed, so one exists
    raise ConfigError(
        f"{kind} {value!r} contains {bad!r}; IoT Hub ids may only use ASCII letters, digits and "
        "- . % _ * ? ! ( ) , : = @ $ '"
    )


def _shown(value: str) -> str:
    return repr(value[:80]) + ("…" if len(value) > 80 else "")


def check_host(value: object, *, argument: str = "hostname", expected: Optional[str] = None) -> None:
    """Refuse anything but a DNS host name or an IP address (IPv4, or IPv6 without brackets).

    Raises :class:`~lightclient.exceptions.ConfigError` naming ``argument`` (the caller's keyword) and
    ``expected`` (the form to give). A host name goes on the wire as it is (MQTT username, URL, TLS SNI),
    so ``hub?x=1``, ``hub#``, ``hub:8883`` or ``hub/x`` would change what is sent, not only where.
    """
    expected = expected or f"only the host name, e.g. {_EXAMPLE_HOST!r} (no scheme, port, path, query or spaces)"
    if not isinstance(value, str):
        raise ConfigError(f"{argument} must be a str, not {type(value).__name__}")
    if not value:
        raise ConfigError(f"{argument} is empty; give {expected}")
    try:
        ipaddress.ip_address(value)
        return
    except ValueError:
        pass
    bad = _HOSTNAME_BAD_RE.search(value) or _HOST_CHAR_BAD_RE.search(value)
    if bad:
        char = bad.group()
        if char == ":" and _HOST_PORT_RE.fullmatch(value):
            raise ConfigError(f"{argument} {_shown(value)} contains ':' and a port; give the port separately "
                              f"(port=), and {expected}")
        if not char.isascii():
            raise ConfigError(f"{argument} {_shown(value)} contains {char!r}; give an international name in its "
                              f"ASCII form (xn--…), and {expected}")
        raise ConfigError(f"{argument} {_shown(value)} contains {char!r}; give {expected}")
    if len(value) > _MAX_HOST_LENGTH:
        raise ConfigError(f"{argument} {_shown(value)} is {len(value)} characters long; a DNS name has at most "
                          f"{_MAX_HOST_LENGTH}")
    labels = value.split(".")
    for label in labels:
        if not label:
            raise ConfigError(f"{argument} {_shown(value)} has an empty label (a dot at the start or end, or two "
                              f"in a row); give {expected}")
        if len(label) > _MAX_LABEL_LENGTH:
            raise ConfigError(f"{argument} {_shown(value)} has a label of {len(label)} characters; a DNS label "
                              f"has at most {_MAX_LABEL_LENGTH}")
        if label.startswith("-") or label.endswith("-"):
            raise ConfigError(f"{argument} {_shown(value)} has a label starting or ending with '-' ({label!r}); "
                              f"give {expected}")
    if labels[-1].isdigit():
        # "1.2.3" or "256.0.0.1": resolvers would read some of these as (odd) IPv4 addresses.
        raise ConfigError(f"{argument} {_shown(value)} is neither an IP address nor a host name (a name "
                          f"cannot end in an all-digit label); give {expected}")


def _q(value: str) -> str:
    # quote(), never quote_plus(): the hub decodes %20 but would keep a '+' as a literal plus.
    return quote(value, safe="")


@dataclass(frozen=True)
class Identity:
    """A device (``module_id=None``) or module identity on one IoT hub, validated on construction.

    ``hostname`` is the hub's host name, e.g. ``"myhub.azure-devices.net"`` (no scheme, no path);
    ``model_id`` is an IoT Plug and Play model id such as ``"dtmi:com:example:Thermostat;1"``.
    Invalid values raise :class:`~lightclient.exceptions.ConfigError` naming the field.
    """

    hostname: str
    device_id: str
    module_id: Optional[str] = None
    model_id: Optional[str] = None

    def __post_init__(self) -> None:
        check_host(self.hostname, argument="hostname")
        _check_id("device_id", self.device_id)
        if self.module_id is not None:
            _check_id("module_id", self.module_id)
        if self.model_id is not None:
            if not isinstance(self.model_id, str):
                raise ConfigError(f"model_id must be a str, not {type(self.model_id).__name__}")
            if not self.model_id.startswith("dtmi:") or any(c.isspace() for c in self.model_id):
                raise ConfigError(
                    f"model_id {self.model_id!r} is not a DTDL model id; "
                    "expected something like 'dtmi:com:example:Thermostat;1'"
                )

    @property
    def is_module(self) -> bool:
        return self.module_id is not None

    @property
    def client_id(self) -> str:
        """The MQTT client id: ``"{device_id}"`` or ``"{device_id}/{module_id}"``."""
        if self.module_id is None:
            return self.device_id
        return f"{self.device_id}/{self.module_id}"

    def username(self, api_version: str = API_VERSION, client_type: Optional[str] = None) -> str:
        """The MQTT username.

        ``{hostname}/{device_id}[/{module_id}]/?api-version={v}&DeviceClientType={t}[&model-id={m}]``, e.g.
        ``hub.azure-devices.net/d1/?api-version=2021-04-12&DeviceClientType=lightclient%2F0.1.0``.
        ``client_type`` defaults to :func:`default_client_type`.
        """
        if not isinstance(api_version, str) or not api_version:
            raise ConfigError(f"api_version must be a non-empty str such as {API_VERSION!r}, not {api_version!r}")
        if client_type is None:
            client_type = default_client_type()
        if not isinstance(client_type, str) or not client_type:
            raise ConfigError(f"client_type must be a non-empty str such as 'myapp/1.0', not {client_type!r}")
        # ISO dates compare correctly as strings ("2020-09-30-preview" sorts after "2020-09-30").
        if self.model_id is not None and api_version < _MIN_API_VERSION_FOR_MODEL_ID:
            raise ConfigError(
                f"api_version {api_version!r} is too old to send a model id; "
                f"use {_MIN_API_VERSION_FOR_MODEL_ID!r} or later (default {API_VERSION!r})"
            )
        query = f"api-version={_q(api_version)}&DeviceClientType={_q(client_type)}"
        if self.model_id is not None:
            query += f"&model-id={_q(self.model_id)}"
        return f"{self.hostname}/{self.client_id}/?{query}"


__all__ = ["API_VERSION", "Identity", "check_host", "default_client_type"]
