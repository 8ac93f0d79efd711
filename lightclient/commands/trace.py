"""``lightclient trace``: every MQTT packet in both directions, with its IoT Hub meaning.

Packets are taken from paho's ``on_log`` hook (paho logs each packet it sends and receives) and decoded
here with :mod:`lightclient.topics`; ``--dry-run`` prints what would be used without connecting. Over
WebSockets (``--transport websockets``) paho logs the same MQTT packets before it frames them, so the
trace is the same, after one line naming the WebSocket endpoint (and the proxy, if any).

    → CONNECT     client_id=d1 clean_session=0 keepalive=60  connect as d1, username hub/d1/?api-version=…
    ← CONNACK     rc=0  connection accepted
    → PUBLISH     q1 m3 $iothub/twin/PATCH/properties/reported/?$rid=7 (12 bytes)  twin report rid=7
    ← PUBLISH     q0 m0 $iothub/twin/res/204/?$rid=7&$version=12 (0 bytes)  twin response status=204 rid=7 version=12
"""
from __future__ import annotations

import re
import signal
import threading
import time
from typing import List, Optional

from .. import paho as lcpaho
from .. import topics
from ..exceptions import ProtocolError
from ..identity import Identity
from .common import EXIT_OK, add_connection_options, add_telemetry_options, identity, parse_json, parse_props, setting
from .session import DEFAULT_PORT, Output, Session, preview

SENT, RECEIVED = "→", "←"

CONNACK_MEANING = {0: "connection accepted", 1: "refused: unacceptable protocol version",
                   2: "refused: client id rejected", 3: "refused: server unavailable",
                   4: "refused: bad user name or password", 5: "refused: not authorized"}

TWIN_STATUS = {200: "twin document", 202: "accepted", 204: "reported properties updated", 400: "bad request",
               429: "throttled", 500: "hub error"}

_LINE_RE = re.compile(r"^(Sending|Received) ([A-Z]+)(?: (.*))?$", re.S)
_CONNECT_RE = re.compile(r"\(u(\d), p(\d), wr(\d), wq(\d), wf(\d), c(\d), k(\d+)\) client_id=(.*)$")
_CONNACK_RE = re.compile(r"\((\S+?), (\S+?)\)")
_PUBLISH_RE = re.compile(r"\(d(\d), q(\d), r(\d), m(\d+)\), '(.*)'(?:, \.\.\.\s+\((\d+) bytes\)| \(NULL payload\))$", re.S)
_SUB_RE = re.compile(r"\(b'([^']*)', (\d+)\)")
_MID_RE = re.compile(r"\(Mid: (\d+)\)")


def register(sub) -> None:
    p = sub.add_parser("trace", help="print every MQTT packet with its IoT Hub meaning (--dry-run: no connection)",
                       description="Connect, subscribe to everything a device receives, read the twin, and print "
                                   "every MQTT packet in both directions with its IoT Hub meaning until "
                                   "--duration ends or Ctrl-C. Method calls are answered with --method-status. "
                                   "--dry-run prints the client id, username and topics without connecting.")
    p.add_argument("--dry-run", action="store_true", help="print what would be used, without connecting")
    p.add_argument("--duration", type=float, help="stop after this many seconds (default: until Ctrl-C)")
    p.add_argument("--send", metavar="BODY", action="append", default=[], help="also send this telemetry (repeatable)")
    p.add_argument("--report", metavar="JSON", help="also send this reported-properties patch")
    add_telemetry_options(p)
    p.add_argument("--method-status", type=int, default=200, help="status to answer method calls with (default 200)")
    p.add_argument("--no-twin", action="store_true", help="do not read the twin after connecting")
    add_connection_options(p)
    p.set_defaults(func=run)


# -------------------------------------------------------------------------------------------- pure


def _bare(topic: str) -> str:
    """paho logs topics as given, sometimes as a bytes repr: b'devices/…'."""
    if len(topic) >= 3 and topic[:2] in ("b'", 'b"') and topic[-1] == topic[1]:
        return topic[2:-1]
    return topic


def describe_sent(topic: str, ident: Identity) -> str:
    """The IoT Hub meaning of a topic the device publishes on."""
    base = (f"devices/{ident.device_id}/modules/{ident.module_id}/messages/events/" if ident.module_id
            else f"devices/{ident.device_id}/messages/events/")
    if topic.startswith(base):
        bag = topic[len(base):]
        try:
            props = topics.decode_property_bag(bag) if bag else {}
        except ProtocolError as exc:
            return f"telemetry with a malformed property bag: {exc}"
        return "telemetry" + (" " + _props(props) if props else "")
    for prefix, what in (("$iothub/twin/GET/?", "twin get"),
                         ("$iothub/twin/PATCH/properties/reported/?", "twin report")):
        if topic.startswith(prefix):
            query = _query(topic[len(prefix):])
            return f"{what} rid={query.get('$rid')}"
    if topic.startswith("$iothub/methods/res/"):
        status, _, rest = topic[len("$iothub/methods/res/"):].partition("/?")
        return f"method response status={status} rid={_query(rest).get('$rid')}"
    return "not an IoT Hub topic (the hub would disconnect)"


