"""The connection pipeline: admission, the TLS handshake, one protocol handler, the close.

Theory of operation (docs/ARCHITECTURE.md, "The pipeline"). Every accepted connection
passes the same layers, in order, in :func:`handle_connection`:

1. **admission**: the handshake limits (net/limits.py) admit the connection or it is
   closed before a byte is read or a signature queued;
2. **handshake**: the connection takes the current generation once (a reload never changes
   a connection under way) and completes the TLS handshake within
   ``tls.handshake_timeout``; the token signs here and nowhere else;
3. **handler**: :meth:`Handlers.choose` picks one protocol handler from the configuration
   and what the handshake settled (ALPN, the server name's site), and the handler owns the
   decrypted stream until it returns;
4. **close**: the handler returns a :class:`CloseMode` (close_notify, lingering close,
   abort) and :meth:`TLSStream.close` carries it out, in one place.

The handler interface is deliberately small (:class:`Handler`): ``serve(client)`` gets a
:class:`Client` (the stream, what TLS settled, the generation, the shared server state)
and returns the close mode; ``sweep`` and ``close`` look after what a handler keeps between
connections (idle upstream connections). A handler raises only :class:`ClientGone` for a
client that vanished; anything else is logged as a bug and the connection aborted, so one
bad connection never stops a listener.
"""

from __future__ import annotations

import itertools
import socket
import time
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Protocol

import trio

from proxy.errors import TLSError
from proxy.generation.holder import GenerationHolder
from proxy.generation.model import Generation
from proxy.net.limits import HandshakeLimiter, HandshakeSlot
from proxy.net.sockets import TCPStream
from proxy.ops.admin import Metrics
from proxy.ops.logs import connection_context, log
from proxy.tls.socketstream import open_tls_stream
from proxy.tls.stream import CloseMode, TLSInfo, TLSStream

HTTP1 = "http/1.1"
HTTP2 = "h2"
TCP = "tcp"


class ClientGone(Exception):
    """The client closed or broke the connection; nothing more can be sent to it."""


@dataclass
class ServerState:
    """What every connection of one server shares, whatever its protocol."""

    holder: GenerationHolder
    sign_limiter: trio.CapacityLimiter
    handlers: Handlers
    handshakes: HandshakeLimiter  # security.max_handshakes[_per_client]
    connection_ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    metrics: Metrics = field(default_factory=Metrics)
    draining: bool = False
    # Waits that end quietly when the server drains (an idle keep-alive connection).
    idle_scopes: set[trio.CancelScope] = field(default_factory=set)

    def drain(self) -> None:
        self.draining = True
        for scope in self.idle_scopes:
            scope.cancel()


@dataclass
class Client:
    """One client connection after its handshake, as a protocol handler sees it."""

    id: int
    address: str
    stream: TLSStream
    tls: TLSInfo
    generation: Generation
    server: ServerState


class Handler(Protocol):
    """A protocol spoken on the decrypted stream (HTTP/1.1, TCP passthrough, ...)."""

    async def serve(self, client: Client) -> CloseMode:
        """Serve the connection until it ends; say how it must close."""
        ...

    def sweep(self) -> None:
        """Once a second: let go of what expired (idle upstream connections)."""
        ...

    def close(self) -> None:
        """At shutdown: let go of everything kept between connections."""
        ...


def protocol_for(generation: Generation, info: TLSInfo) -> str:
    """Which handler serves a connection: TCP passthrough for a tcp:// upstream group,
    else HTTP/2 when ALPN settled on h2, else HTTP/1.1."""
    if generation.upstream_serving(info.context).tcp:
        return TCP
    return HTTP2 if info.alpn == HTTP2 else HTTP1


class Handlers:
    """The protocol handlers of one server, by protocol name."""

    def __init__(self, handlers: Mapping[str, Handler]) -> None:
        self._handlers = dict(handlers)

    def choose(self, generation: Generation, info: TLSInfo) -> Handler:
        return self._handlers[protocol_for(generation, info)]

    def sweep(self) -> None:
        for handler in self._handlers.values():
            handler.sweep()

    def close(self) -> None:
        for handler in self._handlers.values():
            handler.close()


async def _admitted(state: ServerState, stream: TCPStream, peer: str) -> HandshakeSlot | None:
    """A handshake slot, or None (the connection is closed) over the handshake limits."""
    limiter = state.handshakes
    slot = limiter.admit(peer)
    if slot is not None:
        return slot
    state.metrics.connection_refused(limiter.refused_reason)
    refused = limiter.refusal_report()
    if refused:
        log.warning(
            f"refused {refused} connections over the handshake limits (the last one: "
            f"{limiter.refused_reason}, from {peer})",
            extra={"fields": {"event": "handshake_limit", "client": peer}},
        )
    with suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        await stream.aclose()
    return None


async def handle_connection(state: ServerState, accepted: socket.socket) -> None:
    """Everything one client connection goes through; never raises."""
    try:
        stream = TCPStream(accepted)
    except OSError:  # could not take the socket over: nothing was read or sent yet
        with suppress(OSError):
            accepted.close()
        return
    connection_id = next(state.connection_ids)
    state.metrics.connection_opened()
    try:
        peer = stream.socket.getpeername()[0]
    except OSError:
        peer = "unknown"
    try:
        slot = await _admitted(state, stream, peer)
        if slot is None:
            return
        await _handshake_and_serve(state, stream, connection_id, peer, slot)
    finally:
        state.metrics.connection_closed()


async def _handshake_and_serve(
    state: ServerState, stream: TCPStream, connection_id: int, peer: str, slot: HandshakeSlot
) -> None:
    generation = state.holder.acquire()  # held for the handshake, the only part that signs
    # One mutable dict per connection: worker threads see the same object, so the SNI
    # name recorded during the handshake reaches the audit line of its signature.
    context: dict[str, object] = {"connection_id": connection_id, "client": peer}
    connection_context.set(context)
    stream.send_timeout = generation.config.http.body_timeout  # a client that stops reading
    tls = open_tls_stream(
        stream,
        generation.ssl_context,
        state.sign_limiter,
        on_server_name=lambda name: context.__setitem__("sni", name),
        max_waiting=generation.config.token.queue_limit,
    )
    mode = CloseMode.CLOSE_NOTIFY
    started = time.perf_counter()
    try:
        try:
            # trio.fail_after, without its generator-based context manager (per connection)
            with trio.move_on_after(generation.config.tls.handshake_timeout) as bounded:
                info = await tls.do_handshake()
            if bounded.cancelled_caught:
                raise trio.TooSlowError
        except trio.TooSlowError:
            state.metrics.handshake_finished(None, "timeout", 0.0)
            log.info("TLS handshake timed out", extra={"fields": context})
            return
        except TLSError as exc:
            state.metrics.handshake_finished(None, "failed", 0.0)
            log.info(str(exc), extra={"fields": context})
            mode = CloseMode.LINGER  # the alert is out: let the client read it
            return
        finally:
            state.holder.release(generation)
            slot.release()
        state.metrics.handshake_finished(
            info.version, "ok", time.perf_counter() - started, info.resumed
        )
        client = Client(connection_id, peer, tls, info, generation, state)
        # A handler that is cancelled (the drain deadline) or fails has no say: whatever it
        # was sending was cut off, and must not end with a clean close_notify.
        mode = CloseMode.ABORT
        mode = await state.handlers.choose(generation, info).serve(client)
    except ClientGone:
        pass
    except Exception:
        log.exception("connection failed unexpectedly", extra={"fields": context})
        mode = CloseMode.ABORT
    finally:
        await tls.close(mode)
