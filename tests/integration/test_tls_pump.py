"""The TLS stream's pumping paths that the benchmark tuned: a large body written in one
``send_all`` (several records, sent in batches, under the send lock) while the other side
talks too, and handshakes whose later steps run inline (full and resumed TLS 1.3)."""

from __future__ import annotations

import socket
import ssl

import trio
import trio.testing
import trustme
from OpenSSL import SSL

from proxy.net.sockets import TCPStream
from proxy.tls.pace import PACE, SigningPace
from proxy.tls.socketstream import open_tls_stream
from proxy.tls.stream import TLSStream
from tests.support import ProxyFactory, RecordingUpstream


def test_one_large_send_arrives_whole_while_the_peer_talks(server_context, ca: trustme.CA) -> None:  # type: ignore[no-untyped-def]
    context, _token = server_context
    body = bytes(range(251)) * 12_000  # about 3 MiB, not a multiple of any chunk size
    question = b"are you there?" * 5000

    async def main() -> None:
        client_transport, server_transport = trio.testing.memory_stream_pair()
        client_ssl = ssl.create_default_context()
        ca.configure_trust(client_ssl)
        client = trio.SSLStream(client_transport, client_ssl, server_hostname="localhost")
        server = TLSStream(server_transport, context, trio.CapacityLimiter(1))
        received = bytearray()
        heard = bytearray()

        async def server_sends() -> None:
            await server.send_all(body)

        async def server_listens() -> None:
            while len(heard) < len(question):
                heard.extend(await server.receive_some())

        async def client_talks() -> None:
            await client.send_all(question)

        async def client_reads() -> None:
            while len(received) < len(body):
                received.extend(await client.receive_some())

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.do_handshake)
                await server.do_handshake()
            async with trio.open_nursery() as nursery:
                for task in (server_sends, server_listens, client_talks, client_reads):
                    nursery.start_soon(task)
        assert bytes(received) == body
        assert bytes(heard) == question

    trio.run(main)


def test_a_fast_token_signs_on_the_event_loop_after_one_probe(
    server_context: tuple[SSL.Context, object], ca: trustme.CA
) -> None:
    """With the real token key: the first handshakes sign in worker threads; then one
    probe signs on the event loop, the key bridge reports the signature from the loop's
    thread, and inline signing is on (pace.py's rule, end to end)."""
    context, _token = server_context
    saved = dict(vars(PACE))
    # A generous limit: the test is about the mechanism, not about this busy machine's speed.
    SigningPace.__init__(PACE, inline_limit=1.0, first_probe_after=2)
    client_ssl = ssl.create_default_context()
    ca.configure_trust(client_ssl)

    async def handshake() -> None:
        client_end, server_end = socket.socketpair()
        client = trio.SSLStream(
            trio.SocketStream(trio.socket.from_stdlib_socket(client_end)),
            client_ssl,
            server_hostname="localhost",
        )
        server = open_tls_stream(TCPStream(server_end), context, trio.CapacityLimiter(2))
        with trio.fail_after(30):  # a guard against a hang
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.do_handshake)
                await server.do_handshake()
        await server.aclose()
        await client.transport_stream.aclose()

    async def main() -> None:
        await handshake()
        assert not PACE.inline  # timed in a worker thread: no measure of the token
        await handshake()  # the probe
        assert PACE.inline
        await handshake()
        assert PACE.inline

    try:
        trio.run(main)
    finally:
        vars(PACE).update(saved)


def _get(port: int, context: ssl.SSLContext, session: ssl.SSLSession | None) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    tls = context.wrap_socket(raw, server_hostname="localhost", session=session)
    tls.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        data += tls.recv(65536)
    assert data.startswith(b"HTTP/1.1 200")
    return tls


def test_resumed_tls13_handshakes_cost_no_signature(
    proxy_factory: ProxyFactory, ca: trustme.CA, upstream: RecordingUpstream
) -> None:
    proxy = proxy_factory("ec256")
    client = ssl.create_default_context()
    ca.configure_trust(client)
    client.minimum_version = ssl.TLSVersion.TLSv1_3

    first = _get(proxy.port, client, None)
    session = first.session  # the tickets came before the response, read with it
    first.close()
    assert proxy.signatures() == 1

    for _ in range(3):
        again = _get(proxy.port, client, session)
        assert again.session_reused
        again.close()
    assert proxy.signatures() == 1
    assert len(upstream.requests) == 4
