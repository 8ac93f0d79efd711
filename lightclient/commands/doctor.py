"""``lightclient doctor``: check the whole chain from Python's OpenSSL to the hub, one ✓/✗ line per link.

Each ✗ comes with the fix. Checks that depend on a failed one are shown as skipped (–). The token checks
(module, token, login, key) run through python-pkcs11 in a child process, because a PKCS#11 module keeps
per-process state and this process then loads the key through OpenSSL's engine; without python-pkcs11
those rows are skipped and the key is still checked through OpenSSL. ``--connect HOST:PORT`` goes on
through TLS, MQTT CONNECT and SUBSCRIBE (the same code as ``send``/``listen``); a refused CONNECT lists
its likely causes, and against the emulator (its ``service-api`` file beside ``--ca``) shows the
emulator's own diagnostic for the connection.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import ssl
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from .. import diagnostics
from ..exceptions import (BackendUnavailableError, CertificateError, ConfigError, KeyLoadError, KeyNotFoundError,
                          LightClientError, ModuleLoadError, OpenSSLMismatchError, PinError, TokenNotFoundError)
from ..keys import KeyRef
from .common import (EXIT_FAILED, EXIT_OK, add_identity_options, add_key_options, add_network_options, env_help,
                     error_text, key_ref, proxy_for, resolve_pin, setting)

OK, FAIL, SKIP, WARN = "✓", "✗", "–", "!"
EXPIRY_WARNING_DAYS = 7


@dataclass
class Check:
    name: str
    status: str
    detail: str = ""
    fix: str = ""


def register(sub) -> None:
    p = sub.add_parser("doctor", help="check OpenSSL, token, key, certificate and (--connect) TLS, MQTT CONNECT and SUBSCRIBE",
                       description="Check every link from Python's OpenSSL to the hub and print ✓/✗ with a fix "
                                   "for each ✗. Exit code 0 when everything passes, 1 otherwise.")
    add_identity_options(p)
    g = p.add_argument_group("certificate and connection")
    g.add_argument("--cert", help=env_help("cert", "device certificate chain (PEM, leaf first)"))
    g.add_argument("--ca", help=env_help("ca", "trusted roots for the server (default: the bundled IoT Hub roots)"))
    g.add_argument("--connect", metavar="HOST:PORT",
                   help="also connect: TLS handshake with the client certificate, MQTT CONNECT as the device "
                        "(user name from --hub, default HOST) and SUBSCRIBE, e.g. myhub.azure-devices.net:8883. "
                        "Against the emulator its diagnostic for the connection is shown")
    g.add_argument("--timeout", type=float, default=10.0, help="seconds for each step of --connect (default 10)")
    g.add_argument("--reach", metavar="HOSTNAME",
                   help="check that HOSTNAME (the hub or gateway) is reachable on 8883 and 443, directly and through "
                        "the proxy, and say which transport will work")
    g.add_argument("--reach-ports", metavar="MQTT,WS", default="8883,443",
                   help="the MQTT and WebSocket ports --reach tries (default 8883,443)")
    add_network_options(g, mqtt=False)
    add_key_options(p)
    p.set_defaults(func=run)


# ------------------------------------------------------------------------------------------------ probe


def _run_probe(module: str, token_label: Optional[str], pin: Optional[str]) -> dict:
    """python-pkcs11's view of module, token, login and keys (lightclient.token.probe), in a child."""
    from .. import token as tk

    try:
        return tk.run_in_child("probe", module_path=module, token_label=token_label, pin=pin, timeout=30)
    except LightClientError as exc:
        return {"module": f"the token probe failed: {exc}", "tokens": [], "login": None, "keys": None}


# ------------------------------------------------------------------------------------------------ checks


def check_openssl(checks: List[Check]) -> bool:
    try:
        facts = diagnostics.openssl_facts()
        diagnostics.check_same_openssl(facts)
    except OpenSSLMismatchError as exc:
        checks.append(Check("Python and the shim share one OpenSSL", FAIL, str(exc).split(". ")[0],
                            diagnostics.WORKING_PYTHONS))
        return False
    except LightClientError as exc:
        checks.append(Check("Python and the shim share one OpenSSL", FAIL, str(exc),
                            "reinstall lightclient with `pip install .` (needs gcc and libssl-dev)"))
        return False
    checks.append(Check("Python and the shim share one OpenSSL", OK,
                        f"{facts.python_version_text} ({facts.shim_crypto_origin})"))
    return True


