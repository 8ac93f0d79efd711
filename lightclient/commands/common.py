"""What the subcommands share: settings from flags or the environment, PINs, keys, exit codes.

Settings come from a flag, else from the first environment variable set among its names. The names
the original Azure IoT samples use are accepted, so existing set-ups work unchanged::

    --hub          IOT_HUB_HOSTNAME, LIGHTCLIENT_HUB
    --device-id    DEVICE_ID, LIGHTCLIENT_DEVICE_ID
    --cert         PATH_TO_CERTIFICATE_FILE, LIGHTCLIENT_CERT
    --key          KEY_IDENTIFIER, LIGHTCLIENT_KEY
    --module-path  LIGHTCLIENT_MODULE_PATH, PKCS11_MODULE_PATH

PINs never come from a plain command-line value unless the user insists (``--pin``, or a ``pin-value``
inside ``--key``, each with a warning):
``--pin-file FILE``, ``--pin-env VAR`` (default ``LIGHTCLIENT_PIN``), or a prompt on a terminal.
"""
from __future__ import annotations

import argparse
import getpass
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from .. import keys
from ..exceptions import (CertificateError, ConfigError, ConnectRefusedError, KeyLoadError, LightClientError,
                          OpenSSLMismatchError, OperationTimeout, PinError, ProtocolError, ProxyError,
                          ServerCertificateError, ServiceError, TlsVersionError, in_terms)

# Exit codes.
EXIT_OK = 0
EXIT_FAILED = 1        # the command ran and found a problem (doctor) or did not get what it waited for
EXIT_USAGE = 2         # bad arguments or settings (argparse uses 2 as well)
EXIT_AUTH = 3          # key, PIN, token, certificate, or the hub/DPS refused the device's credentials
EXIT_SERVICE = 4       # cannot connect, server certificate refused, timed out, or the hub/DPS answered an error
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), after the command's summary

PIN_ENV_DEFAULT = "LIGHTCLIENT_PIN"

ENV: Dict[str, Tuple[str, ...]] = {
    "hub": ("IOT_HUB_HOSTNAME", "LIGHTCLIENT_HUB"),
    "port": ("LIGHTCLIENT_PORT",),
    "device_id": ("DEVICE_ID", "LIGHTCLIENT_DEVICE_ID"),
    "module_id": ("LIGHTCLIENT_MODULE_ID",),
    "model_id": ("LIGHTCLIENT_MODEL_ID",),
    "cert": ("PATH_TO_CERTIFICATE_FILE", "LIGHTCLIENT_CERT"),
    "key": ("KEY_IDENTIFIER", "LIGHTCLIENT_KEY"),
    "sas_key": ("LIGHTCLIENT_SAS_KEY",),
    "module_path": ("LIGHTCLIENT_MODULE_PATH", "PKCS11_MODULE_PATH"),
    "ca": ("LIGHTCLIENT_CA",),
    "id_scope": ("PROVISIONING_IDSCOPE", "LIGHTCLIENT_ID_SCOPE"),
    "registration_id": ("PROVISIONING_REGISTRATION_ID", "LIGHTCLIENT_REGISTRATION_ID"),
    "endpoint": ("PROVISIONING_HOST", "LIGHTCLIENT_DPS_ENDPOINT"),
    "transport": ("LIGHTCLIENT_TRANSPORT",),
    "gateway": ("LIGHTCLIENT_GATEWAY",),
    "websocket_port": ("LIGHTCLIENT_WEBSOCKET_PORT",),
}

FLAG = {"hub": "--hub", "device_id": "--device-id", "module_id": "--module-id", "model_id": "--model-id",
        "cert": "--cert", "key": "--key", "sas_key": "--sas-key", "module_path": "--module-path", "ca": "--ca", "port": "--port",
        "id_scope": "--id-scope", "registration_id": "--registration-id", "endpoint": "--endpoint"}


