"""The supervisor's admin listener under ``--workers`` (workers.py): one address for all.

Theory of operation. The supervisor waits on child processes and is no trio program, so
its admin listener runs trio in a thread of its own. :func:`bind_admin` binds the
``[admin]`` address while the supervisor may still be root (before it drops privileges);
:class:`FleetAdmin` serves it with the same HTTP side as a single process (http/admin.py)
and the fleet's answers (ops/fleet.py). ``/readyz`` first asks every running worker's own
``/readyz``: each worker serves its admin endpoint on a Unix socket in the supervisor's
private directory (``HSM_PROXY_WORKER_ADMIN``), all asked at once, each within
``_ASK_TIMEOUT_SECONDS``. ``/metrics`` reads the workers' multiprocess files.
"""

from __future__ import annotations

import errno
import socket
import threading
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

import trio

from proxy.config import Address
from proxy.errors import ConfigError, UpstreamError
from proxy.http.admin import ask_admin, serve_admin_request
from proxy.net.listen import listen_addresses
from proxy.ops.fleet import FleetEndpoint, WorkerAnswer

_ASK_TIMEOUT_SECONDS = 5.0
_LISTEN_BACKLOG = 128


@dataclass(frozen=True)
class RunningWorker:
    number: int
    pid: int
    admin_socket: Path


def bind_admin(listen: Address) -> list[socket.socket]:
    """Listening sockets for every address ``listen`` names (net/listen.py: ``localhost``
    is both loopbacks; port 0: one port for all)."""
    try:
        candidates = listen_addresses(listen.host, listen.port)
    except socket.gaierror as exc:
        raise ConfigError(f"admin.listen: cannot resolve {listen.host!r}: {exc.strerror}") from None
    sockets: list[socket.socket] = []
    port = listen.port
    for family, host, required in candidates:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host, port))
            sock.listen(_LISTEN_BACKLOG)
        except OSError as exc:
            sock.close()
            if not required and exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                continue  # a loopback added for localhost that this host does not have
            for other in sockets:
                other.close()
            raise ConfigError(
                f"admin.listen: cannot listen on {listen}: {exc.strerror or exc}"
            ) from None
        port = sock.getsockname()[1]
        sockets.append(sock)
    return sockets


def bound_addresses(sockets: Sequence[socket.socket]) -> list[str]:
    shown = []
    for sock in sockets:
        host, port = sock.getsockname()[:2]
        shown.append(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    return shown


class FleetAdmin:
    """The supervisor's admin endpoint, served from a thread running trio."""

    def __init__(
        self,
        sockets: list[socket.socket],
        endpoint: FleetEndpoint,
        running: Callable[[], Sequence[RunningWorker]],
    ) -> None:
        self._sockets = sockets
        self._endpoint = endpoint
        self._running = running
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._started.wait()

    def stop(self) -> None:
        if self._token is not None and self._scope is not None:
            with suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
        self._thread.join(timeout=10)
        for sock in self._sockets:
            sock.close()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        listeners = [
            trio.SocketListener(trio.socket.from_stdlib_socket(sock)) for sock in self._sockets
        ]
        with trio.CancelScope() as scope:
            self._scope = scope
            self._started.set()
            await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        await serve_admin_request(self._answer, stream)

    async def _answer(self, method: str, target: str) -> tuple[int, list[tuple[str, str]], bytes]:
        answers: list[WorkerAnswer] = []
        if self._endpoint.asks_workers(method, target):
            answers = await self._ask_all(list(self._running()))
        return self._endpoint.respond(method, target, answers)

    async def _ask_all(self, workers: list[RunningWorker]) -> list[WorkerAnswer]:
        answers: dict[int, WorkerAnswer] = {}
        async with trio.open_nursery() as nursery:
            for worker in workers:
                nursery.start_soon(self._ask, worker, answers)
        return [answers[worker.number] for worker in workers]

    @staticmethod
    async def _ask(worker: RunningWorker, answers: dict[int, WorkerAnswer]) -> None:
        def failed(reason: str) -> WorkerAnswer:
            return WorkerAnswer(worker.number, worker.pid, None, reason)

        try:
            with trio.fail_after(_ASK_TIMEOUT_SECONDS):
                stream = await trio.open_unix_socket(str(worker.admin_socket))
                async with stream:
                    status, body = await ask_admin(stream, "/readyz")
        except trio.TooSlowError:
            answers[worker.number] = failed(
                f"its admin endpoint did not answer within {_ASK_TIMEOUT_SECONDS:g}s"
            )
        except (OSError, trio.BrokenResourceError, UpstreamError) as exc:
            # Starting (not listening yet) or exiting: the socket is missing or refuses.
            answers[worker.number] = failed(f"its admin endpoint cannot be asked ({exc})")
        else:
            text = body.decode("utf-8", "replace")
            answers[worker.number] = WorkerAnswer(worker.number, worker.pid, status, text)
