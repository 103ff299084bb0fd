"""The server: TLS listeners, one task per connection, and the forwarding loop.

Theory of operation. :func:`serve` binds the listeners and accepts at most
``http.max_connections`` client connections at a time (more wait in the kernel's listen
backlog). A connection task takes the current :class:`Generation` once (a reload never
changes a connection under way), completes the TLS handshake within the configured
timeout, then reads requests with an ``h11.Connection(SERVER)``, one at a time and in
order (pipelined requests wait in h11's buffer until the previous response is complete).

For each request the rules in http.py check it (limits, ambiguous framing), choose the
upstream group, and rewrite the head; an :class:`UpstreamPool` per group lends a
keep-alive connection for the one exchange. The request body is streamed up and the
response streamed back with backpressure: one buffer of at most 64 KiB per direction is
in flight, so memory does not grow with the body. Everything h11 can produce from bytes
already received goes out in one send, so a response head leaves with its first body
bytes (one TLS record for a small response). A 101 answer to an Upgrade request turns the
connection into a byte tunnel both ways until either side closes.

Timeouts: the first request head must arrive within ``http.header_timeout`` of the
handshake, later ones within it of their first byte (408); a kept-alive connection idles
at most ``http.idle_timeout`` (closed silently); a request body that stalls for
``http.body_timeout`` gets 408; the upstream's connect and read timeouts are upstream.py's.

Failure handling: a malformed or ambiguous request gets its status (400, 408, 413, 414,
431, 501) and the connection is closed with a lingering close (close_notify, then a TCP
half-close and a short drain of what the client still sends) so that the client reads the
answer instead of a reset; an unreachable upstream gets 502, a slow one 504; an upstream
that breaks after the response head was sent ends the client connection without
completing the message and without close_notify, so the client can tell it is truncated
even when the response is framed by the connection's end. A connection task never
lets an exception escape: one bad connection cannot stop the listener.

Shutdown: SIGTERM or SIGINT closes the listeners, closes idle keep-alive connections,
answers in-flight requests with ``Connection: close`` and gives them
``http.shutdown_grace`` seconds before cancelling what is left; a second signal stops at
once.

This module, upstream.py and sockets.py (the TCP streams both use) are the only ones that
await on sockets.

The admin listener (/healthz, /readyz, /metrics, when configured) is served here too, one
request per connection, with answers from admin.py's sans-IO endpoint; so are the
readiness probes (token test signatures in a worker thread, a TCP connection upstream).
Metrics are counted through the small :class:`Metrics` interface of admin.py.
"""

from __future__ import annotations

import errno
import itertools
import logging
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import nullcontext, suppress
from dataclasses import dataclass, field
from functools import partial

import h11
import trio

from proxy.config import (
    Address,
    HTTPConfig,
    ProxyConfig,
    Route,
    UpstreamGroup,
)
from proxy.errors import TLSError
from proxy.generation.holder import GenerationHolder
from proxy.generation.model import Generation
from proxy.http.rules import (
    IDEMPOTENT_METHODS,
    ClientInfo,
    ReceivedHead,
    check_request,
    check_request_head,
    choose_upstream,
    client_response,
    error_response,
    error_status_for,
    switching_response,
    upstream_request,
)
from proxy.http.upstream import UpstreamConnection, UpstreamFailure, UpstreamPool, connect_first
from proxy.net.limits import HandshakeLimiter
from proxy.net.sockets import TCPStream
from proxy.net.workers import report_ready, worker_addresses
from proxy.ops.admin import Metrics, Operations, sign_probes, token_state
from proxy.ops.hardening import redact_headers
from proxy.ops.logs import access_log, connection_context, log
from proxy.tls.core import TLSInfo, TLSStream

_LINGER_SECONDS = 2.0
_CLOSE_GRACE_SECONDS = _LINGER_SECONDS + 2.0
_RECEIVE_SIZE = 65536
_LISTEN_BACKLOG = 4096
_ADMIN_TIMEOUT_SECONDS = 10.0
_ADMIN_RECEIVE_SIZE = 16384
# accept() errors that mean "out of resources for now": wait and try again (as trio does).
_ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


