"""Several worker processes behind one address (``hsm-proxy run --workers N``).

Theory of operation. PKCS#11 state does not survive ``fork()``: a module initialised in a
parent is unusable in a forked child. So the supervisor never loads a PKCS#11 module; it
*spawns* each worker as a fresh ``python -m proxy run`` process (fork + exec), which
initialises the module, logs in and builds its generation on its own, exactly as a single
process does.

Sharing the port: the supervisor resolves the listen address and, for each worker number,
binds one listening socket per address with ``SO_REUSEPORT`` (port 0 becomes one concrete
port, the first socket's), as nginx's master does with ``reuseport``. Worker N inherits
its sockets (their descriptors in ``HSM_PROXY_WORKER_LISTEN``, JSON), and so does the
worker that replaces it: the kernel spreads new connections across the sockets by a hash
of the connection's addresses, and connections that reach a dead worker's sockets wait in
their backlog for its replacement. A worker reports that it serves by writing its pid to
the pipe named by ``HSM_PROXY_READY_FD``.

Privileges: the supervisor binds everything a worker needs while it may still be root
(the listening sockets, the admin listener, the private directory handed to
``security.user``), then drops root (ops/hardening.py) before it starts the first
worker. So no worker ever runs as root, a replacement gets the same sockets, and a
privileged port needs no capability in any worker.

Workers start one at a time, each once the previous one serves. Supervision: a worker
that exits before all workers became ready is a start-up failure (bad
config, wrong PIN...): the supervisor stops the others and exits with its status. A worker
that exits later is replaced, with a delay that grows while replacements keep dying young.
SIGTERM or SIGINT is passed on to every worker, which drain and exit; SIGHUP is passed on
too, and each worker reloads its config and secrets.

With ``[admin]`` the supervisor serves the one admin address (net/fleet.py, ops/fleet.py):
it binds it beside the reserved sockets, makes a private directory (0700) for the
workers' prometheus-client multiprocess files (``PROMETHEUS_MULTIPROC_DIR``) and their
admin sockets (``HSM_PROXY_WORKER_ADMIN``, one path per worker number, reused by a
replacement), tells the metrics files when a worker is gone, and removes the directory
when it stops.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

from proxy.config import Address, AdminConfig
from proxy.errors import ConfigError
from proxy.net.fleet import FleetAdmin, RunningWorker, bind_admin, bound_addresses
from proxy.net.listen import listen_addresses
from proxy.ops.admin import MULTIPROCESS_ENV
from proxy.ops.fleet import FleetEndpoint, FleetMetrics, worker_exited
from proxy.ops.hardening import drop_privileges, hand_over
from proxy.ops.logs import log

WORKER_LISTEN_ENV = "HSM_PROXY_WORKER_LISTEN"
WORKER_ADMIN_ENV = "HSM_PROXY_WORKER_ADMIN"
READY_FD_ENV = "HSM_PROXY_READY_FD"
TICKET_KEY_FD_ENV = "HSM_PROXY_TICKET_KEY_FD"
_SHARED_TICKET_KEY_SIZE = 80  # tls.TICKET_KEY_SIZE; workers.py does not import the TLS layer
_inherited_ticket_key: list[bytes | None] = []


def inherited_ticket_key() -> bytes | None:
    """The session-ticket key the supervisor gave this worker (read once from a pipe).

    Without it each worker would make its own, and a client resumed by another worker than
    the one that issued its ticket would pay a full handshake, and a token signature.
    ``None`` outside a supervised worker.
    """
    if not _inherited_ticket_key:
        text = os.environ.get(TICKET_KEY_FD_ENV)
        key = None
        if text is not None:
            with os.fdopen(int(text), "rb") as pipe:
                key = pipe.read(_SHARED_TICKET_KEY_SIZE + 1)
            if len(key) != _SHARED_TICKET_KEY_SIZE:
                raise ConfigError(
                    f"the supervisor's ticket key is {len(key)} bytes, expected exactly "
                    f"{_SHARED_TICKET_KEY_SIZE}"
                )
        _inherited_ticket_key.append(key)
    return _inherited_ticket_key[0]


_STOP_MARGIN_SECONDS = 5.0  # beyond the workers' own shutdown grace
_LISTEN_BACKLOG = 4096
# An added loopback address the host does not have: skipped, not an error.
_ABSENT = {errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT}
_YOUNG_SECONDS = 5.0
_MAX_RESTART_DELAY = 30.0


def worker_sockets() -> list[int] | None:
    """In a worker: the descriptors of the listening sockets it inherited; None otherwise."""
    text = os.environ.get(WORKER_LISTEN_ENV)
    if not text:
        return None
    return [int(fd) for fd in json.loads(text)]


def worker_admin_socket() -> str | None:
    """In a worker of a supervisor with [admin]: the Unix socket to serve admin on."""
    return os.environ.get(WORKER_ADMIN_ENV) or None


def report_ready() -> None:
    """In a worker: tell the supervisor this process serves."""
    fd = os.environ.get(READY_FD_ENV)
    if fd:
        with suppress(OSError):  # the supervisor is gone; nothing to tell
            os.write(int(fd), f"{os.getpid()}\n".encode())


def _reuse_port_socket(family: int, host: str, port: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(_LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def listening_sockets(
    listen: Address, count: int
) -> tuple[list[list[socket.socket]], list[tuple[int, str, int]]]:
    """For each of ``count`` workers, one listening SO_REUSEPORT socket per address
    ``listen`` names (all on one port); and the (family, host, port) of each address."""
    try:
        candidates = listen_addresses(listen.host, listen.port)
    except socket.gaierror as exc:
        raise ConfigError(f"listen: cannot resolve {listen.host!r}: {exc.strerror}") from None
    first: list[socket.socket] = []
    slots = [first]
    addresses: list[tuple[int, str, int]] = []
    port = listen.port
    try:
        for family, host, required in candidates:
            try:
                sock = _reuse_port_socket(family, host, port)
            except OSError as exc:
                if not required and exc.errno in _ABSENT:
                    continue  # a loopback added for localhost that this host does not have
                raise
            port = sock.getsockname()[1]  # port 0: every address shares the first choice
            first.append(sock)
            addresses.append((int(family), host, port))
        for _ in range(count - 1):
            slot: list[socket.socket] = []
            slots.append(slot)
            for family, host, port in addresses:
                slot.append(_reuse_port_socket(family, host, port))
    except OSError as exc:
        for slot in slots:
            for sock in slot:
                sock.close()
        raise ConfigError(f"cannot listen on {listen}: {exc.strerror or exc}") from None
    return slots, addresses


@dataclass
class _Worker:
    number: int
    process: subprocess.Popen[bytes]
    started: float = field(default_factory=time.monotonic)


class Supervisor:
    def __init__(
        self,
        command: list[str],
        count: int,
        listen: Address,
        shutdown_grace: float = 30.0,
        admin: AdminConfig | None = None,
        user: str | None = None,
    ) -> None:
        if count < 1:
            raise ConfigError(f"--workers: must be at least 1, got {count}")
        self._command = command
        self._count = count
        self._listen = listen
        self._admin = admin
        self._user = user  # security.user: dropped to once everything is bound
        self._slots: list[list[socket.socket]] = []  # each worker number's listening sockets
        self._private: Path | None = None  # the workers' metrics files and admin sockets
        self._workers: list[_Worker] = []
        self._stop_grace = shutdown_grace + _STOP_MARGIN_SECONDS
        self._ready: set[int] = set()
        self._ready_lock = threading.Lock()
        self._stopping = threading.Event()
        # One session-ticket key for all workers, in memory only, handed over on a pipe:
        # used when the config names none, so that workers resume each other's sessions.
        self._ticket_key = os.urandom(_SHARED_TICKET_KEY_SIZE)

    def _spawn(self, number: int, ready_fd: int) -> _Worker:
        listening = [sock.fileno() for sock in self._slots[number - 1]]
        key_read, key_write = os.pipe()
        os.write(key_write, self._ticket_key)  # 80 bytes: far below a pipe's buffer
        os.close(key_write)
        env = {
            **os.environ,
            WORKER_LISTEN_ENV: json.dumps(listening),
            READY_FD_ENV: str(ready_fd),
            TICKET_KEY_FD_ENV: str(key_read),
        }
        if self._private is not None:
            env[MULTIPROCESS_ENV] = str(self._private / "metrics")
            env[WORKER_ADMIN_ENV] = str(self._admin_socket(number))
        try:
            process = subprocess.Popen(
                self._command, env=env, pass_fds=(ready_fd, key_read, *listening)
            )
        except OSError as exc:
            as_user = f" as security.user {self._user!r}" if self._user else ""
            raise ConfigError(
                f"cannot start worker {number}{as_user}: {exc.strerror}: {exc.filename} "
                "(workers are started after dropping root: that user must be able to run "
                "the interpreter and read the installation)"
            ) from None
        finally:
            os.close(key_read)
        log.info(
            f"worker {number} started (pid {process.pid})",
            extra={
                "fields": {"event": "worker_started", "worker": number, "worker_pid": process.pid}
            },
        )
        return _Worker(number, process)

    def _read_ready(self, read_fd: int) -> None:
        with os.fdopen(read_fd, "rb", buffering=0) as pipe:
            buffer = b""
            while chunk := pipe.read(64):
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    with self._ready_lock:
                        self._ready.add(int(line))

    def _admin_socket(self, number: int) -> Path:
        assert self._private is not None
        return self._private / f"worker-{number}.sock"

    def _running(self) -> list[RunningWorker]:
        """The workers running now (the admin thread asks their /readyz)."""
        return [
            RunningWorker(worker.number, worker.process.pid, self._admin_socket(worker.number))
            for worker in list(self._workers)
            if worker.process.poll() is None
        ]

    def _start_admin(self, admin: AdminConfig) -> tuple[FleetAdmin, FleetMetrics]:
        sockets = bind_admin(admin.listen)
        self._private = Path(tempfile.mkdtemp(prefix="hsm-proxy-workers-"))
        (self._private / "metrics").mkdir(mode=0o700)
        if self._user is not None and os.geteuid() == 0:
            # The workers (and the supervisor, once it dropped root) write here as the user.
            hand_over(self._private, self._user)
            hand_over(self._private / "metrics", self._user)
        metrics = FleetMetrics(self._private / "metrics")
        fleet = FleetAdmin(sockets, FleetEndpoint(metrics, self._count), self._running)
        fleet.start()
        for address in bound_addresses(sockets):
            log.info(f"admin endpoint http://{address}/ (healthz, readyz, metrics; all workers)")
        return fleet, metrics

    def run(self) -> int:
        self._slots, addresses = listening_sockets(self._listen, self._count)
        fleet: FleetAdmin | None = None
        metrics: FleetMetrics | None = None
        try:
            if self._admin is not None:
                fleet, metrics = self._start_admin(self._admin)
            # Everything is bound: privileged ports are no reason to stay root any longer.
            warning = drop_privileges(self._user)
            if warning:
                log.warning(warning)
            return self._supervise(addresses, metrics)
        finally:
            if fleet is not None:
                fleet.stop()
            if self._private is not None:
                shutil.rmtree(self._private, ignore_errors=True)
            for slot in self._slots:
                for sock in slot:
                    sock.close()

    def _supervise(
        self, addresses: list[tuple[int, str, int]], metrics: FleetMetrics | None
    ) -> int:
        read_fd, write_fd = os.pipe()
        threading.Thread(target=self._read_ready, args=(read_fd,), daemon=True).start()
        previous = {
            signum: signal.signal(signum, lambda *_: self._stopping.set())
            for signum in (signal.SIGTERM, signal.SIGINT)
        }
        previous[signal.SIGHUP] = signal.signal(
            signal.SIGHUP, lambda *_: self._forward(signal.SIGHUP, workers)
        )
        # Workers start one after another: each logs in to the token while no other worker
        # of this host does (an HSM sees no burst of logins; SoftHSM2's file store is not
        # read while another process writes it).
        workers = self._workers
        workers.append(self._spawn(1, write_fd))
        announced = False
        failures = 0
        try:
            while not self._stopping.wait(0.1):
                with self._ready_lock:
                    ready = {w.process.pid for w in workers} & self._ready
                if len(workers) < self._count and len(ready) == len(workers):
                    workers.append(self._spawn(len(workers) + 1, write_fd))
                    continue
                if not announced and len(ready) == self._count:
                    announced = True
                    for _family, host, port in addresses:
                        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
                        log.info(
                            f"serving https://{shown} with {len(workers)} workers",
                            extra={"fields": {"event": "workers_ready"}},
                        )
                for index, worker in enumerate(workers):
                    status = worker.process.poll()
                    if status is None:
                        continue
                    with self._ready_lock:
                        was_ready = worker.process.pid in self._ready
                    if not was_ready and not announced:
                        log.error(
                            f"worker {worker.number} (pid {worker.process.pid}) failed to start "
                            f"(exit status {status}); stopping",
                            extra={"fields": {"event": "worker_failed"}},
                        )
                        return status or 1
                    young = time.monotonic() - worker.started < _YOUNG_SECONDS
                    failures = failures + 1 if young else 0
                    delay = min(_MAX_RESTART_DELAY, 0.5 * 2**failures) if failures else 0.0
                    log.warning(
                        f"worker {worker.number} (pid {worker.process.pid}) exited with status "
                        f"{status}; starting a replacement" + (f" in {delay:g}s" if delay else ""),
                        extra={"fields": {"event": "worker_exited", "worker": worker.number}},
                    )
                    if metrics is not None:
                        worker_exited(worker.process.pid, metrics.directory)
                        metrics.restarts.inc()
                    if delay and self._stopping.wait(delay):
                        break
                    workers[index] = self._spawn(worker.number, write_fd)
            log.info("stopping workers")
            return 0
        finally:
            self._stop(workers)
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            os.close(write_fd)

    @staticmethod
    def _forward(signum: int, workers: list[_Worker]) -> None:
        """SIGHUP (reload): every worker reloads its own config and secrets."""
        for worker in workers:
            if worker.process.poll() is None:
                worker.process.send_signal(signum)

    def _stop(self, workers: list[_Worker]) -> None:
        for worker in workers:
            if worker.process.poll() is None:
                worker.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self._stop_grace
        for worker in workers:
            try:
                worker.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                worker.process.kill()
                worker.process.wait()


def worker_command(config: Path, log_level: str, log_format: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "proxy",
        "--log-level",
        log_level,
        "--log-format",
        log_format,
        "run",
        "--config",
        str(config),
    ]
