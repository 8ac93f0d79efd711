"""The telemetry pipeline of a :class:`~lightclient.device.Device`: from ``send()`` to the hub's PUBACK.

:class:`Pipeline` counts every accepted message against the queue limits, hands at most ``window`` of them
to paho at a time (in order of acceptance), commits them to the :class:`~lightclient.outbox.Outbox` when
there is one, and completes their :class:`SendHandle` on the PUBACK. :func:`queue_settings` checks the
Device's queue and outbox options. Private: Device is the API; ``SendHandle`` is re-exported there.
"""
from __future__ import annotations

import collections
import logging
import os
import threading
import urllib.parse
from typing import TYPE_CHECKING, Deque, Dict, List, Optional, Tuple, Union

from .exceptions import ConfigError, LightClientError, MessageDroppedError, OperationTimeout, QueueFullError
from .outbox import DEFAULT_MAX_BYTES, DEFAULT_MAX_MESSAGES, REJECT_NEW, Outbox, check_limits

if TYPE_CHECKING:
    import paho.mqtt.client as mqtt

# Device's logger: the pipeline is part of Device as far as anyone configuring logging is concerned.
log = logging.getLogger("lightclient.device")


class Message:
    """One telemetry message from send() until its PUBACK (or until it is dropped)."""

    __slots__ = ("topic", "payload", "cost", "key", "handle")

    def __init__(self, topic: str, payload: bytes, handle: "SendHandle", key: Optional[int] = None):
        self.topic = topic
        self.payload = payload
        self.cost = len(topic) + len(payload)  # the topic is ASCII (ids are ASCII, the bag is %-encoded)
        self.key = key
        self.handle = handle


