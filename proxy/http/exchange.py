"""The HTTP/1.1 protocol handler: requests from one client connection, forwarded one at a time.

Theory of operation. :class:`HTTP1Handler` is the handler the connection pipeline
(net/pipeline.py) picks for HTTP/1.1. For each connection it reads requests with an
``h11.Connection(SERVER)``, one at a time and in order (pipelined requests wait in h11's
buffer until the previous response is complete), and returns how the connection must close.

For each request the rules in rules.py check it (limits, ambiguous framing), choose the
upstream group (the first matching route's, else the group of the connection's site: the
``[[tls.sni]]`` entry's ``upstream``, or the top-level one), and rewrite the head; an
:class:`UpstreamPool` per group lends a keep-alive connection for the one exchange. The
request body is streamed up and the response streamed back with backpressure: one buffer
per direction is in flight (at most 64 KiB from the client, 256 KiB from the upstream),
so memory does not grow with the body.
Everything h11 can produce from bytes already received goes out in one send, so a
response head leaves with its first body bytes (one TLS record for a small response). A
101 answer to an Upgrade request turns the connection into a byte tunnel both ways until
either side closes. The upstream's h11 state is touched only through
:class:`UpstreamConnection`.

Timeouts: the first request head must arrive within ``http.header_timeout`` of the
handshake, later ones within it of their first byte (408); a kept-alive connection idles
at most ``http.idle_timeout`` (closed silently); a request body that stalls for
``http.body_timeout`` gets 408; the upstream's connect and read timeouts are upstream.py's.

Full duplex: while a request body streams up, the upstream's answer is watched for; one
that comes before the whole body (a 413 or 401 from the head alone) is relayed at once with
``Connection: close``, the rest of the body is not forwarded, the upstream connection
(which carried part of a request) is closed, and the client connection ends with a
lingering close, which reads and discards what the client still sends, for a bounded time.

Failure handling: a malformed or ambiguous request gets its status (400, 408, 413, 414,
431, 501) and the connection closes with :attr:`CloseMode.LINGER`, so that the client reads
the answer instead of a reset; an unreachable upstream gets 502, a slow one 504; an
upstream that breaks after the response head was sent ends the connection with
:attr:`CloseMode.ABORT` (no close_notify), so the client can tell the response is
truncated even when it is framed by the connection's end. Every request gets one access
line, a client that leaves mid-exchange too (its response's status, or 499 before one).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import suppress

import h11
import trio

from proxy.config import DEFAULT_UPSTREAM, HTTPConfig, ProxyConfig
from proxy.http.rules import (
    IDEMPOTENT_METHODS,
    ChunkSizes,
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
from proxy.http.target import TargetError, parse_target
from proxy.http.upstream import (
    Routing,
    UpstreamConnection,
    UpstreamFailure,
    UpstreamPools,
)
from proxy.net.pipeline import Client, ClientGone, ServerState
from proxy.net.relay import Relay, Side
from proxy.net.sockets import TCPStream
from proxy.ops.admin import Metrics
from proxy.ops.hardening import redact_headers
from proxy.ops.logs import access_log, connection_context, info_line, log
from proxy.tls.stream import LINGER_SECONDS, CloseMode, TLSInfo, TLSStream

_RECEIVE_SIZE = 65536


class _Reject(Exception):
    """The request is refused with ``status`` and the connection closed."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class HTTP1Handler:
    """HTTP/1.1 to clients, forwarded to HTTP/1.1 upstreams through shared keep-alive pools."""

    def __init__(self, pools: UpstreamPools | None = None) -> None:
        # The pools are shared with the HTTP/2 handler (net/server.py); this handler sweeps
        # and closes them.
        self.pools = pools if pools is not None else UpstreamPools()

    def routing(self, config: ProxyConfig) -> Routing:
        return self.pools.routing(config)

    def sweep(self) -> None:
        self.pools.sweep()

    def close(self) -> None:
        self.pools.close()

    async def serve(self, client: Client) -> CloseMode:
        http = client.generation.config.http
        exchange = _Exchange(client.stream, _client_info(client, http.forwarded), client.tls, http)
        exchange.metrics = client.server.metrics
        exchange.default_upstream = client.generation.upstream_serving(client.tls.context).name
        with suppress(ClientGone):
            await _serve_http(exchange, self.routing(client.generation.config), client.server)
        if exchange.abort:
            return CloseMode.ABORT
        return CloseMode.LINGER if exchange.linger else CloseMode.CLOSE_NOTIFY


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
        self.metrics: Metrics | None = None  # the server's, set by the handler
        self.linger = False
        # A response broke off: close without close_notify, so that even a response framed
        # by the connection's end reads as truncated, never as complete.
        self.abort = False
        # What the access line needs when the client leaves in the middle of an exchange.
        self.response_status: int | None = None
        self.upstream_name = "-"
        # Where requests no route matches go: the group of the server name's site.
        self.default_upstream = DEFAULT_UPSTREAM
        # The answer to a HEAD request has no body, an error's included (h11 enforces it).
        self.answering_head = False
        # The chunk sizes of the request body being read, when it is chunked (rules.py).
        self.chunks: ChunkSizes | None = None
        # The access line's fields that stay the same for the connection, once known.
        self.access_fields: dict[str, object] | None = None

    async def _receive(self) -> bytes:
        try:
            return await self.stream.receive_some(_RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ClientGone from exc

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
            data = await self._receive()
            if self.chunks is not None:
                status = self.chunks.feed(data)
                if status is not None:
                    raise _Reject(status)
            self.h11.receive_data(data)
            return
        raise _Reject(408)

    async def send_raw(self, data: bytes | bytearray) -> None:
        """Send to the client; one that stops reading for ``http.body_timeout`` is dropped
        (the client's TCP stream has it as its send timeout)."""
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError) as exc:
            raise ClientGone from exc
        self.bytes_sent += len(data)

    async def send(self, *events: h11.Event) -> None:
        await self.send_raw(b"".join(self.h11.send(event) or b"" for event in events))

    async def send_error(self, status: int) -> None:
        self.linger = True
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            self.abort = True  # a response is already under way: the connection just ends
            return
        response, body = error_response(status)
        content = [] if self.answering_head else [h11.Data(data=body)]
        await self.send(response, *content, h11.EndOfMessage())


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
    pending = [upstream.encode(outgoing)]
    received = 0
    for replayed in replay:
        if isinstance(replayed, h11.Data):
            received += len(replayed.data)
        pending.append(upstream.encode(replayed))
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
                with trio.CancelScope(shield=True):  # an early answer must not cut it short
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
            raise ClientGone  # ConnectionClosed in the middle of a request body
        if upstream.bytes_sent == 0:
            replay.append(event)
        pending.append(upstream.encode(event))
        if isinstance(event, h11.EndOfMessage):
            await upstream.send_data(b"".join(pending))
            return


