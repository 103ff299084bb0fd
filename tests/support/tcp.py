"""Test helpers for TCP passthrough: a TLS client that controls close_notify and TCP
half-closes, a scripted byte upstream, a PROXY protocol v2 parser, redis-server and a
plaintext gRPC server on loopback."""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import shutil
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme

from tests.support import HSM, ProxyProcess, RecordingUpstream, issue_chain
from tests.support.http import ScriptedUpstream

BLOCK = hashlib.sha256(b"hsm-proxy tcp").digest() * 32768  # 1 MiB, not all one byte


def pattern_digest(size: int) -> str:
    """The SHA-256 of ``size`` bytes of BLOCK repeated."""
    digest = hashlib.sha256()
    whole, rest = divmod(size, len(BLOCK))
    for _ in range(whole):
        digest.update(BLOCK)
    digest.update(BLOCK[:rest])
    return digest.hexdigest()


# --- a TLS client over memory BIOs: close_notify and FIN under the test's control ----------


class Aborted(Exception):
    """The connection ended without close_notify (or was reset): not a clean end."""


class TLSClient:
    """A blocking TLS client whose every byte on the wire the test decides: ``close_write``
    sends close_notify and goes on reading, ``fin`` half-closes TCP without close_notify,
    ``receive`` returns b"" at a close_notify and raises :class:`Aborted` at an end of
    stream without one, or a reset."""

    def __init__(
        self,
        port: int,
        context: ssl.SSLContext,
        server_name: str,
        timeout: float = 10,
    ) -> None:
        # An end of stream without close_notify must read as an error, not as b"" (Python
        # 3.11's default contexts set this option).
        context.options &= ~ssl.OP_IGNORE_UNEXPECTED_EOF
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname=server_name)
        try:
            self._retry(self.tls.do_handshake)
        except BaseException:
            self.sock.close()
            raise

    def _flush(self) -> None:
        data = self.outgoing.read()
        if data:
            self.sock.sendall(data)

    def _feed(self) -> None:
        data = self.sock.recv(65536)
        if data:
            self.incoming.write(data)
        else:
            self.incoming.write_eof()

    def _retry(self, operation: Any, *args: Any) -> Any:
        while True:
            try:
                result = operation(*args)
            except ssl.SSLWantReadError:
                self._flush()
                self._feed()
                continue
            self._flush()
            return result

    @property
    def alpn(self) -> str | None:
        return self.tls.selected_alpn_protocol()

    def send(self, data: bytes) -> None:
        self._retry(self.tls.write, data)

    def receive(self, size: int = 65536) -> bytes:
        try:
            return bytes(self._retry(self.tls.read, size))
        except ssl.SSLZeroReturnError:
            return b""
        except ssl.SSLError as exc:
            if "UNEXPECTED_EOF" in str(exc) or isinstance(exc, ssl.SSLEOFError):
                raise Aborted("end of stream without close_notify") from exc
            raise
        except ConnectionResetError as exc:
            raise Aborted("connection reset") from exc

    def receive_until_end(self) -> bytes:
        data = b""
        while chunk := self.receive():
            data += chunk
        return data

    def close_write(self) -> None:
        """Send close_notify; the read side stays open (TLS 1.3 half-close)."""
        # close_notify goes out; OpenSSL then waits for the peer's, which need not come.
        with contextlib.suppress(ssl.SSLWantReadError):
            self.tls.unwrap()
        self._flush()

    def fin(self) -> None:
        """Half-close TCP without a close_notify."""
        self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> TLSClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- the scripted byte upstream ------------------------------------------------------------


def _read_line(sock: socket.socket) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        byte = sock.recv(1)
        if not byte:
            break
        line += byte
    return line.rstrip(b"\n")