def _query(text: str) -> dict:
    try:
        return topics.decode_property_bag(text)
    except ProtocolError:
        return {}


def _props(props) -> str:
    return " ".join(f"{k}={v}" if v is not None else k for k, v in props.items())


def describe_received(topic: str, ident: Identity) -> str:
    """The IoT Hub meaning of a topic the hub publishes to the device."""
    try:
        record = topics.parse(topic, ident)
    except ProtocolError as exc:
        return f"malformed IoT Hub topic: {exc}"
    if isinstance(record, topics.TwinResponse):
        text = f"twin response status={record.status} rid={record.rid}"
        if record.version is not None:
            text += f" version={record.version}"
        meaning = TWIN_STATUS.get(record.status)
        return text + (f" ({meaning})" if meaning else "")
    if isinstance(record, topics.DesiredPatch):
        return f"desired properties patch version={record.version}"
    if isinstance(record, topics.MethodRequest):
        return f"method call name={record.name} rid={record.rid}"
    if isinstance(record, topics.C2DMessage):
        props = {**record.system_properties, **record.properties}
        return "cloud-to-device message" + (" " + _props(props) if props else "")
    if isinstance(record, topics.InputMessage):
        props = {**record.system_properties, **record.properties}
        return f"module input {record.input_name}" + (" " + _props(props) if props else "")
    return "not an IoT Hub topic for this device"


def decode_log_line(line: str, ident: Identity, username: str = "") -> Optional[str]:
    """One line for a paho packet log line (``Sending PUBLISH …``), or None for other log lines."""
    m = _LINE_RE.match(line)
    if not m:
        return None
    direction = SENT if m.group(1) == "Sending" else RECEIVED
    kind, rest = m.group(2), (m.group(3) or "").strip()
    head = f"{direction} {kind:<11}"
    if kind == "CONNECT":
        c = _CONNECT_RE.search(rest)
        if not c:
            return f"{head} {rest}"
        cid = _bare(c.group(8).strip())
        text = f"{head} client_id={cid} clean_session={c.group(6)} keepalive={c.group(7)}"
        auth = "password" if c.group(2) == "1" else "no password: X.509 certificate"
        return f"{text}  connect as {ident.client_id}, username {username or ident.username()}, {auth}"
    if kind == "CONNACK":
        c = _CONNACK_RE.search(rest)
        if not c:
            return f"{head} {rest}"
        rc = c.group(2)
        try:
            meaning = CONNACK_MEANING.get(int(rc), f"refused ({rc})")
        except ValueError:
            meaning = rc
        return f"{head} session_present={c.group(1)} rc={rc}  {meaning}"
    if kind == "PUBLISH":
        p = _PUBLISH_RE.search(rest)
        if not p:
            return f"{head} {rest}"
        topic = _bare(p.group(5))
        size = p.group(6) or "0"
        flags = f"q{p.group(2)} m{p.group(4)}" + (" dup" if p.group(1) == "1" else "") + (" retain" if p.group(3) == "1" else "")
        meaning = describe_sent(topic, ident) if direction == SENT else describe_received(topic, ident)
        return f"{head} {flags} {topic} ({size} bytes)  {meaning}"
    if kind == "SUBSCRIBE":
        subs = ", ".join(f"{t} q{q}" for t, q in _SUB_RE.findall(rest))
        mid = re.search(r"m(\d+)\)", rest)
        return f"{head} m{mid.group(1) if mid else '?'} {subs}"
    if kind in ("PUBACK", "PUBREC", "PUBREL", "PUBCOMP", "UNSUBACK"):
        mid = _MID_RE.search(rest)
        mid_text = mid.group(1) if mid else "?"
        if kind == "PUBACK":
            meaning = "the hub accepted message" if direction == RECEIVED else "acknowledged message"
            return f"{head} m{mid_text}  {meaning} m{mid_text}"
        return f"{head} m{mid_text}"
    if kind == "SUBACK":
        return None      # printed from on_subscribe, which has the granted QoS
    if kind in ("PINGREQ", "PINGRESP"):
        return f"{head} keep-alive"
    if kind == "DISCONNECT":
        return f"{head} {rest}".rstrip()
    return f"{head} {rest}".rstrip()