async def _send_and_answer(
    exchange: _Exchange,
    upstream: UpstreamConnection,
    outgoing: h11.Request,
    replay: list[h11.Event],
    streams_body: bool,
) -> h11.Event:
    """Send the request and return the upstream's first answer (after any 1xx but 101).

    Full duplex while a request body streams up (``streams_body``): the upstream may answer
    before it has the whole body (a 413 or 401 from the head alone), and may stop reading
    then. So its answer is watched for while the body is sent; when one comes first, the
    sending stops, and ``upstream.h11.our_state`` is not DONE (the caller closes both
    connections after relaying it). Until the body has gone the upstream may be quiet for
    as long as the client takes to send it: the read timeout starts afterwards (the send
    timeout, and the client's body timeout, bound the sending meanwhile)."""
    if not streams_body:
        await _send_request(exchange, upstream, outgoing, replay)
        return await upstream.next_event()
    answer: h11.Event | None = None
    sending_failed: Exception | None = None
    watching_failed: UpstreamFailure | None = None
    stream = upstream.stream
    read_timeout, stream.receive_timeout = stream.receive_timeout, None
    try:
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                nonlocal answer, watching_failed
                try:
                    while True:
                        event = await upstream.next_event()
                        if not isinstance(event, h11.InformationalResponse) or (
                            event.status_code == 101
                        ):
                            answer = event
                            break
                        # a 100 Continue nobody asked for (the proxy sent no Expect): go on
                except UpstreamFailure as failure:
                    watching_failed = failure
                nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            try:
                await _send_request(exchange, upstream, outgoing, replay)
            except Exception as failure:  # not trio.Cancelled: that is the watcher's answer
                sending_failed = failure
            nursery.cancel_scope.cancel()
    finally:
        stream.receive_timeout = read_timeout
    if sending_failed is not None and not isinstance(sending_failed, UpstreamFailure):
        raise sending_failed  # the client's side failed (ClientGone, 408, 413, bad framing)
    if answer is not None:
        return answer
    if sending_failed is not None:
        raise sending_failed
    if watching_failed is not None:
        raise watching_failed
    return await upstream.next_event()  # the whole request went before any answer