def check_backend(checks: List[Check], ref: KeyRef) -> bool:
    engine, provider = diagnostics.engine_support(), diagnostics.provider_support()
    have = ", ".join(n for n, ok in (("ENGINE", engine), ("provider", provider)) if ok) or "neither"
    needs_engine, needs_provider = ref.needs_engine, ref.needs_provider
    if (needs_engine and not engine) or (needs_provider and not provider):
        want = "ENGINE" if needs_engine else "provider"
        checks.append(Check("OpenSSL engine or provider support", FAIL, f"{want} needed; this OpenSSL has {have}",
                            "use a store:/provider: key reference (OpenSSL 3 providers)" if needs_engine else
                            "use OpenSSL 3 or newer, or a pkcs11:/engine: key reference"))
        return False
    checks.append(Check("OpenSSL engine or provider support", OK, f"{have} available"))
    return True


def check_token(checks: List[Check], ref: KeyRef, module: Optional[str], pin: Optional[str]) -> bool:
    """Module loads, token present, login works, key found. False if the key cannot be loaded."""
    names = ("PKCS#11 module loads", "token present", "login with the PIN works", "key found on the token")
    if ref.pkcs11_uri is None:
        for name in names:
            checks.append(Check(name, SKIP, "not a PKCS#11 key reference"))
        return True
    module = ref.module_path or module
    key_id = ref.attribute_bytes("id")
    attrs = {"token": ref.attribute("token"), "object": ref.attribute("object"),
             "id": key_id.hex() if key_id is not None else None}
    rest = names[1:]
    if not module:
        checks.append(Check(names[0], FAIL, "no module given",
                            "add ?module-path=/path/to/module.so to the key reference, or pass --module-path"))
        return _skip(checks, rest, "no module")
    if not os.path.isfile(module):
        checks.append(Check(names[0], FAIL, f"{module} does not exist",
                            "install the module (SoftHSM: apt install softhsm2; TPM: apt install "
                            "libtpm2-pkcs11-1) or fix the module path"))
        return _skip(checks, rest, "no module")
    token_label = attrs.get("token")
    if not have_python_pkcs11():
        # The token checks need python-pkcs11; the key itself goes through OpenSSL's engine, which does not.
        checks.append(Check(names[0], WARN, "python-pkcs11 is not installed, so module, token, login and key "
                                            "are not checked one by one",
                            "pip install 'lightclient[token]' for these checks; the OpenSSL check below tests "
                            "the key without it"))
        for name in rest:
            checks.append(Check(name, SKIP, "needs python-pkcs11"))
        return True
    result = _run_probe(module, token_label, pin)
    if result["module"]:
        checks.append(Check(names[0], FAIL, result["module"],
                            "give the path of a PKCS#11 module (.so), e.g. /usr/lib/softhsm/libsofthsm2.so"))
        return _skip(checks, rest, "module did not load")
    checks.append(Check(names[0], OK, module))
    present = ", ".join(repr(t) for t in result["tokens"]) or "none"
    if not token_label:
        checks.append(Check(names[1], WARN, f"the key reference names no token (tokens: {present})",
                            "add token=LABEL to the pkcs11: URI"))
        return _skip(checks, names[2:], "no token= in the key reference") or True
    if token_label not in result["tokens"]:
        checks.append(Check(names[1], FAIL, f"no token {token_label!r} (tokens present: {present})",
                            "fix token= in the key reference (see `lightclient tokens`), or create the token "
                            "(softhsm2-util --init-token, tpm2_ptool addtoken)"))
        return _skip(checks, names[2:], "no token")
    checks.append(Check(names[1], OK, repr(token_label)))
    if result["login"] == "no PIN":
        checks.append(Check(names[2], FAIL, "no PIN given",
                            "give the PIN with --pin-file FILE or LIGHTCLIENT_PIN (or run on a terminal)"))
        return _skip(checks, names[3:], "not logged in")
    if result["login"]:
        checks.append(Check(names[2], FAIL, result["login"],
                            "check the PIN (--pin-file/LIGHTCLIENT_PIN); repeated wrong PINs can lock the token"))
        return _skip(checks, names[3:], "not logged in")
    checks.append(Check(names[2], OK))
    wanted_label, wanted_id = attrs.get("object"), attrs.get("id")
    matches = [k for k in result["keys"] if (wanted_label is None or k["label"] == wanted_label)
               and (wanted_id is None or k["id"] == wanted_id)]
    on_token = ", ".join(f"{k['label']!r} ({k['type']}, id {k['id']})" for k in result["keys"]) or "none"
    if len(matches) != 1:
        what = "no private key" if not matches else f"{len(matches)} private keys"
        checks.append(Check(names[3], FAIL, f"{what} matches object={wanted_label!r} id={wanted_id!r} "
                                           f"(keys on the token: {on_token})",
                            "fix object=/id= in the key reference, or create the key with `lightclient keygen`"))
        return False
    k = matches[0]
    checks.append(Check(names[3], OK, f"{k['label']!r} {k['type']} id {k['id']}"))
    return True


