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

A test whose endpoint did not stop cleanly fails at teardown, saying why: the proxy did not
exit within the ini option ``hsm_proxy_shutdown_timeout`` (30 seconds) of SIGTERM (it is
then killed), it exited with a status other than 0, or its log holds a traceback. A clean
shutdown is part of what a test of a TLS endpoint shows.

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
# Generous on a busy machine: a clean drain with nothing in flight takes well under a second.
SHUTDOWN_TIMEOUT = 30.0
_TRACEBACK = "Traceback (most recent call last)"


class ProxyShutdownError(AssertionError):
    """The proxy hung at shutdown, exited with a failure status, or logged a traceback."""


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

    def stop(self, timeout: float = SHUTDOWN_TIMEOUT) -> None:
        """Stop the proxy; raise :class:`ProxyShutdownError` unless it stopped cleanly."""
        hung = stop_process(self.process, timeout)
        problems = shutdown_problems(
            self.process, self.log_path.read_text(), hung=hung, timeout=timeout
        )
        if problems:
            raise ProxyShutdownError(describe_shutdown(problems, self.log_path))


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON log lines written to ``path`` so far; a last line still being written is
    left out (the proxy may be in the middle of it)."""
    text = path.read_text()
    complete = text[: text.rfind("\n") + 1]
    return [json.loads(line) for line in complete.splitlines() if line.startswith("{")]


def stop_process(process: subprocess.Popen[Any], timeout: float = SHUTDOWN_TIMEOUT) -> bool:
    """SIGTERM (the proxy drains and exits), then SIGKILL after ``timeout`` seconds.
    Returns whether it had to be killed (it hung at shutdown)."""
    if process.poll() is not None:
        return False
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return True
    return False


def shutdown_problems(
    process: subprocess.Popen[Any],
    log_text: str,
    *,
    hung: bool,
    timeout: float = SHUTDOWN_TIMEOUT,
    exit_statuses: frozenset[int] = frozenset({0}),
    tracebacks_expected: bool = False,
) -> list[str]:
    """What went wrong with a proxy that has stopped: it hung at shutdown, it exited with a
    status not in ``exit_statuses``, or its log (JSON lines or text) holds a traceback."""
    problems = []
    if hung:
        problems.append(f"it did not exit within {timeout:g} s of SIGTERM and was killed")
    elif process.returncode not in exit_statuses:
        problems.append(f"it exited with status {process.returncode}")
    if not tracebacks_expected:
        count = sum(1 for line in log_text.splitlines() if _holds_traceback(line))
        if count:
            problems.append(f"its log holds {count} traceback(s)")
    return problems


def _holds_traceback(line: str) -> bool:
    if line.startswith("{"):
        try:
            entry = json.loads(line)
        except ValueError:
            return False  # a line cut short by a kill
        return isinstance(entry, dict) and "exception" in entry
    return line.startswith(_TRACEBACK)


def describe_shutdown(problems: list[str], log_path: Path) -> str:
    """A failure message: what went wrong, then the end of the proxy's log."""
    tail = "\n".join(log_path.read_text().splitlines()[-40:])
    summary = "; ".join(problems)
    return f"the proxy did not stop cleanly: {summary}. Its log ({log_path}) ends:\n{tail}"


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


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "hsm_proxy_shutdown_timeout",
        "seconds an hsm-proxy endpoint may take to exit after SIGTERM before its test fails",
        default=str(SHUTDOWN_TIMEOUT),
    )


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
    hsm_proxy_state_dir: Path, tmp_path: Path, pytestconfig: pytest.Config
) -> Iterator[Callable[..., HSMEndpoint]]:
    started: list[HSMEndpoint] = []
    timeout = float(pytestconfig.getini("hsm_proxy_shutdown_timeout"))

    def start(upstream_url: str | None = None) -> HSMEndpoint:
        log_path = tmp_path / f"hsm-proxy-{len(started) + 1}.log"
        endpoint = start_endpoint(hsm_proxy_state_dir, log_path, upstream_url)
        started.append(endpoint)
        return endpoint

    yield start
    failures = []
    for endpoint in started:
        try:
            endpoint.stop(timeout)
        except ProxyShutdownError as failure:
            failures.append(str(failure))
    if failures:
        pytest.fail("\n\n".join(failures), pytrace=False)


@pytest.fixture
def hsm_tls_endpoint(
    hsm_tls_endpoint_factory: Callable[..., HSMEndpoint], hsm_proxy_upstream: str | None
) -> HSMEndpoint:
    """TLS on a SoftHSM2 token key in front of ``hsm_proxy_upstream``."""
    return hsm_tls_endpoint_factory(hsm_proxy_upstream)
