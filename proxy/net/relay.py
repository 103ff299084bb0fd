"""A byte relay between two half-closeable streams: the core of TCP passthrough.

Theory of operation. :meth:`Relay.run` moves bytes both ways between a client stream (the
decrypted TLS stream) and an upstream stream (plaintext TCP), byte for byte, in two
pumps, one per direction. A pump reads at most ``receive_size`` bytes and sends them whole
before it reads again: that one bounded buffer per direction is all the relay holds, and
a side that stops reading stops the other side's sending through TCP flow control
(backpressure), however much the other side has to say.

Half-close is carried both ways: the end of one side's stream (a TCP FIN, or a TLS
close_notify, both read as ``b""``) becomes ``send_eof`` on the other side (a TCP
half-close, or a close_notify), and the other direction keeps flowing until its own end.
The relay ends

* when both directions have ended: closed by the side that ended first;
* when either side breaks (a reset, a TLS error): the other direction stops too, and
  :attr:`RelayEnd.broken` says which side it was;
* when no byte moved either way for ``idle_timeout`` seconds (a watchdog task reads the
  time of the last move, so moving bytes costs one clock read, not a timer per chunk);
* at ``max_lifetime`` seconds after it started, when one is given;
* when the caller's scope is cancelled (the server's drain deadline): then nothing is
  returned, and :attr:`Relay.bytes_up`/:attr:`Relay.bytes_down` still tell what moved.

A write to the client cut off by the idle timeout or the lifetime may have left a
partial TLS record on the wire; :attr:`RelayEnd.clean` is False then, so the caller
aborts instead of appending a close_notify to it.

The relay knows nothing of TLS, PROXY headers or metrics beyond the ``on_moved`` hook.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

import trio

RECEIVE_SIZE = 65536
_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError)


class Side(enum.Enum):
    CLIENT = "client"
    UPSTREAM = "upstream"


@dataclass(frozen=True)
class RelayEnd:
    """How a relay ended: ``closed_by`` is client, upstream, idle_timeout or max_lifetime."""

    closed_by: str
    reason: str
    broken: Side | None = None  # the side that reset or failed, if one did
    clean: bool = True  # no write to the client was cut off in the middle


class Relay:
    """Bytes both ways between ``client`` and ``upstream`` until both ended (see above)."""

    def __init__(
        self,
        client: trio.abc.HalfCloseableStream,
        upstream: trio.abc.HalfCloseableStream,
        idle_timeout: float,
        max_lifetime: float | None = None,
        on_moved: Callable[[Side, int], None] | None = None,
        receive_size: int = RECEIVE_SIZE,
    ) -> None:
        self.client = client
        self.upstream = upstream
        self.idle_timeout = idle_timeout
        self.max_lifetime = max_lifetime
        self.on_moved = on_moved
        self.receive_size = receive_size
        self.bytes_up = 0  # client to upstream
        self.bytes_down = 0  # upstream to client
        self._last_move = 0.0
        self._ended: list[Side] = []  # sources whose stream ended, in order
        self._end: RelayEnd | None = None
        self._writing_to_client = False

    async def run(self) -> RelayEnd:
        self._last_move = trio.current_time()
        async with trio.open_nursery() as nursery:
            if self.max_lifetime:
                nursery.cancel_scope.deadline = trio.current_time() + self.max_lifetime
            nursery.start_soon(self._pump, Side.CLIENT, nursery.cancel_scope)
            nursery.start_soon(self._pump, Side.UPSTREAM, nursery.cancel_scope)
            nursery.start_soon(self._watch_idle, nursery.cancel_scope)
        if self._end is not None:
            return self._end
        if len(self._ended) == 2:
            first = self._ended[0].value
            return RelayEnd(first, f"{first} ended its stream first, then the other side")
        # Only the lifetime deadline cancels the nursery without saying why.
        return RelayEnd(
            "max_lifetime",
            f"open for {self.max_lifetime:g}s (tcp.max_lifetime)",
            clean=not self._writing_to_client,
        )

    async def _pump(self, source_side: Side, done: trio.CancelScope) -> None:
        """One direction: from ``source_side`` to the other, then its end of stream."""
        to_client = source_side is Side.UPSTREAM
        source, sink = (self.upstream, self.client) if to_client else (self.client, self.upstream)
        sink_side = Side.CLIENT if to_client else Side.UPSTREAM
        while True:
            try:
                data = await source.receive_some(self.receive_size)
            except _STREAM_ERRORS as exc:
                self._broke(source_side, exc, done)
                return
            if not data:
                break
            self._last_move = trio.current_time()
            if to_client:
                self._writing_to_client = True
            try:
                await sink.send_all(data)
            except _STREAM_ERRORS as exc:
                self._broke(sink_side, exc, done)
                return
            if to_client:
                self._writing_to_client = False
            self._last_move = trio.current_time()
            if to_client:
                self.bytes_down += len(data)
            else:
                self.bytes_up += len(data)
            if self.on_moved is not None:
                self.on_moved(source_side, len(data))
        self._ended.append(source_side)
        try:
            await sink.send_eof()
        except _STREAM_ERRORS as exc:
            self._broke(sink_side, exc, done)
            return
        if len(self._ended) == 2:
            done.cancel()  # both directions are over: stop the watchdog

    def _broke(self, side: Side, exc: BaseException, done: trio.CancelScope) -> None:
        if self._end is None:
            self._end = RelayEnd(side.value, f"{side.value} broke the connection: {exc}", side)
        done.cancel()

    async def _watch_idle(self, done: trio.CancelScope) -> None:
        while True:
            deadline = self._last_move + self.idle_timeout
            if trio.current_time() >= deadline:
                if self._end is None:
                    self._end = RelayEnd(
                        "idle_timeout",
                        f"no byte either way for {self.idle_timeout:g}s (tcp.idle_timeout)",
                        clean=not self._writing_to_client,
                    )
                done.cancel()
                return
            await trio.sleep_until(deadline)