#: Library parameter names -> the CLI's flags, for errors whose advice names a setting
#: (:func:`lightclient.exceptions.in_terms`); ``host`` is --hub for the hub and --endpoint for DPS.
CLI_NAMES: Dict[str, str] = {
    "host": "--hub", "port": "--port", "ca": "--ca", "cert": "--cert", "key": "--key",
    "module_path": "--module-path", "pin": "--pin-file FILE or --pin-env VAR (default LIGHTCLIENT_PIN)",
    "hostname": "--hub", "device_id": "--device-id",
}


def error_text(exc: BaseException, args: Optional[argparse.Namespace] = None) -> str:
    """An error's one-line message naming this CLI's flags instead of the library's keyword arguments."""
    names = dict(CLI_NAMES)
    if getattr(args, "command", None) == "provision":
        names["host"] = "--endpoint"
    return in_terms(exc, names)


def is_network_error(exc: BaseException) -> bool:
    """A failure to reach a server (as opposed to a local file or argument problem)."""
    import socket

    return isinstance(exc, (ConnectionError, socket.gaierror, TimeoutError, socket.herror))


def exit_code_for(exc: BaseException) -> int:
    """The exit code for an error that ends a command (the table in the README, one class per row)."""
    if isinstance(exc, (ServerCertificateError, TlsVersionError)):
        return EXIT_SERVICE                   # the server (or --hub/--endpoint/--ca) is wrong, found on connecting
    if isinstance(exc, AuthRefused) or (isinstance(exc, ConnectRefusedError) and exc.return_code in (4, 5)):
        return EXIT_AUTH
    if isinstance(exc, ServiceError) and exc.status in (401, 403):
        return EXIT_AUTH                      # DPS refused the device's credentials
    if isinstance(exc, (KeyLoadError, CertificateError, OpenSSLMismatchError)):
        if isinstance(exc, ConfigError):      # e.g. a malformed key reference refused by OpenSSL
            return EXIT_USAGE
        return EXIT_AUTH
    if isinstance(exc, ConfigError):
        return EXIT_USAGE
    if isinstance(exc, (ServiceError, OperationTimeout, ProtocolError, ConnectionFailed, ProxyError)):
        return EXIT_SERVICE
    if is_network_error(exc) and not isinstance(exc, LightClientError):
        return EXIT_SERVICE
    return EXIT_USAGE                         # a file named in the arguments cannot be read or written


class AuthRefused(LightClientError):
    """The hub refused the device's credentials (CONNACK 4 or 5)."""


class ConnectionFailed(LightClientError):
    """The hub (or DPS) could not be reached, or the connection dropped."""


def _env_name(name: str) -> str:
    return " or ".join(ENV.get(name, ()))


def env_help(name: str, text: str) -> str:
    names = ENV.get(name)
    return f"{text} (env: {', '.join(names)})" if names else text


def setting(args: argparse.Namespace, name: str, required: bool = False, what: str = "") -> Optional[str]:
    """A flag's value, else the first of its environment variables that is set and not empty."""
    value = getattr(args, name, None)
    if value is None:
        for var in ENV.get(name, ()):
            if os.environ.get(var):
                value = os.environ[var]
                break
    if value is None and required:
        flag = FLAG.get(name, "--" + name.replace("_", "-"))
        env = _env_name(name)
        raise ConfigError(f"{what or name.replace('_', ' ')} is not set: pass {flag}"
                          + (f" or set {env}" if env else ""))
    return value


def setting_source(args: argparse.Namespace, name: str) -> Optional[str]:
    """Where :func:`setting` takes ``name`` from, for messages: its flag, else the environment variable set."""
    if getattr(args, name, None) is not None:
        return FLAG.get(name, "--" + name.replace("_", "-"))
    return next((var for var in ENV.get(name, ()) if os.environ.get(var)), None)


