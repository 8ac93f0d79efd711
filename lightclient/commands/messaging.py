"""``lightclient send``, ``listen`` and ``twin get|report``."""
from __future__ import annotations

import json
import signal
import sys
import threading
import time

from .. import paho as lcpaho
from .. import topics
from ..exceptions import ConfigError, OperationTimeout
from .common import (EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, ConnectionFailed, add_connection_options,
                     add_telemetry_options, parse_json, parse_props)
from .progress import Progress
from .session import Output, Session, preview


def register(sub) -> None:
    p = sub.add_parser("send", help="send telemetry (arguments, or one message per stdin line)",
                       description="Send device-to-cloud messages with QoS 1 and wait until the hub has "
                                   "acknowledged each. Bodies come from the arguments, or one per line of "
                                   "standard input when there are none (or the only one is '-'). '{n}' in a "
                                   "body becomes the message's sequence number.")
    p.add_argument("messages", nargs="*", metavar="BODY", help="message bodies")
    add_telemetry_options(p)
    p.add_argument("--json", action="store_true", help="shorthand for --content-type application/json "
                                                       "--content-encoding utf-8 (needed for body-based routing)")
    p.add_argument("--count", type=int, default=1, help="send the bodies this many times (default 1)")
    p.add_argument("--interval", type=float, default=0.0, help="seconds between messages (default 0)")
    add_connection_options(p)
    p.set_defaults(func=run_send)

    p = sub.add_parser("listen", help="print cloud-to-device messages, method calls and desired-property patches",
                       description="Print cloud-to-device messages, direct method calls (answered with "
                                   "--method-status and --method-payload) and desired-property patches as they "
                                   "arrive, until --count events, --duration seconds, or Ctrl-C.")
    p.add_argument("--method-status", type=int, default=200, help="status to answer method calls with (default 200)")
    p.add_argument("--method-payload", metavar="JSON", default="{}", help="JSON to answer method calls with (default {})")
    p.add_argument("--count", type=int, help="stop after this many events")
    p.add_argument("--duration", type=float, help="stop after this many seconds")
    add_connection_options(p)
    p.set_defaults(func=run_listen)

    p = sub.add_parser("twin", help="read the device twin, or report properties",
                       description="`twin get` prints the twin (desired and reported properties) as JSON; "
                                   "`twin report JSON` sends a reported-properties patch (null deletes a key).")
    tw = p.add_subparsers(dest="twin_command", metavar="get|report")
    g = tw.add_parser("get", help="print the twin as JSON")
    add_connection_options(g)
    g.set_defaults(func=run_twin_get)
    r = tw.add_parser("report", help="send a reported-properties patch")
    r.add_argument("patch", metavar="JSON", help="the patch, e.g. '{\"firmware\": \"1.2\"}'")
    add_connection_options(r)
    r.set_defaults(func=run_twin_report)
    p.set_defaults(func=lambda args: _twin_usage(p))


def _twin_usage(parser) -> int:
    parser.print_usage(sys.stderr)
    print("error: give a twin command: get or report JSON", file=sys.stderr)
    return 2


# ----------------------------------------------------------------------------------------------- send


def _bodies(args):
    if args.messages and args.messages != ["-"]:
        return list(args.messages)
    return [line.rstrip("\r\n") for line in sys.stdin if line.strip()]


def run_send(args) -> int:
    if args.count < 1:
        raise ConfigError("--count must be at least 1")
    if args.interval < 0:
        raise ConfigError("--interval cannot be negative")
    props = parse_props(args.prop)
    content_type = "application/json" if args.json and not args.content_type else args.content_type
    content_encoding = "utf-8" if args.json and not args.content_encoding else args.content_encoding
    bodies = _bodies(args)
    if not bodies:
        raise ConfigError("nothing to send: give message bodies as arguments or on standard input")
    session = Session(args)
    topic = topics.telemetry_topic(session.identity, props or None, content_type=content_type,
                                   content_encoding=content_encoding)
    system = topics.system_properties(content_type=content_type, content_encoding=content_encoding)
    total = len(bodies) * args.count
    payloads = []
    for n in range(total):
        body = bodies[n % len(bodies)].replace("{n}", str(n + 1)).encode("utf-8")
        topics.check_message_size(body, props or None, system)
        payloads.append(body)
    session.connect()
    progress = Progress(total)
    start = progress.start
    sent = 0
    interrupted = complete = False
    try:
        try:
            for i, body in enumerate(payloads):
                if session.dropped:
                    break
                info = session.client.publish(topic, body, qos=1)
                if info.rc != 0:
                    break
                sent += 1
                if total > 1:
                    progress.update(sent, session.acked)
                if args.interval and i + 1 < total:
                    time.sleep(args.interval)
            complete = session.wait_acked(sent, args.timeout)
        except KeyboardInterrupt:
            # Ctrl-C: stop sending, give what is on the wire a moment to be acknowledged, then summarise.
            interrupted = True
            progress.clear()
            print("interrupted: waiting up to 2 s for acknowledgements (Ctrl-C again to stop at once)",
                  file=sys.stderr, flush=True)
            try:
                session.wait_acked(sent, min(2.0, args.timeout))
            except KeyboardInterrupt:
                pass
        elapsed = max(time.monotonic() - start, 1e-6)
    finally:
        progress.clear()
        session.close()
    acked = min(session.acked, sent)
    print(f"sent {sent}, acknowledged {acked} in {elapsed:.2f} s ({acked / elapsed:.1f} msg/s)"
          + (f"; interrupted, {total - sent} not sent" if interrupted else ""), flush=True)
    if interrupted:
        return EXIT_INTERRUPTED
    if not complete or sent < total:
        where = f"{session.host}:{session.port}"
        if session.dropped:
            raise ConnectionFailed(f"{total - acked} of {total} messages were not acknowledged: the connection to "
                                   f"{where} dropped ({session.dropped})")
        raise OperationTimeout(f"{total - acked} of {total} messages were not acknowledged: {where} sent no "
                               f"PUBACK within {args.timeout:g} s (--timeout)")
    return EXIT_OK


