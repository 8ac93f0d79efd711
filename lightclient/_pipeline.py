"""The telemetry pipeline of a :class:`~lightclient.device.Device`: from ``send()`` to the hub's PUBACK.

:class:`Pipeline` counts every accepted message against the queue limits, hands at most ``window`` of them
to paho at a time (in order of acceptance), commits them to the :class:`~lightclient.outbox.Outbox` when
there is one (group commit: one transaction for every message waiting at that moment), and completes their
:class:`SendHandle` on the PUBACK. :class:`MessageMaker` builds the messages from ``send()``'s arguments;
:func:`queue_settings` checks the Device's queue and outbox options. Private: the sync and the asyncio
Device are the API (both build on these); ``SendHandle`` is re-exported there.

One object per message: the :class:`SendHandle` the caller gets is also the queue entry, and it keeps
the topic in parts (a :class:`TopicForm` shared by every message with the same properties, plus the
number of its ``$.mid``) until the message is handed to paho, so a queued message costs little more
than its payload.
"""
from __future__ import annotations

import collections
import itertools
import logging
import os
import threading
import time
import urllib.parse
from typing import TYPE_CHECKING, Any, Deque, Dict, Iterable, List, Optional, Tuple, Union

from . import topics
from .exceptions import ConfigError, LightClientError, MessageDroppedError, OperationTimeout, QueueFullError
from .outbox import DEFAULT_MAX_BYTES, DEFAULT_MAX_MESSAGES, REJECT_NEW, Outbox, check_limits

if TYPE_CHECKING:
    import paho.mqtt.client as mqtt

    from .identity import Identity

# Device's logger: the pipeline is part of Device as far as anyone configuring logging is concerned.
log = logging.getLogger("lightclient.device")

_DONE = True   # SendHandle._state once acknowledged (None while pending, the error once dropped)
_TOPIC_CACHE_SIZE = 256
# Stands in for the $.mid while a topic is cached: a UUID's length, and unreserved characters only.
_MID_PLACEHOLDER = "00000000-0000-4000-8000-000000000000"


class TopicForm:
    """A telemetry topic around an automatic ``$.mid``: ``head + prefix + "-" + "%011x" % n + tail``.

    ``size`` is what the properties count against the 256 KB message limit (Device's topic cache keeps
    one form per property set)."""

    __slots__ = ("head", "prefix", "tail", "size", "fixed")

    def __init__(self, head: str, prefix: str, tail: str, size: int):
        self.head = head
        self.prefix = prefix
        self.tail = tail
        self.size = size
        # Topic length without the counter digits (always 11: a Device never sends 16**11 messages).
        self.fixed = len(head) + len(prefix) + 12 + len(tail)

    def message_id(self, n: int) -> str:
        return f"{self.prefix}-{n:011x}"

    def topic(self, n: int) -> str:
        return f"{self.head}{self.prefix}-{n:011x}{self.tail}"


