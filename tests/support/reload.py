"""Helpers for the reload tests: configs with secrets, a steady stream of clients, secret pushes.

The load runs real TLS clients in threads (fresh connections, and keep-alive connections
that never reconnect silently: a dropped one is a failure) and records every failure.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cryptography import x509

from tests.support import (
    REPO,
    KeepAlive,
    ProxyProcess,
    https_request,
    proxy_command,
    stop_all,
)

RELOAD_SETTINGS = "\n[reload]\nwatch_interval = 0.2\naws_poll_interval = 0.5\n"


_launched: list[ProxyProcess] = []


# The AWS Secrets Manager stand-in, from its own virtualenv (deploy/setup.sh --test makes it).
MOTO_SERVER = REPO / ".venv-moto" / "bin" / "moto_server"


def stop_launched() -> None:
    """Stop what :func:`launch` started; fail if one did not stop cleanly."""
    launched = list(_launched)
    _launched.clear()
    stop_all(launched)


def launch(directory: Path, config: Path, *extra: str) -> ProxyProcess:
    """`hsm-proxy run --config CONFIG` in a subprocess, once it serves (stopped by the
    ``stop_proxies`` fixture of the test module)."""
    return launch_command(directory, "run", "--config", str(config), *extra)


def launch_command(directory: Path, *args: str) -> ProxyProcess:
    """`hsm-proxy ARGS...` in a subprocess, once it serves."""
    log_path = directory / f"proxy-{time.monotonic_ns()}.log"
    with log_path.open("w") as log_file:
        process = subprocess.Popen(
            proxy_command(*args),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO,
        )
    proxy = ProxyProcess(process, log_path)
    _launched.append(proxy)
    proxy.wait_until_serving()
    return proxy


def replace_file(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically (write beside it, then rename over), as tools do."""
    temporary = path.with_name(f".{path.name}.new")
    temporary.write_bytes(data)
    os.replace(temporary, path)


class KubernetesSecretDir:
    """A directory laid out as the kubelet mounts a Secret: FILE -> ..data/FILE, ..data ->
    ..<timestamp>/, and an update swaps the ..data symlink atomically."""

    def __init__(self, directory: Path, files: dict[str, bytes]) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._generation = 0
        self.update(files)
        for name in files:
            (directory / name).symlink_to(Path("..data") / name)

    def update(self, files: dict[str, bytes]) -> None:
        self._generation += 1
        old = (
            (self.directory / "..data").resolve() if (self.directory / "..data").exists() else None
        )
        target = self.directory / f"..2026_11_28_{self._generation:04d}"
        target.mkdir()
        for name, data in files.items():
            (target / name).write_bytes(data)
        link = self.directory / "..data_tmp"
        link.symlink_to(target.name)
        os.replace(link, self.directory / "..data")
        if old is not None:
            shutil.rmtree(old)


def serial_of(port: int, context: ssl.SSLContext, server_name: str = "localhost") -> int:
    """The serial of the certificate a fresh handshake gets."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=server_name) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return int(x509.load_der_x509_certificate(der).serial_number)


def wait_until(condition: Callable[[], bool], timeout: float = 30, what: str = "") -> None:
    """Poll ``condition`` (a bounded wait, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"gave up waiting for {what or condition}")


class Load:
    """Clients that keep requesting until stopped: fresh connections and keep-alive ones."""

    def __init__(
        self, port: int, context: ssl.SSLContext, fresh: int = 2, keepalive: int = 2
    ) -> None:
        self.port = port
        self.context = context
        self.ok = 0
        self.failures: list[str] = []
        self.keepalive_connections = 0  # one per keep-alive client unless one was dropped
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._fresh_loop, daemon=True) for _ in range(fresh)
        ] + [threading.Thread(target=self._keepalive_loop, daemon=True) for _ in range(keepalive)]

    def _record(self, error: str | None) -> None:
        with self._lock:
            if error is None:
                self.ok += 1
            else:
                self.failures.append(error)

    def _fresh_loop(self) -> None:
        while not self._stop.is_set():
            try:
                reply = https_request(self.port, self.context, path="/load/fresh")
                self._record(None if reply.status == 200 else f"status {reply.status}")
            except Exception as exc:
                self._record(f"fresh connection: {exc!r}")
            time.sleep(0.01)

    def _keepalive_loop(self) -> None:
        """One connection for as long as the load runs. A proxy that closes it (a reload
        that drops kept-alive connections) is a failure, not a silent reconnect."""
        connection: KeepAlive | None = None
        served = 0
        while not self._stop.is_set():
            try:
                if connection is None:
                    connection = KeepAlive(self.port, self.context)
                    served = 0
                    with self._lock:
                        self.keepalive_connections += 1
                status = connection.get("/load/keepalive")
                served += 1
                self._record(None if status == 200 else f"status {status}")
            except Exception as exc:
                self._record(f"keep-alive connection lost after {served} requests: {exc!r}")
                if connection is not None:
                    connection.close()
                connection = None
            time.sleep(0.01)
        if connection is not None:
            connection.close()

    def count(self) -> int:
        with self._lock:
            return self.ok

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        wait_until(lambda: self.count() >= 8, what="the load to get going")
        return self

    def wait_for_more(self, requests: int = 20) -> None:
        target = self.count() + requests
        wait_until(lambda: self.count() >= target, what=f"{requests} more requests")

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)


def resume(
    port: int,
    context: ssl.SSLContext,
    session: ssl.SSLSession | None = None,
    server_name: str = "localhost",
) -> tuple[bool, ssl.SSLSession | None]:
    """One request on a fresh connection, offering ``session``: (resumed?, the new session)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=server_name, session=session) as tls:
            tls.sendall(b"GET /resume HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
            assert data.startswith(b"HTTP/1.1 200 "), data[:100]
            return bool(tls.session_reused), tls.session
