"""A durable outbox for telemetry: messages survive reconnects, crashes and power loss until the hub acks them.

Opt in with ``Device(..., outbox="/var/lib/app/outbox.db")`` (or an :class:`Outbox` object for your own
limits). Then:

* :meth:`Device.send` returns only after the message is committed to the SQLite file (WAL mode,
  ``synchronous=FULL`` by default: the commit is on disk when ``send`` returns). Group commit: the
  messages of every thread waiting in ``send`` at that moment share one transaction (one disk flush),
  and :meth:`Device.send_many` commits a whole batch at once, so durable telemetry keeps up with the
  network.
* A message leaves the file only after the hub acknowledged it (MQTT PUBACK). Acknowledged rows are
  deleted in small batches a few milliseconds later, so after a crash a handful of already-acknowledged
  messages may be sent again: delivery is at-least-once, and every message carries its ``$.mid``.
* When a Device opens an outbox that holds messages (after a crash or a restart), it sends them first,
  in the order they were accepted, then the new ones.
* Bounded by ``max_messages`` and ``max_bytes`` (topic + body bytes of every pending message). When full,
  ``full_policy="reject_new"`` refuses the new message with :class:`QueueFullError`;
  ``"drop_oldest"`` deletes the oldest messages not yet handed to the network and fails their handles
  with :class:`MessageDroppedError`.

Security: the file (and SQLite's ``-wal``/``-shm`` files, which inherit its mode) is created 0600; an
existing file must belong to this user and is narrowed to 0600; a world-writable directory without the
sticky bit is refused, and a symbolic link in place of the file is never followed.

Thread-safe: one SQLite connection guarded by a lock; :meth:`remove` (called on paho's network thread
for every PUBACK) only records the key and never waits for the disk.
"""
from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path
from typing import Iterable, List, Optional, Tuple, Union

from .exceptions import ConfigError, OutboxError, QueueFullError


class _Sqlite3OnFirstUse:
    """``sqlite3`` imported when an Outbox first touches it: Device imports this module, and most
    devices never use an outbox (the import costs ~5 ms of start-up)."""

    def __getattr__(self, name: str):
        import sqlite3 as module

        globals()["sqlite3"] = module
        return getattr(module, name)


sqlite3 = _Sqlite3OnFirstUse()

REJECT_NEW = "reject_new"
DROP_OLDEST = "drop_oldest"
FULL_POLICIES = (REJECT_NEW, DROP_OLDEST)

#: Defaults shared by the in-memory queue and the outbox.
DEFAULT_MAX_MESSAGES = 10000
DEFAULT_MAX_BYTES = 64 * 1024 * 1024

_SCHEMA_VERSION = 1
_FLUSH_BATCH_DELAY = 0.02   # seconds between a PUBACK and the DELETE that follows it (batches them)
_FLUSHER_IDLE_EXIT = 0.5    # the delete thread exits after this long without work


def message_cost(topic: str, payload: bytes) -> int:
    """The bytes a pending message counts against ``max_bytes``: its topic (UTF-8) plus its body."""
    return len(topic.encode("utf-8")) + len(payload)


