"""Test helpers: SoftHSM2 tokens, certificates from a trustme CA, a recording upstream,
the proxy as a real subprocess, and plain TLS clients. No mocks anywhere."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from proxy.commands.devstate import find_softhsm_module, use_softhsm_config
from proxy.pkcs11.provision import generate_key, initialize_token
from proxy.pkcs11.token import Token
from proxy.pkcs11.uri import KeyURI
from proxy.pytest_plugin import (
    describe_shutdown,
    read_json_lines,
    shutdown_problems,
    stop_process,
)
from proxy.tls.certificates import DevCA

TOKEN_LABEL = "proxy"
TOKEN_PIN = "test-pin-4821"
SO_PIN = "test-so-pin-9907"
REPO = Path(__file__).resolve().parent.parent.parent

# name -> (label, id, kind)
KEYS = {
    "ec256": ("web-ec256", b"\x01", "P-256"),
    "ec384": ("web-ec384", b"\x02", "P-384"),
    "rsa2048": ("web-rsa2048", b"\x03", "RSA-2048"),
    "other": ("other-ec256", b"\x04", "P-256"),
    "twin-a": ("twin", b"\x10", "P-256"),
    "twin-b": ("twin", b"\x11", "P-256"),
}


@dataclass
class HSM:
    directory: Path
    module: str
    pin_file: Path
    public_keys: dict[str, bytes] = field(default_factory=dict)

    def uri(self, name: str) -> KeyURI:
        label, key_id, _ = KEYS[name]
        return KeyURI(token=TOKEN_LABEL, object=label, id=key_id)

    def add_key(
        self, name: str, label: str, key_id: bytes, kind: str, *, extractable: bool = False
    ) -> None:
        """Generate one more key (slow kinds such as RSA-4096 only when a test needs them)."""
        if name in self.public_keys:
            return
        KEYS[name] = (label, key_id, kind)
        generate_key(
            self.module, TOKEN_LABEL, TOKEN_PIN, label, key_id, kind, extractable=extractable
        )
        with Token(self.module, self.uri(name), TOKEN_PIN, pool_size=1) as token:
            public = token.find_private_key(self.uri(name)).info.public_key_der
        assert public is not None
        self.public_keys[name] = public


def make_hsm(directory: Path) -> HSM:
    use_softhsm_config(directory)
    module = find_softhsm_module()
    initialize_token(module, TOKEN_LABEL, SO_PIN, TOKEN_PIN)
    pin_file = directory / "pin"
    pin_file.write_text(TOKEN_PIN + "\n")
    pin_file.chmod(0o600)
    hsm = HSM(directory, module, pin_file)
    for name, (label, key_id, kind) in list(KEYS.items()):
        generate_key(module, TOKEN_LABEL, TOKEN_PIN, label, key_id, kind)
        if not name.startswith("twin"):
            with Token(module, hsm.uri(name), TOKEN_PIN, pool_size=1) as token:
                public = token.find_private_key(hsm.uri(name)).info.public_key_der
            assert public is not None
            hsm.public_keys[name] = public
    return hsm


def dev_ca(ca: trustme.CA) -> DevCA:
    """The trustme CA in the form the proxy's certificate helpers take."""
    certificate = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
    return DevCA(certificate, key)  # type: ignore[arg-type]


def issue_chain(
    ca: trustme.CA, public_key_der: bytes, names: tuple[str, ...] = ("localhost", "127.0.0.1")
) -> bytes:
    return dev_ca(ca).issue(public_key_der, names)


# --- a recording upstream ----------------------------------------------------------------


@dataclass
class SeenRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class _Server(ThreadingHTTPServer):
    # The library's backlog of 5 overflows when many HTTP/2 streams open upstream
    # connections at once; a connection left in a full accept queue stalls for a minute.
    request_queue_size = 1024