# ----------------------------------------------------------------------------------------------- listen


def run_listen(args) -> int:
    answer = parse_json(args.method_payload, "--method-payload")
    out = Output()
    events = [0]
    kinds = {"c2d": 0, "method": 0, "desired": 0}
    done = threading.Event()
    holder = {}

    def on_record(record, message) -> None:
        body = message.payload
        if isinstance(record, topics.C2DMessage):
            props = {**record.system_properties, **record.properties}
            extra = " " + " ".join(f"{k}={v}" for k, v in props.items()) if props else ""
            out(f"c2d message{extra}: {preview(body)}")
            kinds["c2d"] += 1
        elif isinstance(record, topics.InputMessage):
            out(f"input message on {record.input_name}: {preview(body)}")
            kinds["c2d"] += 1
        elif isinstance(record, topics.MethodRequest):
            lcpaho.answer_method(holder["session"].client, record, args.method_status, answer)
            out(f"method call {record.name} rid={record.rid} payload {preview(body)} -> answered "
                f"{args.method_status} {json.dumps(answer)}")
            kinds["method"] += 1
        elif isinstance(record, topics.DesiredPatch):
            out(f"desired properties version={record.version}: {preview(body)}")
            kinds["desired"] += 1
        else:
            return
        events[0] += 1
        if args.count is not None and events[0] >= args.count:
            done.set()

    session = Session(args, on_record=on_record)
    holder["session"] = session
    previous = signal.signal(signal.SIGTERM, lambda *_: done.set())
    interrupted = False
    try:
        session.connect()
        try:
            session.subscribe(lcpaho.subscriptions(session.identity))
            what = "module" if session.identity.is_module else "device"
            out(f"listening as {what} {session.identity.client_id} on {session.host}:{session.port} "
                "(Ctrl-C to stop)")
            deadline = time.monotonic() + args.duration if args.duration is not None else None
            while not done.is_set() and not session.dropped:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                done.wait(0.2 if left is None else min(0.2, left))
            # Let a method answer published from paho's thread go out before disconnecting.
            time.sleep(0.1)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            session.close()
    finally:
        signal.signal(signal.SIGTERM, previous)
    out(f"{events[0]} event{'s' if events[0] != 1 else ''}: {kinds['c2d']} cloud-to-device, {kinds['method']} "
        f"method call{'s' if kinds['method'] != 1 else ''}, {kinds['desired']} desired patch"
        f"{'es' if kinds['desired'] != 1 else ''}" + ("; interrupted" if interrupted else ""))
    if session.dropped:
        out(f"connection dropped: {session.dropped}")
        return 4
    if args.count is not None and events[0] < args.count:
        return EXIT_FAILED
    return EXIT_OK


# ----------------------------------------------------------------------------------------------- twin


def _twin_session(args) -> Session:
    session = Session(args)
    session.connect()
    try:
        session.subscribe([(topics.TWIN_RESPONSE_FILTER, 0)])
    except BaseException:
        session.close()
        raise
    return session


def run_twin_get(args) -> int:
    session = _twin_session(args)
    try:
        twin = session.get_twin()
    finally:
        session.close()
    print(json.dumps(twin, indent=2, sort_keys=True))
    return EXIT_OK


def run_twin_report(args) -> int:
    patch = parse_json(args.patch, "the reported patch")
    if not isinstance(patch, dict):
        raise ConfigError("a reported patch is a JSON object, e.g. '{\"firmware\": \"1.2\"}'")
    session = _twin_session(args)
    try:
        response = session.report(patch)
    finally:
        session.close()
    version = f", version {response.version}" if response.version is not None else ""
    print(f"reported properties updated (status {response.status}{version})")
    return EXIT_OK