async def _tunnel(exchange: _Exchange, upstream: UpstreamConnection) -> None:
    """Bytes both ways after a 101, on the relay TCP passthrough uses (net/relay.py): a
    half-close is carried to the other side, and the tunnel ends when both sides ended,
    either broke, or no byte moved for ``http.tunnel_idle_timeout`` seconds."""
    client_rest = exchange.h11.trailing_data[0]
    stream, upstream_rest = upstream.take_over()
    transport = exchange.stream.transport
    if isinstance(transport, TCPStream):  # the relay's idle timeout bounds every wait now
        transport.send_timeout = transport.receive_timeout = None

    def moved(source: Side, count: int) -> None:
        if source is Side.UPSTREAM:
            exchange.bytes_sent += count

    try:
        try:
            if client_rest:
                await stream.send_all(client_rest)
            if upstream_rest:
                await exchange.send_raw(upstream_rest)
        except (trio.BrokenResourceError, trio.ClosedResourceError, ClientGone):
            exchange.abort = True
            return
        idle_timeout = exchange.http.tunnel_idle_timeout
        ended = await Relay(exchange.stream, stream, idle_timeout, on_moved=moved).run()
        if ended.closed_by == "idle_timeout":
            log.info(
                f"upgraded connection closed: no byte either way for {idle_timeout:g}s "
                "(http.tunnel_idle_timeout)",
                extra={"fields": {"event": "tunnel_idle"}},
            )
        if ended.broken is not None or not ended.clean:
            exchange.abort = True
    finally:
        stream.close()