class RecordingUpstream:
    """An HTTP/1.1 server on loopback that records what reaches it and answers in JSON."""

    def __init__(self) -> None:
        self.requests: list[SeenRequest] = []
        self.connections = 0
        self.closed = 0  # connections that ended (the proxy closed an idle pooled one ...)
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                upstream.connections += 1

            def finish(self) -> None:
                super().finish()
                upstream.closed += 1

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    body = self._read_chunked()
                else:
                    body = self.rfile.read(length) if length else b""
                seen = SeenRequest(self.command, self.path, dict(self.headers.items()), body)
                upstream.requests.append(seen)
                status = 200
                if self.path.startswith("/status/"):
                    status = int(self.path.split("/")[2])
                payload = json.dumps(
                    {
                        "method": seen.method,
                        "path": seen.path,
                        "headers": seen.headers,
                        "body_length": len(body),
                    }
                ).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.send_header("Connection", "keep-alive")
                self.send_header("Keep-Alive", "timeout=5")
                self.end_headers()
                if self.command != "HEAD" and status not in (204, 304):
                    self.wfile.write(payload)

            def _read_chunked(self) -> bytes:
                body = b""
                while True:
                    size = int(self.rfile.readline().split(b";")[0], 16)
                    if size == 0:
                        self.rfile.readline()
                        return body
                    body += self.rfile.read(size)
                    self.rfile.readline()

            do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _answer

            def log_message(self, format: str, *args: object) -> None:
                return

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def start_upstream() -> RecordingUpstream:
    return RecordingUpstream()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# --- the proxy as a subprocess -----------------------------------------------------------


def proxy_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "proxy", "--log-format", "json", *args]


