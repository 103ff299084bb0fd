"""The TLS streams against trio's own stdlib-ssl client, each test on both transports: the
memory-BIO TLSStream over in-memory transports (trio.testing), and SocketTLSStream, whose
OpenSSL reads and writes a real socket (a socket pair) itself: concurrent send and
receive, large transfers (beyond what the socket buffers hold), end of stream."""

from __future__ import annotations

import socket
import ssl
import threading

import pytest
import trio
import trio.testing
import trustme
from OpenSSL import SSL

from proxy.errors import TLSError
from proxy.net.sockets import TCPStream
from proxy.tls.socketstream import SocketTLSStream, open_tls_stream
from proxy.tls.stream import TLSStream

ServerContext = tuple[SSL.Context, object]  # the conftest's server_context: (context, token)


@pytest.fixture(params=["memory", "socket"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _transports(kind: str) -> tuple[trio.abc.Stream, trio.abc.Stream]:
    """The client's and the server's end of a connection."""
    if kind == "memory":
        return trio.testing.memory_stream_pair()
    client_end, server_end = socket.socketpair()
    return trio.SocketStream(trio.socket.from_stdlib_socket(client_end)), TCPStream(server_end)


def _server(transport: trio.abc.Stream, context, limiter: trio.CapacityLimiter) -> TLSStream:  # type: ignore[no-untyped-def]
    server = open_tls_stream(transport, context, limiter)
    assert isinstance(server, SocketTLSStream) == isinstance(transport, TCPStream)
    return server


def _pair(server_context, ca: trustme.CA, kind: str):  # type: ignore[no-untyped-def]
    client_transport, server_transport = _transports(kind)
    client_ssl = ssl.create_default_context()
    ca.configure_trust(client_ssl)
    client = trio.SSLStream(client_transport, client_ssl, server_hostname="localhost")
    server = _server(server_transport, server_context, trio.CapacityLimiter(2))
    return client, server


def test_concurrent_echo_of_a_large_body(
    server_context: ServerContext, ca: trustme.CA, transport: str
) -> None:
    context, _token = server_context
    payload = bytes(range(256)) * 4096 * 4  # 4 MiB

    async def main() -> None:
        client, server = _pair(context, ca, transport)
        received = bytearray()

        async def echo() -> None:
            while data := await server.receive_some():
                await server.send_all(data)
            await server.aclose()

        async def send() -> None:
            await client.send_all(payload)

        async def receive() -> None:
            while len(received) < len(payload):
                received.extend(await client.receive_some())
            await client.aclose()  # close_notify: the server's echo loop reads b"" and ends

        async with trio.open_nursery() as nursery:
            nursery.start_soon(echo)
            nursery.start_soon(send)
            nursery.start_soon(receive)
            with trio.fail_after(60):
                await client.do_handshake()
        assert bytes(received) == payload
        assert server.info is not None
        assert server.info.server_name == "localhost"
        assert server.info.version in ("TLSv1.2", "TLSv1.3")

    trio.run(main)


def test_end_of_stream_without_close_notify_reads_as_empty(
    server_context: ServerContext, ca: trustme.CA, transport: str
) -> None:
    context, _token = server_context

    async def main() -> None:
        client, server = _pair(context, ca, transport)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.do_handshake)
            await server.do_handshake()
        await client.send_all(b"last words")
        await client.transport_stream.send_eof()  # no close_notify
        assert await server.receive_some() == b"last words"
        assert await server.receive_some() == b""
        await server.aclose()
        await client.transport_stream.aclose()

    trio.run(main)


def test_a_client_that_is_not_tls_fails_the_handshake_clearly(
    server_context: ServerContext, transport: str
) -> None:
    context, _token = server_context

    async def main() -> None:
        client_transport, server_transport = _transports(transport)
        server = _server(server_transport, context, trio.CapacityLimiter(1))
        await client_transport.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        with pytest.raises(
            TLSError, match=r"TLS handshake failed: (http request|wrong version number)"
        ):
            await server.do_handshake()
        await server.aclose()
        await client_transport.aclose()

    trio.run(main)


def test_a_large_response_waits_for_a_slow_reader_and_arrives_whole(
    server_context: ServerContext, ca: trustme.CA, transport: str
) -> None:
    """16 MiB in one send_all: far more than the socket buffers hold, so OpenSSL's write
    wants to write again and again, and the stream waits for the reader each time."""
    context, _token = server_context
    payload = bytes(range(256)) * 4096 * 16

    async def main() -> None:
        client, server = _pair(context, ca, transport)
        received = bytearray()

        async def respond() -> None:
            await server.send_all(payload)
            await server.aclose()

        async def read_slowly() -> None:
            while data := await client.receive_some(4096):
                received.extend(data)
            # close_notify came last: the stdlib client read a clean end, not a truncation
            await client.transport_stream.aclose()

        with trio.fail_after(60):  # a guard against a hang, not a measure of speed
            async with trio.open_nursery() as nursery:
                nursery.start_soon(respond)
                nursery.start_soon(read_slowly)
        assert bytes(received) == payload

    trio.run(main)


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    """A client and a server socket of one loopback TCP connection."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client_end = socket.create_connection(listener.getsockname()[:2])
        server_end, _ = listener.accept()
    return client_end, server_end


def test_a_send_of_many_records_leaves_a_tcp_socket_uncorked(
    server_context: ServerContext, ca: trustme.CA
) -> None:
    """A send of several records is written corked (the kernel sends full segments only);
    once it returns, the socket is uncorked: the response's last partial segment leaves at
    once, not after the kernel's cork timeout, and a small response after it is not held."""
    context, _token = server_context
    payload = bytes(range(256)) * 64 * 5 + b"!"  # five full records and one byte

    async def main() -> None:
        client_end, server_end = _tcp_pair()
        client_ssl = ssl.create_default_context()
        ca.configure_trust(client_ssl)
        client_transport = trio.SocketStream(trio.socket.from_stdlib_socket(client_end))
        client = trio.SSLStream(client_transport, client_ssl, server_hostname="localhost")
        server = _server(TCPStream(server_end), context, trio.CapacityLimiter(2))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.do_handshake)
            await server.do_handshake()
        for message in (payload, b"and a small one"):
            await server.send_all(message)
            assert server_end.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK) == 0
            received = bytearray()
            with trio.fail_after(10):
                while len(received) < len(message):
                    received.extend(await client.receive_some())
            assert bytes(received) == message
        await server.aclose()
        await client_transport.aclose()

    trio.run(main)