def have_python_pkcs11() -> bool:
    try:
        import pkcs11  # noqa: F401  (importing it loads no PKCS#11 module)
    except ImportError:
        return False
    return True


def _skip(checks: List[Check], names, why: str) -> bool:
    for name in names:
        checks.append(Check(name, SKIP, why))
    return False


_KEY_FIXES = (
    (BackendUnavailableError, "install the libp11 engine (apt install libengine-pkcs11-openssl) or the provider"),
    (ModuleLoadError, "fix the PKCS#11 module path"),
    (TokenNotFoundError, "fix token= in the key reference"),
    (PinError, "check the PIN"),
    (KeyNotFoundError, "fix object=/id= in the key reference"),
)


def load_key_check(checks: List[Check], ref, module: Optional[str], pin: Optional[str]):
    from ..keys import load_key

    name = "key loads through OpenSSL"
    try:
        key = load_key(ref, pin=pin, module_path=module)
    except (KeyLoadError, ConfigError) as exc:
        fix = next((f for cls, f in _KEY_FIXES if isinstance(exc, cls)), "check the key reference")
        checks.append(Check(name, FAIL, error_text(exc), fix))
        return None
    checks.append(Check(name, OK, f"{key.key_type}-{key.bits} from {key.description}"))
    return key


def check_certificate(checks: List[Check], cert: Optional[str], expected_cn: Optional[str], key,
                      now: Optional[_dt.datetime] = None) -> Optional[bytes]:
    names = ("certificate readable", "certificate within its validity period", "certificate CN equals the device id",
             "certificate matches the key")
    if not cert:
        checks.append(Check(names[0], FAIL, "no certificate given",
                            "pass --cert device.pem or set PATH_TO_CERTIFICATE_FILE"))
        _skip(checks, names[1:], "no certificate")
        return None
    try:
        chain = diagnostics.read_certificate_file(cert)
        if b"-----BEGIN CERTIFICATE-----" not in chain:
            raise ValueError("no PEM certificate in it")
        info = diagnostics.certificate_info(chain)
    except (LightClientError, OSError, ValueError, ssl.SSLError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        checks.append(Check(names[0], FAIL, f"{cert}: {detail}",
                            "give the PEM certificate issued for this key (DER: openssl x509 -inform der -in "
                            "c.der -out c.pem)"))
        _skip(checks, names[1:], "no certificate")
        return None
    count = chain.count(b"-----BEGIN CERTIFICATE-----")
    issuer = info.issuer_cn or None
    checks.append(Check(names[0], OK, f"{cert} ({count} certificate{'s' if count > 1 else ''}, issuer {issuer!r})"))
    now = now or _dt.datetime.now(_dt.timezone.utc)
    start, end = info.not_before, info.not_after
    if now < start:
        checks.append(Check(names[1], FAIL, f"not valid before {start:%Y-%m-%d %H:%M} UTC",
                            "check the system clock (date -u), or wait until the certificate is valid"))
    elif now > end:
        checks.append(Check(names[1], FAIL, f"expired on {end:%Y-%m-%d %H:%M} UTC",
                            "issue a new certificate: lightclient csr … then have your CA sign it, or "
                            "lightclient provision --csr"))
    elif end - now < max(_dt.timedelta(days=EXPIRY_WARNING_DAYS), (end - start) * 0.2):
        # Also relative: past the usual 80 % renewal point a long-lived certificate is overdue too.
        left = end - now
        shown = f"{left.days} days" if left.days else f"{int(left.total_seconds() // 3600)} hours"
        checks.append(Check(names[1], WARN, f"expires on {end:%Y-%m-%d %H:%M} UTC, in {shown}",
                            "renew it now: lightclient renew --cert … (see lightclient status)"))
    else:
        checks.append(Check(names[1], OK, f"until {end:%Y-%m-%d} UTC"))
    cn = info.subject_cn or None
    if expected_cn is None:
        checks.append(Check(names[2], SKIP, f"CN is {cn!r}; no --device-id given"))
    elif cn == expected_cn:
        checks.append(Check(names[2], OK, repr(cn)))
    else:
        checks.append(Check(names[2], FAIL, f"CN is {cn!r} but the device id is {expected_cn!r}",
                            "IoT Hub and DPS require CN = device id (registration id): fix --device-id, or issue "
                            f"a certificate for CN={expected_cn}"))
    if key is None:
        checks.append(Check(names[3], SKIP, "the key did not load"))
    else:
        try:
            same = diagnostics.cert_matches_key(chain, key)
        except CertificateError as exc:
            checks.append(Check(names[3], FAIL, str(exc), "give the PEM certificate for this key"))
        else:
            if same:
                checks.append(Check(names[3], OK, "the leaf's public key is the token key's"))
            else:
                checks.append(Check(names[3], FAIL, "the certificate's public key differs from the key's",
                                    "use the certificate issued for this key, or make a new CSR with "
                                    "`lightclient csr` and have it signed"))
    return chain


def check_roots(checks: List[Check], ca: Optional[str]):
    from ..tls import iothub_roots_path

    path = ca or iothub_roots_path()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        if os.path.isdir(path):
            ctx.load_verify_locations(capath=path)
        else:
            diagnostics.check_ca_file(path)
            ctx.load_verify_locations(cafile=path)
    except (LightClientError, OSError, ssl.SSLError) as exc:
        checks.append(Check("trusted server roots present", FAIL, f"{path}: {exc}",
                            "give a PEM CA file with --ca (or leave it out to use the bundled IoT Hub roots)"))
        return False
    n = len(ctx.get_ca_certs())
    if n == 0 and not os.path.isdir(path):
        checks.append(Check("trusted server roots present", FAIL, f"{path} holds no CA certificate",
                            "give a PEM CA file with --ca"))
        return False
    checks.append(Check("trusted server roots present", OK,
                        f"{n} root{'s' if n != 1 else ''} from {'the bundled IoT Hub roots' if not ca else path}"))
    return True


def check_handshake(checks: List[Check], target: str, cert: Optional[str], key, ca: Optional[str], timeout: float,
                    sas: bool = False):
    """The TLS handshake row; returns the context that passed it, or None. ``sas``: no client certificate."""
    from ..tls import client_context, server_context

    name = f"TLS handshake with {target}"
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or not host:
        checks.append(Check(name, FAIL, "expected HOST:PORT", "e.g. --connect myhub.azure-devices.net:8883"))
        return None
    try:
        ctx = server_context(ca=ca) if sas else client_context(cert=cert, key=key, ca=ca)
    except LightClientError as exc:
        checks.append(Check(name, FAIL, error_text(exc), "fix the certificate and key first"))
        return None
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as raw:
            with ctx.wrap_socket(raw, server_hostname=host) as tls:
                version = tls.version()
                # With TLS 1.3 a refused client certificate arrives as an alert after the handshake.
                tls.settimeout(0.3)
                try:
                    data = tls.recv(1)
                except (socket.timeout, TimeoutError):
                    data = None
                if data == b"":
                    raise ConnectionError("the server closed the connection right after the handshake")
    except ssl.SSLCertVerificationError as exc:
        typed = diagnostics.tls_failure(exc, host, int(port), ctx)
        if getattr(typed, "reason", None) == "hostname":
            checks.append(Check(name, FAIL, f"the server certificate is not for {host!r}: {exc.verify_message}",
                                f"connect to the name in the server's certificate (the hub's own name, in "
                                f"--connect and --hub), not an alias or address"))
        else:
            checks.append(Check(name, FAIL, f"server certificate not trusted: {exc.verify_message}",
                                "give the server's CA with --ca (IoT Hub: leave --ca out), and check that "
                                f"{host} is the hub"))
    except ssl.SSLError as exc:
        checks.append(Check(name, FAIL, f"TLS error: {exc.reason or exc}",
                            "the server refused the client certificate: register it (or its CA) with the hub"))
    except OSError as exc:
        checks.append(Check(name, FAIL, f"cannot connect: {diagnostics.network_reason(exc)}",
                            "check the host name and port, and that outbound TCP to it is allowed"))
    else:
        checks.append(Check(name, OK, f"{version}, " + ("server verified (SAS: no client certificate)" if sas
                                                         else "client certificate accepted")))
        return ctx
    return None


# What to do about a refusal the emulator explained (its rule names); the real hub never says.
_EMULATOR_FIXES = (
    ("connect.username", "give --hub the hub's own host name (the one in the emulator's --hostname)"),
    ("connect.client-id", "register the device (emulator --device ID, or PUT /devices/ID on its service API) "
                          "or fix --device-id"),
    ("connect.disabled", "enable the device in the hub"),
    ("connect.certificate", "use the certificate registered for this device (CA-signed: issued by the hub's CA, "
                            "CN = device id)"),
    ("connect.thumbprint", "register this certificate's thumbprint for the device, or use the registered one"),
    ("connect.sas-signature", "--sas-key is not the device's primary or secondary key: import the hub's key "
                              "(lightclient import-key)"),
    ("connect.sas-expired", "sync the clock (date -u) or raise --sas-lifetime"),
    ("connect.sas", "use a SAS key reference for this device (--sas-key)"),
)


def emulator_api(ca: Optional[str]) -> Optional[str]:
    """The service API URL of a running emulator whose CA is ``ca``: the emulator writes it to
    ``service-api`` in its state directory, beside its ca.pem, while it runs."""
    if not ca:
        return None
    path = Path(ca).resolve().parent / "service-api"
    try:
        with open(path, "rb") as fh:
            url = fh.read(512).decode("ascii", "replace").strip()
    except OSError:
        return None
    return url if url.startswith("http://127.0.0.1:") or url.startswith("http://localhost:") else None


def emulator_diagnostics(api: Optional[str], client_id: str, since: float) -> List[dict]:
    """The emulator's diagnostics for ``client_id`` recorded since ``since`` (empty if it cannot be asked)."""
    if not api:
        return []
    url = f"{api}/emulator/diagnostics?" + urllib.parse.urlencode({"identity": client_id})
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            items = json.loads(resp.read(1024 * 1024))
    except (OSError, ValueError):
        return []
    return [d for d in items if isinstance(d, dict) and d.get("time", 0) >= since - 1]


def check_mqtt(checks: List[Check], args, target: str, ctx, ca: Optional[str], sas=None) -> None:
    """MQTT CONNECT as the device and SUBSCRIBE to its topics, through the same code as send/listen."""
    from .. import paho as lcpaho
    from ..identity import Identity
    from .session import CONNACK_TEXT, Session, refusal_causes

    host, _, port = target.rpartition(":")
    device_id = setting(args, "device_id")
    names = ("MQTT CONNECT accepted", "SUBSCRIBE to the device's topics")
    if not device_id:
        checks.append(Check(names[0], FAIL, "no device id", "pass --device-id (the MQTT client id)"))
        _skip(checks, names[1:], "not connected")
        return
    hub = setting(args, "hub") or host
    try:
        ident = Identity(hub, device_id, setting(args, "module_id"), setting(args, "model_id"))
    except ConfigError as exc:
        checks.append(Check(names[0], FAIL, error_text(exc), "fix --hub / --device-id"))
        _skip(checks, names[1:], "not connected")
        return
    api = emulator_api(ca)
    started = time.time()
    session = Session(args, ssl_context=ctx, address=(host, int(port)), ident=ident, sas=sas)
    try:
        session.connect()
    except LightClientError as exc:
        code = session.connack_code
        said = [d.get("text") or d.get("message", "") for d in emulator_diagnostics(api, ident.client_id, started)
                if str(d.get("rule", "")).startswith("connect.")]
        if code:
            detail = f"as {ident.client_id!r}, user name {ident.hostname}/{ident.client_id}/…: refused, CONNACK " \
                     f"{code} ({CONNACK_TEXT.get(code, '?')})"
            if said:
                rule = said[-1]
                fix = next((f for r, f in _EMULATOR_FIXES if f" {r}" in rule), "see the emulator's diagnostic")
                detail += f"; the emulator says: {rule}"
            else:
                causes = refusal_causes(code, ident)
                fix = ("the hub does not say which; check: " if len(causes) > 1 else "") + \
                      "; ".join(f"({i}) {c}" for i, c in enumerate(causes, 1))
        else:
            detail, fix = error_text(exc, args), "see the TLS row above; check --hub and --device-id"
            if said:
                detail += f"; the emulator says: {said[-1]}"
        checks.append(Check(names[0], FAIL, detail, fix))
        _skip(checks, names[1:], "not connected")
        return
    try:
        checks.append(Check(names[0], OK, f"as {ident.client_id!r}, user name {ident.hostname}/{ident.client_id}/…"))
        filters = lcpaho.subscriptions(ident)
        try:
            session.subscribe(filters)
        except LightClientError as exc:
            checks.append(Check(names[1], FAIL, error_text(exc, args),
                                "the hub refused or did not answer the subscriptions; check the device's identity "
                                "(module ids subscribe to their own topics)"))
        else:
            checks.append(Check(names[1], OK, f"{len(filters)} filters granted (C2D, methods, twin)"))
    finally:
        session.close()


def check_reachability(checks: List[Check], host: str, proxy, ports=(8883, 443), timeout: float = 5.0) -> Optional[str]:
    """TCP reachability of ``host`` on the MQTT and WebSocket ports, directly and through ``proxy`` (a
    :class:`lightclient.proxy.Proxy` or None), then one line saying which transport will work (returned
    as ``"tcp"``/``"websockets"``, or None). A blocked port is a warning (the other may do); only "no
    transport works" and a broken proxy (unreachable, credentials, not a proxy) are failures. No TLS
    here (``--connect`` does the handshake)."""
    from ..exceptions import ProxyError

    mqtt_port, ws_port = ports
    routes = [("directly", None)] + ([(f"through {proxy}", proxy)] if proxy is not None else [])
    works = {}
    for how, via in routes:
        for port, transport in ((mqtt_port, "tcp"), (ws_port, "websockets")):
            name = f"{host}:{port} reachable {how}"
            try:
                if via is None:
                    socket.create_connection((host, port), timeout=timeout).close()
                else:
                    via.open(host, port, timeout=timeout).close()
            except ProxyError as exc:
                checks.append(Check(name, FAIL if exc.reason in ("auth", "unreachable", "protocol") else WARN,
                                    str(exc), "check --proxy / HTTPS_PROXY and its credentials"
                                    if exc.reason in ("auth", "unreachable", "protocol") else
                                    "the proxy will not tunnel there; the other port may work"))
            except OSError as exc:
                checks.append(Check(name, WARN, f"cannot connect: {exc.strerror or exc}",
                                    "a firewall may block it; the other port or a proxy (--proxy) may work"))
            else:
                checks.append(Check(name, OK, "TCP connection opened"))
                works[(via is not None, transport)] = True
    use_proxy = proxy is not None
    for transport in ("tcp", "websockets"):
        if works.get((use_proxy, transport)):
            how = f"through {proxy}" if use_proxy else "directly"
            flag = "--transport websockets (or auto)" if transport == "websockets" else "--transport tcp (default)"
            checks.append(Check("transport that will work", OK, f"{transport} {how}: use {flag}"))
            return transport
    checks.append(Check("transport that will work", FAIL, f"neither {mqtt_port} nor {ws_port} is reachable"
                        + (f" through {proxy}" if use_proxy else ""),
                        "check the host name, the firewall, or set a proxy (--proxy http://host:port)"))
    return None


# ------------------------------------------------------------------------------------------------ output


def render(checks: List[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        line = f"{c.status} {c.name.ljust(width)}  {c.detail}".rstrip()
        lines.append(line)
        if c.status in (FAIL, WARN) and c.fix:
            lines.append(f"  {' ' * width}  fix: {c.fix}")
    failed = sum(c.status == FAIL for c in checks)
    lines.append(f"{failed} problem{'s' if failed != 1 else ''} found" if failed else "all checks passed")
    return "\n".join(lines)


def check_sas(checks: List[Check], args):
    """--sas-key: the key is in the token and signs (one HMAC there); returns the SasCredential, or None."""
    from ..identity import Identity
    from .common import sas_credential

    name = "SAS key signs in the token"
    host = (args.connect or "").rpartition(":")[0]
    try:
        ident = Identity(setting(args, "hub") or host or "hub.example",
                         setting(args, "device_id", required=True, what="the device id (the SAS resource)"),
                         setting(args, "module_id"))
        cred = sas_credential(args, ident)
        tok = cred.renew()
    except LightClientError as exc:
        fix = next((f for cls, f in _KEY_FIXES if isinstance(exc, cls) and cls is not BackendUnavailableError),
                   "check --sas-key (see `lightclient tokens`) and --sas-lifetime")
        checks.append(Check(name, FAIL, error_text(exc, args), fix))
        return None
    checks.append(Check(name, OK, f"{str(cred.key.ref).split('?')[0]}: HMAC-SHA256 in the token, a token for "
                                  f"{cred.uri} valid {cred.lifetime} s, renewed after "
                                  f"{int(tok.renew_at - tok.issued)} s"))
    return cred


def run(args) -> int:
    checks: List[Check] = []
    if setting(args, "sas_key") is not None and getattr(args, "key", None) is None and \
            getattr(args, "cert", None) is None:
        return run_sas(args, checks)
    module = setting(args, "module_path")
    device_id = setting(args, "device_id")
    module_id = setting(args, "module_id")
    expected_cn = f"{device_id}/{module_id}" if device_id and module_id else device_id
    ssl_ok = check_openssl(checks)
    key = None
    try:
        kr = key_ref(args, required=False)
    except ConfigError as exc:
        kr = None
        checks.append(Check("key loads through OpenSSL", FAIL, error_text(exc), "check the key reference"))
    else:
        if kr is None:
            checks.append(Check("key reference given", FAIL, "no key reference",
                                "pass --key or set KEY_IDENTIFIER (see `lightclient tokens`)"))
        else:
            check_backend(checks, kr)
            pin = resolve_pin(args, f"the key {str(kr).split('?')[0]}", prompt=kr.needs_pin)
            if check_token(checks, kr, module, pin) and ssl_ok:
                key = load_key_check(checks, kr, module, pin)
            else:
                checks.append(Check("key loads through OpenSSL", SKIP, "see above"))
    cert = setting(args, "cert")
    check_certificate(checks, cert, expected_cn, key)
    ca = setting(args, "ca")
    roots = check_roots(checks, ca)
    if args.connect:
        mqtt_rows = ("MQTT CONNECT accepted", "SUBSCRIBE to the device's topics")
        if key is None or not cert or not roots:
            checks.append(Check(f"TLS handshake with {args.connect}", SKIP, "key, certificate or roots missing"))
            _skip(checks, mqtt_rows, "no TLS connection")
        else:
            ctx = check_handshake(checks, args.connect, cert, key, ca, args.timeout)
            if ctx is None:
                _skip(checks, mqtt_rows, "no TLS connection")
            else:
                check_mqtt(checks, args, args.connect, ctx, ca)
    return _finish(args, checks)


def run_sas(args, checks: List[Check]) -> int:
    """The symmetric-key chain: key signs in the token, roots, and with --connect TLS (server only) and CONNECT
    with the SAS as password."""
    check_openssl(checks)
    cred = check_sas(checks, args)
    ca = setting(args, "ca")
    roots = check_roots(checks, ca)
    if args.connect:
        mqtt_rows = ("MQTT CONNECT accepted", "SUBSCRIBE to the device's topics")
        ctx = check_handshake(checks, args.connect, None, None, ca, args.timeout, sas=True) if roots else None
        if ctx is None or cred is None:
            if ctx is None and not roots:
                checks.append(Check(f"TLS handshake with {args.connect}", SKIP, "roots missing"))
            _skip(checks, mqtt_rows, "no TLS connection" if ctx is None else "no SAS token")
        else:
            check_mqtt(checks, args, args.connect, ctx, ca, sas=cred)
    return _finish(args, checks)


def _finish(args, checks: List[Check]) -> int:
    if getattr(args, "reach", None):
        mqtt_port, _, ws_port = args.reach_ports.partition(",")
        if not (mqtt_port.isdigit() and ws_port.isdigit()):
            raise ConfigError(f"--reach-ports expects MQTT,WS port numbers, e.g. 8883,443; got {args.reach_ports!r}")
        check_reachability(checks, args.reach, proxy_for(args, args.reach), (int(mqtt_port), int(ws_port)),
                           args.timeout)
    print(render(checks))
    return EXIT_FAILED if any(c.status == FAIL for c in checks) else EXIT_OK