def transport_line(transport: str, host: str, port: int, proxy=None) -> str:
    """How the connection is carried, e.g. ``⇄ WEBSOCKET   wss://hub:443/$iothub/websocket subprotocol mqtt``."""
    via = f" through {proxy}" if proxy is not None else ""
    if transport == "websockets":
        return f"⇄ {'WEBSOCKET':<11} wss://{host}:{port}/$iothub/websocket subprotocol mqtt{via}"
    return f"⇄ {'TCP':<11} mqtts://{host}:{port}{via}"


def dry_run_lines(ident: Identity, host: str, port: int, properties=None, content_type=None,
                  content_encoding=None, transport: str = "tcp", proxy=None) -> List[str]:
    """What a connection would use: the exact strings, no network."""
    carried = {"websockets": "MQTT 3.1.1 over WebSockets (GET /$iothub/websocket, subprotocol mqtt)",
               "auto": "MQTT 3.1.1 on this port, else over WebSockets"}.get(transport, "MQTT 3.1.1")
    lines = [f"client id     {ident.client_id}",
             f"username      {ident.username()}",
             "password      (none: the X.509 client certificate authenticates)",
             f"server        {host}:{port} (TLS 1.2+, {carried}, clean session 0)"]
    if proxy is not None:
        lines.append(f"proxy         {proxy}")
    for sub, qos in lcpaho.subscriptions(ident):
        lines.append(f"subscribe     {sub} qos={qos}")
    telemetry = topics.telemetry_topic(ident, properties or None, content_type=content_type,
                                       content_encoding=content_encoding)
    lines += [f"publish       {telemetry}  telemetry",
              f"publish       {topics.twin_get_topic('RID').replace('RID', '{rid}')}  twin get",
              f"publish       {topics.twin_patch_reported_topic('RID').replace('RID', '{rid}')}  twin report",
              f"publish       {topics.method_response_topic(200, 'RID').replace('RID', '{rid}').replace('/200/', '/{status}/')}"
              "  method response"]
    return lines


# -------------------------------------------------------------------------------------------- live


def run(args) -> int:
    props = parse_props(args.prop)
    if args.dry_run:
        from .common import proxy_for

        ident = identity(args)
        transport = setting(args, "transport") or "tcp"
        port = int(setting(args, "websocket_port") or 443) if transport == "websockets" else \
            int(setting(args, "port") or DEFAULT_PORT)
        host = setting(args, "gateway") or ident.hostname
        for line in dry_run_lines(ident, host, port, props, args.content_type, args.content_encoding,
                                  transport, proxy_for(args, host)):
            print(line)
        return EXIT_OK
    report = parse_json(args.report, "--report") if args.report is not None else None
    out = Output()
    holder = {}

    def on_log(buf: str) -> None:
        s = holder.get("session")
        ident = s.identity if s else identity(args)
        line = decode_log_line(buf, ident)
        if line:
            out(line)

    def on_record(record, message) -> None:
        if message.payload:
            out(f"      payload {preview(message.payload)}")
        if isinstance(record, topics.MethodRequest):
            lcpaho.answer_method(holder["session"].client, record, args.method_status, {})

    session = Session(args, on_record=on_record, on_log=on_log)
    holder["session"] = session
    orig = session._on_subscribe

    def on_subscribe(client, userdata, mid, reason_codes, properties=None):
        granted = ", ".join("refused" if rc.is_failure else f"q{rc.value}" for rc in reason_codes)
        out(f"{RECEIVED} {'SUBACK':<11} m{mid} granted {granted}")
        orig(client, userdata, mid, reason_codes, properties)

    session.client.on_subscribe = on_subscribe
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        if session.transport != "auto":
            port = session.websocket_port if session.transport == "websockets" else session.port
            out(transport_line(session.transport, session.host, port, session.proxy))
        session.connect()
        if session.transport == "auto":
            out(transport_line(session.client.transport, session.host, session.port, session.proxy))
        try:
            session.subscribe(lcpaho.subscriptions(session.identity))
            if not args.no_twin:
                session.get_twin()
            for body in args.send:
                session.client.publish(topics.telemetry_topic(session.identity, props or None,
                                                              content_type=args.content_type,
                                                              content_encoding=args.content_encoding),
                                       body.encode(), qos=1)
            if report is not None:
                session.report(report)
            deadline = time.monotonic() + args.duration if args.duration is not None else None
            while not stop.is_set() and not session.dropped:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                stop.wait(0.2 if left is None else min(0.2, left))
        except KeyboardInterrupt:
            pass
        finally:
            session.close()
    finally:
        signal.signal(signal.SIGTERM, previous)
    return EXIT_OK
