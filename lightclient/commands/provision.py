"""``lightclient provision``: register with the Device Provisioning Service over HTTPS."""
from __future__ import annotations

import json

from .. import dps, keys, tls
from ..exceptions import ConfigError
from .common import (EXIT_OK, add_key_options, add_network_options, env_help, key_ref, load_key, parse_json, proxy_for,
                     resolve_pin, sas_lifetime, sas_token_key, setting)


def register(sub) -> None:
    p = sub.add_parser("provision", help="register with DPS over HTTPS (optionally getting a certificate issued)",
                       description="Register the device with the Device Provisioning Service over HTTPS, "
                                   "authenticated by the certificate and the key in its token, and print the "
                                   "assignment. With --csr (or --new-csr) DPS issues a certificate, written "
                                   "to --cert-out.")
    p.add_argument("--id-scope", help=env_help("id_scope", "the DPS ID scope, e.g. 0ne00A1B2C3"))
    p.add_argument("--registration-id",
                   help=env_help("registration_id", "registration id (default: the device id); equals the certificate CN"))
    p.add_argument("--device-id", help=env_help("device_id", "used as the registration id when that is not given"))
    p.add_argument("--endpoint", help=env_help("endpoint", f"DPS host[:port] (default {dps.DEFAULT_ENDPOINT})"))
    p.add_argument("--cert", help=env_help("cert", "the certificate (chain) DPS authenticates"))
    p.add_argument("--ca", help=env_help("ca", "trusted roots for DPS (default: the bundled roots)"))
    p.add_argument("--payload", metavar="JSON", help="custom payload for the allocation policy")
    issue = p.add_mutually_exclusive_group()
    issue.add_argument("--csr", metavar="FILE", help="a PEM CSR (from lightclient csr): DPS issues a certificate for it")
    issue.add_argument("--new-csr", action="store_true",
                       help="sign a CSR with the key now (CN = registration id) and have DPS issue a certificate")
    p.add_argument("--cert-out", metavar="FILE", help="where to write the issued chain (PEM, leaf first)")
    p.add_argument("--cache", metavar="FILE", help="reuse the assignment saved in FILE; save a new one there")
    p.add_argument("--force", action="store_true", help="with --cache: register again even if FILE has an assignment")
    p.add_argument("--timeout", type=float, default=120.0, help="give up after this many seconds (default 120)")
    p.add_argument("--json", action="store_true", help="print the assignment as JSON")
    p.add_argument("--sas-group-key", metavar="REF",
                   help="symmetric-key group enrollment: the group key in a token (pkcs11:…;type=secret-key); the "
                        "device key is derived from it in the token (HMAC of the registration id), stored there "
                        "as object=<registration id>, and used to register (then pass that key as --sas-key)")
    add_network_options(p, mqtt=False)
    add_key_options(p)
    p.set_defaults(func=run)


def run(args) -> int:
    scope = setting(args, "id_scope", required=True, what="the DPS ID scope")
    reg_id = setting(args, "registration_id") or setting(args, "device_id")
    if not reg_id:
        raise ConfigError("the registration id is not set: pass --registration-id or --device-id "
                          "(or set PROVISIONING_REGISTRATION_ID or DEVICE_ID)")
    endpoint = setting(args, "endpoint") or dps.DEFAULT_ENDPOINT
    payload = parse_json(args.payload, "--payload") if args.payload is not None else None
    if args.sas_group_key is not None or setting(args, "sas_key") is not None:
        return _run_sas(args, scope, reg_id, endpoint, payload)
    cert = setting(args, "cert", required=True, what="the device certificate")
    if (args.csr or args.new_csr) and not args.cert_out:
        raise ConfigError("certificate issuance needs --cert-out FILE for the issued chain")
    if args.cert_out and not (args.csr or args.new_csr):
        raise ConfigError("--cert-out is for certificate issuance: add --csr FILE or --new-csr")
    csr = None
    if args.csr:
        csr = dps.read_csr(args.csr)
    key = load_key(args)
    if args.new_csr:
        csr = keys.csr_pem(keys.sign_csr(key, [("CN", reg_id)]))
    ctx = tls.https_context(cert=cert, key=key, ca=setting(args, "ca"))
    options = dict(ssl_context=ctx, endpoint=endpoint, payload=payload, csr=csr, timeout=args.timeout,
                   cert_out=args.cert_out, proxy=proxy_for(args, endpoint.rsplit(":", 1)[0].strip("[]")))
    return _register(args, scope, reg_id, options, csr, cert)