class Pipeline:
    """Telemetry from :meth:`Device.send <lightclient.device.Device.send>` to the hub's PUBACK (one per Device).

    Every accepted message is counted against ``max_messages`` / ``max_bytes`` until acknowledged.
    At most ``window`` (= ``max_inflight``) of them are handed to paho at a time, and only while
    connected; the rest wait in ``queue``, in order, where ``drop_oldest`` can still take them back
    (a message paho holds is resent by paho after a reconnect and cannot be recalled). With an outbox,
    every message is committed to it before :meth:`put` returns and deleted from it on its PUBACK.

    Locking: ``lock`` is never held while calling paho (paho's network thread holds paho's own lock when
    it calls :meth:`acked`). A PUBACK can be handled on the network thread before ``publish()`` has
    returned the packet id to the sending thread; such an ack is parked in ``early`` with the sequence
    number of that moment, and :meth:`_register` accepts it only if it is not older than its own publish
    (a parked ack for a reused packet id of a twin request or method answer is older and ignored).
    Only one thread at a time moves messages from ``queue`` to paho (``pumping``), so the wire order is
    the order of acceptance.
    """

    def __init__(self, client: mqtt.Client, window: int, max_messages: int, max_bytes: int, policy: str,
                 outbox: Optional[Outbox]):
        self.client = client
        self.window = window
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.policy = policy
        self.outbox = outbox
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.put_lock = threading.Lock()           # with an outbox: file order = queue order
        self.waiting = 0                           # threads in drained()
        self.queue: Deque[Message] = collections.deque()
        self.inflight: Dict[int, Message] = {}    # handed to paho, by MQTT packet id
        self.early: Dict[int, int] = {}
        self.seq = 0
        self.sending = 0                           # publishes in progress (each holds a window slot)
        self.pumping = False
        self.repump = False
        self.count = 0
        self.bytes = 0
        self.online = False

    # ----------------------------------------------------------------------------- accepting

    def _room(self, cost: int) -> int:
        """How many queued messages must be dropped for one of ``cost`` bytes; QueueFullError if it cannot fit."""
        count, size = self.count + 1, self.bytes + cost
        if count <= self.max_messages and size <= self.max_bytes:
            return 0
        where = "outbox" if self.outbox is not None else "offline queue"
        limits = (f"{self.count} messages, {self.bytes} bytes pending; limits {self.max_messages} messages, "
                  f"{self.max_bytes} bytes")
        if cost > self.max_bytes:
            raise QueueFullError(f"the message ({cost} bytes with its topic) is larger than the {where}'s "
                                 f"max_bytes ({self.max_bytes}); it was not accepted")
        if self.policy == REJECT_NEW:
            raise QueueFullError(f"the {where} is full ({limits}); the message was not accepted: wait for the "
                                 "connection to come back, or use full_policy='drop_oldest'")
        dropped = 0
        for message in self.queue:
            dropped += 1
            count -= 1
            size -= message.cost
            if count <= self.max_messages and size <= self.max_bytes:
                return dropped
        raise QueueFullError(f"the {where} is full ({limits}) and the oldest messages are already in flight "
                             "(they cannot be recalled); the message was not accepted")

    def put(self, topic: str, payload: bytes, message_id: str) -> "SendHandle":
        handle = SendHandle(self, message_id)
        message = Message(topic, payload, handle)
        cost = message.cost
        dropped: List[Message] = []
        if self.outbox is None:
            with self.lock:
                for _ in range(self._room(cost)):
                    dropped.append(self._drop_first())
                direct = self._accept(message)
        else:
            with self.put_lock:
                with self.lock:
                    drops = self._room(cost)
                    if not drops:
                        self.count += 1   # reserve the room while the file is written
                        self.bytes += cost
                if not drops:
                    try:
                        message.key = self.outbox.add(topic, payload)
                    except BaseException:
                        with self.lock:
                            self.count -= 1
                            self.bytes -= cost
                        raise
                    with self.lock:
                        self.count -= 1
                        self.bytes -= cost
                        direct = self._accept(message)
                else:
                    # Rare (full with drop_oldest): the lock stays held over the write, so the queue cannot
                    # move between choosing the victims and deleting them in the same transaction.
                    with self.lock:
                        drops = self._room(cost)
                        victims = [self.queue[i] for i in range(drops)]
                        message.key = self.outbox.add(topic, payload, drop=[m.key for m in victims if m.key])
                        for _ in range(drops):
                            dropped.append(self._drop_first())
                        direct = self._accept(message)
        for victim in dropped:
            victim.handle._fail(MessageDroppedError(
                f"message {victim.handle.message_id!r} was dropped unsent to make room for newer ones "
                f"(full_policy='drop_oldest', limits {self.max_messages} messages, {self.max_bytes} bytes)"))
        if direct is not None:
            self._publish([(message, direct)])
        return handle

    def _drop_first(self) -> Message:
        message = self.queue.popleft()
        self.count -= 1
        self.bytes -= message.cost
        return message

    def _accept(self, message: Message) -> Optional[int]:
        """Count ``message`` in; the sequence number to publish it with now, or None (queued). Holds ``lock``."""
        self.count += 1
        self.bytes += message.cost
        if self.online and not self.queue and not self.pumping and len(self.inflight) + self.sending < self.window:
            self.sending += 1
            self.seq += 1
            return self.seq
        self.queue.append(message)
        return None

    def load(self, pending: List[Tuple[int, str, bytes]]) -> List["SendHandle"]:
        """Queue what an outbox still held when it was opened (before any new message)."""
        handles = []
        with self.lock:
            for key, topic, payload in pending:
                message_id = message_id_of(topic)
                handle = SendHandle(self, message_id)
                message = Message(topic, payload, handle, key)
                self.count += 1
                self.bytes += message.cost
                self.queue.append(message)
                handles.append(handle)
        return handles

    # ------------------------------------------------------------------------------ handing out

    def _take(self) -> List[Tuple[Message, int]]:
        """Messages to hand to paho now (holds ``lock``); the caller then owns the pump."""
        taken = []
        while self.online and self.queue and len(self.inflight) + self.sending < self.window:
            message = self.queue.popleft()
            self.sending += 1
            self.seq += 1
            taken.append((message, self.seq))
        return taken

    def pump(self) -> None:
        """Hand queued messages to paho while the window has room (any thread)."""
        with self.lock:
            if self.pumping:
                self.repump = True
                return
            taken = self._take()
            if not taken:
                return
            self.pumping = True
        self._publish(taken, pumping=True)

    def _publish(self, batch: List[Tuple[Message, int]], pumping: bool = False) -> None:
        while True:
            for message, started in batch:
                try:
                    info = self.client.publish(message.topic, message.payload, qos=1)
                except Exception as exc:  # validated in send(); only a paho bug gets here
                    log.exception("paho refused a queued message")
                    with self.lock:
                        self.sending -= 1
                        self.count -= 1
                        self.bytes -= message.cost
                    message.handle._fail(LightClientError(f"paho refused the message: {exc}"))
                    if message.key is not None and self.outbox is not None:
                        self.outbox.remove(message.key)
                    continue
                self._register(message, info.mid, started)
            with self.lock:
                if not pumping:
                    if self.pumping or not self.queue:
                        return
                    pumping = True
                    self.pumping = True  # a direct send that freed a slot and found a queue: pump it
                self.repump = False
                batch = self._take()
                if not batch:
                    self.pumping = False
                    return

    def _register(self, message: Message, mid: int, started: int) -> None:
        handle = message.handle
        handle.mid = mid
        with self.lock:
            self.sending -= 1
            acked_at = self.early.pop(mid, None)
            if acked_at is not None and acked_at >= started:
                self._done(message)
            else:
                self.inflight[mid] = message
                acked_at = None
            if not self.sending and self.early:
                self.early.clear()  # what is left belongs to publishes that were not telemetry
        if acked_at is not None:
            self._after_ack(message)

    def _done(self, message: Message) -> None:
        """Holds ``lock``."""
        self.count -= 1
        self.bytes -= message.cost
        handle = message.handle
        handle._done = True
        if handle._event is not None:
            handle._event.set()
        if self.waiting and not self.count:
            self.cond.notify_all()  # only disconnect()'s flush waits here

    def _after_ack(self, message: Message) -> None:
        if message.key is not None and self.outbox is not None:
            self.outbox.remove(message.key)
        self.pump()

    def acked(self, mid: int) -> None:
        """paho's on_publish (network thread)."""
        with self.lock:
            message = self.inflight.pop(mid, None)
            if message is None:
                if self.sending:
                    self.early[mid] = self.seq
                return
            self._done(message)
        self._after_ack(message)

    def set_online(self, online: bool) -> None:
        with self.lock:
            self.online = online
        if online:
            self.pump()

    def drained(self, timeout: Optional[float]) -> bool:
        """Wait until every accepted message is acknowledged."""
        predicate = lambda: not self.count  # noqa: E731
        with self.cond:
            self.waiting += 1
            try:
                return self.cond.wait_for(predicate, timeout)
            finally:
                self.waiting -= 1


