"""TLSStream over in-memory transports (trio.testing), against trio's own stdlib-ssl client:
the BIO pump, concurrent send and receive, large transfers and end of stream."""

from __future__ import annotations

import ssl

import pytest
import trio
import trio.testing
import trustme

from proxy.errors import TLSError
from proxy.tls.stream import TLSStream


def _pair(server_context, ca: trustme.CA):  # type: ignore[no-untyped-def]
    client_transport, server_transport = trio.testing.memory_stream_pair()
    client_ssl = ssl.create_default_context()
    ca.configure_trust(client_ssl)
    client = trio.SSLStream(client_transport, client_ssl, server_hostname="localhost")
    server = TLSStream(server_transport, server_context, trio.CapacityLimiter(2))
    return client, server


def test_concurrent_echo_of_a_large_body(server_context, ca: trustme.CA) -> None:  # type: ignore[no-untyped-def]
    context, _token = server_context
    payload = bytes(range(256)) * 4096 * 4  # 4 MiB

    async def main() -> None:
        client, server = _pair(context, ca)
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


def test_end_of_stream_without_close_notify_reads_as_empty(server_context, ca: trustme.CA) -> None:  # type: ignore[no-untyped-def]
    context, _token = server_context

    async def main() -> None:
        client, server = _pair(context, ca)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.do_handshake)
            await server.do_handshake()
        await client.send_all(b"last words")
        await client.transport_stream.aclose()  # no close_notify
        assert await server.receive_some() == b"last words"
        assert await server.receive_some() == b""

    trio.run(main)


def test_a_client_that_is_not_tls_fails_the_handshake_clearly(server_context) -> None:  # type: ignore[no-untyped-def]
    context, _token = server_context

    async def main() -> None:
        client_transport, server_transport = trio.testing.memory_stream_pair()
        server = TLSStream(server_transport, context, trio.CapacityLimiter(1))
        await client_transport.send_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        with pytest.raises(
            TLSError, match=r"TLS handshake failed: (http request|wrong version number)"
        ):
            await server.do_handshake()

    trio.run(main)
