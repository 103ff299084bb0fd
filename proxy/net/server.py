"""The server: listeners, accepting, and the graceful drain.

Theory of operation. :func:`serve` binds the listeners (or, under ``--workers``, takes the
``SO_REUSEPORT`` sockets its supervisor bound for it, workers.py) and accepts at
most ``http.max_connections`` client connections at a time (more wait in the kernel's
listen backlog, or with ``max_connections_mode = "refuse"`` are closed at once, counted and
logged; running out of file descriptors pauses accepting). Each connection is a
task that runs the pipeline (pipeline.py): admission, handshake, one protocol handler,
the close. Beside the listeners run the handlers' once-a-second sweep, the caller's tasks
(the reloader) and, when configured, the admin listener and its readiness probes
(http/admin.py, readiness.py). A worker of a ``--workers`` supervisor serves its admin
endpoint on the Unix socket the supervisor named, for the supervisor alone (net/fleet.py
serves the one TCP admin address), and samples its on-demand gauges once a second for
the shared metrics files (ops/admin.py).

Shutdown: SIGTERM or SIGINT closes the listeners, cancels the waits of idle connections
(``ServerState.drain``), lets in-flight work finish (HTTP/1.1 answers with
``Connection: close``, HTTP/2 connections send GOAWAY and finish the streams they took,
TCP tunnels keep relaying) for ``http.shutdown_grace`` seconds, then cancels
what is left; a second signal stops at once.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import nullcontext, suppress
from functools import partial

import trio

from proxy.config import Address
from proxy.errors import TLSError
from proxy.generation.holder import GenerationHolder
from proxy.generation.model import Generation
from proxy.http.admin import handle_admin
from proxy.http.exchange import HTTP1Handler
from proxy.http2.handler import HTTP2Handler
from proxy.net.limits import HandshakeLimiter, Refusals
from proxy.net.listen import open_listeners
from proxy.net.pipeline import HTTP1, HTTP2, TCP, Handlers, ServerState, handle_connection
from proxy.net.readiness import probe_readiness
from proxy.net.sockets import CHECKPOINT_EVERY
from proxy.net.workers import report_ready, worker_admin_socket, worker_sockets
from proxy.ops.admin import Operations, token_state
from proxy.ops.logs import log
from proxy.tcp.handler import TCPHandler

_LISTEN_BACKLOG = 4096
# accept() errors that mean "out of resources for now": wait and try again (as trio does).
_ACCEPT_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
# accept() errors about the one connection that went away (reset or refused before it was
# taken; trio's SocketListener list): take the next one.
_ACCEPT_GONE_ERRNOS = {
    getattr(errno, name)
    for name in (
        "EPERM",  # Linux: denied by the firewall
        "ECONNABORTED",
        "EPROTO",
        "ENETDOWN",
        "ENOPROTOOPT",
        "EHOSTDOWN",
        "ENONET",
        "EHOSTUNREACH",
        "EOPNOTSUPP",
        "ENETUNREACH",
        "ENOSR",
        "ESOCKTNOSUPPORT",
        "EPROTONOSUPPORT",
        "ETIMEDOUT",
        "ECONNRESET",
    )
    if hasattr(errno, name)
}


async def _accept(
    listener: trio.SocketListener,
    connections: trio.Nursery,
    state: ServerState,
    slots: trio.Semaphore,
    refusals: Refusals | None = None,
) -> None:
    """Accept while fewer than ``http.max_connections`` are open; beyond, new connections
    wait in the kernel's backlog, or with ``refusals`` (``max_connections_mode =
    "refuse"``) are accepted and closed at once, counted and logged. Running out of file
    descriptors pauses accepting.

    The listening socket is used directly (a duplicate of its descriptor, closed with
    this task), not through ``SocketListener.accept``: that built a trio socket and a
    ``SocketStream`` per connection only for the pipeline to take the descriptor back
    (about 3% of a full handshake's CPU in bench scenario 1). The accepted socket gets
    the options trio's stream would have set."""

    async def run(accepted: socket.socket) -> None:
        try:
            await handle_connection(state, accepted)
        finally:
            slots.release()

    listening = socket.socket(fileno=os.dup(listener.socket.fileno()))
    listening.setblocking(False)
    immediate = 0  # accepts in a row that did not wait: yield now and then, as trio does
    try:
        while True:
            if refusals is None:
                await slots.acquire()
            try:
                checkpoint = immediate >= CHECKPOINT_EVERY
                accepted = await _accept_one(listening, checkpoint)
                immediate = 1 if checkpoint else immediate + 1
                while accepted is None:  # waited until the backlog had one: accept again
                    accepted = await _accept_one(listening, False)
                    immediate = 0
            except OSError as exc:
                if refusals is None:
                    slots.release()
                if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                    raise
                log.warning(f"cannot accept a connection now: {exc.strerror}; retrying")
                await trio.sleep(0.1)
                continue
            except BaseException:
                if refusals is None:
                    slots.release()
                raise
            if refusals is not None:
                try:
                    slots.acquire_nowait()
                except trio.WouldBlock:
                    _refuse(accepted, state, refusals)
                    continue
            connections.start_soon(run, accepted)
    finally:
        listening.close()


async def _accept_one(listening: socket.socket, checkpoint: bool) -> socket.socket | None:
    """A connection from the backlog at once, or None after waiting until there is one (or
    when the one in the backlog went away before it was taken)."""
    if checkpoint:
        await trio.lowlevel.checkpoint()
    try:
        accepted, _ = listening.accept()
    except BlockingIOError:
        await trio.lowlevel.wait_readable(listening)
        return None
    except OSError as exc:
        if exc.errno in _ACCEPT_GONE_ERRNOS:
            return None  # that connection is gone: the caller accepts again
        raise
    # What trio.SocketStream sets: no Nagle delay, and writable only while at most 16 KiB
    # is unsent. Not for a Unix socket (refused there, as trio ignores it).
    with suppress(OSError):
        accepted.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        accepted.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, 2**14)
    return accepted