class SendHandle:
    """A telemetry message on its way; :meth:`wait` blocks until the hub acknowledged it (PUBACK).

    ``message_id`` is its ``$.mid`` (yours, or a unique one lightclient chose); ``mid`` the MQTT packet id once
    the message is handed to the network (None while it waits in the queue).
    """

    # The handle is the message itself (one object per message): ``_form``/``_n`` are the topic (a
    # TopicForm and the $.mid counter, or the whole topic and None), ``payload``/``cost``/``key`` what the
    # pipeline and the outbox need. ``_state``: None pending, True acknowledged, the error once dropped.
    # ``_waker`` is made only when someone waits: a lock held until the ack releases it (cheaper than an
    # Event, and it wakes only the threads waiting for this message). Only acquire(timeout=) and release()
    # are used, so lightclient.aio puts a lock of its own there that also wakes the coroutines awaiting it.
    __slots__ = ("_form", "_n", "payload", "cost", "key", "mid", "_state", "_waker", "_book")

    def __init__(self, book: "Pipeline", form: Union[TopicForm, str], n: Optional[int], payload: bytes, cost: int,
                 key: Optional[int] = None):
        self._form = form
        self._n = n
        self.payload = payload
        self.cost = cost
        self.key = key
        self.mid: Optional[int] = None
        self._state: Union[None, bool, LightClientError] = None
        self._waker: Optional[threading.Lock] = None
        self._book = book

    @property
    def topic(self) -> str:
        form = self._form
        return form if self._n is None else form.topic(self._n)  # type: ignore[union-attr,return-value]

    @property
    def message_id(self) -> str:
        form = self._form
        if self._n is None:
            return message_id_of(form)  # type: ignore[arg-type]
        return form.message_id(self._n)  # type: ignore[union-attr]

    def done(self) -> bool:
        """True once the hub has acknowledged the message."""
        return self._state is _DONE

    @property
    def error(self) -> Optional[LightClientError]:
        """:class:`MessageDroppedError` if the message was dropped unsent (``drop_oldest``), else None."""
        state = self._state
        return None if state is None or state is _DONE else state  # type: ignore[return-value]

    def _settle(self, state: Union[bool, LightClientError]) -> None:
        """Holds the book's lock."""
        self._state = state
        waker = self._waker
        if waker is not None:
            self._waker = None
            waker.release()

    def _fail(self, error: LightClientError) -> None:
        with self._book.lock:
            self._settle(error)

    def wait(self, timeout: Optional[float] = None) -> None:
        """Block until acknowledged; raise :class:`OperationTimeout` after ``timeout`` seconds.

        A message not yet acknowledged stays queued: it is resent after a reconnect, so waiting again
        later is fine. Raises :class:`MessageDroppedError` if it was dropped to make room for newer ones.
        """
        if self._state is _DONE:
            return
        with self._book.lock:
            state = self._state
            if state is None:
                waker = self._waker
                if waker is None:
                    waker = self._waker = threading.Lock()
                    waker.acquire()
        if state is None:
            if not waker.acquire(timeout=-1 if timeout is None else max(timeout, 0)):
                raise OperationTimeout(
                    f"message {self.message_id!r} was not acknowledged within {timeout} s; it stays queued "
                    "and is sent again after a reconnect, so wait again or check the connection")
            waker.release()  # the next thread waiting for this message, if any, wakes too
            state = self._state
        if state is not _DONE:
            raise state  # type: ignore[misc]

    def __repr__(self) -> str:
        state = "done" if self._state is _DONE else "pending" if self._state is None else "dropped"
        return f"<SendHandle {self.message_id!r} mid={self.mid} {state}>"