async def _early_response(upstream: UpstreamConnection) -> h11.Event | None:
    """A response the upstream sent before it stopped taking the request, if any."""
    if not upstream.may_answer_early:
        return None
    try:
        with trio.move_on_after(LINGER_SECONDS):
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
    http = exchange.http
    status = check_request(request, http, head)
    if status is not None:
        raise _Reject(status)
    try:
        target = parse_target(request.target, request.method, http.allow_ambiguous_paths)
    except TargetError as refused:
        raise _Reject(refused.status) from None
    exchange.chunks = None
    if b"transfer-encoding" in head.names:  # chunked: check_request refused the rest
        exchange.chunks = ChunkSizes(http.max_body_bytes)
        # The body bytes that came with the head: refused here, nothing reaches an upstream.
        status = exchange.chunks.feed(exchange.h11.trailing_data[0])
        if status is not None:
            raise _Reject(status)
    server_name = exchange.client.server_name
    chosen = choose_upstream(
        routing.routes, request, server_name, head, exchange.default_upstream, target
    )
    pool = routing.pools[chosen]
    try:
        outgoing = upstream_request(request, exchange.client, pool.authority, head, target)
    except h11.LocalProtocolError:
        # A Host the proxy cannot repeat in the headers it adds (a control character, which
        # h11 lets through in a field value): the request is malformed, not a proxy failure.
        raise _Reject(400) from None
    upgrade = head.upgrade
    has_body = head.has_body
    # Resending is safe when nothing reached the upstream, or when a bodiless idempotent
    # request on a reused connection got no byte of answer (the backend closed it idle).
    may_resend = request.method in IDEMPOTENT_METHODS and not has_body and not upgrade
    # A body not all here yet streams up while the upstream may already answer.
    streams_body = has_body and not (
        head.content_length is not None
        and len(exchange.h11.trailing_data[0]) >= head.content_length
    )
    upstream: UpstreamConnection | None = None
    where = exchange.upstream_name = pool.group.name
    try:
        upstream, reused = await pool.acquire()
        where = upstream.label
        replay: list[h11.Event] = []
        while True:
            try:
                event = await _send_and_answer(exchange, upstream, outgoing, replay, streams_body)
                if upstream.h11.our_state is not h11.DONE:
                    # An answer before the whole body (full duplex): relayed, and then the
                    # client connection closes (a lingering close reads and discards what
                    # it still sends, for a bounded time); the upstream connection carried
                    # part of a request and is closed, never reused.
                    exchange.linger = True
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
                where = upstream.label
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
        closing = draining() or exchange.linger
        pending: list[bytes | bytearray] = [
            exchange.h11.send(client_response(event, closing=closing)) or b""
        ]
        while True:
            piece = upstream.next_event_nowait()
            if piece is h11.NEED_DATA:
                if pending:
                    await exchange.send_raw(_joined(pending))
                    pending = []
                await upstream.receive_more()
            elif isinstance(piece, h11.Data):
                # The body bytes as h11 framed them, not joined: at most one join before
                # the send, none for a piece of a Content-Length body that came alone.
                pending.extend(exchange.h11.send_with_data_passthrough(piece) or ())
            elif isinstance(piece, h11.EndOfMessage):
                pending.append(exchange.h11.send(h11.EndOfMessage()) or b"")
                await exchange.send_raw(_joined(pending))
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


def _joined(pieces: list[bytes | bytearray]) -> bytes | bytearray:
    """One buffer for one TLS write: a lone piece as it is (no copy), else joined (a
    response head goes out in the same record as its first body bytes)."""
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


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
    connection = exchange.access_fields
    if connection is None:  # the fields every access line of this connection repeats
        connection = exchange.access_fields = {
            "connection_id": (connection_context.get() or {}).get("connection_id"),
            "client": exchange.client.address,
            "sni": exchange.client.server_name,
            "tls_version": exchange.tls_info.version,
        }
    fields = {
        **connection,
        "method": request.method.decode("ascii", "replace") if request else "-",
        "path": request.target.decode("ascii", "replace") if request else "-",
        "status": status,
        "bytes_sent": exchange.bytes_sent - sent_before,
        "duration_ms": round((time.perf_counter() - started) * 1000, 3),
        "upstream": where,
    }
    if exchange.tls_info.client_auth:
        fields.update(_client_cert_field(exchange.tls_info))
    info_line(access_log, "request", fields)


async def _serve_http(exchange: _Exchange, routing: Routing, state: ServerState) -> None:
    draining: Callable[[], bool] = lambda: state.draining  # noqa: E731
    first = True
    while True:
        started = time.perf_counter()
        exchange.answering_head = False
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
        exchange.answering_head = request.method == b"HEAD"
        if log.isEnabledFor(logging.DEBUG):
            headers = redact_headers(request.headers.raw_items())
            log.debug("request headers", extra={"fields": {"headers": headers}})
        started = time.perf_counter()
        sent_before = exchange.bytes_sent
        where = "-"
        exchange.response_status, exchange.upstream_name = None, "-"
        try:
            status, where = await _forward(exchange, request, routing, draining)
        except ClientGone:
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


def _client_info(client: Client, forwarded: bool) -> ClientInfo:
    """What the forwarding rules learn of the client, verified identity included."""
    return ClientInfo(
        client.address,
        client.tls.server_name,
        identity=client.tls.client_identity,
        client_auth=client.tls.client_auth,
        forwarded=forwarded,
    )