def add_key_options(parser: argparse.ArgumentParser, key_required: bool = True, sas: bool = True) -> None:
    """``sas=False`` for commands that only make sense with an X.509 key: --sas-key is then refused by name."""
    g = parser.add_argument_group("key and PIN")
    g.add_argument("--key", help=env_help("key", "key reference: pkcs11:token=…;object=…, engine:…, store:…, "
                                                 "handle:0x81…, or a PEM file (development only)"))
    g.add_argument("--module-path", "--pkcs11-module", dest="module_path",
                   help=env_help("module_path", "the PKCS#11 module (.so) for a pkcs11: key reference without "
                                                "?module-path="))
    if not sas:
        def refuse(_value: str) -> str:
            raise argparse.ArgumentTypeError(f"`{parser.prog}` is for X.509 keys only; a symmetric (SAS) key "
                                             "cannot be used with it: give --key")
        g.add_argument("--sas-key", "--sas-lifetime", type=refuse, help=argparse.SUPPRESS)
        add_pin_options(g)
        return
    g.add_argument("--sas-key", metavar="REF", help=env_help("sas_key", "symmetric key in a token for SAS "
                   "authentication instead of a certificate: pkcs11:token=…;object=…;type=secret-key"))
    g.add_argument("--sas-lifetime", type=int, default=3600, metavar="S",
                   help="SAS token lifetime in seconds (default 3600)")
    add_pin_options(g)


def add_pin_options(g) -> None:
    g.add_argument("--pin-file", metavar="FILE", help="read the token PIN from FILE (a trailing newline is ignored)")
    g.add_argument("--pin-env", metavar="VAR",
                   help=f"read the token PIN from environment variable VAR (default: {PIN_ENV_DEFAULT} if set)")
    g.add_argument("--pin", help=argparse.SUPPRESS)  # discouraged: visible in `ps` and shell history


def add_identity_options(parser: argparse.ArgumentParser, hub: bool = True) -> None:
    g = parser.add_argument_group("identity")
    if hub:
        g.add_argument("--hub", metavar="HOSTNAME", help=env_help("hub", "IoT Hub host name, e.g. myhub.azure-devices.net"))
    g.add_argument("--device-id", help=env_help("device_id", "device id registered in IoT Hub"))
    g.add_argument("--module-id", help=env_help("module_id", "module id, for a module identity"))
    g.add_argument("--model-id", help=env_help("model_id", "IoT Plug and Play model id (dtmi:…)"))


def add_telemetry_options(parser: argparse.ArgumentParser) -> None:
    """--prop, --content-type, --content-encoding: the properties a telemetry message carries."""
    parser.add_argument("--prop", action="append", default=[], metavar="KEY=VALUE",
                        help="application property of the telemetry (repeatable)")
    parser.add_argument("--content-type", help="telemetry content type ($.ct), e.g. application/json")
    parser.add_argument("--content-encoding", help="telemetry content encoding ($.ce), e.g. utf-8")


def add_connection_options(parser: argparse.ArgumentParser) -> None:
    add_identity_options(parser)
    g = parser.add_argument_group("connection")
    g.add_argument("--port", type=int, help=env_help("port", "MQTT port (default 8883)"))
    g.add_argument("--cert", help=env_help("cert", "device certificate chain (PEM, leaf first)"))
    g.add_argument("--ca", help=env_help("ca", "trusted roots for the server (default: the bundled IoT Hub roots)"))
    g.add_argument("--keylog", metavar="FILE", help="append TLS secrets to FILE (NSS key log format, for Wireshark)")
    g.add_argument("--timeout", type=float, default=15.0, help="seconds to wait for each answer (default 15)")
    add_network_options(g)
    add_key_options(parser)


