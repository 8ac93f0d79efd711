"""The ``lightclient`` command: token tooling, CSRs, a doctor, DPS, telemetry, twin, methods, tracing.

    lightclient keygen --module-path /usr/lib/softhsm/libsofthsm2.so --token lab --label devkey
    lightclient csr --key 'pkcs11:token=lab;object=devkey?module-path=…' --device-id dev1 --out dev1.csr
    lightclient doctor --hub myhub.azure-devices.net --device-id dev1 --cert dev1.pem --key '…'
    lightclient send --hub … --device-id dev1 --cert dev1.pem --key '…' '{"temp": 21}'

Exit codes (the README's table): 0 success; 1 the command ran and found a problem (doctor, a wait that
ended empty); 2 usage or settings; 3 key, PIN, token, certificate, or the hub/DPS refused the device's
credentials; 4 connection, server certificate, timeout or service error; 130 interrupted (Ctrl-C).
Errors are one line (``error: …``) naming CLI flags; ``--debug`` adds the traceback.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .commands import common


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .commands import csr, doctor, messaging, provision, tokens, trace
    from .commands import renew, status
    from .commands import upload

    parser = argparse.ArgumentParser(
        prog="lightclient",
        description="Azure IoT Hub device tooling whose X.509 key stays in a PKCS#11 token or TPM.",
        epilog="Settings also come from the environment (IOT_HUB_HOSTNAME, DEVICE_ID, PATH_TO_CERTIFICATE_FILE, "
               "KEY_IDENTIFIER, LIGHTCLIENT_PIN, …); see `lightclient COMMAND --help`. Exit codes: 0 ok, "
               "1 problems found, 2 usage, 3 key/PIN/certificate/credentials, 4 connection/service.")
    parser.add_argument("--version", action="version", version=f"lightclient {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    tokens.register(sub)
    csr.register(sub)
    doctor.register(sub)
    provision.register(sub)
    renew.register(sub)
    status.register(sub)
    trace.register(sub)
    messaging.register(sub)
    upload.register(sub)
    sub.add_parser("emulator", add_help=False,
                   help="run the local IoT Hub + DPS emulator (`lightclient emulator --help` lists its options)")
    return parser


def _split_emulator(argv: List[str]):
    """``[--debug] emulator ARGS…``: the emulator parses its own arguments, --help included."""
    for i, arg in enumerate(argv):
        if arg == "emulator":
            return argv[:i], argv[i + 1:]
        if not arg.startswith("-"):
            return None
    return None


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = _split_emulator(argv)
    if split is not None and all(a == "--debug" for a in split[0]):
        from .emulator.__main__ import main as emulator_main

        return emulator_main(split[1], prog="lightclient emulator")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return common.EXIT_USAGE
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return common.EXIT_INTERRUPTED
    except (common.LightClientError, OSError) as exc:
        if args.debug:
            import traceback

            traceback.print_exc()
        # LightClientError first: OperationTimeout is also an OSError (TimeoutError).
        if isinstance(exc, common.LightClientError):
            text = common.error_text(exc, args)
            queue = getattr(exc, "openssl_errors", ())
            if args.debug and queue:                # one line; OpenSSL's error queue only with --debug
                text += "\n  OpenSSL said: " + "\n  OpenSSL said: ".join(queue)
        else:
            text = _os_error(exc)
        print(f"error: {text}", file=sys.stderr)
        return common.exit_code_for(exc)


def _os_error(exc: OSError) -> str:
    from .diagnostics import network_reason

    if common.is_network_error(exc):
        return f"network error: {network_reason(exc)}"
    where = f" {exc.filename!r}" if getattr(exc, "filename", None) else ""
    return f"{exc.strerror or exc}{where}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