def _run_sas(args, scope: str, reg_id: str, endpoint: str, payload) -> int:
    """Symmetric-key enrollment: the SAS in the Authorization header is signed in the token; no client certificate."""
    from ..symkey import SasCredential

    for flag, given in (("--cert", args.cert), ("--key", args.key), ("--csr", args.csr), ("--new-csr", args.new_csr),
                        ("--cert-out", args.cert_out)):
        if given:
            raise ConfigError(f"{flag} is for X.509 enrollments; --sas-key/--sas-group-key authenticate with a "
                              f"symmetric key: drop {flag} (or drop the SAS option to register with a certificate)")
    if args.sas_group_key is not None and getattr(args, "sas_key", None) is not None:
        raise ConfigError("give --sas-key (individual enrollment, or a device key derived earlier) or --sas-group-key "
                          "(derive the device key now), not both")
    lifetime = sas_lifetime(args)
    if args.sas_group_key is not None:
        key = _derive_from_group(args, reg_id)
    else:
        key = sas_token_key(args)
    cred = SasCredential.for_dps(scope, reg_id, key, lifetime=lifetime)
    options = dict(ssl_context=tls.server_context(ca=setting(args, "ca"), alpn=["http/1.1"]), endpoint=endpoint,
                   payload=payload, timeout=args.timeout, sas=cred,
                   proxy=proxy_for(args, endpoint.rsplit(":", 1)[0].strip("[]")))
    args.sas_key = str(key.ref)  # the reference the next command names
    return _register(args, scope, reg_id, options, None, None)


def _derive_from_group(args, reg_id: str):
    """The group key's HMAC of ``reg_id``, computed and stored in the token (lightclient.token.derive_secret_key)."""
    from .. import token as tk
    from ..symkey import TokenKey

    group = keys.parse_secret_key_ref(args.sas_group_key)
    module = group.module_path or setting(args, "module_path")
    if not module:
        raise ConfigError(f"--sas-group-key {str(group).split('?')[0]} names no PKCS#11 module: add "
                          "?module-path=/path/to/module.so or pass --module-path")
    if not group.attribute("token"):
        raise ConfigError(f"--sas-group-key {group} names no token: add token=<label>")
    pin = resolve_pin(args, f"the group key {str(group).split('?')[0]}", prompt=group.needs_pin or not group.has_pin)
    pin = group.resolve_pin(pin, None, None)
    group_id = group.attribute_bytes("id")
    info = tk.KeyInfo(**tk.run_in_child("derive-secret", module_path=module, token_label=group.attribute("token"),
                                        registration_id=reg_id, new_label=reg_id, group_label=group.attribute("object"),
                                        group_id_hex=group_id.hex() if group_id else None, pin=pin))
    uri = info.uri(module)
    print(f"derived the device key of {reg_id!r} from the group key in token {info.token_label!r} and stored it "
          f"there as {info.label!r} (sensitive, non-extractable); use it from now on with --sas-key {uri}")
    return TokenKey(uri, pin=pin)


def _register(args, scope: str, reg_id: str, options: dict, csr, cert) -> int:
    from_cache = False
    if args.cache:
        if csr is not None:
            raise ConfigError("--cache and certificate issuance do not mix: a cached assignment issues nothing")
        result, from_cache = dps.provision_cached(dps.ProvisioningCache(args.cache), scope, reg_id, force=args.force,
                                                  **options)
    else:
        result = dps.provision(scope, reg_id, **options)
    if args.json:
        print(json.dumps({"assignedHub": result.assigned_hub, "deviceId": result.device_id,
                          "substatus": result.substatus, "payload": result.payload, "fromCache": from_cache,
                          "issuedCertificate": args.cert_out if result.issued_certificate_chain else None}))
        return EXIT_OK
    source = " (from the cache; --force registers again)" if from_cache else ""
    print(f"assigned hub {result.assigned_hub}, device id {result.device_id}{source}")
    if result.substatus:
        print(f"substatus {result.substatus}")
    if result.payload is not None:
        print(f"payload {json.dumps(result.payload)}")
    if result.issued_certificate_chain:
        print(f"issued certificate chain ({len(result.issued_certificate_chain)} certificates) written to {args.cert_out}")
    elif csr is not None:
        print("DPS issued no certificate (does the enrollment allow certificate issuance?)")
    print("next: " + next_command(args, result, args.cert_out if result.issued_certificate_chain else cert))
    return EXIT_OK


def next_command(args, result, cert) -> str:
    """The send command for the assigned hub, with every setting this provisioning used (never a PIN)."""
    import shlex

    words = ["lightclient", "send", "--hub", result.assigned_hub, "--device-id", result.device_id]
    if cert is None:   # symmetric key
        ref = keys.parse_secret_key_ref(args.sas_key)
        words += ["--sas-key", "…" if ref.has_pin_value else str(ref)]
    else:
        ref = key_ref(args)
        words += ["--cert", cert, "--key", "…" if ref.has_pin_value else str(ref)]
    ca = setting(args, "ca")
    if ca:
        words += ["--ca", ca]
    if args.pin_file:
        words += ["--pin-file", args.pin_file]
    elif args.pin_env:
        words += ["--pin-env", args.pin_env]
    return " ".join(w if w == "…" else shlex.quote(w) for w in words) + " [--port PORT] 'hello'"