def test_event_loops_in_several_threads_receive_their_own_bytes(
    server_context: ServerContext, ca: trustme.CA
) -> None:
    """Each thread's event loop has its own receive buffer: ``SSL_read`` runs with the
    interpreter lock released, so a buffer shared across threads would take the other
    loop's plaintext."""
    context, _token = server_context
    loops = range(3)
    payloads = [bytes([number + 1]) * (16 * 1024 * 1024) for number in loops]
    received: list[bytes] = [b"" for _ in loops]
    failures: list[BaseException] = []

    def run(index: int) -> None:
        async def main() -> None:
            client, server = _pair(context, ca, "socket")
            got = bytearray()

            async def send() -> None:
                await client.send_all(payloads[index])
                await client.aclose()

            async def receive() -> None:
                while data := await server.receive_some():
                    got.extend(data)
                await server.aclose()

            with trio.fail_after(60):  # a guard against a hang, not a measure of speed
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(send)
                    nursery.start_soon(receive)
            received[index] = bytes(got)

        try:
            trio.run(main)
        except BaseException as exc:  # reported by the test's thread
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(index,)) for index in loops]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures, failures
    for index in loops:
        assert len(received[index]) == len(payloads[index])
        assert received[index] == payloads[index], f"loop {index} got the other loop's bytes"