def wait_all(handles: Iterable[SendHandle], timeout: Optional[float] = None) -> None:
    """Wait until every handle is acknowledged (:class:`OperationTimeout` after ``timeout`` s in all).

    Raises the first error in the order given (a message dropped unsent), after waiting for the others.
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    first: Optional[LightClientError] = None
    for handle in handles:
        if handle._state is _DONE:
            continue  # acks mostly arrive in order: most handles are done by the time we get to them
        try:
            handle.wait(None if deadline is None else deadline - time.monotonic())
        except MessageDroppedError as exc:
            first = first or exc
    if first is not None:
        raise first


class Pipeline:
    """Telemetry from :meth:`Device.send <lightclient.device.Device.send>` to the hub's PUBACK (one per Device).

    Every accepted message is counted against ``max_messages`` / ``max_bytes`` until acknowledged.
    At most ``window`` (= ``max_inflight``) of them are handed to paho at a time, and only while
    connected; the rest wait in ``queue``, in order, where ``drop_oldest`` can still take them back
    (a message paho holds is resent by paho after a reconnect and cannot be recalled).

    With an outbox, every message is committed to it before :meth:`put` returns and deleted from it on its
    PUBACK. Group commit: a sender stages its messages (counted, in order) and waits; one sender at a time
    (the leader) writes everything staged so far in one transaction (one fsync) and then queues it, in the
    same order as in the file, and wakes the others whose messages that transaction covered.

    Locking: ``lock`` is never held while calling paho (paho's network thread holds paho's own lock when
    it calls :meth:`acked`) or writing the outbox. A PUBACK can be handled on the network thread before
    ``publish()`` has returned the packet id to the sending thread; such an ack is parked in ``early`` with
    the sequence number of that moment, and :meth:`_register` accepts it only if it is not older than its
    own publish (a parked ack for a reused packet id of a twin request or method answer is older and
    ignored). Only one thread at a time moves messages from ``queue`` to paho (``pumping``), so the wire
    order is the order of acceptance.
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
        self.committed = threading.Condition(self.lock)  # group commit: a leader finished a transaction
        self.waiting = 0                           # threads in drained()
        self.queue: Deque[SendHandle] = collections.deque()
        self.inflight: Dict[int, SendHandle] = {}  # handed to paho, by MQTT packet id
        self.early: Dict[int, int] = {}
        self.seq = 0
        self.sending = 0                           # publishes in progress (each holds a window slot)
        self.pumping = False
        self.repump = False
        self.count = 0
        self.bytes = 0
        self.online = False
        # Group commit (outbox only): staged messages, the queued keys to delete with them, the batch
        # number they will be committed in, whether a leader is writing now.
        self.staged: List[SendHandle] = []
        self.staged_drops: List[SendHandle] = []
        self.batch = 0
        self.committing = False

    # ----------------------------------------------------------------------------- accepting

    def _room(self, count: int, cost: int) -> int:
        """How many queued messages must be dropped for ``count`` more of ``cost`` bytes in all;
        QueueFullError if they cannot fit. Holds ``lock``."""
        total, size = self.count + count, self.bytes + cost
        if total <= self.max_messages and size <= self.max_bytes:
            return 0
        where = "outbox" if self.outbox is not None else "offline queue"
        what = "the message was" if count == 1 else f"the {count} messages were"
        limits = (f"{self.count} messages, {self.bytes} bytes pending; limits {self.max_messages} messages, "
                  f"{self.max_bytes} bytes")
        if count == 1 and cost > self.max_bytes:
            raise QueueFullError(f"the message ({cost} bytes with its topic) is larger than the {where}'s "
                                 f"max_bytes ({self.max_bytes}); it was not accepted")
        if cost > self.max_bytes or count > self.max_messages:
            raise QueueFullError(f"the batch of {count} messages ({cost} bytes with topics) is larger than the "
                                 f"{where}'s limits ({self.max_messages} messages, {self.max_bytes} bytes); "
                                 "none was accepted: send it in smaller batches")
        if self.policy == REJECT_NEW:
            raise QueueFullError(f"the {where} is full ({limits}); {what} not accepted: wait for the "
                                 "connection to come back, or use full_policy='drop_oldest'")
        dropped = 0
        for message in self.queue:
            if message.key is None and self.outbox is not None:
                break  # staged by another sender, not committed yet: cannot be dropped in this transaction
            dropped += 1
            total -= 1
            size -= message.cost
            if total <= self.max_messages and size <= self.max_bytes:
                return dropped
        raise QueueFullError(f"the {where} is full ({limits}) and the oldest messages are already in flight "
                             f"(they cannot be recalled); {what} not accepted")

    def put(self, handle: SendHandle) -> SendHandle:
        """Accept one message (a fresh handle); with an outbox, return once it is committed."""
        if self.outbox is not None:
            self._commit([handle])
            return handle
        with self.lock:
            dropped = self._drop(self._room(1, handle.cost))
            direct = self._accept(handle)
        self._dropped(dropped)
        if direct is not None:
            self._publish([(handle, direct)])
        return handle

    def put_many(self, handles: List[SendHandle]) -> List[SendHandle]:
        """Accept all of ``handles`` or none (QueueFullError); with an outbox, in one transaction."""
        if not handles:
            return handles
        if self.outbox is not None:
            self._commit(handles)
            return handles
        with self.lock:
            dropped = self._drop(self._room(len(handles), sum(h.cost for h in handles)))
            for handle in handles:
                self.count += 1
                self.bytes += handle.cost
                self.queue.append(handle)
        self._dropped(dropped)
        self.pump()
        return handles

    def _drop(self, n: int) -> List[SendHandle]:
        """Take the ``n`` oldest queued messages out (holds ``lock``)."""
        dropped = []
        for _ in range(n):
            message = self.queue.popleft()
            self.count -= 1
            self.bytes -= message.cost
            dropped.append(message)
        return dropped

    def _dropped(self, dropped: List[SendHandle]) -> None:
        for victim in dropped:
            victim._fail(MessageDroppedError(
                f"message {victim.message_id!r} was dropped unsent to make room for newer ones "
                f"(full_policy='drop_oldest', limits {self.max_messages} messages, {self.max_bytes} bytes)"))

    def _commit(self, handles: List[SendHandle]) -> None:
        """Group commit (outbox): stage ``handles``, then lead a transaction or wait for the one covering them."""
        with self.lock:
            victims = self._drop(self._room(len(handles), sum(h.cost for h in handles)))
            for handle in handles:
                self.count += 1   # reserve the room while the file is written
                self.bytes += handle.cost
            self.staged.extend(handles)
            self.staged_drops.extend(victims)
            mine = self.batch
            while True:
                if self.batch > mine and not (self.committing and self.batch == mine + 1):
                    break  # the transaction that covered ours is over
                if not self.committing:
                    self._lead()
                    continue
                self.committed.wait()
        if handles[0].key is None:  # the transaction failed: its error is on every handle it held
            raise handles[0]._state  # type: ignore[misc]

    def _lead(self) -> None:
        """Write everything staged in one transaction, then queue it (holds ``lock``, released while writing)."""
        batch, drops = self.staged, self.staged_drops
        self.staged, self.staged_drops = [], []
        self.batch += 1
        self.committing = True
        outbox = self.outbox
        assert outbox is not None
        error: Optional[BaseException] = None
        self.lock.release()
        try:
            keys = outbox.add_many([(h.topic, h.payload) for h in batch], drop=[v.key for v in drops if v.key])
        except BaseException as exc:  # noqa: B902 - handed to every sender in this batch
            error = exc
        finally:
            self.lock.acquire()
        self.committing = False
        if error is None:
            for handle, key in zip(batch, keys):
                handle.key = key
            self.count -= len(batch)
            self.bytes -= sum(h.cost for h in batch)
            for handle in batch:
                self._accept(handle)
            dropped: List[SendHandle] = drops
        else:
            for handle in batch:
                self.count -= 1
                self.bytes -= handle.cost
                # Not queued, never returned: the error reaches each sender through its own handle.
                handle._state = error if isinstance(error, LightClientError) else LightClientError(
                    f"could not write the outbox: {error}")
            for victim in reversed(drops):  # not deleted after all: back to the front, in order
                self.queue.appendleft(victim)
                self.count += 1
                self.bytes += victim.cost
            dropped = []
        self.committed.notify_all()
        self.lock.release()
        try:
            self._dropped(dropped)
            if error is None:
                self.pump()
        finally:
            self.lock.acquire()

    def _accept(self, message: SendHandle) -> Optional[int]:
        """Count ``message`` in; the sequence number to publish it with now, or None (queued). Holds ``lock``."""
        self.count += 1
        self.bytes += message.cost
        if (self.outbox is None and self.online and not self.queue and not self.pumping
                and len(self.inflight) + self.sending < self.window):
            self.sending += 1
            self.seq += 1
            return self.seq
        self.queue.append(message)
        return None

    def load(self, pending: List[Tuple[int, str, bytes]]) -> List[SendHandle]:
        """Queue what an outbox still held when it was opened (before any new message)."""
        handles = []
        with self.lock:
            for key, topic, payload in pending:
                handle = SendHandle(self, topic, None, payload, len(topic) + len(payload), key)
                self.count += 1
                self.bytes += handle.cost
                self.queue.append(handle)
                handles.append(handle)
        return handles

    # ------------------------------------------------------------------------------ handing out

    def _take(self) -> List[Tuple[SendHandle, int]]:
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

    def _publish(self, batch: List[Tuple[SendHandle, int]], pumping: bool = False) -> None:
        publish = self.client.publish
        while True:
            for message, started in batch:
                try:
                    info = publish(message.topic, message.payload, qos=1)
                except Exception as exc:  # validated in send(); only a paho bug gets here
                    log.exception("paho refused a queued message")
                    with self.lock:
                        self.sending -= 1
                        self.count -= 1
                        self.bytes -= message.cost
                        message._settle(LightClientError(f"paho refused the message: {exc}"))
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

    def _register(self, message: SendHandle, mid: int, started: int) -> None:
        message.mid = mid
        with self.lock:
            self.sending -= 1
            acked_at = self.early.pop(mid, None) if self.early else None
            if acked_at is not None and acked_at >= started:
                self._done(message)
            else:
                self.inflight[mid] = message
                acked_at = None
            if not self.sending and self.early:
                self.early.clear()  # what is left belongs to publishes that were not telemetry
        if acked_at is not None:
            self._after_ack(message)

    def _done(self, message: SendHandle) -> None:
        """Holds ``lock``."""
        self.count -= 1
        self.bytes -= message.cost
        message._state = _DONE
        if message._waker is not None:
            message._settle(_DONE)
        if self.waiting and not self.count:
            self.cond.notify_all()  # only disconnect()'s flush waits here

    def _after_ack(self, message: SendHandle) -> None:
        if message.key is not None and self.outbox is not None:
            self.outbox.remove(message.key)
        if self.queue:
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