def run_cli(
    *args: str, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        proxy_command(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=REPO,
        check=False,
    )


def write_config(
    directory: Path,
    hsm: HSM,
    ca: trustme.CA,
    upstream_url: str,
    key: str,
    *,
    certificate_for: str | None = None,
    key_uri: str | None = None,
    pin_file: Path | None = None,
    extra_tls: str = "",
    extra: str = "",
    module: str | None = None,
    sessions: int = 2,
    extra_token: str = "",
) -> Path:
    chain = directory / f"chain-{key}.pem"
    chain.write_bytes(issue_chain(ca, hsm.public_keys[certificate_for or key]))
    config = directory / "proxy.toml"
    config.write_text(
        f'listen = "127.0.0.1:0"\n'
        f'upstream = "{upstream_url}"\n\n'
        f"[token]\n"
        f'module = "{module or hsm.module}"\n'
        f'pin_file = "{pin_file or hsm.pin_file}"\n'
        f"sessions = {sessions}\n"
        f"{extra_token}\n"
        f"[tls]\n"
        f'certificate = "{chain}"\n'
        f'key = "{key_uri or hsm.uri(key)}"\n'
        f"{extra_tls}"
        f"{extra}"
    )
    return config


class ProxyProcess:
    """`hsm-proxy run` in a subprocess, its JSON log lines, and where it listens.

    :meth:`stop` fails (AssertionError) when the proxy did not stop cleanly: it hung at
    shutdown, exited with another status than 0, or logged a traceback. A test that kills a
    proxy or provokes a traceback on purpose says so first (:meth:`expect_exit`,
    :attr:`tracebacks_expected`)."""

    def __init__(self, process: subprocess.Popen[str], log_path: Path) -> None:
        self.process = process
        self.log_path = log_path
        self.port = 0
        self.exit_statuses = frozenset({0})
        self.tracebacks_expected = False
        self._checked = False

    def expect_exit(self, *statuses: int) -> None:
        """The exit statuses this test makes on purpose (-9: it SIGKILLs the proxy)."""
        self.exit_statuses = frozenset(statuses)

    @classmethod
    def start(
        cls,
        directory: Path,
        hsm: HSM,
        ca: trustme.CA,
        upstream_url: str,
        key: str,
        *,
        env: dict[str, str] | None = None,
        run_args: tuple[str, ...] = (),
        **options: Any,
    ) -> ProxyProcess:
        config = write_config(directory, hsm, ca, upstream_url, key, **options)
        return cls.run_config(config, directory, env=env, run_args=run_args)

    @classmethod
    def run_config(
        cls,
        config: Path,
        directory: Path,
        *global_options: str,
        env: dict[str, str] | None = None,
        run_args: tuple[str, ...] = (),
    ) -> ProxyProcess:
        """``hsm-proxy [global_options] run --config CONFIG [run_args]``, serving (the caller
        stops it)."""
        log_path = directory / f"proxy-{time.monotonic_ns()}.log"
        log_file = log_path.open("w")
        process = subprocess.Popen(
            proxy_command(*global_options, "run", "--config", str(config), *run_args),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO,
            env={**os.environ, **(env or {})},
        )
        log_file.close()
        proxy = cls(process, log_path)
        try:
            proxy.wait_until_serving()
        except AssertionError:
            proxy.stop(check=False)  # the start-up failure is the one to report
            raise
        return proxy

    def lines(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far; a last line still being written is left out."""
        return read_json_lines(self.log_path)

    def wait_until_serving(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for entry in self.lines():
                message = entry.get("message", "")
                if message.startswith("serving https://"):
                    self.port = int(message.split()[1].rsplit(":", 1)[1])
                    return
            if self.process.poll() is not None:
                raise AssertionError(f"proxy exited early:\n{self.log_path.read_text()}")
            time.sleep(0.05)
        raise AssertionError(f"proxy did not start:\n{self.log_path.read_text()}")

    def signatures(self) -> int:
        """Token signatures made for client connections (not the start-up test signature)."""
        return sum(
            1
            for entry in self.lines()
            if entry.get("event") == "token_signature" and "connection_id" in entry
        )

    def wait_for_log(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 5
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for entry in self.lines():
                if predicate(entry):
                    return entry
            time.sleep(0.02)
        raise AssertionError(f"no matching log line in:\n{self.log_path.read_text()}")

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    def stop(self, check: bool = True) -> None:
        """SIGTERM and wait; then (once, unless ``check`` is False) fail if it did not stop
        cleanly."""
        hung = stop_process(self.process)
        if not check or self._checked:
            return
        self._checked = True
        problems = shutdown_problems(
            self.process,
            self.log_path.read_text(),
            hung=hung,
            exit_statuses=self.exit_statuses,
            tracebacks_expected=self.tracebacks_expected,
        )
        if problems:
            raise AssertionError(describe_shutdown(problems, self.log_path))


def stop_all(proxies: list[ProxyProcess]) -> None:
    """Stop every proxy, then fail with what each one that did not stop cleanly did."""
    failures = []
    for proxy in proxies:
        try:
            proxy.stop()
        except AssertionError as failure:
            failures.append(str(failure))
    if failures:
        raise AssertionError("\n\n".join(failures))


ProxyFactory = Callable[..., ProxyProcess]
# conftest.on_faulthsm: a proxy on faulthsm over the test token (key, settings=..., options)
StartOnFaulthsm = Callable[..., ProxyProcess]


# --- clients -----------------------------------------------------------------------------


def client_context(
    ca: trustme.CA, version: ssl.TLSVersion | None = None, alpn: list[str] | None = None
) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    if version is not None:
        context.minimum_version = context.maximum_version = version
    context.set_alpn_protocols(alpn if alpn is not None else ["http/1.1"])
    return context


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    tls_version: str | None
    alpn: str | None


def https_request(
    port: int,
    context: ssl.SSLContext,
    method: str = "GET",
    path: str = "/",
    body: bytes = b"",
    server_name: str = "localhost",
    headers: dict[str, str] | None = None,
) -> Reply:
    """One request on a fresh TLS connection (a fresh context never resumes a session)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=server_name) as tls:
            lines = [
                f"{method} {path} HTTP/1.1",
                f"Host: {server_name}:{port}",
                "Connection: close",
            ]
            lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
            if body:
                lines.append(f"Content-Length: {len(body)}")
            tls.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
            version, alpn = tls.version(), tls.selected_alpn_protocol()
    head, _, payload = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    parsed = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        parsed[name.strip().lower()] = value.strip()
    return Reply(int(status_line.split()[1]), parsed, payload, version, alpn)


class KeepAlive:
    """One TLS connection kept open for many requests; never silently reconnects."""

    def __init__(self, port: int, context: ssl.SSLContext) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.tls = context.wrap_socket(raw, server_hostname="localhost")
        self.reader = self.tls.makefile("rb")

    def get(self, path: str) -> int:
        self.tls.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        status = int(self.reader.readline().split()[1])
        length = 0
        while (line := self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
        self.reader.read(length)
        return status

    def close(self) -> None:
        self.reader.close()
        self.tls.close()


class StartedProxies:
    """Proxy processes started for one test (:meth:`start`, as :meth:`ProxyProcess.start`
    in ``directory`` with ``hsm`` and ``ca``), all stopped by :meth:`stop_all`: what the
    proxy-starting fixtures share."""

    def __init__(self, directory: Path, hsm: HSM, ca: trustme.CA) -> None:
        self.directory, self.hsm, self.ca = directory, hsm, ca
        self.started: list[ProxyProcess] = []

    def start(self, upstream_url: str, key: str = "ec256", **options: Any) -> ProxyProcess:
        process = ProxyProcess.start(
            self.directory, self.hsm, self.ca, upstream_url, key, **options
        )
        self.started.append(process)
        return process

    def stop_all(self) -> None:
        stop_all(self.started)


# Starts a proxy in front of an upstream URL (the start_proxy fixture of the integration tests).
StartProxy = Callable[..., ProxyProcess]


def peak_rss_kib(pid: int) -> int:
    """The peak resident memory of a running process (VmHWM), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc status")
