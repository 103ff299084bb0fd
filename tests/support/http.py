"""Test helpers for HTTP forwarding: scripted upstreams that misbehave on purpose, a
streaming source/sink upstream, and raw TLS conversations with the proxy."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path

import trustme

from tests.support import client_context

Handler = Callable[[socket.socket, "ScriptedUpstream"], None]


class ScriptedUpstream:
    """A TCP server on loopback; each connection runs ``handler(sock, server)`` in a thread.
    ``connections`` counts accepted connections; ``heads`` collects request heads read
    through :meth:`read_head`."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.heads: list[bytes] = []
        self.lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._open: list[socket.socket] = []
        self._stopped = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stopped:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
                self._open.append(sock)
            threading.Thread(target=self._run, args=(sock,), daemon=True).start()

    def _run(self, sock: socket.socket) -> None:
        try:
            self.handler(sock, self)
        except OSError:
            pass
        finally:
            sock.close()

    def read_head(self, sock: socket.socket, buffer: bytearray) -> bytes | None:
        """One request head from ``sock`` (None at the end of the stream); bytes after it
        stay in ``buffer``."""
        while b"\r\n\r\n" not in buffer:
            data = sock.recv(65536)
            if not data:
                return None
            buffer += data
        head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
        buffer[:] = rest
        with self.lock:
            self.heads.append(head)
        return head

    def stop(self) -> None:
        self._stopped = True
        self._listener.close()
        with self.lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


def header(head: bytes, name: str) -> str | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name.lower().encode():
            return value.strip().decode()
    return None


def read_body(sock: socket.socket, head: bytes, buffer: bytearray) -> int:
    """Read and discard a Content-Length or chunked body; return its length."""
    length = header(head, "content-length")
    if length is not None:
        remaining = int(length) - len(buffer)
        total = int(length)
        buffer.clear()
        while remaining > 0:
            data = sock.recv(min(remaining, 1 << 20))
            if not data:
                raise OSError("body truncated")
            remaining -= len(data)
        return total
    if (header(head, "transfer-encoding") or "").lower() == "chunked":
        total = 0
        while True:
            while b"\r\n" not in buffer:
                buffer += sock.recv(65536)
            line, _, rest = bytes(buffer).partition(b"\r\n")
            size = int(line.split(b";")[0], 16)
            buffer[:] = rest
            while len(buffer) < size + 2:
                buffer += sock.recv(1 << 20)
            del buffer[: size + 2]
            total += size
            if size == 0:
                return total
    return 0


def respond(sock: socket.socket, status: int = 200, body: bytes = b"ok", extra: str = "") -> None:
    sock.sendall(
        f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body
    )


# --- a streaming source and sink --------------------------------------------------------

_BLOCK = bytes(range(256)) * 4096  # 1 MiB


def streaming_handler(sock: socket.socket, server: ScriptedUpstream) -> None:
    """``GET /bytes/N`` answers N bytes (Content-Length), ``GET /chunked/N`` the same in
    chunks; any request with a body is read and answered with its length."""
    buffer = bytearray()
    while (head := server.read_head(sock, buffer)) is not None:
        target = head.split(b" ")[1].decode()
        received = read_body(sock, head, buffer)
        if target.startswith(("/bytes/", "/chunked/")):
            size = int(target.rsplit("/", 1)[1])
            chunked = target.startswith("/chunked/")
            framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {size}"
            sock.sendall(f"HTTP/1.1 200 OK\r\n{framing}\r\n\r\n".encode())
            left = size
            while left:
                block = _BLOCK[: min(left, len(_BLOCK))]
                sock.sendall(b"%x\r\n%s\r\n" % (len(block), block) if chunked else block)
                left -= len(block)
            if chunked:
                sock.sendall(b"0\r\n\r\n")
        else:
            respond(sock, body=str(received).encode())


# --- raw TLS conversations with the proxy --------------------------------------------------


def tls_connect(port: int, ca: trustme.CA, timeout: float = 10) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return client_context(ca).wrap_socket(raw, server_hostname="localhost")


def read_all(tls: ssl.SSLSocket) -> bytes:
    data = b""
    try:
        while chunk := tls.recv(65536):
            data += chunk
    except (ssl.SSLError, ConnectionResetError):
        pass
    return data


def exchange_raw(port: int, ca: trustme.CA, payload: bytes) -> bytes:
    """Send ``payload`` on a fresh TLS connection and read until the proxy closes."""
    with tls_connect(port, ca) as tls:
        tls.sendall(payload)
        return read_all(tls)


def read_response(tls: ssl.SSLSocket) -> bytes:
    """One Content-Length framed response from a kept-alive connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += tls.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(header(head, "content-length") or 0)
    while len(body) < length:
        body += tls.recv(65536)
    return head + b"\r\n\r\n" + body


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def wait_until(predicate: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def write_ca(ca: trustme.CA, directory: Path) -> Path:
    path = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path
