"""One server-side TLS connection, driven over memory BIOs by a small asyncio protocol.

Why not ``loop.start_tls``: asyncio's TLS layer gives every connection a 256 KiB receive buffer the moment
it is accepted (Python 3.11+), so 500 silent TCP connections cost ~130 MB, and after they close glibc keeps
most of it. Here a connection that has not finished its handshake costs a transport, this object and one
timer: the ``ssl.SSLObject`` is only made when the first byte arrives, socket reads go through one receive
buffer shared by every connection of the hub (the loop is single-threaded, and each read is copied into
the connection's BIO before the next one happens), and decrypted bytes are buffered up to ``read_limit``
before reading from the socket pauses.

Life cycle: the hub's ``on_made(channel)`` decides whether to keep it (False: it was aborted, e.g. over the
connection cap), ``on_handshake(channel)`` runs once the handshake succeeded, ``on_failure(channel, reason,
timed_out)`` once it failed, timed out or the peer left first, ``on_lost(channel)`` when the socket is gone.
After the handshake the owner reads with :meth:`read`, writes with :meth:`write` and :meth:`drain`, and
ends with :meth:`close` or :meth:`abort`.
"""
from __future__ import annotations

import asyncio
import ssl
from typing import Callable, Optional

#: Largest chunk taken out of the TLS layer at a time (one TLS record's worth).
_RECORD = 16384


class TlsChannel(asyncio.BufferedProtocol):
    def __init__(self, context: ssl.SSLContext, receive_buffer: memoryview, *,
                 on_made: Callable[["TlsChannel"], bool],
                 on_handshake: Callable[["TlsChannel"], None],
                 on_failure: Callable[["TlsChannel", str, bool], None],
                 on_lost: Callable[["TlsChannel"], None],
                 handshake_timeout: float, read_limit: int = 65536):
        self._context = context
        self._receive_buffer = receive_buffer
        self._on_made = on_made
        self._on_handshake = on_handshake
        self._on_failure = on_failure
        self._on_lost = on_lost
        self._handshake_timeout = handshake_timeout
        self._read_limit = read_limit
        self.transport: Optional[asyncio.Transport] = None
        self.peer = "?"
        self.ssl_object: Optional[ssl.SSLObject] = None
        self._incoming: Optional[ssl.MemoryBIO] = None
        self._outgoing: Optional[ssl.MemoryBIO] = None
        self._timer: Optional[asyncio.TimerHandle] = None
        self._secure = False        # handshake done
        self._settled = False       # on_handshake or on_failure has run
        self._plain = bytearray()
        self._eof = False
        self._error: Optional[BaseException] = None
        self._reading_paused = False
        self._writing_paused = False
        self._waiter: Optional[asyncio.Future] = None
        self._lost: Optional[asyncio.Future] = None

    # ------------------------------------------------------------------ asyncio protocol callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername") or ("?", 0)
        self.peer = f"{peer[0]}:{peer[1]}"
        if not self._on_made(self):     # over the connection cap: already aborted and counted
            self._settled = True
            return
        loop = asyncio.get_running_loop()
        self._lost = loop.create_future()
        self._timer = loop.call_later(self._handshake_timeout, self._handshake_timed_out)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._receive_buffer

    def buffer_updated(self, nbytes: int) -> None:
        if self.ssl_object is None:
            self._incoming, self._outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            self.ssl_object = self._context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._incoming.write(self._receive_buffer[:nbytes])
        self._pump()

    def eof_received(self) -> bool:
        self._eof = True
        if not self._secure:
            self._fail("the peer closed the connection before the TLS handshake completed")
        self._wake()
        return True  # keep the transport: a CONNACK or a close_notify may still have to go out

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._wake()

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self._eof = True
        if self._timer is not None:
            self._timer.cancel()
        if not self._settled:
            self._fail(f"the connection was lost during the TLS handshake ({exc or 'closed'})")
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)
        self._on_lost(self)
        self._wake()

    # ------------------------------------------------------------------ TLS

    def _pump(self) -> None:
        """Advance the handshake, then decrypt what fits under the read limit; send what TLS produced."""
        try:
            if not self._secure:
                self.ssl_object.do_handshake()
                self._secure = True
                if self._timer is not None:
                    self._timer.cancel()
            while len(self._plain) < self._read_limit:
                chunk = self.ssl_object.read(_RECORD)
                if not chunk:           # the peer's close_notify
                    self._eof = True
                    break
                self._plain += chunk
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            self._eof = True
        except ssl.SSLError as exc:
            self._error = exc
        self._flush()
        if self._error is not None and not self._secure:
            self._fail(f"{getattr(self._error, 'reason', None) or type(self._error).__name__}: {self._error}")
            return
        if self._secure and not self._settled:
            self._settled = True
            self._on_handshake(self)
        if len(self._plain) >= self._read_limit and not self._reading_paused and not self._eof:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def _flush(self) -> None:
        if self._outgoing is not None and self._outgoing.pending and not self.transport.is_closing():
            self.transport.write(self._outgoing.read())

    def _fail(self, reason: str, timed_out: bool = False) -> None:
        if self._settled:
            return
        self._settled = True
        if self._timer is not None:
            self._timer.cancel()
        self._on_failure(self, reason, timed_out)
        self.abort()

    def _handshake_timed_out(self) -> None:
        self._fail(f"no completed TLS handshake within {self._handshake_timeout:g} s", timed_out=True)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    # ------------------------------------------------------------------ the owner's side

    async def read(self) -> bytes:
        """Decrypted bytes, at most ``read_limit``; b"" at the end of the stream."""
        while not self._plain:
            if self._error is not None:
                raise self._error
            if self._eof:
                return b""
            await self._wait()
        data = bytes(self._plain)
        self._plain.clear()
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resume_reading()
            # Records already in the BIO (or the peer's last ones before its EOF) would otherwise wait
            # for a socket read that may never come.
            self._pump()
        return data

    def write(self, data: bytes) -> None:
        if self.transport.is_closing():
            return
        try:
            self.ssl_object.write(data)
        except ssl.SSLError as exc:
            self._error = exc
            self.abort()
            return
        self._flush()

    def write_buffer_size(self) -> int:
        return self.transport.get_write_buffer_size() + (self._outgoing.pending if self._outgoing else 0)

    async def drain(self) -> None:
        """Wait while the socket's send buffer is above its high-water mark."""
        while self._writing_paused and not self.transport.is_closing():
            await self._wait()

    async def close(self, timeout: float) -> None:
        """Send close_notify and what is still buffered, then close; abort after ``timeout`` seconds."""
        if self.transport.is_closing():
            return
        try:
            self.ssl_object.unwrap()
        except (ssl.SSLError, ValueError):
            pass  # SSLWantReadError: the peer's close_notify is not awaited, as the hub does not
        self._flush()
        self.transport.close()
        try:
            await asyncio.wait_for(asyncio.shield(self._lost), timeout)
        except asyncio.TimeoutError:
            self.abort()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