def add_network_options(g, mqtt: bool = True) -> None:
    """--transport, --websocket-port, --gateway (MQTT only) and --proxy / --no-proxy."""
    if mqtt:
        g.add_argument("--transport", choices=("tcp", "websockets", "auto"),
                       help=env_help("transport", "tcp: MQTT on 8883 (default); websockets: MQTT over WebSockets "
                                                  "on 443; auto: try 8883, fall back to 443"))
        g.add_argument("--websocket-port", type=int, metavar="PORT",
                       help=env_help("websocket_port", "the MQTT-over-WebSockets port (default 443)"))
        g.add_argument("--gateway", metavar="HOSTNAME",
                       help=env_help("gateway", "connect to this IoT Edge gateway; the identity stays the hub's "
                                                "(trust the gateway's CA with --ca)"))
    g.add_argument("--proxy", metavar="URL",
                   help="http://host:port (HTTP CONNECT) or socks5://host:port; default: HTTPS_PROXY / ALL_PROXY "
                        "unless NO_PROXY lists the host (put credentials there or in LIGHTCLIENT_PROXY, not here)")
    g.add_argument("--no-proxy", action="store_true", help="connect directly even if HTTPS_PROXY is set")


def proxy_for(args: argparse.Namespace, host: str):
    """The proxy for ``host``: --proxy, else LIGHTCLIENT_PROXY, else HTTPS_PROXY/ALL_PROXY unless NO_PROXY
    lists ``host``; None with --no-proxy. A :class:`lightclient.proxy.Proxy`."""
    from ..proxy import Proxy, from_environment

    if getattr(args, "no_proxy", False):
        if getattr(args, "proxy", None):
            raise ConfigError("--proxy and --no-proxy contradict each other: give one")
        return None
    if getattr(args, "proxy", None):
        proxy = Proxy.parse(args.proxy, what="--proxy")
        if proxy.has_credentials:
            warn("--proxy holds credentials, which puts them in the process list and shell history; set "
                 "LIGHTCLIENT_PROXY or HTTPS_PROXY instead")
        return proxy
    if os.environ.get("LIGHTCLIENT_PROXY"):
        return Proxy.parse(os.environ["LIGHTCLIENT_PROXY"], what="the proxy in LIGHTCLIENT_PROXY")
    return from_environment(os.environ, host)


def warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr, flush=True)


def resolve_pin(args: argparse.Namespace, what: str = "the token", prompt: bool = True) -> Optional[str]:
    """The PIN from --pin-file, --pin-env/LIGHTCLIENT_PIN, --pin (warned about) or a terminal prompt."""
    if getattr(args, "_pin_resolved", False):
        return args._pin_value
    pin: Optional[str] = None
    if getattr(args, "pin", None) is not None:
        warn("--pin puts the PIN in the process list and shell history; use --pin-file FILE, "
             f"--pin-env VAR or {PIN_ENV_DEFAULT}, or type it at the prompt")
        pin = args.pin
    elif getattr(args, "pin_file", None):
        pin = keys.read_pin_file(args.pin_file)
    elif getattr(args, "pin_env", None):
        # Taken out of the environment once read: child processes (the token probes) must not inherit it.
        pin = os.environ.pop(args.pin_env, None)
        if not pin:
            raise PinError(f"--pin-env {args.pin_env}: that environment variable is not set or empty")
    elif os.environ.get(PIN_ENV_DEFAULT):
        pin = os.environ.pop(PIN_ENV_DEFAULT)
    elif prompt and sys.stdin is not None and sys.stdin.isatty():
        pin = getpass.getpass(f"PIN for {what}: ")
    if pin is not None and "\x00" in pin:
        raise ConfigError("the PIN contains a NUL character")
    args._pin_resolved, args._pin_value = True, pin
    return pin


