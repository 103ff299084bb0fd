"""A pytest plugin: an HSM-backed TLS endpoint in front of your service, in your tests.

Installed with the package (entry point ``pytest11``: ``hsm_proxy``). It only defines
fixtures, and a fixture does nothing until a test names it, so the plugin costs nothing to
test suites that do not use it (this repository's own suite included).

* ``hsm_tls_endpoint``: starts ``hsm-proxy dev`` in a subprocess, serving TLS on a free
  loopback port from a SoftHSM2 token made once per test session, in front of the URL that
  the ``hsm_proxy_upstream`` fixture returns, and yields an :class:`HSMEndpoint` (``url``,
  ``ca_file``, ``port``, the proxy's JSON log lines). The proxy stops after the test.
* ``hsm_proxy_upstream``: override it (in your conftest.py or test module) to return your
  upstream's ``http://HOST:PORT``; by default it is ``None``, which serves the built-in
  demo upstream.
* ``hsm_tls_endpoint_factory``: a function ``start(upstream_url=None)`` for tests that need
  several endpoints.

The token, its PIN and the development CA live in a session-scoped temporary directory;
the subprocess selects its own ``SOFTHSM2_CONF``, so the plugin never changes the test
process's environment. Only trusted test code should use this: it is a development tool.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

_START_TIMEOUT = 60.0


@dataclass
class HSMEndpoint:
    """A running ``hsm-proxy dev``: where it serves, the CA to trust, its log."""

    url: str  # https://127.0.0.1:PORT (the certificate names 127.0.0.1 and localhost)
    port: int
    ca_file: Path
    log_path: Path
    process: subprocess.Popen[bytes]

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts the endpoint's development CA."""
        return ssl.create_default_context(cafile=str(self.ca_file))

    def log_lines(self) -> list[dict[str, Any]]:
        """The proxy's JSON log lines so far: access lines, and audit lines per signature."""
        return read_json_lines(self.log_path)

    def stop(self) -> None:
        stop_process(self.process)


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON log lines written to ``path`` so far; a last line still being written is
    left out (the proxy may be in the middle of it)."""
    text = path.read_text()
    complete = text[: text.rfind("\n") + 1]
    return [json.loads(line) for line in complete.splitlines() if line.startswith("{")]


def stop_process(process: subprocess.Popen[Any]) -> None:
    """SIGTERM (the proxy drains and exits), then SIGKILL after 10 s."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def start_endpoint(state_dir: Path, log_path: Path, upstream_url: str | None) -> HSMEndpoint:
    """Start ``hsm-proxy dev`` and wait until it serves (or raise with its output)."""
    command = [
        sys.executable,
        "-m",
        "proxy",
        "--log-format",
        "json",
        "dev",
        "--state-dir",
        str(state_dir),
        "--listen",
        "127.0.0.1:0",
    ]
    if upstream_url is not None:
        command += ["--upstream", upstream_url]
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, env=dict(os.environ)
        )
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline:
        for line in log_path.read_text().splitlines():
            if not line.startswith("{"):
                continue
            message = str(json.loads(line).get("message", ""))
            if message.startswith("serving https://"):
                port = int(message.split()[1].rsplit(":", 1)[1])
                return HSMEndpoint(
                    f"https://127.0.0.1:{port}", port, state_dir / "ca.pem", log_path, process
                )
        if process.poll() is not None:
            break
        time.sleep(0.05)
    output = log_path.read_text()
    if process.poll() is None:
        process.kill()
        process.wait()
    raise RuntimeError(f"hsm-proxy dev did not start serving:\n{output}")


@pytest.fixture(scope="session")
def hsm_proxy_state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the session's SoftHSM2 token, PIN and development CA live."""
    return tmp_path_factory.mktemp("hsm-proxy-dev")


@pytest.fixture
def hsm_proxy_upstream() -> str | None:
    """Override to return your upstream's http://HOST:PORT (None: the built-in demo)."""
    return None


@pytest.fixture
def hsm_tls_endpoint_factory(
    hsm_proxy_state_dir: Path, tmp_path: Path
) -> Iterator[Callable[..., HSMEndpoint]]:
    started: list[HSMEndpoint] = []

    def start(upstream_url: str | None = None) -> HSMEndpoint:
        log_path = tmp_path / f"hsm-proxy-{len(started) + 1}.log"
        endpoint = start_endpoint(hsm_proxy_state_dir, log_path, upstream_url)
        started.append(endpoint)
        return endpoint

    yield start
    for endpoint in started:
        endpoint.stop()


@pytest.fixture
def hsm_tls_endpoint(
    hsm_tls_endpoint_factory: Callable[..., HSMEndpoint], hsm_proxy_upstream: str | None
) -> HSMEndpoint:
    """TLS on a SoftHSM2 token key in front of ``hsm_proxy_upstream``."""
    return hsm_tls_endpoint_factory(hsm_proxy_upstream)