def _refuse(accepted: socket.socket, state: ServerState, refusals: Refusals) -> None:
    """Close a connection beyond http.max_connections before reading a byte."""
    accepted.close()
    state.metrics.connection_refused("max_connections")
    count = refusals.refused()
    if count:
        log.warning(
            f"refused {count} connections over http.max_connections "
            f"({state.holder.current.config.http.max_connections} open)",
            extra={"fields": {"event": "connection_limit"}},
        )


async def _sweep(state: ServerState) -> None:
    """Once a second, the handlers let go of what expired (idle upstream connections)."""
    while True:
        await trio.sleep(1.0)
        state.handlers.sweep()


def _inherited_listener(fd: int) -> trio.SocketListener:
    """A worker's listening socket, bound by its supervisor (workers.py)."""
    return trio.SocketListener(trio.socket.from_stdlib_socket(socket.socket(fileno=fd)))


def _bound(listeners: list[trio.SocketListener]) -> list[str]:
    """HOST:PORT (or [IPv6]:PORT) each listener is bound to."""
    bound = []
    for listener in listeners:
        host, port = listener.socket.getsockname()[:2]
        bound.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    return bound


async def _sample(operations: Operations) -> None:
    """Multiprocess metrics: write the on-demand gauges once a second."""
    while True:
        operations.metrics.sample()
        await trio.sleep(1.0)