class MessageMaker:
    """Turns ``send()``'s arguments into a checked :class:`SendHandle` for ``book``, not yet accepted (hand it
    to :meth:`Pipeline.put` / :meth:`Pipeline.put_many`): type and size checks, the ``$.mid`` and the topic cache.

    One per Device, shared by :class:`lightclient.device.Device` and :class:`lightclient.aio.Device` so both
    send exactly the same messages. An automatic ``$.mid`` has 36 characters, like a UUID: a random 96-bit
    prefix per Device and a counter (a UUID4 per message is unique too, but costs a system call).
    """

    def __init__(self, identity: "Identity", book: "Pipeline"):
        self.identity = identity
        self.book = book
        self.mid_prefix = os.urandom(12).hex()
        self.counter = itertools.count(1)  # next() on a count is atomic under the GIL
        self.cache: Dict[Any, Tuple[Union[TopicForm, str], int]] = {}

    def message(self, payload: Any, properties: Optional[topics.Properties],
                system_properties: Dict[str, Any]) -> SendHandle:
        """One checked message, not yet accepted: its handle (the topic stays in parts until it is sent)."""
        if isinstance(payload, (bytearray, memoryview)):
            payload = bytes(payload)
        message_id = system_properties.get("message_id")
        if message_id is None:
            system_properties.pop("message_id", None)
            form, overhead = self.topic(properties, system_properties, True)
            n: Optional[int] = next(self.counter)
            cost = form.fixed  # type: ignore[union-attr]
        else:
            form, overhead = self.topic(properties, system_properties, False)
            n = None
            cost = len(form)  # type: ignore[arg-type]
        if not isinstance(payload, bytes) or len(payload) + overhead > topics.MAX_MESSAGE_SIZE:
            # Slow path: str bodies, wrong types and oversized messages get topics' own checks and messages.
            if not isinstance(payload, (bytes, str)):
                raise ConfigError(f"payload must be bytes or str (sent as UTF-8), bytearray or memoryview, not "
                                  f"{type(payload).__name__}; send b'' for a message without a body")
            if n is not None:
                system_properties = dict(system_properties, message_id=form.message_id(n))  # type: ignore[union-attr]
            topics.check_message_size(payload, properties, topics.system_properties(**system_properties))
            if not isinstance(payload, bytes):
                payload = payload.encode("utf-8")
        # The topic is ASCII (ids are ASCII, the bag is %-encoded): its length is its size in bytes.
        return SendHandle(self.book, form, n, payload, cost + len(payload))

    def topic(self, properties: Optional[topics.Properties], system_properties: Dict[str, Any],
              auto_id: bool) -> Tuple[Union[TopicForm, str], int]:
        """The telemetry topic and the size its properties count against the 256 KB limit, cached.

        With ``auto_id`` the topic is a :class:`TopicForm`, to be completed with a fresh ``$.mid``.
        Most applications send the same few property sets over and over; building and validating the
        topic costs more than paho's whole publish(), and the sending thread shares the GIL with the
        network thread, so the cache is what keeps Device.send close to a raw paho publish.
        """
        try:
            key: Any = (tuple(properties.items()) if isinstance(properties, dict) else
                        None if properties is None else tuple(properties), tuple(system_properties.items()),
                        auto_id)
            cached = self.cache.get(key)
        except TypeError:  # unhashable values (lists as pairs, bad types): no caching, full checks below
            key, cached = None, None
        if cached is not None:
            return cached
        given = dict(system_properties, message_id=_MID_PLACEHOLDER) if auto_id else system_properties
        try:
            topic = topics.telemetry_topic(self.identity, properties, **given)
            system = topics.system_properties(**given)
        except TypeError as exc:
            raise ConfigError(f"{exc}; system properties are message_id, correlation_id, user_id, content_type, "
                              "content_encoding, absolute_expiry, creation_time, component, output_name") from None
        size = topics.message_size(None, properties, system)
        result: Tuple[Union[TopicForm, str], int]
        if auto_id:
            head, tail = topic.split("%24.mid=" + _MID_PLACEHOLDER, 1)
            result = (TopicForm(head + "%24.mid=", self.mid_prefix, tail, size), size)
        else:
            result = (topic, size)
        if key is not None:
            if len(self.cache) >= _TOPIC_CACHE_SIZE:
                self.cache.clear()  # unique message ids defeat any cache; keep memory bounded instead
            self.cache[key] = result
        return result


def message_id_of(topic: str) -> str:
    """The ``$.mid`` of a telemetry topic ('' if it has none): for messages reloaded from an outbox."""
    bag = topic.split("/messages/events/", 1)[-1]
    for pair in bag.split("&"):
        if pair.startswith("%24.mid="):
            return urllib.parse.unquote(pair[len("%24.mid="):])
    return ""


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


__all__ = ["MessageMaker", "Pipeline", "SendHandle", "TopicForm", "message_id_of", "queue_settings", "wait_all"]
