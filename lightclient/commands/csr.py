"""``lightclient csr``: a certificate signing request signed by the key where it lives."""
from __future__ import annotations

import os

from .. import keys
from ..exceptions import ConfigError
from .common import EXIT_OK, add_key_options, env_help, load_key, setting


def register(sub) -> None:
    p = sub.add_parser("csr", help="make a CSR signed by a key reference (the key never leaves its token)",
                       description="Make a PKCS#10 certificate signing request, signed inside the token. The "
                                   "subject CN defaults to the device id, which is what IoT Hub and DPS require.")
    p.add_argument("--device-id", help=env_help("device_id", "device id: the subject CN unless --cn is given"))
    p.add_argument("--cn", help="subject CN (default: the device id)")
    p.add_argument("--subject", action="append", default=[], metavar="FIELD=VALUE",
                   help="another subject field, e.g. O=Contoso or C=DE (repeatable)")
    p.add_argument("--san", help="subjectAltName in OpenSSL syntax, e.g. DNS:device1,URI:urn:dev:1")
    p.add_argument("--digest", default="sha256", help="signature digest (default sha256; sha384, sha512)")
    p.add_argument("--out", "-o", metavar="FILE", help="write the PEM CSR here (default: standard output)")
    add_key_options(p, sas=False)
    p.set_defaults(func=run)


def subject_fields(args):
    cn = args.cn or setting(args, "device_id")
    if not cn:
        raise ConfigError("the CSR needs a subject CN: pass --device-id (or set DEVICE_ID) or --cn")
    fields = [("CN", cn)]
    for item in args.subject:
        name, eq, value = item.partition("=")
        if not eq or not name or not value:
            raise ConfigError(f"--subject {item!r}: expected FIELD=VALUE, e.g. O=Contoso")
        fields.append((name, value))
    return fields


def run(args) -> int:
    fields = subject_fields(args)
    key = load_key(args)
    pem = keys.csr_pem(keys.sign_csr(key, fields, san=args.san, digest=args.digest))
    if args.out:
        tmp = args.out + ".tmp"
        with open(tmp, "wb") as fh:
            fh.write(pem)
        os.replace(tmp, args.out)
        print(f"wrote a CSR for CN={fields[0][1]} signed by {key.description} ({key.key_type}-{key.bits}) "
              f"to {args.out}")
    else:
        print(pem.decode(), end="")
    return EXIT_OK
