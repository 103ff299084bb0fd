"""The server: TLS listeners, one task per connection, and the forwarding loop.

Theory of operation. :func:`serve` binds the listeners and runs one task per accepted TCP
connection. A connection task takes the current :class:`Generation` once (a reload never
changes a connection under way), completes the TLS handshake within the configured
timeout, then reads requests with an ``h11.Connection(SERVER)``. Each request is sent to
the upstream over an :class:`UpstreamConnection` kept for the life of the client
connection while both ends allow keep-alive; the request body is streamed up, then the
response is streamed back. The HTTP rules themselves live in http.py.

Failure handling: a malformed request gets h11's suggested status (400, 414, 431) and the
connection is closed; an upstream that cannot be reached gets 502, a slow one 504; an
upstream that breaks after the response head was sent ends the client connection without
completing the message, so the client can tell it is truncated. A connection task never
lets an exception escape: one bad connection cannot stop the listener.

This module and upstream.py are the only ones that await on sockets.
"""

from __future__ import annotations

import itertools
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from functools import partial

import h11
import trio

from proxy.config import Address
from proxy.errors import TLSError
from proxy.http import (
    ClientInfo,
    client_response,
    error_response,
    error_status_for,
    upstream_request,
)
from proxy.logs import access_log, connection_context, log
from proxy.reload import Generation, GenerationHolder
from proxy.tls import TLSInfo, TLSStream
from proxy.upstream import UpstreamConnection, UpstreamFailure

IDLE_KEEPALIVE_SECONDS = 75.0
_CLOSE_GRACE_SECONDS = 2.0


@dataclass
class ServerState:
    holder: GenerationHolder
    sign_limiter: trio.CapacityLimiter
    connection_ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))


class _ClientGone(Exception):
    """The client closed or broke the connection; nothing more can be sent to it."""


class _Exchange:
    """One client connection's HTTP side: the h11 server state and the TLS stream."""

    def __init__(self, stream: TLSStream, client: ClientInfo, tls_info: TLSInfo) -> None:
        self.stream = stream
        self.client = client
        self.tls_info = tls_info
        self.h11 = h11.Connection(h11.SERVER)
        self.bytes_sent = 0

    async def next_event(self, timeout: float | None = None) -> h11.Event:
        while True:
            event = self.h11.next_event()  # raises h11.RemoteProtocolError on bad input
            if event is not h11.NEED_DATA:
                return event  # type: ignore[return-value]
            try:
                if timeout is None:
                    data = await self.stream.receive_some()
                else:
                    with trio.fail_after(timeout):
                        data = await self.stream.receive_some()
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise _ClientGone from exc
            self.h11.receive_data(data)

    async def send(self, *events: h11.Event) -> None:
        data = b"".join(self.h11.send(event) or b"" for event in events)
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise _ClientGone from exc
        self.bytes_sent += len(data)

    async def send_error(self, status: int) -> None:
        if self.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return  # a response is already under way: the connection just ends
        response, body = error_response(status)
        await self.send(response, h11.Data(data=body), h11.EndOfMessage())


async def _forward(
    exchange: _Exchange,
    request: h11.Request,
    generation: Generation,
    upstream: UpstreamConnection | None,
) -> tuple[int, UpstreamConnection | None]:
    """Forward one request; return the status sent and the upstream connection to keep."""
    config = generation.config.upstream
    if exchange.h11.they_are_waiting_for_100_continue:
        await exchange.send(h11.InformationalResponse(status_code=100, headers=[]))
    outgoing = upstream_request(request, exchange.client)
    if upstream is not None and not upstream.reusable:
        await upstream.aclose()
        upstream = None
    reused = upstream is not None
    has_body = any(
        name in (b"content-length", b"transfer-encoding") for name, _ in outgoing.headers
    )
    try:
        if upstream is None:
            upstream = await UpstreamConnection.connect(config)
        try:
            await upstream.send(outgoing)
        except UpstreamFailure:
            if not reused:
                raise
            # A kept-alive connection the upstream had already closed: nothing of this
            # request reached it, so one fresh connection is safe.
            await upstream.aclose()
            upstream = await UpstreamConnection.connect(config)
            reused = False
            await upstream.send(outgoing)
        while True:
            event = await exchange.next_event()
            if isinstance(event, h11.Data):
                await upstream.send(h11.Data(data=event.data))
            elif isinstance(event, h11.EndOfMessage):
                await upstream.send(h11.EndOfMessage())
                break
            else:
                raise _ClientGone  # ConnectionClosed in the middle of a request body
        try:
            event = await upstream.next_event()
        except UpstreamFailure:
            if not (reused and not has_body and upstream.bytes_received == 0):
                raise
            await upstream.aclose()
            upstream = await UpstreamConnection.connect(config)
            await upstream.send(outgoing)
            await upstream.send(h11.EndOfMessage())
            event = await upstream.next_event()
        while isinstance(event, h11.InformationalResponse):
            event = await upstream.next_event()  # 1xx from upstream: the proxy sent its own 100
        if not isinstance(event, h11.Response):
            raise UpstreamFailure(f"upstream {config} sent {type(event).__name__} first", 502)
        status = event.status_code
        await exchange.send(client_response(event))
        while True:
            event = await upstream.next_event()
            if isinstance(event, h11.Data):
                await exchange.send(h11.Data(data=event.data))
            elif isinstance(event, h11.EndOfMessage):
                await exchange.send(h11.EndOfMessage())
                break
            else:
                raise UpstreamFailure(f"upstream {config} ended the response early", 502)
    except UpstreamFailure as failure:
        log.warning(str(failure), extra={"fields": {"event": "upstream_error"}})
        if upstream is not None:
            await upstream.aclose()
        await exchange.send_error(failure.status)
        return failure.status, None
    if upstream.reusable or (
        upstream._h11.our_state is h11.DONE and upstream._h11.their_state is h11.DONE
    ):
        upstream.start_next_cycle()
        return status, upstream
    await upstream.aclose()
    return status, None