@dataclass(frozen=True)
class Routing:
    """The upstream pools and routes one configuration uses."""

    routes: tuple[Route, ...]
    pools: dict[str, UpstreamPool]


@dataclass
class ServerState:
    holder: GenerationHolder
    sign_limiter: trio.CapacityLimiter
    connection_ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    metrics: Metrics = field(default_factory=Metrics)
    pools: dict[tuple[UpstreamGroup, HTTPConfig], UpstreamPool] = field(default_factory=dict)
    draining: bool = False
    idle_scopes: set[trio.CancelScope] = field(default_factory=set)
    _routing: tuple[ProxyConfig, Routing] | None = None
    handshakes: HandshakeLimiter | None = None  # security.max_handshakes[_per_client]

    def routing(self, config: ProxyConfig) -> Routing:
        """Pools are shared by every configuration that names the same upstream group."""
        if self._routing is not None and self._routing[0] is config:
            return self._routing[1]
        pools = {}
        for group in config.upstream_groups():
            key = (group, config.http)
            if key not in self.pools:
                self.pools[key] = UpstreamPool(group, config.http)
            pools[group.name] = self.pools[key]
        routing = Routing(config.routes, pools)
        self._routing = (config, routing)
        return routing

    def drain(self) -> None:
        self.draining = True
        for scope in self.idle_scopes:
            scope.cancel()


class _ClientGone(Exception):
    """The client closed or broke the connection; nothing more can be sent to it."""


class _Reject(Exception):
    """The request is refused with ``status`` and the connection closed."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _LingeringClose(trio.abc.Stream):
    """Swapped in as the TLS stream's transport just before it closes after an error: the
    close becomes a TCP half-close, a short drain of whatever the client still sends, and
    only then the close, so that the client reads our answer instead of a reset."""

    def __init__(self, inner: TCPStream) -> None:
        self.inner = inner

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        try:
            with trio.move_on_after(_LINGER_SECONDS):
                await self.inner.send_eof()
                while await self.inner.receive_some(_RECEIVE_SIZE):
                    pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        finally:
            await self.inner.aclose()


class _Exchange:
    """One client connection's HTTP side: the h11 server state and the TLS stream."""

    def __init__(
        self, stream: TLSStream, client: ClientInfo, tls_info: TLSInfo, http: HTTPConfig
    ) -> None:
        self.stream = stream
        self.client = client
        self.tls_info = tls_info
        self.http = http
        self.h11 = h11.Connection(
            h11.SERVER,
            max_incomplete_event_size=http.max_header_bytes + http.max_request_line + 4,
        )
        self.bytes_sent = 0
        self.metrics: Metrics | None = None  # the server's, set by handle_connection
        self.linger = False
        # A response broke off: close without close_notify, so that even a response framed
        # by the connection's end reads as truncated, never as complete.
        self.abort = False
        # What the access line needs when the client leaves in the middle of an exchange.
        self.response_status: int | None = None
        self.upstream_name = "-"

    async def _receive(self) -> bytes:
        try:
            return await self.stream.receive_some(_RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise _ClientGone from exc

    async def read_request(self, state: ServerState, first: bool) -> h11.Request | None:
        """The next request head, or None when the client closed or stayed idle too long.
        Raises :class:`_Reject` (limits, obs-fold, 408) or ``h11.RemoteProtocolError``."""
        http = self.http
        connection = self.h11
        deadline = trio.current_time() + http.header_timeout if first else None
        while True:
            buffered, closed = connection.trailing_data
            if buffered:
                status = check_request_head(buffered, http)
                if status is not None:
                    raise _Reject(status)
            if buffered or closed:  # else h11 can only say NEED_DATA: skip asking it
                event = connection.next_event()
                if event is not h11.NEED_DATA:
                    return event if isinstance(event, h11.Request) else None
            if buffered:
                if deadline is None:
                    deadline = trio.current_time() + http.header_timeout
                with trio.move_on_at(deadline):
                    connection.receive_data(await self._receive())
                    continue
                raise _Reject(408)
            # Nothing of a request yet: the wait ends quietly on timeout or when draining.
            if state.draining:
                return None
            idle_deadline = (
                trio.current_time() + http.idle_timeout if deadline is None else deadline
            )
            with trio.CancelScope(deadline=idle_deadline) as idle:
                state.idle_scopes.add(idle)
                try:
                    data = await self._receive()
                finally:
                    state.idle_scopes.discard(idle)
            if idle.cancelled_caught:
                return None  # idle too long, or the server is draining
            connection.receive_data(data)

    async def receive_body_data(self) -> None:
        """More request body bytes into h11, within the body timeout (else 408)."""
        with trio.move_on_after(self.http.body_timeout):
            self.h11.receive_data(await self._receive())
            return
        raise _Reject(408)

    async def send_raw(self, data: bytes) -> None:
        """Send to the client; one that stops reading for ``http.body_timeout`` is dropped
        (the client's TCP stream has it as its send timeout)."""
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError) as exc:
            raise _ClientGone from exc
        self.bytes_sent += len(data)

    async def send(self, *events: h11.Event) -> None:
        await self.send_raw(b"".join(self.h11.send(event) or b"" for event in events))

    async def send_error(self, status: int) -> None:
        self.linger = True
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            self.abort = True  # a response is already under way: the connection just ends
            return
        response, body = error_response(status)
        await self.send(response, h11.Data(data=body), h11.EndOfMessage())


