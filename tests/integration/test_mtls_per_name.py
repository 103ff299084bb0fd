"""Mutual TLS per server name: a connection switched to another context by its SNI name
gets that context's client-certificate rules (OpenSSL does not copy them by itself)."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trio
import trio.testing
import trustme

from proxy.errors import TLSError
from proxy.secrets.store import SecretRef
from proxy.tls.stream import TLSInfo, TLSStream

CA_REF = SecretRef(file=Path("client-ca.pem"), what="client CA bundle")


def handshake(
    contexts: tuple[object, object, Path], ca: trustme.CA, name: str, with_cert: bool
) -> TLSInfo:
    open_context, mtls_context, cert_path = contexts
    client_ssl = ssl.create_default_context()
    ca.configure_trust(client_ssl)
    if with_cert:
        client_ssl.load_cert_chain(cert_path, cert_path.with_suffix(".key"))
    outcome: list[TLSInfo] = []

    async def main() -> None:
        client_side, server_side = trio.testing.memory_stream_pair()
        client = trio.SSLStream(client_side, client_ssl, server_hostname=name)
        server = TLSStream(server_side, open_context, trio.CapacityLimiter(2))  # type: ignore[arg-type]

        def by_name(server_name: str) -> None:
            if server_name == "secure.localhost":
                server.switch_context(mtls_context)  # type: ignore[arg-type]

        server.on_server_name = by_name

        async def client_talks() -> None:
            try:
                await client.send_all(b"ping")
                await client.receive_some(10)
            except (trio.BrokenResourceError, ssl.SSLError):
                pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(client_talks)
            try:
                outcome.append(await server.do_handshake())
                assert await server.receive_some(4) == b"ping"
                await server.send_all(b"pong")
            finally:
                await server.aclose()

    try:
        trio.run(main)
    except ExceptionGroup as group:  # trio's nursery wraps the server's TLSError
        [error] = group.exceptions
        raise error from None
    return outcome[0]


def test_client_certificates_are_required_only_for_the_server_name_that_wants_them(
    contexts: tuple[object, object, Path], ca: trustme.CA
) -> None:
    plain = handshake(contexts, ca, "localhost", with_cert=False)
    assert (plain.client_auth, plain.client_identity) == (False, None)
    with pytest.raises(TLSError, match="peer did not return a certificate"):
        handshake(contexts, ca, "secure.localhost", with_cert=False)
    secure = handshake(contexts, ca, "secure.localhost", with_cert=True)
    assert secure.client_auth
    assert secure.client_identity is not None
    assert secure.client_identity.common_names == ("web",)
