"""The TLS stream with OpenSSL on the socket: OpenSSL reads and writes the client's
non-blocking socket itself, and trio only waits for readiness.

Theory of operation (docs/ARCHITECTURE.md, decision 6). :class:`SocketTLSStream` is a
:class:`~proxy.tls.stream.TLSStream` whose connection has a socket BIO (``SSL_set_fd``
through binding.py, :func:`~proxy.tls.binding.attach_socket`) instead of memory BIOs, so no
ciphertext passes through Python: one ``SSL_read`` decrypts what the kernel holds (records
are read ahead), one ``SSL_write`` encrypts and sends a whole response (the socket corked
while it writes several records, so that the kernel sends full segments). "Want read" and
"want write" become one wait on the transport's readiness (``wait_until_readable`` /
``wait_until_writable`` of :class:`SocketTransport`, net/sockets.py's ``TCPStream``: the net
package owns every socket wait and option, under its timeouts), then the same call again.

What stays as in :class:`TLSStream`: the handshake's steps and their thread hand-off, what
the handshake settled, the close modes, the errors. Per connection:

* one task receives and one sends at a time (a lock each; trio allows one waiter per
  direction and descriptor). OpenSSL's state is touched only from the event loop's thread
  after the handshake, so a receive that answers a key update and a send never interleave
  records: each OpenSSL call runs to completion before the other starts;
* calls that complete at once yield to the scheduler every ``CHECKPOINT_EVERY``-th time,
  as the TCP stream does, so a bulk transfer stays fair and cancellable;
* the plaintext of ``receive_some`` lands in one buffer shared by every stream of the
  event loop's thread (decryption and the copy out happen with no await between them, and
  another thread's loop, which runs while ``SSL_read`` has the interpreter lock released,
  has its own), so an idle connection holds no receive buffer of its own.

A non-socket transport (a memory stream in tests) keeps :class:`TLSStream`'s memory BIOs:
:func:`open_tls_stream` picks the class from the transport.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import trio
from OpenSSL import SSL

from proxy.errors import TLSError
from proxy.tls.binding import (
    SSL_ERROR_SYSCALL,
    SSL_ERROR_WANT_READ,
    SSL_ERROR_WANT_WRITE,
    SSL_ERROR_ZERO_RETURN,
    attach_socket,
    ffi,
    libcrypto,
    libssl,
    openssl_errors,
)
from proxy.tls.stream import TLSStream, _acquire

_RECEIVE_SIZE = 65536
_RECORD_SIZE = 16384  # the most plaintext one TLS record holds
CHECKPOINT_EVERY = 4  # calls completed at once before one yields to the scheduler
_INT_MAX = 2**31 - 1


class _ReceiveBuffer(threading.local):
    """The one receive buffer of a thread's event loop (see the module docstring)."""

    def __init__(self) -> None:
        self.data = ffi.new(f"char[{_RECEIVE_SIZE}]")


_receive_buffer = _ReceiveBuffer()


@runtime_checkable
class SocketTransport(Protocol):
    """What a transport offers so that OpenSSL can use its socket: net/sockets.TCPStream."""

    def fileno(self) -> int: ...

    @property
    def closed(self) -> bool: ...

    async def wait_until_readable(self) -> None: ...

    async def wait_until_writable(self) -> None: ...

    def readable_now(self) -> bool: ...

    def cork(self, corked: bool) -> None: ...