async def _send_request(
    exchange: _Exchange,
    upstream: UpstreamConnection,
    outgoing: h11.Request,
    replay: list[h11.Event],
) -> None:
    """The request head and the whole body, streamed from the client as it arrives; the
    head goes out together with whatever body bytes are already here.

    ``replay`` collects the body events taken from the client until the first send to
    this upstream succeeds: a retry on a fresh connection sends them again, since the
    client will not."""
    client = exchange.h11
    limit = exchange.http.max_body_bytes
    pending = [upstream.h11.send(outgoing) or b""]
    received = 0
    for replayed in replay:
        if isinstance(replayed, h11.Data):
            received += len(replayed.data)
        pending.append(upstream.h11.send(replayed) or b"")
    if replay and isinstance(replay[-1], h11.EndOfMessage):
        await upstream.send_data(b"".join(pending))
        return
    while True:
        event: h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED] = client.next_event()
        if event is h11.NEED_DATA:
            if pending:
                await upstream.send_data(b"".join(pending))
                pending = []
            if client.they_are_waiting_for_100_continue:
                await exchange.send(h11.InformationalResponse(status_code=100, headers=[]))
            await exchange.receive_body_data()
            continue
        if isinstance(event, h11.Data):
            received += len(event.data)
            if limit and received > limit:
                raise _Reject(413)
        elif isinstance(event, h11.EndOfMessage):
            event = h11.EndOfMessage()  # trailers are not forwarded
        else:
            raise _ClientGone  # ConnectionClosed in the middle of a request body
        if upstream.bytes_sent == 0:
            replay.append(event)
        pending.append(upstream.h11.send(event) or b"")
        if isinstance(event, h11.EndOfMessage):
            await upstream.send_data(b"".join(pending))
            return


async def _tunnel(exchange: _Exchange, upstream: UpstreamConnection) -> None:
    """Bytes both ways after a 101, until either side closes."""
    client_rest = exchange.h11.trailing_data[0]
    upstream_rest = upstream.h11.trailing_data[0]
    # A tunnel may stay quiet, or wait for the upstream to read, as long as both sides like.
    upstream.stream.receive_timeout = upstream.stream.send_timeout = None

    async def up(done: trio.CancelScope) -> None:
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            if client_rest:
                await upstream.stream.send_all(client_rest)
            while data := await exchange.stream.receive_some(_RECEIVE_SIZE):
                await upstream.stream.send_all(data)
        done.cancel()

    async def down(done: trio.CancelScope) -> None:
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError, _ClientGone):
            if upstream_rest:
                await exchange.send_raw(upstream_rest)
            while data := await upstream.stream.receive_some(_RECEIVE_SIZE):
                await exchange.send_raw(data)
        done.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(up, nursery.cancel_scope)
        nursery.start_soon(down, nursery.cancel_scope)