def message_id_of(topic: str) -> str:
    """The ``$.mid`` of a telemetry topic ('' if it has none): for messages reloaded from an outbox."""
    bag = topic.split("/messages/events/", 1)[-1]
    for pair in bag.split("&"):
        if pair.startswith("%24.mid="):
            return urllib.parse.unquote(pair[len("%24.mid="):])
    return ""


class SendHandle:
    """A telemetry message on its way; :meth:`wait` blocks until the hub acknowledged it (PUBACK).

    ``message_id`` is its ``$.mid`` (yours, or a unique one lightclient chose); ``mid`` the MQTT packet id once
    the message is handed to the network (None while it waits in the queue).
    """

    __slots__ = ("mid", "message_id", "_done", "_error", "_book", "_event")

    def __init__(self, book: Pipeline, message_id: str):
        self.mid: Optional[int] = None
        self.message_id = message_id
        self._done = False
        self._error: Optional[LightClientError] = None
        self._book = book
        # Made only when someone waits: one Event per waited-for message, so an ack wakes only the
        # thread waiting for that message (a shared Condition would wake every waiter on every ack).
        self._event: Optional[threading.Event] = None

    def done(self) -> bool:
        """True once the hub has acknowledged the message."""
        return self._done

    @property
    def error(self) -> Optional[LightClientError]:
        """:class:`MessageDroppedError` if the message was dropped unsent (``drop_oldest``), else None."""
        return self._error

    def _fail(self, error: LightClientError) -> None:
        with self._book.lock:
            self._error = error
            if self._event is not None:
                self._event.set()

    def wait(self, timeout: Optional[float] = None) -> None:
        """Block until acknowledged; raise :class:`OperationTimeout` after ``timeout`` seconds.

        A message not yet acknowledged stays queued: it is resent after a reconnect, so waiting again
        later is fine. Raises :class:`MessageDroppedError` if it was dropped to make room for newer ones.
        """
        if self._done:
            return
        with self._book.lock:
            if self._done:
                return
            if self._error is not None:
                raise self._error
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        if not event.wait(timeout):
            raise OperationTimeout(
                f"message {self.message_id!r} was not acknowledged within {timeout} s; it stays queued "
                "and is sent again after a reconnect, so wait again or check the connection")
        if self._error is not None:
            raise self._error

    def __repr__(self) -> str:
        state = "done" if self._done else "dropped" if self._error is not None else "pending"
        return f"<SendHandle {self.message_id!r} mid={self.mid} {state}>"


def queue_settings(outbox: Union[None, str, "os.PathLike[str]", Outbox], max_queue: Optional[int],
                   max_queue_bytes: Optional[int], full_policy: Optional[str]
                   ) -> Tuple[Optional[Outbox], bool, int, int, str]:
    """Check Device's queue options: ``(outbox, opened_here, max_messages, max_bytes, full_policy)``.

    An :class:`Outbox` object brings its own limits (the Device options must then be left unset); a path
    opens one with the Device's limits (``opened_here``: the Device closes it).
    """
    if isinstance(outbox, Outbox):
        if (max_queue, max_queue_bytes, full_policy) != (None, None, None):
            raise ConfigError("with an Outbox object, set max_messages, max_bytes and full_policy on the "
                              "Outbox, not max_queue, max_queue_bytes and full_policy on the Device")
        return outbox, False, outbox.max_messages, outbox.max_bytes, outbox.full_policy
    max_queue = DEFAULT_MAX_MESSAGES if max_queue is None else max_queue
    max_queue_bytes = DEFAULT_MAX_BYTES if max_queue_bytes is None else max_queue_bytes
    full_policy = REJECT_NEW if full_policy is None else full_policy
    try:
        check_limits(max_queue, max_queue_bytes, full_policy)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("max_messages", "max_queue").replace("max_bytes", "max_queue_bytes")) from None
    if outbox is None:
        return None, False, max_queue, max_queue_bytes, full_policy
    if not isinstance(outbox, (str, os.PathLike)):
        raise ConfigError(f"outbox must be a file path or a lightclient.outbox.Outbox, not {type(outbox).__name__}")
    return (Outbox(outbox, max_messages=max_queue, max_bytes=max_queue_bytes, full_policy=full_policy), True,
            max_queue, max_queue_bytes, full_policy)


__all__ = ["Message", "Pipeline", "SendHandle", "message_id_of", "queue_settings"]
