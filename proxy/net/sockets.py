"""TCP streams for the forwarding path: each operation is tried at once, and only an
operation the kernel says would block waits, within the stream's timeout.

Theory of operation. ``trio.SocketStream`` makes every call a full checkpoint: it checks
for cancellation before the system call and yields to the scheduler after it, and a
receive with nothing buffered first raises ``BlockingIOError`` inside trio. A keep-alive
request crosses four such calls (the client's TLS bytes in, the request out to the
upstream, the response in, the TLS bytes out), and in the benchmark's keep-alive scenario
those checkpoints and the per-call ``fail_after`` scopes around them were a large part of
the proxy's CPU. :class:`TCPStream` keeps trio's semantics where they matter: a call that
must wait waits in ``trio.lowlevel.wait_readable``/``wait_writable`` (a checkpoint, so
cancellation and other tasks run), and that wait alone is bounded by ``receive_timeout``
or ``send_timeout`` (``trio.TooSlowError``): a timeout measures a stall, not the length of
a large transfer. A call the kernel completes at once does not yield, except every
``CHECKPOINT_EVERY``-th call in a row: a keep-alive request waits at least once anyway
(for the upstream's answer), but a bulk transfer (a large body, a WebSocket tunnel) on
fast sockets may never have to wait, and must still let other connections run and be
cancellable (timeouts, the shutdown grace period).

Errors are trio's: ``trio.ClosedResourceError`` after :meth:`TCPStream.aclose`,
``trio.BrokenResourceError`` (from the ``OSError``) for a reset or broken connection.

The net package is the only one that awaits on sockets: everything above it (the
protocol handlers, the upstream pool) works on these streams.
"""

from __future__ import annotations

import errno
import os
import select
import socket
from collections.abc import Callable
from contextlib import suppress
from functools import partial
from typing import TypeVar

import trio

DEFAULT_RECEIVE_SIZE = 65536
_Received = TypeVar("_Received", bytes, int)
_TCP_CORK: int | None = getattr(socket, "TCP_CORK", None)  # Linux
CHECKPOINT_EVERY = 4  # calls completed at once before one yields to the scheduler