async def _early_response(upstream: UpstreamConnection) -> h11.Event | None:
    """A response the upstream sent before it stopped taking the request, if any."""
    if upstream.h11.their_state is not h11.SEND_RESPONSE or upstream.h11.our_state is h11.DONE:
        return None
    try:
        with trio.move_on_after(_LINGER_SECONDS):
            event = await upstream.next_event()
            return event if isinstance(event, h11.Response) else None
    except UpstreamFailure:
        return None
    return None


async def _forward(
    exchange: _Exchange, request: h11.Request, routing: Routing, draining: Callable[[], bool]
) -> tuple[int, str]:
    """Forward one request and stream its response; return the status and the upstream.

    Raises :class:`_Reject` for a request refused before a response started, and
    ``h11.RemoteProtocolError`` when the request body breaks framing."""
    head = ReceivedHead(request.headers)
    status = check_request(request, exchange.http, head)
    if status is not None:
        raise _Reject(status)
    server_name = exchange.client.server_name
    pool = routing.pools[choose_upstream(routing.routes, request, server_name, head)]
    outgoing = upstream_request(request, exchange.client, pool.group.servers[0].authority, head)
    upgrade = head.upgrade
    has_body = head.has_body
    # Resending is safe when nothing reached the upstream, or when a bodiless idempotent
    # request on a reused connection got no byte of answer (the backend closed it idle).
    may_resend = request.method in IDEMPOTENT_METHODS and not has_body and not upgrade
    upstream: UpstreamConnection | None = None
    where = exchange.upstream_name = pool.group.name
    try:
        upstream, reused = await pool.acquire()
        where = str(upstream.config)
        replay: list[h11.Event] = []
        while True:
            try:
                await _send_request(exchange, upstream, outgoing, replay)
                event = await upstream.next_event()
                break
            except UpstreamFailure as failure:
                fresh_is_safe = (failure.sent_nothing and not upstream.bytes_sent) or (
                    may_resend and upstream.bytes_received == 0
                )
                if not (reused and fresh_is_safe):
                    early = await _early_response(upstream)
                    if early is None:
                        raise
                    # The upstream answered (413, 401 ...) and closed before taking the whole
                    # body: relay its answer; the client connection closes after it.
                    event = early
                    exchange.linger = True
                    break
                await upstream.aclose()
                upstream = None
                upstream = await pool.connect()
                reused = False
                where = str(upstream.config)
        while isinstance(event, h11.InformationalResponse):
            if event.status_code == 101 and upgrade:
                await exchange.send(switching_response(event))
                await _tunnel(exchange, upstream)
                return 101, where
            event = await upstream.next_event()  # other 1xx: the proxy sent its own 100
        if not isinstance(event, h11.Response):
            raise UpstreamFailure(
                f"upstream {where} sent {type(event).__name__} first", 502, kind="protocol"
            )
        status = exchange.response_status = event.status_code
        exchange.upstream_name = where
        pending = [exchange.h11.send(client_response(event, closing=draining())) or b""]
        while True:
            piece = upstream.next_event_nowait()
            if piece is h11.NEED_DATA:
                if pending:
                    await exchange.send_raw(b"".join(pending))
                    pending = []
                upstream.h11.receive_data(await upstream.receive())
            elif isinstance(piece, h11.Data):
                pending.append(exchange.h11.send(piece) or b"")
            elif isinstance(piece, h11.EndOfMessage):
                pending.append(exchange.h11.send(h11.EndOfMessage()) or b"")
                await exchange.send_raw(b"".join(pending))
                break
            else:
                raise UpstreamFailure(
                    f"upstream {where} ended the response early", 502, kind="protocol"
                )
    except (UpstreamFailure, h11.LocalProtocolError) as caught:
        broken = (
            caught
            if isinstance(caught, UpstreamFailure)
            else UpstreamFailure(
                f"upstream {where} sent what cannot be relayed: {caught}", 502, kind="protocol"
            )
        )
        log.warning(str(broken), extra={"fields": {"event": "upstream_error", "kind": broken.kind}})
        if exchange.metrics is not None:
            exchange.metrics.upstream_failed(broken.kind)
        if upstream is not None:
            await upstream.aclose()
        await exchange.send_error(broken.status)
        return broken.status, where
    except BaseException:
        if upstream is not None:
            with trio.CancelScope(shield=True):
                await upstream.aclose()
        raise
    await pool.release(upstream)
    return status, where


