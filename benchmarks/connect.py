"""Connect with a hardware key: from ``Device.connect()`` to connected, for lightclient with a
SoftHSM key and with the TPM chains, against ``openssl s_client`` handshakes with the same key.

Keys (EC P-256 everywhere): a SoftHSM token through the libp11 engine; a software TPM 2.0 (swtpm
behind tpm2-abrmd) through tpm2-pkcs11 and the libp11 engine (chain 1); the same TPM through the
tpm2-openssl provider with a persistent ``handle:`` key and with a TSS2 PEM key file (chain 2).

Per key, alternating over rounds: a fresh lightclient child (one untimed warm-up handshake, then
timed TLS handshakes and timed ``Device.connect()`` calls, i.e. TCP + TLS + MQTT CONNECT/CONNACK +
SUBSCRIBE/SUBACK) and ``openssl s_client`` runs with the same key and certificate; s_client's
handshake is timed from its "before SSL initialization" state line to "write finished" (the client
Finished, where SSL_connect returns in TLS 1.3), so its process start and key loading are not
counted: that is the floor. All against the local mosquitto, TLS 1.3.

Every TPM and engine user runs in a child process (one libp11 engine per process; the tpm2 provider
changes the whole process).
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import PIN, BenchError, Context, Section, child_env, fmt, fmt_ratio, lc_child, median, orders, ratio

NAME = "connect"
TITLE = "Connect with a hardware key"
TPM_TOKEN = "lc-bench"
TPM_HANDLE = 0x81000021

ENGINE_CONF = """openssl_conf = openssl_init
[openssl_init]
engines = engine_section
[engine_section]
pkcs11 = pkcs11_section
[pkcs11_section]
engine_id = pkcs11
MODULE_PATH = {module}
init = 0
"""


class HandshakeTimer:
    """A TLS 1.3 server that requires a client certificate from the lab CA and times each full
    handshake on its side: from accept() (the TCP connection is up, the ClientHello follows at once)
    to the client's Finished. The same server times s_client and lightclient, so neither the
    clients' process start nor their key loading counts, and both see the same server."""

    def __init__(self, ca):
        import socket
        import ssl
        import threading

        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        self.ctx.load_cert_chain(str(ca.server_cert), str(ca.server_key))
        self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.ctx.load_verify_locations(cafile=str(ca.cert))
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.times, self.errors = [], []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="bench-handshake-timer", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        import socket

        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            t0 = time.perf_counter()
            try:
                conn.settimeout(30)
                with self.ctx.wrap_socket(conn, server_side=True) as tls:
                    self.times.append((time.perf_counter() - t0) * 1000)
                    tls.getpeercert()
            except OSError as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")
                conn.close()

    def take(self, expected: int) -> list:
        deadline = time.monotonic() + 10
        while len(self.times) < expected and time.monotonic() < deadline and not self.errors:
            time.sleep(0.01)
        if self.errors or len(self.times) != expected:
            raise BenchError(f"handshake timer: {len(self.times)} of {expected} handshakes; {self.errors[-3:]}")
        times, self.times = self.times, []
        return times

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        self._thread.join(5)


def s_client(key_args, cert: str, ca: str, port: int, env: dict) -> str:
    """One full s_client handshake (TLS 1.3) against the timer, which closes the connection after it
    (s_client then exits, often with status 1 for the missing close_notify: whether the handshake
    completed is what the timer saw). Returns s_client's stderr for error messages."""
    cmd = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost", "-tls1_3",
           "-cert", cert, "-CAfile", ca, "-verify_return_error", *key_args]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    lines = [line for line in err.decode(errors="replace").splitlines() if line.strip()]
    return f"openssl s_client exited with {proc.returncode}: {' | '.join(lines[-6:])}"[-1200:]


class Key:
    """One key under test: how lightclient names it, how s_client loads it, the env both need."""

    def __init__(self, label, ref, cert, env, s_client_args, s_client_env, pin=None):
        self.label, self.ref, self.cert, self.env = label, ref, cert, env
        self.s_client_args, self.s_client_env, self.pin = s_client_args, s_client_env, pin