class TCPStream(trio.abc.HalfCloseableStream):
    """A connected TCP socket as a trio stream, with per-wait timeouts (None: no limit)."""

    def __init__(
        self,
        sock: socket.socket,
        receive_timeout: float | None = None,
        send_timeout: float | None = None,
    ) -> None:
        sock.setblocking(False)
        self.socket = sock
        self.receive_timeout = receive_timeout
        self.send_timeout = send_timeout
        self._closed = False
        self._unchecked = 0  # calls completed at once since the last checkpoint

    @classmethod
    def from_trio(cls, stream: trio.SocketStream) -> TCPStream:
        """Take over the socket of a ``trio.SocketStream`` (the stream is unusable after)."""
        trio_socket = stream.socket
        # Family, type and protocol given, so that Python does not ask the kernel for them.
        family, kind, protocol = trio_socket.family, trio_socket.type, trio_socket.proto
        return cls(socket.socket(family, kind, protocol, fileno=trio_socket.detach()))

    async def _start(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the stream was closed")
        if self._unchecked >= CHECKPOINT_EVERY:
            # Before the system call, so that a cancellation here loses no data.
            self._unchecked = 0
            await trio.lowlevel.checkpoint()

    async def _wait(self, readable: bool) -> None:
        self._unchecked = 0
        timeout = self.receive_timeout if readable else self.send_timeout
        wait = trio.lowlevel.wait_readable if readable else trio.lowlevel.wait_writable
        if timeout is None:
            await wait(self.socket)
            return
        # trio.fail_after, without its generator-based context manager (once per request).
        with trio.CancelScope(deadline=trio.current_time() + timeout) as scope:
            await wait(self.socket)
        if scope.cancelled_caught:
            raise trio.TooSlowError

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self._receive(partial(self.socket.recv, max_bytes or DEFAULT_RECEIVE_SIZE))

    async def receive_into(self, buffer: bytearray, wait_first: bool = False) -> int:
        """Receive into ``buffer`` (no new bytes object per read: a relayed body's reads
        reuse one); the count, 0 at the end of the stream. ``wait_first`` waits for
        readability before the first try: for an answer that cannot be there yet (just
        after a request went out), which saves a receive that would fail."""
        return await self._receive(partial(self.socket.recv_into, buffer), wait_first)

    async def _receive(
        self, attempt: Callable[[], _Received], wait_first: bool = False
    ) -> _Received:
        """``attempt`` (one receive system call) at once, else after waiting for
        readability, within the receive timeout."""
        await self._start()
        waited = False
        if wait_first:
            await self._wait(readable=True)
            waited = True
        while True:
            if self._closed:
                raise trio.ClosedResourceError("the stream was closed")
            try:
                received = attempt()
            except BlockingIOError:
                pass
            except OSError as exc:
                raise self._broken(exc) from exc
            else:
                if not waited:
                    self._unchecked += 1
                return received
            await self._wait(readable=True)
            waited = True

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._start()
        view = memoryview(data)
        total = len(view)
        sent = 0
        waited = False
        while True:
            try:
                sent += self.socket.send(view[sent:] if sent else view)
            except BlockingIOError:
                pass
            except OSError as exc:
                raise self._broken(exc) from exc
            if sent >= total:
                if not waited:
                    self._unchecked += 1
                return
            await self._wait(readable=False)
            waited = True
            if self._closed:
                raise trio.ClosedResourceError("the stream was closed")

    # For a TLS stream whose OpenSSL reads and writes this socket itself (tls/stream.py):
    # the descriptor, and the waits for readiness under this stream's timeouts.

    def fileno(self) -> int:
        return self.socket.fileno()

    def cork(self, corked: bool) -> None:
        """Hold partial segments back while a large send is written in many pieces
        (``TCP_CORK``: full segments go at once, the rest when uncorked). OpenSSL writes a
        response record by record, one ``write`` per 16 KiB; corked, the kernel does the
        per-send TCP work once per segment instead of once per record (bench scenario 4,
        interleaved A/Bs: gathering the records in a buffering BIO took 8% off the CPU per
        MiB, and corking instead 16% more, with no copy). Where the option is missing or
        the socket is gone, nothing happens."""
        if _TCP_CORK is not None:
            with suppress(OSError):
                self.socket.setsockopt(socket.IPPROTO_TCP, _TCP_CORK, 1 if corked else 0)

    @property
    def closed(self) -> bool:
        return self._closed

    async def wait_until_readable(self) -> None:
        """Wait until the socket is readable, within ``receive_timeout``
        (``trio.TooSlowError``); ``trio.ClosedResourceError`` once the stream is closed."""
        if self._closed:
            raise trio.ClosedResourceError("the stream was closed")
        await self._wait(readable=True)
        if self._closed:
            raise trio.ClosedResourceError("the stream was closed")

    async def wait_until_writable(self) -> None:
        """Wait until the socket is writable, within ``send_timeout``."""
        if self._closed:
            raise trio.ClosedResourceError("the stream was closed")
        await self._wait(readable=False)
        if self._closed:
            raise trio.ClosedResourceError("the stream was closed")

    async def wait_send_all_might_not_block(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the stream was closed")
        await trio.lowlevel.wait_writable(self.socket)

    async def send_eof(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the stream was closed")
        await trio.lowlevel.checkpoint()
        try:
            self.socket.shutdown(socket.SHUT_WR)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:  # the peer is already gone: nothing to end
                raise self._broken(exc) from exc

    def addresses(self) -> tuple[tuple[str, int], tuple[str, int]]:
        """The peer's and our own (host, port) of this connection. Raises ``OSError`` for a
        socket that is no longer connected."""
        peer = self.socket.getpeername()
        local = self.socket.getsockname()
        return (peer[0], peer[1]), (local[0], local[1])

    def readable_now(self) -> bool:
        """Whether a receive would not block: on an idle keep-alive connection, the peer
        closed it (or is talking out of turn). A closed stream counts as readable."""
        try:
            readable, _, _ = select.select([self.socket.fileno()], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def close(self) -> None:
        """Close at once (synchronously): for pools and error paths."""
        if self._closed:
            return
        self._closed = True
        # Wakes a task waiting on the socket; outside trio (a pool closed at exit) nobody can.
        with suppress(RuntimeError):
            trio.lowlevel.notify_closing(self.socket)
        self.socket.close()

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()

    def _broken(self, exc: OSError) -> trio.BrokenResourceError:
        return trio.BrokenResourceError(f"connection broken: {exc.strerror or exc}")


async def connect_tcp(host: str, port: int) -> TCPStream:
    """A TCP connection to ``host``:``port`` (each address in turn, happy eyeballs as trio
    does it); the caller bounds it with a timeout. Raises ``OSError``: when every attempt
    failed the same way, one that says how ("Connection refused") rather than trio's "all
    attempts to connect to HOST:PORT failed"."""
    try:
        stream = await trio.open_tcp_stream(host, port)
    except OSError as exc:
        cause = exc.__cause__
        if isinstance(cause, BaseExceptionGroup):
            numbers = {getattr(error, "errno", None) for error in cause.exceptions}
            number = numbers.pop() if len(numbers) == 1 else None
            if number is not None:
                raise OSError(number, os.strerror(number)) from exc
        raise
    return TCPStream.from_trio(stream)


def try_connect(host: str, port: int, timeout: float) -> None:
    """Open and close one TCP connection, blocking (``hsm-proxy check``, outside trio).
    Raises ``TimeoutError`` or ``OSError``."""
    with socket.create_connection((host, port), timeout=timeout):
        pass
