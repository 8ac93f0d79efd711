"""``lightclient status``: the device certificate's names, validity, time left and next renewal."""
from __future__ import annotations

import json
import os
import time

from .. import renewal
from ..exceptions import CertificateExpiredError
from .common import EXIT_OK, env_help, setting


def register(sub) -> None:
    p = sub.add_parser("status", help="show the device certificate's validity and when it will be renewed",
                       description="Show the device certificate's subject, issuer, validity, time left and the "
                                   "next renewal under the renewal policy. An expired certificate is an error "
                                   "(exit 3) that names the way out.")
    p.add_argument("--cert", help=env_help("cert", "the device certificate chain (PEM, leaf first)"))
    add_policy_options(p)
    p.add_argument("--state", metavar="FILE", help="the renewal state file (default: CERT.renewal.json), if any")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.set_defaults(func=run)


def add_policy_options(p) -> None:
    g = p.add_argument_group("renewal policy")
    g.add_argument("--renew-fraction", type=float, default=0.8, metavar="F",
                   help="renew once this fraction of the lifetime has passed (default 0.8)")
    g.add_argument("--renew-days-before", type=float, metavar="DAYS",
                   help="renew this many days before expiry, if that is earlier")
    g.add_argument("--renew-jitter", type=float, default=0.05, metavar="F",
                   help="renew up to this fraction of the lifetime earlier, at random (default 0.05)")


def policy(args) -> renewal.RenewalPolicy:
    return renewal.RenewalPolicy(fraction=args.renew_fraction, days_before=args.renew_days_before,
                                 jitter=args.renew_jitter)


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def run(args) -> int:
    cert = setting(args, "cert", required=True, what="the device certificate")
    state = renewal.load_state(args.state or os.path.abspath(cert) + ".renewal.json")
    pending = None
    if state is not None:
        cert, pending = state.cert, state.pending
    v = renewal.certificate_validity(cert)
    now = time.time()
    p = policy(args)
    earliest, latest = p.renew_at(v, 1.0), p.renew_at(v, 0.0)
    if args.json:
        print(json.dumps({"certificate": cert, "subject": v.subject, "issuer": v.issuer,
                          "validFrom": _when(v.not_before), "validUntil": _when(v.not_after),
                          "secondsLeft": round(v.remaining(now)), "renewFrom": _when(earliest),
                          "renewBy": _when(latest), "expired": v.expired(now),
                          "renewalInProgress": pending.step if pending else None}))
    else:
        print(f"certificate  {cert}")
        print(f"subject      CN={v.subject}")
        print(f"issuer       CN={v.issuer}")
        print(f"valid        {_when(v.not_before)} .. {_when(v.not_after)}")
        print(f"time left    {renewal.format_duration(v.remaining(now))} "
              f"({100 * (1 - v.elapsed_fraction(now)):.0f} % of {renewal.format_duration(v.lifetime)})")
        print(f"next renewal between {_when(earliest)} and {_when(latest)}"
              + (" (due now)" if now >= earliest else f" (in {renewal.format_duration(earliest - now)})"))
        if pending:
            print(f"renewal in progress: step {pending.step!r} over {pending.route} (finished or rolled back "
                  "on the next start)")
    if v.expired(now):
        raise CertificateExpiredError(
            f"the certificate {cert} expired on {_when(v.not_after)}; the hub refuses it. Get a new one over DPS "
            "with the onboarding credential: `lightclient renew --id-scope … --onboarding-cert …` (or "
            "`lightclient provision --new-csr --cert-out …`)")
    return EXIT_OK