def _softhsm_key(ctx: Context) -> Key:
    lab = ctx.lab
    hsm = lab.hsm
    conf = lab.root / "engine-softhsm.cnf"
    conf.write_text(ENGINE_CONF.format(module=hsm.module_path))
    uri = lab.hsm_uri.split("?", 1)[0]
    return Key("SoftHSM (libp11 engine)", lab.hsm_uri, str(lab.hsm_cert), lab.hsm_env,
               ["-engine", "pkcs11", "-keyform", "engine", "-key", uri, "-pass", "env:BENCH_PIN"],
               {**lab.hsm_env, "OPENSSL_CONF": str(conf), "BENCH_PIN": PIN}, pin=PIN)


def _tpm_keys(ctx: Context, tpm) -> list:
    from tests.lab import tpm as lab_tpm

    lab = ctx.lab
    ca = lab.ca
    env = {k: v for k, v in child_env(tpm.tcti_env).items() if k != "SOFTHSM2_CONF"}
    token = lab_tpm.Tpm2Pkcs11Token(tpm)
    token.init_token(TPM_TOKEN, PIN, "so-" + PIN)
    info = token.keygen(TPM_TOKEN, PIN, "eckey", "ec-p256")
    handle = tpm.persistent_key(TPM_HANDLE, "ec")
    tss2 = str(tpm.tss2_key_file(tpm.root / "ec.tss2.pem", "ec"))
    provider = ["-provider", "default", "-provider", "tpm2", "-propquery", "?tpm2.signature"]
    keys = [
        Key("TPM: tpm2-pkcs11 + libp11 engine", token.uri(info), None, env, None, env, pin=PIN),
        Key("TPM: tpm2 provider, handle: key", handle, None, env, [*provider, "-key", handle], env),
        Key("TPM: tpm2 provider, TSS2 key file", tss2, None, env, [*provider, "-key", tss2], env),
    ]
    for i, key in enumerate(keys):
        cn = f"bench-tpm-{i}"
        csr = lc_child({"task": "csr", "key": key.ref, "pin": key.pin, "cn": cn}, env=env)
        key.cert = str(ca.sign_csr(csr["csr"].encode(), lab.root / f"{cn}.pem"))
    return keys