def _read_to_end(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def bytes_handler(sock: socket.socket, server: ScriptedUpstream) -> None:
    """One command line, then:

    * ``SINK N``: read N bytes, answer with their SHA-256 (hex) and close;
    * ``SOURCE N``: send N bytes of BLOCK repeated, then close;
    * ``ECHO``: send back what arrives until the end of stream, then close;
    * ``AFTER-EOF``: read to the end of stream, then answer ``got <bytes>`` and close;
    * ``HALF``: send ``bye``, half-close, read to the end of stream (kept in ``heads``);
    * ``RESET``: close with a TCP reset.
    """
    command, _, argument = _read_line(sock).partition(b" ")
    if command == b"SINK":
        left = int(argument)
        digest = hashlib.sha256()
        while left:
            chunk = sock.recv(min(left, 1 << 20))
            if not chunk:
                return
            digest.update(chunk)
            left -= len(chunk)
        sock.sendall(digest.hexdigest().encode())
    elif command == b"SOURCE":
        left = int(argument)
        while left:
            block = BLOCK[: min(left, len(BLOCK))]
            sock.sendall(block)
            left -= len(block)
    elif command == b"ECHO":
        while chunk := sock.recv(65536):
            sock.sendall(chunk)
    elif command == b"AFTER-EOF":
        data = _read_to_end(sock)
        sock.sendall(b"got " + data)
    elif command == b"HALF":
        sock.sendall(b"bye")
        sock.shutdown(socket.SHUT_WR)
        data = _read_to_end(sock)
        with server.lock:
            server.heads.append(data)
    elif command == b"RESET":
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


# --- PROXY protocol v2, parsed the way a backend would ------------------------------------

V2_SIGNATURE = bytes.fromhex("0d0a0d0a000d0a515549540a")


@dataclass
class ProxyHeader:
    """A parsed PROXY v2 header: command, family, addresses, and the TLVs by type (each
    type maps to the list of its values, in order); ``ssl`` holds the PP2_TYPE_SSL parts."""

    command: int
    family: int
    source: tuple[str, int]
    destination: tuple[str, int]
    tlvs: dict[int, list[bytes]] = field(default_factory=dict)
    ssl_client: int | None = None
    ssl_verify: int | None = None
    ssl_tlvs: dict[int, list[bytes]] = field(default_factory=dict)


def _parse_tlvs(data: bytes) -> dict[int, list[bytes]]:
    found: dict[int, list[bytes]] = {}
    offset = 0
    while offset < len(data):
        assert offset + 3 <= len(data), "truncated TLV"
        kind, length = struct.unpack_from("!BH", data, offset)
        value = data[offset + 3 : offset + 3 + length]
        assert len(value) == length, "TLV longer than the header"
        found.setdefault(kind, []).append(value)
        offset += 3 + length
    return found


def read_proxy_header(sock: socket.socket) -> ProxyHeader:
    """Read exactly one PROXY v2 header from ``sock`` (written from the specification,
    section 2.2, independently of proxy/tcp/proxyproto.py)."""
    fixed = b""
    while len(fixed) < 16:
        chunk = sock.recv(16 - len(fixed))
        assert chunk, "the connection ended inside the header"
        fixed += chunk
    assert fixed[:12] == V2_SIGNATURE
    version_command, family, length = fixed[12], fixed[13], struct.unpack("!H", fixed[14:16])[0]
    assert version_command >> 4 == 2
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        assert chunk
        body += chunk
    if version_command & 0x0F == 0:  # LOCAL: a health check, no addresses to read
        return ProxyHeader(0, family, ("", 0), ("", 0), _parse_tlvs(body) if family else {})
    if family == 0x11:
        size = 4
    else:
        assert family == 0x21, f"unexpected family {family:#x}"
        size = 16
    source_host = str(ipaddress.ip_address(body[:size]))
    destination_host = str(ipaddress.ip_address(body[size : 2 * size]))
    source_port, destination_port = struct.unpack_from("!HH", body, 2 * size)
    header = ProxyHeader(
        version_command & 0x0F,
        family,
        (source_host, source_port),
        (destination_host, destination_port),
        _parse_tlvs(body[2 * size + 4 :]),
    )
    ssl_values = header.tlvs.get(0x20)
    if ssl_values:
        (value,) = ssl_values
        header.ssl_client, header.ssl_verify = struct.unpack_from("!BI", value)
        header.ssl_tlvs = _parse_tlvs(value[5:])
    return header


class ProxyProtocolUpstream(ScriptedUpstream):
    """Reads the PROXY header of each connection (kept in ``headers``), then echoes."""

    def __init__(self) -> None:
        self.headers: list[ProxyHeader] = []
        super().__init__(self._serve)

    def _serve(self, sock: socket.socket, _server: ScriptedUpstream) -> None:
        header = read_proxy_header(sock)
        with self.lock:
            self.headers.append(header)
        if header.command == 0:
            return  # LOCAL (the proxy's readiness probe): nothing is relayed
        while chunk := sock.recv(65536):
            sock.sendall(chunk)


# --- upstreams that refuse or never answer ---------------------------------------------------


def closed_port() -> int:
    """A loopback port nothing listens on (connections to it are refused)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def silent_listener() -> Iterator[int]:
    """A loopback listener whose accept queue is full: the kernel drops further SYNs, so a
    connect to it never completes (until the client's own timeout)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = int(listener.getsockname()[1])
    fillers: list[socket.socket] = []
    try:
        while True:
            filler = socket.socket()
            filler.settimeout(0.5)
            try:
                filler.connect(("127.0.0.1", port))
            except (TimeoutError, OSError):
                filler.close()
                break
            fillers.append(filler)
            assert len(fillers) < 64, "the accept queue never filled"
        yield port
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


# --- redis-server and a gRPC server ---------------------------------------------------------


@contextlib.contextmanager
def redis_server(directory: Path) -> Iterator[int]:
    """redis-server (Debian's) on a free loopback port, persistence off."""
    executable = shutil.which("redis-server")
    assert executable, "redis-server comes with deploy/setup.sh --test"
    port = closed_port()
    process = subprocess.Popen(
        [
            executable,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(directory),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as probe:
                    probe.sendall(b"PING\r\n")
                    if probe.recv(64).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            assert process.poll() is None, "redis-server exited"
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        process.wait(timeout=10)


def _unary(request: bytes, _context: Any) -> bytes:
    return b"echo:" + request


def _bidi(requests: Iterator[bytes], _context: Any) -> Iterator[bytes]:
    for request in requests:
        yield request[::-1]


@contextlib.contextmanager
def grpc_server() -> Iterator[int]:
    """A plaintext (h2c) gRPC server with generic handlers on bytes (no generated code):
    ``/test.Echo/Unary`` prefixes ``echo:``, ``/test.Echo/Reverse`` streams each message
    back reversed."""
    import grpc

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handler = grpc.method_handlers_generic_handler(
        "test.Echo",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(_unary),
            "Reverse": grpc.stream_stream_rpc_method_handler(_bidi),
        },
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(grace=None)


# --- the module's proxy: HTTP by default, a TCP upstream per server name ---------------------

SITES = ("redis", "grpc", "bytes", "pp", "refused", "silent")


@dataclass
class TCPSetup:
    """A proxy process serving ``NAME.test`` for each of SITES from its own tcp:// upstream
    (and HTTP for localhost), with optional mutual TLS (any certificate of ``client_ca``)."""

    proxy: ProxyProcess
    ca_file: Path
    client_ca: trustme.CA
    directory: Path
    redis_port: int
    grpc_port: int
    bytes_upstream: ScriptedUpstream
    pp_upstream: ProxyProtocolUpstream
    http_upstream: RecordingUpstream

    def access_lines(self, since: int = 0, sni: str | None = None) -> list[dict[str, Any]]:
        """The tunnel access lines among the log lines from index ``since`` on."""
        return [
            entry
            for entry in self.proxy.lines()[since:]
            if entry.get("logger") == "hsm_proxy.access"
            and entry.get("message") == "tunnel"
            and (sni is None or entry.get("sni") == sni)
        ]

    def wait_for_access(self, since: int, sni: str, timeout: float = 10) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = self.access_lines(since, sni)
            if lines:
                return lines[-1]
            time.sleep(0.02)
        raise AssertionError(f"no access line for {sni}:\n{self.proxy.log_path.read_text()}")


def tcp_config(
    directory: Path,
    hsm: HSM,
    ca: trustme.CA,
    client_ca_file: Path,
    http_url: str,
    upstreams: dict[str, str],
) -> Path:
    """The config text: one [[tls.sni]] site and one [upstreams.NAME] per upstream."""
    key = hsm.uri("ec256")
    default_chain = directory / "chain-default.pem"
    default_chain.write_bytes(issue_chain(ca, hsm.public_keys["ec256"]))
    text = [
        'listen = "127.0.0.1:0"',
        f'upstream = "{http_url}"',
        "[token]",
        f'module = "{hsm.module}"',
        f'pin_file = "{hsm.pin_file}"',
        "sessions = 2",
        "[tls]",
        f'certificate = "{default_chain}"',
        f'key = "{key}"',
    ]
    for name in upstreams:
        chain = directory / f"chain-{name}.pem"
        chain.write_bytes(issue_chain(ca, hsm.public_keys["ec256"], (f"{name}.test",)))
        text += [
            "[[tls.sni]]",
            f'certificate = "{chain}"',
            f'key = "{key}"',
            f'upstream = "{name}"',
        ]
    text += [
        "[tls.client_auth]",
        'mode = "optional"',
        f'ca = "{client_ca_file}"',
        "allow_any = true",
        "[tcp]",
        "connect_timeout = 1",
        "idle_timeout = 3",
        "[admin]",
        'listen = "127.0.0.1:0"',
        "probe_interval = 60",
    ]
    for name, address in upstreams.items():
        text += [f"[upstreams.{name}]", f'servers = ["{address}"]']
        if name == "grpc":
            text.append('alpn = ["h2"]')
        if name == "pp":
            text += ['alpn = ["h2"]', 'proxy_protocol = "v2"']
    config = directory / "proxy.toml"
    config.write_text("\n".join(text) + "\n")
    return config