async def _unix_listener(path: str) -> trio.SocketListener:
    """A worker's admin endpoint for its supervisor, in the supervisor's private directory
    (which alone keeps others out; the socket itself is open to whoever gets there, so a
    supervisor that dropped root still connects to a worker that bound it as root)."""
    with suppress(FileNotFoundError):
        os.unlink(path)  # left by the worker this one replaces
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    try:
        await sock.bind(path)
        os.chmod(path, 0o666)  # noqa: S103 - the directory (0700) is the access control
        sock.listen(_LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        raise TLSError(f"cannot listen on {path} (admin, for the supervisor): {exc}") from None
    return trio.SocketListener(sock)


async def _listen(address: Address, what: str) -> tuple[list[trio.SocketListener], list[str]]:
    try:
        listeners = await open_listeners(address.host, address.port, _LISTEN_BACKLOG)
    except OSError as exc:
        raise TLSError(f"cannot listen on {address} ({what}): {exc.strerror or exc}") from None
    return listeners, _bound(listeners)


async def serve(
    holder: GenerationHolder,
    listen: Address,
    on_ready: Callable[[list[str]], None],
    handle_signals: bool = True,
    tasks: Sequence[Callable[..., Awaitable[None]]] = (),
    operations: Operations | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM (then drain, see the module docstring) or cancellation;
    ``tasks`` run beside the listeners (the reloader), each started (``task_status``)
    before the server reports ready: a SIGHUP sent as soon as it is ready finds the
    reloader listening; with ``operations.config``, the admin listener and its readiness
    probes too."""
    operations = operations or Operations()
    security = holder.current.config.security
    http1 = HTTP1Handler()  # owns the upstream pools; HTTP/2 streams use the same ones
    state = ServerState(
        holder,
        # Every token's sessions: a handshake step waits only when all are busy.
        trio.CapacityLimiter(sum(token.pool_size for token in holder.current.all_tokens())),
        handlers=Handlers({HTTP1: http1, HTTP2: HTTP2Handler(http1.pools), TCP: TCPHandler()}),
        handshakes=HandshakeLimiter(
            security.max_handshakes,
            security.max_handshakes_per_client,
            rate_per_client=security.handshake_rate_per_client,
            burst_per_client=security.handshake_burst_per_client,
        ),
        metrics=operations.metrics,
    )
    operations.serving(holder.current.number, holder.current.chains())
    operations.metrics.track_queue(lambda: state.sign_limiter.statistics().tasks_waiting)

    def resize_sign_limiter(generation: Generation) -> None:
        # Handshake steps that sign at once: as many as the served tokens have sessions.
        # The old generation's handshakes in flight finish under the new size.
        state.sign_limiter.total_tokens = sum(token.pool_size for token in generation.all_tokens())

    holder.on_swap(resize_sign_limiter)
    operations.readiness.add_check(lambda: token_state(*state.holder.current.all_tokens()))
    http = holder.current.config.http
    shared = worker_sockets()
    try:
        if shared is None:
            listeners = await open_listeners(listen.host, listen.port, _LISTEN_BACKLOG)
        else:
            listeners = [_inherited_listener(fd) for fd in shared]
    except OSError as exc:
        raise TLSError(f"cannot listen on {listen}: {exc.strerror or exc}") from None
    bound = _bound(listeners)
    admin_listeners: list[trio.SocketListener] = []
    admin_bound: list[str] = []
    supervised_admin = worker_admin_socket()
    if operations.config is not None and supervised_admin is not None:
        admin_listeners = [await _unix_listener(supervised_admin)]
    elif operations.config is not None:
        admin_listeners, admin_bound = await _listen(operations.config.listen, "admin")
    slots = trio.Semaphore(http.max_connections)
    refusals = Refusals() if http.max_connections_mode == "refuse" else None
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
                        accepting.start_soon(
                            partial(_accept, listener, connections, state, slots, refusals)
                        )
                    accepting.start_soon(_sweep, state)
                    if operations.metrics.multiprocess:
                        accepting.start_soon(_sample, operations)
                    for task in tasks:
                        await accepting.start(task)
                    if operations.config is not None:
                        accepting.start_soon(
                            partial(
                                trio.serve_listeners,
                                partial(handle_admin, holder, operations),
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
        state.handlers.close()


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