def run(ctx: Context) -> Section:
    lab = ctx.lab
    broker = lab.broker
    ca = str(lab.ca.cert)
    section = Section(NAME, TITLE, header=["key", "TLS handshake: openssl s_client (floor)",
                                           "TLS handshake: lightclient", "handshake / floor",
                                           "lightclient connect() → connected", "raw paho connect → CONNACK"])
    keys = [_softhsm_key(ctx)]
    timer = HandshakeTimer(lab.ca)
    tpm = None
    rounds, per_child = ctx.n(3, 1), ctx.n(3, 1)
    results = {}
    try:
        try:
            from tests.lab import tpm as lab_tpm

            tpm = lab_tpm.SoftwareTPM(lab.root / "tpm").start()
            keys += _tpm_keys(ctx, tpm)
        except Exception as exc:  # swtpm & co. missing (lab.LabError): reported, not a crash
            section.notes.append(f"TPM chains not measured: {type(exc).__name__}: {exc}"[:400])
        for key in keys:
            runs = {"lightclient": [], "s_client": []}

            def lightclient(key=key):
                out = lc_child({"task": "connect", "key": key.ref, "pin": key.pin, "cert": key.cert, "ca": ca,
                                "port": broker.port, "hs_port": timer.port, "rounds": per_child, "tls": "1.3"},
                               env=key.env)
                out["server_ms"] = timer.take(per_child)
                runs["lightclient"].append(out)

            def openssl(key=key):
                for _ in range(per_child):
                    err = s_client(key.s_client_args, key.cert, ca, timer.port, key.s_client_env)
                try:
                    runs["s_client"] += timer.take(per_child)
                except BenchError as exc:
                    raise BenchError(f"{exc}; {err}") from None

            programs = {"lightclient": lightclient}
            if key.s_client_args is not None:
                programs["s_client"] = openssl
            for order in orders(list(programs), rounds):
                for name in order:
                    programs[name]()
            hs = [ms for r in runs["lightclient"] for ms in r["server_ms"]]
            conn = [ms for r in runs["lightclient"] for ms in r["connect_ms"]]
            paho = [ms for r in runs["lightclient"] for ms in r["paho_connack_ms"]]
            floor = median(runs["s_client"])
            r = results[key.label] = {"s_client_ms": runs["s_client"], "handshake_ms": hs, "connect_ms": conn,
                                      "client_side_handshake_ms": [ms for x in runs["lightclient"] for ms in x["handshake_ms"]],
                                      "floor": floor, "handshake": median(hs), "connect": median(conn),
                                      "paho_connack_ms": paho, "paho_connack": median(paho),
                                      "version": runs["lightclient"][0]["version"]}
            ctx.log(f"   {key.label}: s_client {fmt(floor, 1)} ms, lightclient handshake {r['handshake']:.1f} ms, "
                    f"connect() {r['connect']:.1f} ms ({r['version']})")
            section.rows.append([key.label, fmt(floor, 1, "ms") if key.s_client_args is not None else "— (see below)",
                                 fmt(r["handshake"], 1, "ms"), fmt_ratio(ratio(r["handshake"], floor)),
                                 fmt(r["connect"], 1, "ms"), fmt(r["paho_connack"], 1, "ms")])
    finally:
        timer.close()
        if tpm is not None:
            tpm.stop()
    section.notes.append(
        f"Medians of {rounds * per_child} samples per key and program, {rounds} alternating rounds, TLS 1.3, EC P-256 "
        "keys. Both handshake columns are timed by the same TLS server (a Python ssl server in the benchmark, "
        "requiring a client certificate) from accept() to the client's Finished, so the clients' process start and "
        "key loading are not counted. connect() is lightclient's Device.connect() against the local mosquitto, "
        "timed in the client: TCP, TLS, MQTT CONNECT/CONNACK and SUBSCRIBE/SUBACK of the twin, method and C2D "
        "topics; raw paho (same TLS context, same child) stops at CONNACK. mosquitto runs with TCP_NODELAY (see "
        "the note in benchmarks/common.py: with its default, every TLS 1.3 connect of any client waits ~40 ms "
        "for a delayed ACK).")
    if any(k.s_client_args is None for k in keys):
        section.notes.append(
            "tpm2-pkcs11 has no s_client floor: `openssl s_client -engine pkcs11` makes libp11 the default RSA/EC "
            "implementation of the whole process (ENGINE_set_default), and tpm2-pkcs11's own salted TPM session "
            "then fails during C_Login (\"Could not create rsa key\"). lightclient loads the engine without making "
            "it the default for exactly this reason. The provider rows use the same TPM and curve.")
    section.notes.append("s_client uses the tpm2 provider as lightclient does: `-provider default -provider tpm2 "
                         "-propquery ?tpm2.signature`, so only the signature runs in the TPM. With `-provider tpm2` "
                         "first, hashing and key exchange run in the TPM too and a handshake takes ~200 ms.")
    section.notes.append("The TPM is swtpm (a software TPM) behind tpm2-abrmd: a hardware TPM takes tens to hundreds "
                         "of ms per ECDSA signature, which adds the same amount to every column of its rows.")
    section.chart("TLS handshake with a hardware key", "ms",
                  [(f"{label.replace('TPM: ', 'TPM ')} · {what}", r[k]) for label, r in results.items()
                   for what, k in (("s_client", "floor"), ("lightclient", "handshake"))], better="lower")
    section.chart("lightclient connect() → connected", "ms",
                  [(label.replace("TPM: ", "TPM "), r["connect"]) for label, r in results.items()], better="lower")
    section.raw = results
    return section


if __name__ == "__main__":
    import run as runner

    sys.exit(runner.main(["--only", NAME, *sys.argv[1:]]))