class SocketTLSStream(TLSStream):
    """A server-side TLS stream whose OpenSSL reads and writes the transport's socket."""

    def __init__(
        self,
        transport: SocketTransport,
        context: SSL.Context,
        sign_limiter: trio.CapacityLimiter,
        on_server_name: Callable[[str], None] = lambda _name: None,
        max_waiting: int | None = None,
    ) -> None:
        super().__init__(
            transport,  # type: ignore[arg-type] # a TCPStream: a trio stream as well
            context,
            sign_limiter,
            on_server_name=on_server_name,
            max_waiting=max_waiting,
        )
        self._socket = transport
        self._ssl_handle = attach_socket(self._connection, transport.fileno())
        self._unchecked = 0

    # -- waiting ---------------------------------------------------------------------------

    async def _wait_for(self, error: int, holding: trio.Lock | None = None) -> None:
        """Wait for what OpenSSL asked (readable or writable). ``holding`` is the lock of
        the caller's own direction; OpenSSL seldom asks a receive to write (a ticket or a
        key update that does not fit in the socket) or a send to read, and then the wait is
        made under the other direction's lock, or skipped once that direction's task has
        moved things on (trio allows one waiter per direction and socket)."""
        self._unchecked = 0
        writable = error == SSL_ERROR_WANT_WRITE
        wait = self._socket.wait_until_writable if writable else self._socket.wait_until_readable
        other = self._send_lock if writable else self._receive_lock
        if other is holding:
            await wait()
            return
        if other.locked():
            await other.acquire()  # the other task was waiting for this: retry after it
            other.release()
            return
        async with other:
            await wait()

    async def _start(self) -> None:
        if self._socket.closed:
            raise trio.ClosedResourceError("the stream was closed")
        self._unchecked += 1
        if self._unchecked > CHECKPOINT_EVERY:
            self._unchecked = 0
            await trio.lowlevel.checkpoint()

    # -- handshake ---------------------------------------------------------------------------

    async def _run_handshake(self) -> None:
        if not self._socket.readable_now():
            # The client speaks first: a step before its hello arrives would only learn
            # "want read", at the price of a thread hop while the token is not measured fast.
            try:
                await self._socket.wait_until_readable()
            except trio.ClosedResourceError as exc:
                raise TLSError("the client went away during the handshake") from exc
        while True:
            if self._socket.closed:
                raise TLSError("the client went away during the handshake")
            outcome = await self._step()
            if outcome is None:
                return
            if outcome == "eof":
                raise TLSError("the client closed the connection during the handshake")
            if outcome == "gone":
                raise TLSError("the client went away during the handshake")
            if outcome not in ("want-read", "want-write"):
                raise TLSError(f"TLS handshake failed: {outcome}")
            try:
                if outcome == "want-write":
                    await self._socket.wait_until_writable()
                else:
                    await self._socket.wait_until_readable()
            except trio.ClosedResourceError as exc:
                raise TLSError("the client went away during the handshake") from exc

    # -- trio.abc.Stream ---------------------------------------------------------------------

    def _failure(self, result: int) -> tuple[int, str]:
        """After a failed ``SSL_read``/``SSL_write``/``SSL_shutdown`` (with nothing called
        in between, so ``errno`` is still the call's): OpenSSL's error kind, and for a
        broken connection why."""
        number = ffi.errno
        error = libssl.SSL_get_error(self._ssl_handle, result)
        if error in (SSL_ERROR_WANT_READ, SSL_ERROR_WANT_WRITE, SSL_ERROR_ZERO_RETURN):
            return error, ""
        if error == SSL_ERROR_SYSCALL and not libcrypto.ERR_peek_error():
            if result == 0 or number == 0:
                return SSL_ERROR_ZERO_RETURN, ""  # the peer closed the TCP connection
            return error, f"connection broken: {os.strerror(number)}"
        return error, f"TLS error: {openssl_errors()}"

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if not self._handshake_done:
            await self.do_handshake()
        await self._start()
        size = min(max_bytes or _RECEIVE_SIZE, _RECEIVE_SIZE)
        lock = self._receive_lock
        await _acquire(lock)
        try:
            while True:
                buffer = _receive_buffer.data
                result = libssl.SSL_read(self._ssl_handle, buffer, size)
                if result > 0:
                    return ffi.buffer(buffer, result)[:]  # type: ignore[no-any-return]
                error, reason = self._failure(result)
                if error == SSL_ERROR_ZERO_RETURN:
                    # close_notify, or (OP_IGNORE_UNEXPECTED_EOF) an end without one: h11
                    # notices a truncated message by its framing.
                    return b""
                if reason:
                    raise trio.BrokenResourceError(reason)
                await self._wait_for(error, lock)
        finally:
            lock.release()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if not self._handshake_done:
            await self.do_handshake()
        await self._start()
        plaintext = ffi.from_buffer(data)
        total = len(plaintext)
        lock = self._send_lock
        await _acquire(lock)
        try:
            if total <= _RECORD_SIZE:
                await self._write(plaintext, total)
                return
            # OpenSSL writes each record with its own write(): corked, the kernel sends
            # full segments only, and the rest once uncorked (bench/README.md, round 3).
            self._socket.cork(True)
            try:
                await self._write(plaintext, total)
            finally:
                self._socket.cork(False)
        finally:
            lock.release()

    async def _write(self, plaintext: Any, total: int) -> None:
        """``SSL_write`` until all of ``plaintext`` is taken (under the send lock)."""
        sent = 0
        while sent < total:
            # Without partial writes, SSL_write returns only once all it was given is
            # out; after "want write" it is called again with the same bytes.
            size = min(total - sent, _INT_MAX)
            result = libssl.SSL_write(self._ssl_handle, plaintext + sent, size)
            if result > 0:
                sent += result
                continue
            error, reason = self._failure(result)
            if error == SSL_ERROR_ZERO_RETURN:
                raise trio.BrokenResourceError("the peer closed the connection")
            if reason:
                raise trio.BrokenResourceError(reason)
            await self._wait_for(error, self._send_lock)

    async def wait_send_all_might_not_block(self) -> None:
        await self._socket.wait_until_writable()

    async def _send_close_notify(self) -> None:
        """close_notify straight onto the socket, waiting while the socket is full."""
        if self._socket.closed:
            return
        await _acquire(self._send_lock)
        try:
            while True:
                result = libssl.SSL_shutdown(self._ssl_handle)
                if result >= 0:
                    return
                error, reason = self._failure(result)
                if reason or error not in (SSL_ERROR_WANT_READ, SSL_ERROR_WANT_WRITE):
                    libcrypto.ERR_clear_error()
                    return
                if error == SSL_ERROR_WANT_READ:
                    return  # sent; OpenSSL would wait for the peer's: we never do
                await self._wait_for(error, self._send_lock)
        finally:
            self._send_lock.release()


_ON_SOCKET: dict[type, bool] = {}


def open_tls_stream(
    transport: trio.abc.Stream,
    context: SSL.Context,
    sign_limiter: trio.CapacityLimiter,
    on_server_name: Callable[[str], None] = lambda _name: None,
    max_waiting: int | None = None,
) -> TLSStream:
    """A server-side TLS stream over ``transport``: OpenSSL on its socket when it has one
    (:class:`SocketTransport`), memory BIOs otherwise."""
    kind = type(transport)
    on_socket = _ON_SOCKET.get(kind)
    if on_socket is None:  # a runtime Protocol check is slow: once per transport type
        on_socket = _ON_SOCKET[kind] = isinstance(transport, SocketTransport)
    cls: Any = SocketTLSStream if on_socket else TLSStream
    stream: TLSStream = cls(
        transport, context, sign_limiter, on_server_name=on_server_name, max_waiting=max_waiting
    )
    return stream
