"""A strict recording upstream: it parses exactly what reaches it with h11 and flags
anything that is not a sequence of whole, well-framed requests.

Each accepted connection runs in a thread with its own ``h11.Connection(SERVER)``. Every
complete request is recorded (:class:`Arrived`: method, target, headers, body, and which
connection carried it) and answered by ``answer`` (200 with the request's body length by
default). Whatever cannot be parsed, and whatever bytes a connection carried beyond its
last complete request when it ended, are recorded too (:attr:`StrictUpstream.broken`,
:attr:`StrictUpstream.leftovers`): a proxy that forwards a request it should have refused,
smuggles a second request behind a first, or leaves half a request on a connection shows
up there.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

import h11


@dataclass(frozen=True)
class Arrived:
    """One complete request as the upstream parsed it."""

    connection: int
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    http_version: bytes

    def header(self, name: bytes) -> bytes | None:
        values = [value for key, value in self.headers if key == name.lower()]
        return b", ".join(values) if values else None


# (the request, the socket) -> the raw response bytes; None sends nothing and closes.
Answer = Callable[[Arrived], bytes | None]


def answer_ok(request: Arrived) -> bytes:
    body = b"%d" % len(request.body)
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


class StrictUpstream:
    """A TCP server on loopback that records whole requests and flags everything else."""

    def __init__(self, answer: Answer = answer_ok) -> None:
        self.answer = answer
        self.arrived: list[Arrived] = []
        self.broken: list[tuple[int, str]] = []  # (connection, h11's complaint)
        self.leftovers: list[tuple[int, bytes]] = []  # (connection, bytes past the last request)
        self.connections = 0
        self.ended = threading.Condition()
        self.connections_ended = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                number = self.connections
                self._open.append(sock)
            threading.Thread(target=self._serve, args=(sock, number), daemon=True).start()

    def _serve(self, sock: socket.socket, number: int) -> None:
        connection = h11.Connection(h11.SERVER)
        pending = b""  # raw bytes since the last complete request
        request: h11.Request | None = None
        body = bytearray()
        try:
            while True:
                event = connection.next_event()
                if event is h11.NEED_DATA:
                    data = sock.recv(65536)
                    connection.receive_data(data)
                    pending += data
                    if not data:
                        break
                    continue
                if isinstance(event, h11.Request):
                    request, body = event, bytearray()
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    assert request is not None
                    arrived = Arrived(
                        number,
                        request.method,
                        request.target,
                        [(bytes(k), bytes(v)) for k, v in request.headers],
                        bytes(body),
                        request.http_version,
                    )
                    with self._lock:
                        self.arrived.append(arrived)
                    pending = bytes(connection.trailing_data[0])
                    response = self.answer(arrived)
                    if response is None:
                        break
                    sock.sendall(response)
                    # The response went out raw: start h11 afresh for the next request.
                    rest = pending
                    connection = h11.Connection(h11.SERVER)
                    connection.receive_data(rest)
                elif isinstance(event, h11.ConnectionClosed):
                    break
        except h11.RemoteProtocolError as exc:
            with self._lock:
                self.broken.append((number, str(exc)))
        except OSError:
            pass
        finally:
            if pending:
                with self._lock:
                    self.leftovers.append((number, pending))
            sock.close()
            with self.ended:
                self.connections_ended += 1
                self.ended.notify_all()

    def wait_ended(self, count: int, timeout: float = 10) -> None:
        """Until ``count`` connections have ended (the proxy closed them)."""
        with self.ended:
            if not self.ended.wait_for(lambda: self.connections_ended >= count, timeout):
                raise AssertionError(
                    f"{self.connections_ended} of {count} upstream connections ended"
                )

    def assert_clean(self) -> None:
        """Nothing unparsable and nothing left over on any connection."""
        with self._lock:
            assert not self.broken, f"the upstream could not parse: {self.broken}"
            assert not self.leftovers, f"bytes beyond whole requests: {self.leftovers}"

    def stop(self) -> None:
        self._listener.close()
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