def _access(
    exchange: _Exchange,
    request: h11.Request | None,
    status: int,
    sent_before: int,
    started: float,
    where: str,
) -> None:
    if exchange.metrics is not None:
        exchange.metrics.request_answered(status)
    access_log.info(
        "request",
        extra={
            "fields": {
                "connection_id": (connection_context.get() or {}).get("connection_id"),
                "client": exchange.client.address,
                "sni": exchange.client.server_name,
                "tls_version": exchange.tls_info.version,
                "method": request.method.decode("ascii", "replace") if request else "-",
                "path": request.target.decode("ascii", "replace") if request else "-",
                "status": status,
                "bytes_sent": exchange.bytes_sent - sent_before,
                "duration_ms": round((time.perf_counter() - started) * 1000, 3),
                "upstream": where,
                **_client_cert_field(exchange.tls_info),
            }
        },
    )


async def _serve_http(exchange: _Exchange, generation: Generation, state: ServerState) -> None:
    routing = state.routing(generation.config)
    draining: Callable[[], bool] = lambda: state.draining  # noqa: E731
    first = True
    while True:
        started = time.perf_counter()
        try:
            request = await exchange.read_request(state, first)
        except (_Reject, h11.RemoteProtocolError) as refused:
            # Refused before a request was parsed: still one access line, without a path.
            status = refused.status if isinstance(refused, _Reject) else error_status_for(refused)
            sent_before = exchange.bytes_sent
            await exchange.send_error(status)
            _access(exchange, None, status, sent_before, started, "-")
            return
        if request is None:
            return
        first = False
        if log.isEnabledFor(logging.DEBUG):
            headers = redact_headers(request.headers.raw_items())
            log.debug("request headers", extra={"fields": {"headers": headers}})
        started = time.perf_counter()
        sent_before = exchange.bytes_sent
        where = "-"
        exchange.response_status, exchange.upstream_name = None, "-"
        try:
            status, where = await _forward(exchange, request, routing, draining)
        except _ClientGone:
            # Still one access line: the response's status if it had begun, else 499
            # (nginx's "client closed request").
            status = exchange.response_status or 499
            _access(exchange, request, status, sent_before, started, exchange.upstream_name)
            raise
        except _Reject as reject:
            status = reject.status
            await exchange.send_error(status)
        except h11.RemoteProtocolError as exc:
            # The request body broke framing (bad chunk size, ...): never forwarded whole.
            status = error_status_for(exc)
            await exchange.send_error(status)
        _access(exchange, request, status, sent_before, started, where)
        if exchange.linger or status == 101 or state.draining:
            return
        if exchange.h11.our_state is h11.MUST_CLOSE or exchange.h11.their_state in (
            h11.MUST_CLOSE,
            h11.CLOSED,
        ):
            return
        try:
            exchange.h11.start_next_cycle()
        except h11.LocalProtocolError:
            return


def _client_cert_field(info: TLSInfo) -> dict[str, str | None]:
    """Who the client certificate says the client is, for the access log (mutual TLS)."""
    if not info.client_auth:
        return {}
    return {"client_cert": info.client_identity.subject if info.client_identity else None}