async def _serve_http(exchange: _Exchange, generation: Generation) -> None:
    upstream: UpstreamConnection | None = None
    try:
        while True:
            try:
                event = await exchange.next_event(timeout=IDLE_KEEPALIVE_SECONDS)
            except trio.TooSlowError:
                return
            except h11.RemoteProtocolError as exc:
                await exchange.send_error(error_status_for(exc))
                return
            if not isinstance(event, h11.Request):
                return  # ConnectionClosed
            started = time.perf_counter()
            sent_before = exchange.bytes_sent
            try:
                status, upstream = await _forward(exchange, event, generation, upstream)
            except h11.RemoteProtocolError as exc:
                # The request body broke framing (bad chunk size, ...): never forwarded.
                status = error_status_for(exc)
                await exchange.send_error(status)
                if upstream is not None:
                    await upstream.aclose()
                    upstream = None
            access_log.info(
                "request",
                extra={
                    "fields": {
                        "client": exchange.client.address,
                        "sni": exchange.client.server_name,
                        "tls_version": exchange.tls_info.version,
                        "method": event.method.decode("ascii", "replace"),
                        "path": event.target.decode("ascii", "replace"),
                        "status": status,
                        "bytes_sent": exchange.bytes_sent - sent_before,
                        "duration_ms": round((time.perf_counter() - started) * 1000, 3),
                        "upstream": str(generation.config.upstream),
                    }
                },
            )
            if exchange.h11.our_state is h11.MUST_CLOSE or exchange.h11.their_state in (
                h11.MUST_CLOSE,
                h11.CLOSED,
            ):
                return
            try:
                exchange.h11.start_next_cycle()
            except h11.LocalProtocolError:
                return
    finally:
        if upstream is not None:
            with trio.CancelScope(shield=True):
                await upstream.aclose()


async def handle_connection(state: ServerState, stream: trio.SocketStream) -> None:
    """Everything one client connection goes through; never raises."""
    connection_id = next(state.connection_ids)
    try:
        peer = stream.socket.getpeername()[0]
    except OSError:
        peer = "unknown"
    generation = state.holder.acquire()  # held for the handshake, the only part that signs
    # One mutable dict per connection: worker threads see the same object, so the SNI
    # name recorded during the handshake reaches the audit line of its signature.
    context: dict[str, object] = {"connection_id": connection_id, "client": peer}
    connection_context.set(context)
    tls = TLSStream(
        stream,
        generation.ssl_context,
        state.sign_limiter,
        on_server_name=lambda name: context.__setitem__("sni", name),
    )
    try:
        try:
            with trio.fail_after(generation.config.tls.handshake_timeout):
                info = await tls.do_handshake()
        except trio.TooSlowError:
            log.info("TLS handshake timed out", extra={"fields": context})
            return
        except TLSError as exc:
            log.info(str(exc), extra={"fields": context})
            return
        finally:
            state.holder.release(generation)
        exchange = _Exchange(tls, ClientInfo(peer, info.server_name), info)
        await _serve_http(exchange, generation)
    except _ClientGone:
        pass
    except Exception:
        log.exception("connection failed unexpectedly", extra={"fields": context})
    finally:
        with trio.move_on_after(_CLOSE_GRACE_SECONDS) as scope:
            scope.shield = True
            with suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await tls.aclose()


async def serve(
    holder: GenerationHolder,
    listen: Address,
    on_ready: Callable[[list[str]], None],
    handle_signals: bool = True,
    tasks: Sequence[Callable[[], Awaitable[None]]] = (),
) -> None:
    """Serve until SIGINT/SIGTERM (or cancellation); ``tasks`` run beside (the reloader)."""
    state = ServerState(holder, trio.CapacityLimiter(holder.current.token.pool_size))
    try:
        listeners = await trio.open_tcp_listeners(listen.port, host=listen.host)
    except OSError as exc:
        raise TLSError(f"cannot listen on {listen}: {exc.strerror or exc}") from None
    bound = []
    for listener in listeners:
        host, port = listener.socket.getsockname()[:2]
        bound.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            partial(trio.serve_listeners, partial(handle_connection, state), listeners)
        )
        for task in tasks:
            nursery.start_soon(task)
        on_ready(bound)
        if handle_signals:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    log.info(f"received {signal.Signals(signum).name}, stopping")
                    nursery.cancel_scope.cancel()
                    break
