"""Connections to upstream backends: plaintext HTTP/1.1 over TCP, driven by h11, and a
keep-alive pool per upstream group.

Theory of operation. An :class:`UpstreamConnection` is one TCP stream to a backend and the
``h11.Connection(CLIENT)`` that speaks on it. It carries one request at a time and, while
both sides keep it alive, goes back to its :class:`UpstreamPool` between requests.

A pool belongs to one upstream group (config ``[upstreams.NAME]`` or the top-level
``upstream``). :meth:`UpstreamPool.acquire` hands out the most recently used idle
connection that is neither expired (``http.pool_idle_timeout``) nor readable (an idle
keep-alive connection that became readable was closed by the backend, or is talking out of
turn: either way it is not reused), else connects a new one. Addresses are chosen by the
group's :class:`Balancer` (net/balancer.py): round-robin, and an address that cannot be
connected to is skipped for ``http.down_time`` seconds while the next one is tried, so one
dead backend costs one failed connect, not one per request. :meth:`UpstreamPool.release`
keeps at most ``http.pool_size`` idle connections per address and closes the rest, and
never keeps one that holds bytes beyond the response (a backend that sent a body with a
304, say: those bytes would be read as the next response). The server's sweeper calls
:meth:`UpstreamPool.sweep` to close expired idle connections nobody asked for.

Timeouts turn into :class:`UpstreamFailure` with the ``status`` the server sends to the
client: 502 when the backend cannot be reached or breaks the protocol, 504 when it is too
slow. ``sent_nothing`` on a failure tells the server whether any byte of the request left
(only then may it retry on a fresh connection without risking a duplicate).

Sockets themselves are net/sockets.py's: this module connects and reads through its
:class:`TCPStream`.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass

import h11
import trio

from proxy.config import HTTPConfig, ProxyConfig, Route, UpstreamConfig, UpstreamGroup
from proxy.errors import UpstreamError
from proxy.net.balancer import Balancer
from proxy.net.sockets import TCPStream, connect_tcp

# Large reads from backends: fewer h11 events and TLS batches per MiB (bench scenario 4);
# bounded per read, so memory stays flat however large the body.
_RECEIVE_SIZE = 262144


class _ReceiveBuffer(threading.local):
    """The one buffer every upstream read of a thread's event loop lands in: each read goes
    straight on into h11 (which copies it) with no await between, so a relayed body costs
    no new bytes object per read (bench/README.md, issue 13 round 3). Per thread, since
    the kernel fills it with the interpreter lock released."""

    def __init__(self) -> None:
        self.data = bytearray(_RECEIVE_SIZE)
        self.view = memoryview(self.data)


_receive_buffer = _ReceiveBuffer()


class UpstreamFailure(UpstreamError):
    """An upstream error with the HTTP status the client should get for it."""

    def __init__(
        self, message: str, status: int, sent_nothing: bool = False, kind: str = "other"
    ) -> None:
        super().__init__(message)
        # For metrics: connect, connect_timeout, read_timeout, reset, protocol, other.
        self.kind = kind
        self.status = status
        self.sent_nothing = sent_nothing


class UpstreamConnection:
    """One keep-alive capable HTTP/1.1 connection to an upstream."""

    def __init__(
        self, config: UpstreamConfig, stream: TCPStream, read_timeout: float = 60.0
    ) -> None:
        self.config = config
        # The address as logs and access lines name it, rendered once per connection.
        self.label = str(config)
        # Every wait on the backend, to send or to receive, is bounded by the read timeout.
        stream.receive_timeout = stream.send_timeout = read_timeout
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)
        self.read_timeout = read_timeout
        self.bytes_received = 0
        self.bytes_sent = 0
        self.requests = 0
        self.idle_since = 0.0

    @classmethod
    async def connect(
        cls, config: UpstreamConfig, connect_timeout: float = 5.0, read_timeout: float = 60.0
    ) -> UpstreamConnection:
        try:
            with trio.fail_after(connect_timeout):
                stream = await connect_tcp(config.host, config.port)
        except trio.TooSlowError:
            raise UpstreamFailure(
                f"connecting to upstream {config} timed out after {connect_timeout:g}s",
                504,
                sent_nothing=True,
                kind="connect_timeout",
            ) from None
        except OSError as exc:
            raise UpstreamFailure(
                f"cannot connect to upstream {config}: {exc.strerror or exc}",
                502,
                sent_nothing=True,
                kind="connect",
            ) from None
        return cls(config, stream, read_timeout)

    @property
    def reusable(self) -> bool:
        return self.h11.our_state is h11.IDLE and self.h11.their_state is h11.IDLE

    @property
    def exchange_complete(self) -> bool:
        """Both sides finished one request/response and the connection may carry another."""
        return self.h11.our_state is h11.DONE and self.h11.their_state is h11.DONE

    def looks_closed(self) -> bool:
        """An idle connection that is readable was closed by the backend (or misbehaves)."""
        return self.stream.readable_now()

    async def send_data(self, data: bytes) -> None:
        if data:
            try:
                await self.stream.send_all(data)
            except trio.TooSlowError:
                raise UpstreamFailure(
                    f"upstream {self.config} took nothing for {self.read_timeout:g}s",
                    504,
                    kind="write_timeout",
                ) from None
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise UpstreamFailure(
                    f"upstream {self.config} closed the connection",
                    502,
                    sent_nothing=self.bytes_sent == 0,
                    kind="reset",
                ) from exc
            self.bytes_sent += len(data)

    def encode(self, event: h11.Event) -> bytes:
        """The bytes that send ``event`` (no I/O: batch them with :meth:`send_data`)."""
        return self.h11.send(event) or b""

    async def send(self, *events: h11.Event) -> None:
        await self.send_data(b"".join(self.encode(event) for event in events))

    @property
    def may_answer_early(self) -> bool:
        """The upstream could have answered before it took the whole request (a 413 or 401
        from the head alone)."""
        return self.h11.their_state is h11.SEND_RESPONSE and self.h11.our_state is not h11.DONE

    async def receive_more(self) -> None:
        """Read more of the response, within the read timeout."""
        await self._receive(wait_first=False)

    def take_over(self) -> tuple[TCPStream, bytes]:
        """After a 101 answer: the raw stream, and the bytes already read beyond the head.
        The HTTP side of this connection is over; the timeouts are lifted (a tunnel may stay
        quiet, or wait for the upstream to read, as long as both sides like)."""
        self.stream.receive_timeout = self.stream.send_timeout = None
        return self.stream, self.h11.trailing_data[0]

    def next_event_nowait(self) -> h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED]:
        """The next event h11 can produce from bytes already received (no I/O)."""
        try:
            return self.h11.next_event()  # type: ignore[return-value]
        except h11.RemoteProtocolError as exc:
            raise UpstreamFailure(
                f"upstream {self.config} broke HTTP/1.1: {exc}", 502, kind="protocol"
            ) from None

    async def _receive(self, wait_first: bool) -> None:
        """Raw bytes from the upstream into h11 within the read timeout (none: its end).
        ``wait_first``: nothing can have come yet, so wait for readability before trying."""
        buffer = _receive_buffer
        try:
            count = await self.stream.receive_into(buffer.data, wait_first)
        except trio.TooSlowError:
            raise UpstreamFailure(
                f"upstream {self.config} sent nothing for {self.read_timeout:g}s",
                504,
                kind="read_timeout",
            ) from None
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise UpstreamFailure(
                f"upstream {self.config} reset the connection", 502, kind="reset"
            ) from exc
        self.bytes_received += count
        self.h11.receive_data(buffer.view[:count])  # type: ignore[arg-type] # h11 copies it

    async def next_event(self) -> h11.Event:
        """The next event from the upstream, reading as needed, within the read timeout."""
        connection = self.h11
        if connection.their_state is h11.SEND_RESPONSE and not any(connection.trailing_data):
            # Waiting for a response head with nothing buffered: h11 could only say
            # NEED_DATA, and the socket is not readable yet either (the request just left).
            await self._receive(wait_first=True)
        while True:
            event = self.next_event_nowait()
            if event is not h11.NEED_DATA:
                return event  # type: ignore[return-value]
            await self._receive(wait_first=False)

    def start_next_cycle(self) -> None:
        self.h11.start_next_cycle()

    async def aclose(self) -> None:
        await self.stream.aclose()


async def connect_first(
    servers: Sequence[UpstreamConfig],
    http: HTTPConfig,
    on_failure: Callable[[UpstreamConfig, UpstreamFailure], None] | None = None,
) -> UpstreamConnection:
    """A connection to the first of ``servers`` that accepts one, in order; the last
    failure when none does. ``on_failure`` hears of each address that failed."""
    failure: UpstreamFailure | None = None
    for server in servers:
        try:
            return await UpstreamConnection.connect(server, http.connect_timeout, http.read_timeout)
        except UpstreamFailure as exc:
            if on_failure is not None:
                on_failure(server, exc)
            failure = exc
    if failure is None:
        raise UpstreamFailure("no upstream address to connect to", 502, sent_nothing=True)
    raise failure


class UpstreamPool:
    """Keep-alive connections and address selection for one upstream group."""

    def __init__(self, group: UpstreamGroup, http: HTTPConfig) -> None:
        self.group = group
        self.http = http
        # Keyed by the address object's identity (the group's own objects, kept alive by
        # it): hashing a frozen dataclass hashes every field, twice per request.
        self._idle: dict[int, deque[UpstreamConnection]] = {
            id(server): deque() for server in group.servers
        }
        # The Host a forwarded request names when the client sent none, rendered once.
        self.authority = group.servers[0].authority
        self._balancer = Balancer(group, http.down_time)
        self.connections_opened = 0

    def _take_idle(self, server: UpstreamConfig) -> UpstreamConnection | None:
        idle = self._idle[id(server)]
        now = time.monotonic()
        while idle:
            connection = idle.pop()  # most recently used: the least likely to be stale
            if now - connection.idle_since < self.http.pool_idle_timeout and not (
                connection.looks_closed()
            ):
                return connection
            connection.stream.close()
        return None

    async def _connect(self, candidates: Sequence[UpstreamConfig]) -> UpstreamConnection:
        def mark_down(server: UpstreamConfig, failure: UpstreamFailure) -> None:
            self._balancer.mark_down(server, str(failure))

        connection = await connect_first(candidates, self.http, mark_down)
        self._balancer.mark_up(connection.config)
        self.connections_opened += 1
        return connection

    async def connect(self) -> UpstreamConnection:
        """A new connection to the next address that accepts one."""
        return await self._connect(self._balancer.candidates())

    async def acquire(self) -> tuple[UpstreamConnection, bool]:
        """A connection for one request, and whether it was reused from the pool: requests
        go round-robin over the addresses, each address with its own idle connections."""
        candidates = self._balancer.candidates()
        connection = self._take_idle(candidates[0])
        if connection is not None:
            return connection, True
        return await self._connect(candidates), False

    async def release(self, connection: UpstreamConnection) -> None:
        """Return a connection after a complete exchange; keep it if it can be reused."""
        if connection.exchange_complete:
            with suppress(h11.LocalProtocolError):
                connection.start_next_cycle()
        idle = self._idle.get(id(connection.config))
        if (
            connection.reusable
            and idle is not None
            and len(idle) < self.http.pool_size
            and not connection.h11.trailing_data[0]
        ):
            connection.bytes_sent = connection.bytes_received = 0  # they count one exchange
            connection.idle_since = time.monotonic()
            connection.requests += 1
            idle.append(connection)
            return
        await connection.aclose()

    def sweep(self) -> None:
        """Close idle connections past their idle timeout."""
        now = time.monotonic()
        for idle in self._idle.values():
            while idle and now - idle[0].idle_since >= self.http.pool_idle_timeout:
                idle.popleft().stream.close()

    def close(self) -> None:
        for idle in self._idle.values():
            while idle:
                idle.popleft().stream.close()


@dataclass(frozen=True)
class Routing:
    """The upstream pools and routes one configuration uses."""

    routes: tuple[Route, ...]
    pools: dict[str, UpstreamPool]


class UpstreamPools:
    """Every upstream pool of a server, shared by the protocol handlers that forward HTTP
    (HTTP/1.1 and HTTP/2 clients reach the same keep-alive connections), and by every
    configuration that names the same upstream group with the same ``[http]`` settings."""

    def __init__(self) -> None:
        self._pools: dict[tuple[UpstreamGroup, HTTPConfig], UpstreamPool] = {}
        self._routing: tuple[ProxyConfig, Routing] | None = None

    def routing(self, config: ProxyConfig) -> Routing:
        if self._routing is not None and self._routing[0] is config:
            return self._routing[1]
        pools = {}
        for group in config.upstream_groups():
            if group.tcp:
                continue  # served by the TCP passthrough handler
            key = (group, config.http)
            if key not in self._pools:
                self._pools[key] = UpstreamPool(group, config.http)
            pools[group.name] = self._pools[key]
        routing = Routing(config.routes, pools)
        self._routing = (config, routing)
        return routing

    def sweep(self) -> None:
        for pool in list(self._pools.values()):
            pool.sweep()

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