def check_limits(max_messages: object, max_bytes: object, full_policy: object) -> None:
    """Raise :class:`ConfigError` unless the three queue settings are usable."""
    for name, value in (("max_messages", max_messages), ("max_bytes", max_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive int, not {value!r}")
    if full_policy not in FULL_POLICIES:
        raise ConfigError(f"full_policy must be 'reject_new' or 'drop_oldest', not {full_policy!r}")


class Outbox:
    """Pending telemetry in a SQLite file; see the module docstring. Use as a context manager or :meth:`close`."""

    def __init__(self, path: Union[str, "os.PathLike[str]"], *, max_messages: int = DEFAULT_MAX_MESSAGES,
                 max_bytes: int = DEFAULT_MAX_BYTES, full_policy: str = REJECT_NEW, synchronous: str = "FULL"):
        check_limits(max_messages, max_bytes, full_policy)
        if synchronous not in ("FULL", "NORMAL", "EXTRA"):
            raise ConfigError(f"synchronous must be 'FULL', 'EXTRA' or 'NORMAL', not {synchronous!r}: NORMAL "
                              "survives a crashed process but may lose the last messages on power loss")
        self.path = Path(path)
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.full_policy = full_policy
        self._db_lock = threading.Lock()        # the sqlite3 connection
        self._state = threading.Condition()     # sizes, acked keys, the delete thread
        self._sizes: dict = {}                  # key -> cost, every message not yet acknowledged
        self._bytes = 0
        self._acked: List[int] = []             # acknowledged, DELETE not yet committed
        self._flusher: Optional[threading.Thread] = None
        self._closed = False
        self._conn = self._open(synchronous)

    # ------------------------------------------------------------------------------------ opening

    def _open(self, synchronous: str) -> sqlite3.Connection:
        path = self.path
        directory = path.parent if str(path.parent) else Path(".")
        try:
            info = os.stat(directory)
        except OSError as exc:
            raise OutboxError(f"the outbox directory {str(directory)!r} is not usable: {exc.strerror}") from None
        if info.st_mode & stat.S_IWOTH and not info.st_mode & stat.S_ISVTX:
            raise OutboxError(f"the outbox directory {str(directory)!r} is world-writable (mode "
                              f"{stat.S_IMODE(info.st_mode):o}): anyone could replace the file; use a private "
                              "directory")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o600)
        except OSError as exc:
            raise OutboxError(f"cannot open the outbox {str(path)!r}: {exc.strerror}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise OutboxError(f"the outbox {str(path)!r} is not a regular file")
            if hasattr(os, "geteuid") and info.st_uid != os.geteuid():
                raise OutboxError(f"the outbox {str(path)!r} belongs to another user (uid {info.st_uid}); "
                                  "it must be this user's own file")
            if stat.S_IMODE(info.st_mode) & 0o077:
                os.fchmod(fd, 0o600)  # queued telemetry is the owner's business only
        finally:
            os.close(fd)
        try:
            conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=10)
        except sqlite3.Error as exc:
            raise OutboxError(f"cannot open the outbox {str(path)!r}: {exc}") from exc
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise OutboxError(f"the outbox {str(path)!r} cannot use WAL mode (got {mode!r})")
            conn.execute(f"PRAGMA synchronous={synchronous}")
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, _SCHEMA_VERSION):
                raise OutboxError(f"the outbox {str(path)!r} has schema version {version}; this lightclient "
                                  f"knows {_SCHEMA_VERSION}")
            conn.execute("CREATE TABLE IF NOT EXISTS messages (id INTEGER PRIMARY KEY AUTOINCREMENT, "
                         "topic TEXT NOT NULL, payload BLOB NOT NULL, created REAL NOT NULL)")
            conn.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
            for key, cost in conn.execute("SELECT id, length(CAST(topic AS BLOB)) + length(CAST(payload AS BLOB)) "
                                          "FROM messages ORDER BY id"):
                self._sizes[key] = cost
                self._bytes += cost
        except sqlite3.Error as exc:
            conn.close()
            raise OutboxError(f"the outbox {str(path)!r} is not a usable lightclient outbox: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        return conn

    # --------------------------------------------------------------------------------------- API

    def __len__(self) -> int:
        with self._state:
            return len(self._sizes)

    @property
    def bytes(self) -> int:
        """Topic + body bytes of every message not yet acknowledged."""
        with self._state:
            return self._bytes

    def __repr__(self) -> str:
        return f"<Outbox {str(self.path)!r} {len(self)} pending, {self.full_policy}>"

    def add(self, topic: str, payload: bytes, *, drop: Iterable[int] = ()) -> int:
        """Commit one message (after deleting the ``drop`` keys, in the same transaction); return its key.

        Raises :class:`QueueFullError` if it does not fit within the limits even after the drops.
        """
        return self.add_many([(topic, payload)], drop=drop)[0]

    def add_many(self, messages: Iterable[Tuple[str, bytes]], *, drop: Iterable[int] = ()) -> List[int]:
        """Commit ``(topic, payload)`` messages in one transaction (one disk flush); their keys, in order.

        The ``drop`` keys are deleted in the same transaction. All or nothing: :class:`QueueFullError` if
        they do not fit within the limits even after the drops, :class:`OutboxError` if the file cannot
        be written.
        """
        rows = []
        costs = []
        now = time.time()
        for topic, payload in messages:
            if not isinstance(topic, str) or not isinstance(payload, bytes):
                raise ConfigError("an outbox message is a str topic and a bytes payload")
            rows.append((topic, payload, now))
            costs.append(message_cost(topic, payload))
        if not rows:
            return []
        drop = [key for key in drop]
        with self._db_lock:
            self._check_open()
            with self._state:
                acked, self._acked = self._acked, []
                freed = sum(self._sizes.get(key, 0) for key in drop)
                count = len(self._sizes) - sum(1 for key in drop if key in self._sizes)
                if count + len(rows) > self.max_messages or self._bytes - freed + sum(costs) > self.max_bytes:
                    self._acked = acked + self._acked
                    what = "the message was not" if len(rows) == 1 else f"none of the {len(rows)} messages was"
                    raise QueueFullError(
                        f"the outbox is full ({len(self._sizes)} messages, {self._bytes} bytes; limits "
                        f"{self.max_messages} messages, {self.max_bytes} bytes): {what} accepted")
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    gone = acked + drop
                    if gone:
                        self._conn.executemany("DELETE FROM messages WHERE id = ?", [(k,) for k in gone])
                    if len(rows) == 1:
                        keys = [self._conn.execute(
                            "INSERT INTO messages (topic, payload, created) VALUES (?, ?, ?)", rows[0]).lastrowid]
                    else:
                        # Keys are consecutive: AUTOINCREMENT under BEGIN IMMEDIATE (no other writer).
                        first = self._conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'messages'"
                                                   ).fetchone()
                        self._conn.executemany("INSERT INTO messages (topic, payload, created) VALUES (?, ?, ?)",
                                               rows)
                        last = self._conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'messages'"
                                                  ).fetchone()[0]
                        keys = list(range(last - len(rows) + 1, last + 1))
                        if first is not None and keys[0] <= first[0]:
                            raise OutboxError("the outbox's message ids are not consecutive")  # pragma: no cover
                    self._conn.execute("COMMIT")
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                with self._state:
                    self._acked = acked + self._acked
                raise OutboxError(f"could not write the outbox {str(self.path)!r}: {exc}") from exc
            except BaseException:
                with self._state:
                    self._acked = acked + self._acked
                raise
            with self._state:
                for k in drop:
                    self._bytes -= self._sizes.pop(k, 0)
                for key, cost in zip(keys, costs):
                    self._sizes[key] = cost
                    self._bytes += cost
            return keys  # type: ignore[return-value]

    def remove(self, key: int) -> None:
        """The hub acknowledged message ``key``: forget it (the row is deleted a few milliseconds later)."""
        with self._state:
            cost = self._sizes.pop(key, None)
            if cost is None:
                return
            self._bytes -= cost
            self._acked.append(key)
            if self._closed:
                return
            if self._flusher is None:
                self._flusher = threading.Thread(target=self._flush_loop, name="lightclient-outbox-delete",
                                                 daemon=True)
                self._flusher.start()
            else:
                self._state.notify()

    def flush(self) -> None:
        """Delete the rows of acknowledged messages now."""
        with self._db_lock:
            if self._conn is None:
                return
            with self._state:
                acked, self._acked = self._acked, []
            if not acked:
                return
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                self._conn.executemany("DELETE FROM messages WHERE id = ?", [(k,) for k in acked])
                self._conn.execute("COMMIT")
            except sqlite3.Error:
                try:
                    self._conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                with self._state:
                    self._acked = acked + self._acked  # tried again later; at worst sent again after a crash
                raise

    def pending(self) -> List[Tuple[int, str, bytes]]:
        """Every message not yet acknowledged, oldest first: ``(key, topic, payload)``.

        A payload stored as TEXT (or a number) rather than a BLOB, as an older writer or a hand edit may
        leave it, is sent as the bytes SQLite holds for it (the UTF-8 text), so nothing is lost; a topic
        that is not UTF-8 text cannot be sent at all and raises :class:`OutboxError` naming the row.
        """
        with self._db_lock:
            self._check_open()
            with self._state:
                live = set(self._sizes)
            try:
                rows = self._conn.execute(
                    "SELECT id, CAST(topic AS BLOB), CAST(payload AS BLOB) FROM messages ORDER BY id").fetchall()
            except sqlite3.Error as exc:
                raise OutboxError(f"could not read the outbox {str(self.path)!r}: {exc}") from exc
        return [(key, self._topic_of(key, topic), payload) for key, topic, payload in rows if key in live]

    def _topic_of(self, key: int, topic: bytes) -> str:
        try:
            return topic.decode("utf-8")
        except UnicodeDecodeError:
            raise OutboxError(
                f"row {key} of the outbox {str(self.path)!r} has a topic that is not UTF-8 text, so the message "
                f"cannot be sent; delete that row (DELETE FROM messages WHERE id = {key}) or move the file away"
            ) from None

    def close(self) -> None:
        """Delete what was acknowledged, stop the delete thread and close the file. Safe to call twice."""
        with self._state:
            self._closed = True
            flusher = self._flusher
            self._state.notify_all()
        if flusher is not None and flusher is not threading.current_thread():
            flusher.join(5)
        try:
            self.flush()
        except sqlite3.Error:
            pass
        with self._db_lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None  # type: ignore[assignment]

    def __enter__(self) -> "Outbox":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------ internal

    def _check_open(self) -> None:
        if self._conn is None:
            raise OutboxError(f"the outbox {str(self.path)!r} is closed")

    def _flush_loop(self) -> None:
        while True:
            with self._state:
                if not self._acked and not self._closed:
                    self._state.wait(_FLUSHER_IDLE_EXIT)
                if not self._acked or self._closed:
                    self._flusher = None
                    return
            time.sleep(_FLUSH_BATCH_DELAY)  # let a few more PUBACKs join this DELETE
            try:
                self.flush()
            except sqlite3.Error:
                time.sleep(0.5)


__all__ = ["DEFAULT_MAX_BYTES", "DEFAULT_MAX_MESSAGES", "DROP_OLDEST", "FULL_POLICIES", "Outbox", "REJECT_NEW",
           "check_limits", "message_cost"]