def _client_info(peer: str, info: TLSInfo, forwarded: bool) -> ClientInfo:
    """What the forwarding rules learn of the client, verified identity included."""
    return ClientInfo(
        peer,
        info.server_name,
        identity=info.client_identity,
        client_auth=info.client_auth,
        forwarded=forwarded,
    )


async def handle_connection(state: ServerState, accepted: trio.SocketStream) -> None:
    """Everything one client connection goes through; never raises."""
    try:
        stream = TCPStream.from_trio(accepted)
    except OSError:  # could not take the socket over: nothing was read or sent yet
        with suppress(OSError):
            accepted.socket.close()
        return
    connection_id = next(state.connection_ids)
    state.metrics.connection_opened()
    try:
        peer = stream.socket.getpeername()[0]
    except OSError:
        peer = "unknown"
    slot = state.handshakes.admit(peer) if state.handshakes is not None else None
    if state.handshakes is not None and slot is None:
        # Over the handshake limits: close before reading a byte or queueing a signature.
        refused = state.handshakes.refusal_report()
        if refused:
            log.warning(
                f"refused {refused} connections over the handshake limits",
                extra={"fields": {"event": "handshake_limit", "client": peer}},
            )
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await stream.aclose()
        return
    generation = state.holder.acquire()  # held for the handshake, the only part that signs
    # One mutable dict per connection: worker threads see the same object, so the SNI
    # name recorded during the handshake reaches the audit line of its signature.
    context: dict[str, object] = {"connection_id": connection_id, "client": peer}
    connection_context.set(context)
    stream.send_timeout = generation.config.http.body_timeout  # a client that stops reading
    tls = TLSStream(
        stream,
        generation.ssl_context,
        state.sign_limiter,
        on_server_name=lambda name: context.__setitem__("sni", name),
        max_waiting=generation.config.token.queue_limit,
    )
    linger = abort = False
    handshake_started = time.perf_counter()
    try:
        try:
            with trio.fail_after(generation.config.tls.handshake_timeout):
                info = await tls.do_handshake()
        except trio.TooSlowError:
            state.metrics.handshake_finished(None, "timeout", 0.0)
            log.info("TLS handshake timed out", extra={"fields": context})
            return
        except TLSError as exc:
            state.metrics.handshake_finished(None, "failed", 0.0)
            log.info(str(exc), extra={"fields": context})
            linger = True  # the alert is out: let the client read it
            return
        finally:
            state.holder.release(generation)
            if slot is not None:
                slot.release()
        http = generation.config.http
        client = _client_info(peer, info, http.forwarded)
        state.metrics.handshake_finished(
            info.version, "ok", time.perf_counter() - handshake_started, info.resumed
        )
        exchange = _Exchange(tls, client, info, http)
        exchange.metrics = state.metrics
        try:
            await _serve_http(exchange, generation, state)
        finally:
            linger, abort = exchange.linger, exchange.abort
    except _ClientGone:
        pass
    except Exception:
        log.exception("connection failed unexpectedly", extra={"fields": context})
    finally:
        state.metrics.connection_closed()
        with trio.move_on_after(_CLOSE_GRACE_SECONDS) as scope:
            scope.shield = True
            if linger:
                tls.transport = _LingeringClose(stream)
            with suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                if abort:
                    await tls.transport.aclose()
                else:
                    await tls.aclose()
        if scope.cancelled_caught:
            await stream.aclose()


async def _accept(
    listener: trio.SocketListener,
    connections: trio.Nursery,
    state: ServerState,
    slots: trio.Semaphore,
) -> None:
    """Accept while fewer than ``http.max_connections`` are open; beyond, new connections
    wait in the kernel's backlog. Running out of file descriptors pauses accepting."""

    async def run(stream: trio.SocketStream) -> None:
        try:
            await handle_connection(state, stream)
        finally:
            slots.release()

    while True:
        await slots.acquire()
        try:
            stream = await listener.accept()
        except OSError as exc:
            slots.release()
            if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                raise
            log.warning(f"cannot accept a connection now: {exc.strerror}; retrying")
            await trio.sleep(0.1)
            continue
        except BaseException:
            slots.release()
            raise
        connections.start_soon(run, stream)