def key_ref(args: argparse.Namespace, required: bool = True):
    """The parsed --key / KEY_IDENTIFIER (a :class:`lightclient.keys.KeyRef`), warning once about a pin-value in it."""
    ref = setting(args, "key", required=required, what="the key reference")
    if ref is None:
        return None
    kr = keys.parse_key_ref(ref)
    if kr.has_pin_value and not getattr(args, "_pin_value_warned", False):
        where = "--key" if getattr(args, "key", None) is not None else f"the key reference in {_env_name('key')}"
        warn(f"{where} holds a pin-value, which puts the PIN in the process list and shell history; use "
             f"--pin-file FILE, --pin-env VAR or {PIN_ENV_DEFAULT}, or pin-source=FILE in the URI")
        args._pin_value_warned = True
    return kr


def sas_token_key(args: argparse.Namespace, name: str = "sas_key"):
    """The TokenKey named by --sas-key / LIGHTCLIENT_SAS_KEY (or the setting ``name``), or None without one."""
    ref = setting(args, name)
    if ref is None:
        return None
    from lightclient.symkey import TokenKey

    kr = keys.parse_secret_key_ref(ref)
    pin = resolve_pin(args, f"the SAS key {str(kr).split('?')[0]}", prompt=kr.needs_pin or not kr.has_pin)
    return TokenKey(kr, pin=pin, module_path=setting(args, "module_path"))


def sas_credential(args: argparse.Namespace, ident):
    """A SasCredential for --sas-key / LIGHTCLIENT_SAS_KEY (signed in the token), or None without one."""
    if setting(args, "sas_key") is None:
        return None
    from lightclient.symkey import SasCredential

    lifetime = sas_lifetime(args)
    return SasCredential.for_identity(ident, sas_token_key(args), lifetime=lifetime)


def refuse_x509_flags_with_sas(args: argparse.Namespace) -> None:
    """A SAS key and --cert/--key together: refused, naming where the SAS key came from (flag or environment),
    rather than quietly ignoring a flag the user typed."""
    if setting(args, "sas_key") is None:
        return
    source = setting_source(args, "sas_key")
    for flag, value in (("--cert", getattr(args, "cert", None)), ("--key", getattr(args, "key", None))):
        if value is not None:
            by, undo = (source, f"drop {flag}") if source == "--sas-key" else (
                f"{source} (set in the environment)", f"drop {flag}, or unset {source} to use the certificate")
            raise ConfigError(f"{flag} is for X.509 devices; {by} authenticates with a SAS token signed in "
                              f"the token: {undo}")


def sas_lifetime(args: argparse.Namespace) -> int:
    """--sas-lifetime, checked before any PIN is asked for (0 or a negative value is an error, not the default)."""
    from lightclient.sas import check_lifetime

    return check_lifetime(getattr(args, "sas_lifetime", 3600), "--sas-lifetime")


def load_key(args: argparse.Namespace):
    """Load the key named by --key / KEY_IDENTIFIER (prompting for a PIN on a terminal if needed)."""
    kr = key_ref(args)
    pin = resolve_pin(args, f"the key {str(kr).split('?')[0]}", prompt=kr.needs_pin)
    return keys.load_key(kr, pin=pin, module_path=setting(args, "module_path"))


def identity(args: argparse.Namespace, need_hub: bool = True):
    from ..identity import Identity

    hub = setting(args, "hub", required=need_hub, what="the IoT Hub host name") or "hub.example"
    device_id = setting(args, "device_id", required=True, what="the device id")
    return Identity(hub, device_id, setting(args, "module_id"), setting(args, "model_id"))


def parse_props(items: Sequence[str]) -> List[Tuple[str, Optional[str]]]:
    """``k=v`` strings as pairs; ``k`` alone is a property without a value."""
    out = []
    for item in items or ():
        key, eq, value = item.partition("=")
        if not key:
            raise ConfigError(f"--prop {item!r}: expected KEY=VALUE")
        out.append((key, value if eq else None))
    return out


def parse_json(text: str, what: str):
    import json

    try:
        return json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{what} is not valid JSON: {exc} (quote it for the shell, e.g. '{{\"fw\": \"1.2\"}}')") from None
