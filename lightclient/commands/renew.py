"""``lightclient renew``: renew the device certificate now (or only when due), over DPS or the hub."""
from __future__ import annotations

import dataclasses
import time

from .. import dps, renewal
from ..exceptions import CertificateExpiredError, ConfigError
from .common import (EXIT_OK, add_key_options, env_help, identity, key_ref, resolve_pin, setting)
from .status import add_policy_options, policy


def register(sub) -> None:
    p = sub.add_parser("renew", help="renew the device certificate (over DPS or the hub), optionally on a new key",
                       description="Renew the device certificate: a CSR signed in the token (optionally by a new "
                                   "key made there), sent to DPS (re-registration) or to the hub "
                                   "($iothub/credentials); the new chain replaces --cert only after it has "
                                   "connected. A state file (CERT.renewal.json, mode 0600) makes an interrupted "
                                   "renewal finish or roll back on the next run.")
    p.add_argument("--cert", help=env_help("cert", "the device certificate chain to renew (PEM, leaf first)"))
    p.add_argument("--device-id", help=env_help("device_id", "device id (the CSR's CN)"))
    p.add_argument("--via", choices=("auto", "dps", "hub"), default="auto",
                   help="renewal path: dps, hub, or auto = hub when --hub is given, then DPS (default)")
    p.add_argument("--if-due", action="store_true", help="do nothing unless the renewal policy says it is time")
    p.add_argument("--rotate-key", action="store_true", help="make a new key in the same token for the new certificate")
    p.add_argument("--key-type", default=renewal.DEFAULT_KEY_TYPE, choices=("ec-p256", "ec-p384", "rsa-2048", "rsa-3072"),
                   help=f"type of the new key with --rotate-key (default {renewal.DEFAULT_KEY_TYPE})")
    p.add_argument("--retire-after", type=float, default=24 * 3600.0, metavar="SECONDS",
                   help="with --rotate-key: delete the old key from the token this long after the switch "
                        "(default 86400; 0 = at once); a later `lightclient renew` deletes it when due")
    p.add_argument("--state", metavar="FILE", help="renewal state file (default: CERT.renewal.json)")
    g = p.add_argument_group("DPS")
    g.add_argument("--id-scope", help=env_help("id_scope", "the DPS ID scope"))
    g.add_argument("--registration-id", help=env_help("registration_id", "registration id (default: the device id)"))
    g.add_argument("--endpoint", help=env_help("endpoint", f"DPS host[:port] (default {dps.DEFAULT_ENDPOINT})"))
    g.add_argument("--onboarding-cert", metavar="FILE",
                   help="authenticate to DPS with this (long-lived) certificate instead of the one renewed")
    h = p.add_argument_group("hub")
    h.add_argument("--hub", metavar="HOSTNAME", help=env_help("hub", "IoT Hub host name (for --via hub)"))
    h.add_argument("--port", type=int, help=env_help("port", "MQTT port (default 8883)"))
    p.add_argument("--ca", help=env_help("ca", "trusted roots for the hub and DPS (default: the bundled roots)"))
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the new certificate (default 120)")
    add_policy_options(p)
    add_key_options(p, sas=False)
    p.set_defaults(func=run)


def run(args) -> int:
    cert = setting(args, "cert", required=True, what="the device certificate")
    device_id = setting(args, "device_id", required=True, what="the device id")
    kr = key_ref(args)
    module_path = setting(args, "module_path")
    if module_path and not kr.module_path:
        kr = kr.with_options(module_path=module_path)
    uri = kr.pkcs11_uri or str(setting(args, "key"))
    if kr.pkcs11_uri and kr.module_path:
        uri = kr.pkcs11_uri.split("?")[0] + "?module-path=" + kr.module_path
    pin = resolve_pin(args, "the token", prompt=kr.needs_pin)
    scope = setting(args, "id_scope")
    hub = setting(args, "hub")
    via = args.via
    routes = {"dps": ("dps",), "hub": ("hub",), "auto": (("hub",) if hub else ()) + (("dps",) if scope else ())}[via]
    if "dps" in routes and not scope:
        raise ConfigError("renewal over DPS needs --id-scope (or PROVISIONING_IDSCOPE)")
    if "hub" in routes and not hub:
        raise ConfigError("renewal over the hub needs --hub (or IOT_HUB_HOSTNAME)")
    if not routes:
        raise ConfigError("nothing to renew over: give --id-scope (DPS) and/or --hub (the credentials API)")
    route = None
    if scope:
        route = renewal.DpsRoute(scope, setting(args, "registration_id") or device_id,
                                 setting(args, "endpoint") or dps.DEFAULT_ENDPOINT, ca=setting(args, "ca"),
                                 onboarding_cert=args.onboarding_cert,
                                 onboarding_key=uri if args.onboarding_cert else None, timeout=args.timeout)
    if not 0 <= args.retire_after <= 365 * 86400:
        raise ConfigError(f"--retire-after must be 0 to 31536000 seconds, not {args.retire_after:g}")
    renewer = renewal.Renewer(cert=cert, key=uri, pin=pin, device_id=device_id, state=args.state,
                              ca=setting(args, "ca"), policy=dataclasses.replace(policy(args), grace=args.retire_after),
                              dps=route, routes=routes,
                              rotate_keys=args.rotate_key, key_type=args.key_type, hub_timeout=args.timeout)
    action = renewer.recover()
    if action in ("rollback", "commit"):
        print(f"an interrupted renewal was {'rolled back' if action == 'rollback' else 'completed'}")
    if args.if_due and action != "try":
        at = renewer.renew_at()
        if time.time() < at:
            print(f"not due: the next renewal is in {renewal.format_duration(at - time.time())}")
            return EXIT_OK
    if action != "try":
        validity = renewer.validity()
        if validity.expired(time.time()):
            if not (args.onboarding_cert and "dps" in routes):
                raise CertificateExpiredError(
                    f"the certificate {renewer.state.cert} expired on "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(validity.not_after))}: neither the hub nor "
                    "DPS accepts it any more. Register again over DPS with the onboarding credential: "
                    "`lightclient renew --via dps --id-scope … --onboarding-cert FILE`")
            routes = ("dps",)   # the only way back: DPS, authenticated by the onboarding certificate
    device = None
    if "hub" in routes:
        from ..device import Device

        ident = identity(args)
        port = int(setting(args, "port") or 8883)
        device = renewer.connect_device(lambda ctx: Device(ident, ctx, port=port), timeout=30.0)
    elif action == "try":
        raise ConfigError("an interrupted renewal waits to be tried on the hub: run again with --hub")
    try:
        validity = renewer.renew(routes[0] if len(routes) == 1 else None)
    finally:
        if device is not None:
            device.close()
    retired = renewer.retire_due()
    state = renewer.state
    print(f"renewed {state.cert}: valid until "
          f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(validity.not_after))}"
          + (f" on the new key {state.key.split('?')[0]}" if args.rotate_key else ""))
    for label in retired:
        print(f"retired the old key {label!r}: deleted from the token")
    for item in state.retire:
        print(f"the old key {item.label!r} stays until "
              f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(item.after))}; a later `lightclient renew` "
              "deletes it")
    return EXIT_OK