async def _sweep_pools(state: ServerState) -> None:
    """Close idle upstream connections past ``http.pool_idle_timeout``."""
    while True:
        await trio.sleep(1.0)
        for pool in list(state.pools.values()):
            pool.sweep()


async def _reuse_port_listener(family: int, host: str, port: int) -> trio.SocketListener:
    """A worker's own listening socket on the address the supervisor reserved (workers.py)."""
    sock = trio.socket.socket(family, trio.socket.SOCK_STREAM)
    try:
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEPORT, 1)
        if family == trio.socket.AF_INET6:
            sock.setsockopt(trio.socket.IPPROTO_IPV6, trio.socket.IPV6_V6ONLY, 1)
        await sock.bind((host, port))
        sock.listen(_LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    return trio.SocketListener(sock)


def _bound(listeners: list[trio.SocketListener]) -> list[str]:
    """HOST:PORT (or [IPv6]:PORT) each listener is bound to."""
    bound = []
    for listener in listeners:
        host, port = listener.socket.getsockname()[:2]
        bound.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    return bound


async def _listen(address: Address, what: str) -> tuple[list[trio.SocketListener], list[str]]:
    try:
        listeners = await trio.open_tcp_listeners(address.port, host=address.host)
    except OSError as exc:
        raise TLSError(f"cannot listen on {address} ({what}): {exc.strerror or exc}") from None
    return listeners, _bound(listeners)


async def handle_admin(
    state: ServerState, operations: Operations, stream: trio.SocketStream
) -> None:
    """One admin request per connection (/healthz, /readyz, /metrics); never raises."""
    connection = h11.Connection(h11.SERVER)
    try:
        with trio.move_on_after(_ADMIN_TIMEOUT_SECONDS):
            while True:
                event = connection.next_event()
                if event is h11.NEED_DATA:
                    connection.receive_data(await stream.receive_some(_ADMIN_RECEIVE_SIZE))
                    continue
                if not isinstance(event, h11.Request):
                    return
                generation = state.holder.current
                operations.serving(generation.number, generation.chains())
                method = event.method.decode("ascii", "replace")
                status, headers, body = operations.endpoint.respond(
                    method, event.target.decode("ascii", "replace")
                )
                headers += [("content-length", str(len(body))), ("connection", "close")]
                data = connection.send(h11.Response(status_code=status, headers=headers)) or b""
                if method != "HEAD":
                    data += connection.send(h11.Data(data=body)) or b""
                data += connection.send(h11.EndOfMessage()) or b""
                await stream.send_all(data)
                return
    except h11.RemoteProtocolError as exc:
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            response, body = error_response(error_status_for(exc))
            await stream.send_all(
                (connection.send(response) or b"")
                + (connection.send(h11.Data(data=body)) or b"")
                + (connection.send(h11.EndOfMessage()) or b"")
            )
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    except Exception:
        log.exception("admin request failed unexpectedly")
    finally:
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await stream.aclose()


async def probe_readiness(state: ServerState, operations: Operations, interval: float) -> None:
    """Every ``interval`` seconds: token test signatures, a TCP connection upstream."""
    while True:
        generation = state.holder.acquire()  # a reload must not close it under the probe
        try:
            operations.serving(generation.number, generation.chains())
            keys = [generation.key, *(site.key for site in generation.sites)]
            outcome = await trio.to_thread.run_sync(sign_probes, keys, limiter=state.sign_limiter)
            operations.probe_signed(outcome)
        finally:
            state.holder.release(generation)
        await _probe_upstreams(generation.config, operations)
        await trio.sleep(interval)


async def _probe_upstreams(config: ProxyConfig, operations: Operations) -> None:
    """Ready when every upstream group has an address that accepts a TCP connection."""
    reached = []
    for group in config.upstream_groups():
        try:
            connection = await connect_first(group.servers, config.http)
        except UpstreamFailure as failure:
            operations.readiness.upstream_result(False, f"{group.name}: {failure}")
            return
        await connection.aclose()
        reached.append(str(connection.config))
    operations.readiness.upstream_result(True, f"{', '.join(reached)} accepted a connection")


async def serve(
    holder: GenerationHolder,
    listen: Address,
    on_ready: Callable[[list[str]], None],
    handle_signals: bool = True,
    tasks: Sequence[Callable[[], Awaitable[None]]] = (),
    operations: Operations | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM (then drain, see the module docstring) or cancellation;
    ``tasks`` run beside the listeners (the reloader); with ``operations.config``, the
    admin listener and its readiness probes too."""
    operations = operations or Operations()
    security = holder.current.config.security
    state = ServerState(
        holder,
        trio.CapacityLimiter(holder.current.token.pool_size),
        metrics=operations.metrics,
        handshakes=HandshakeLimiter(security.max_handshakes, security.max_handshakes_per_client),
    )
    operations.serving(holder.current.number, holder.current.chains())
    operations.metrics.track_queue(lambda: state.sign_limiter.statistics().tasks_waiting)
    operations.readiness.add_check(lambda: token_state(state.holder.current.token))
    http = holder.current.config.http
    shared = worker_addresses()
    try:
        if shared is None:
            listeners = await trio.open_tcp_listeners(listen.port, host=listen.host)
        else:
            listeners = [await _reuse_port_listener(*address) for address in shared]
    except OSError as exc:
        raise TLSError(f"cannot listen on {listen}: {exc.strerror or exc}") from None
    bound = _bound(listeners)
    admin_listeners: list[trio.SocketListener] = []
    admin_bound: list[str] = []
    if operations.config is not None:
        admin_listeners, admin_bound = await _listen(operations.config.listen, "admin")
    slots = trio.Semaphore(http.max_connections)
    signals = (
        trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM)
        if handle_signals
        else nullcontext(None)
    )
    try:
        with signals as received:
            async with trio.open_nursery() as connections:
                async with trio.open_nursery() as accepting:
                    for listener in listeners:
                        accepting.start_soon(partial(_accept, listener, connections, state, slots))
                    accepting.start_soon(_sweep_pools, state)
                    for task in tasks:
                        accepting.start_soon(task)
                    if operations.config is not None:
                        accepting.start_soon(
                            partial(
                                trio.serve_listeners,
                                partial(handle_admin, state, operations),
                                admin_listeners,
                            )
                        )
                        accepting.start_soon(
                            probe_readiness, state, operations, operations.config.probe_interval
                        )
                        for address in admin_bound:
                            log.info(f"admin endpoint http://{address}/ (healthz, readyz, metrics)")
                    on_ready(bound)
                    report_ready()
                    if received is not None:
                        async for signum in received:
                            log.info(
                                f"received {signal.Signals(signum).name}: stopping; in-flight "
                                f"requests get {http.shutdown_grace:g}s"
                            )
                            break
                        accepting.cancel_scope.cancel()
                for listener in listeners:
                    await listener.aclose()
                state.drain()
                connections.cancel_scope.deadline = trio.current_time() + http.shutdown_grace
                helpers = 1
                if received is not None:
                    connections.start_soon(_second_signal, received, connections.cancel_scope)
                    helpers = 2
                connections.start_soon(_stop_when_idle, connections, helpers)
    finally:
        for pool in state.pools.values():
            pool.close()


async def _second_signal(received: AsyncIterator[int], scope: trio.CancelScope) -> None:
    async for _ in received:
        log.info("second signal: stopping now")
        scope.cancel()
        return


async def _stop_when_idle(connections: trio.Nursery, helpers: int) -> None:
    """End the drain as soon as the last connection is gone (the signal task would keep
    the nursery open otherwise); ``helpers`` counts this task and the signal task."""
    while len(connections.child_tasks) > helpers:
        await trio.sleep(0.05)
    connections.cancel_scope.cancel()
