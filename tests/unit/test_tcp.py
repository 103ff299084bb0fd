"""TCP passthrough without a proxy process: the [tcp] and tcp:// configuration, the ALPN
each site offers, the PROXY protocol v2 encoder (byte for byte against the specification),
the relay over real loopback sockets, and the shared round-robin balancer."""

from __future__ import annotations

import socket
import time

import pytest
import trio

from proxy.config import (
    DEFAULT_UPSTREAM,
    ProxyConfig,
    TCPConfig,
    UpstreamConfig,
    UpstreamGroup,
)
from proxy.errors import ConfigError
from proxy.net.balancer import Balancer
from proxy.net.relay import Relay, RelayEnd, Side
from proxy.net.sockets import TCPStream
from proxy.tcp.proxyproto import LOCAL_HEADER, encode_v2
from proxy.tls.clientauth import ClientIdentity
from proxy.tls.stream import TLSInfo
from tests.support.configs import base_config, minimal_config

BASE = base_config("tcp://127.0.0.1:6379")

SITE = """
[[tls.sni]]
certificate = "site.pem"
key = "pkcs11:object=k;type=private"
names = ["api.example.com"]
upstream = "api"
"""


def config(extra: str, base: str = BASE) -> ProxyConfig:
    return minimal_config(extra, base)


# --- configuration ---------------------------------------------------------------------------


def test_tcp_defaults_overrides_and_alpn_per_site() -> None:
    loaded = config(
        """
[tcp]
connect_timeout = 2
idle_timeout = 600
max_lifetime = 86400
alpn = ["h2"]
proxy_protocol = "v2"
[upstreams.api]
servers = ["http://10.0.0.1:8080"]
[upstreams.grpc]
servers = ["tcp://10.0.0.2:50051", "tcp://[2001:db8::5]:50051"]
alpn = []
proxy_protocol = "off"
"""
        + SITE.replace('names = ["api.example.com"]\n', "")
    )
    assert loaded.tcp == TCPConfig(2.0, 600.0, 86400.0, ("h2",), "v2")
    default, api, grpc = loaded.upstream_groups()
    assert default == UpstreamGroup(
        DEFAULT_UPSTREAM, (UpstreamConfig("127.0.0.1", 6379, scheme="tcp"),), ("h2",), "v2"
    )
    assert default.tcp
    assert grpc.tcp
    assert not api.tcp
    assert str(grpc.servers[1]) == "tcp://[2001:db8::5]:50051"
    assert (grpc.alpn, grpc.proxy_protocol) == ((), "off")
    assert loaded.alpn_offer() == ((b"h2",), True)
    assert loaded.alpn_offer(loaded.tls.sni[0]) == ((b"h2", b"http/1.1"), False)  # the api site
    assert loaded.site_upstream(loaded.tls.sni[0]) is api
    assert config("").tcp == TCPConfig()
    assert config("").alpn_offer() == ((), False)  # nothing offered, nothing required


def test_http_upstreams_offer_h2_then_http11_and_keep_port_80() -> None:
    loaded = config("", base=base_config("http://backend"))
    assert loaded.alpn_offer() == ((b"h2", b"http/1.1"), False)
    assert str(loaded.upstream) == "http://backend"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            "[upstreams.api]\nservers = ['tcp://10.0.0.1:1', 'http://10.0.0.2']\n",
            "upstreams.api.servers[1]: 'http://10.0.0.2' mixes http:// with the tcp://",
        ),
        ("[upstreams.api]\nservers = ['tcp://10.0.0.1']\n", "upstreams.api.servers[0]: "),
        (
            "[upstreams.api]\nservers = ['http://10.0.0.1']\nalpn = ['h2']\n",
            "upstreams.api.alpn: only tcp:// upstreams take alpn",
        ),
        (
            "[upstreams.api]\nservers = ['http://10.0.0.1']\nproxy_protocol = 'v2'\n",
            "upstreams.api.proxy_protocol: only tcp:// upstreams",
        ),
        ("[upstreams.api]\nservers = ['udp://x:1']\n", "or a tcp://HOST:PORT address"),
        ("[tcp]\nproxy_protocol = 'v1'\n", 'tcp.proxy_protocol: must be "off" or "v2"'),
        ("[tcp]\nalpn = ['h2', 'h2']\n", "tcp.alpn: a protocol is listed twice"),
        ("[tcp]\nalpn = ['h 2']\n", "tcp.alpn: 'h 2' is not an ALPN protocol ID"),
        ("[tcp]\nalpn = 'h2'\n", "tcp.alpn: expected a list"),
        ("[tcp]\nidle_timeout = 0\n", "tcp.idle_timeout: must be greater than 0"),
        ("[tcp]\nmax_lifetime = -1\n", "tcp.max_lifetime: must be 0 (no limit) or more"),
        ("[tcp]\nconnect = 1\n", "tcp.connect: unknown key"),
        (
            "[[routes]]\nupstream = 'default'\n",
            "routes[0].upstream: 'default' is a tcp:// upstream",
        ),
        (SITE, "tls.sni[1].upstream: no upstream named 'api' (known: default)"),
    ],
)
def test_tcp_config_errors_name_the_key(extra: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config(extra)
    assert message in str(caught.value)


# --- PROXY protocol v2, byte for byte ------------------------------------------------------

SIGNATURE = bytes.fromhex("0d0a0d0a000d0a515549540a")


def test_proxy_v2_ipv4_with_every_tls_tlv_and_a_verified_client() -> None:
    identity = ClientIdentity(
        subject="CN=app",
        issuer="CN=CA",
        common_names=("app",),
        dns_names=("app.internal",),
        uris=("spiffe://x/app",),
        spki_sha256=b"\x11" * 32,
        fingerprint_sha256="22" * 32,
    )
    info = TLSInfo(
        version="TLSv1.3",
        cipher="TLS_AES_128_GCM_SHA256",
        alpn="h2",
        server_name="db.example",
        client_auth=True,
        client_identity=identity,
    )
    expected = (
        SIGNATURE
        + bytes.fromhex("21 11 00c6")  # version 2 PROXY, TCP over IPv4, 198 bytes follow
        + bytes.fromhex("c000020a c6336401 c738 01bb")  # 192.0.2.10:51000 -> 198.51.100.1:443
        + bytes.fromhex("01 0002") + b"h2"  # PP2_TYPE_ALPN
        + bytes.fromhex("02 000a") + b"db.example"  # PP2_TYPE_AUTHORITY
        + bytes.fromhex("20 002e")  # PP2_TYPE_SSL, 46 bytes
        + bytes.fromhex("07 00000000")  # SSL | CERT_CONN | CERT_SESS, verified
        + bytes.fromhex("21 0007") + b"TLSv1.3"  # PP2_SUBTYPE_SSL_VERSION
        + bytes.fromhex("22 0003") + b"app"  # PP2_SUBTYPE_SSL_CN
        + bytes.fromhex("23 0016") + b"TLS_AES_128_GCM_SHA256"  # PP2_SUBTYPE_SSL_CIPHER
        + bytes.fromhex("e0 0006") + b"CN=app"
        + bytes.fromhex("e1 0005") + b"CN=CA"
        + bytes.fromhex("e2 000e") + b"spiffe://x/app"
        + bytes.fromhex("e3 000c") + b"app.internal"
        + bytes.fromhex("e4 0020") + b"\x11" * 32
        + bytes.fromhex("e5 0020") + b"\x22" * 32
    )  # fmt: skip
    assert encode_v2(("192.0.2.10", 51000), ("198.51.100.1", 443), info) == expected


def test_proxy_v2_without_a_client_certificate_and_resumed_sessions() -> None:
    plain = TLSInfo(version="TLSv1.2", cipher="", alpn=None, server_name=None)
    assert encode_v2(("10.0.0.1", 1), ("10.0.0.2", 2), plain) == (
        SIGNATURE
        + bytes.fromhex("21 11 001e 0a000001 0a000002 0001 0002")
        + bytes.fromhex("20 000f 01 00000001 21 0007")  # SSL only, verify: no certificate
        + b"TLSv1.2"
    )
    identity = ClientIdentity("CN=a", "CN=b", (), (), (), b"\x00" * 32)
    resumed = TLSInfo("TLSv1.3", "", None, None, True, None, True, identity)
    header = encode_v2(("10.0.0.1", 1), ("10.0.0.2", 2), resumed)
    # The certificate was shown on the session's first connection, not on this one.
    assert header[28:36] == bytes.fromhex("20 000f 05 00000000")


def test_proxy_v2_ipv6_and_mapped_ipv4_and_local() -> None:
    assert encode_v2(("::1", 1), ("2001:db8::2", 2)) == (
        SIGNATURE
        + bytes.fromhex("21 21 0024")
        + bytes.fromhex("00000000000000000000000000000001")
        + bytes.fromhex("20010db8000000000000000000000002")
        + bytes.fromhex("0001 0002")
    )
    mixed = encode_v2(("192.0.2.1", 1), ("2001:db8::2", 2))
    assert mixed[13] == 0x21
    assert mixed[16:32] == bytes.fromhex("00000000000000000000ffffc0000201")
    assert bytes.fromhex("0d0a0d0a000d0a515549540a 20 00 0000") == LOCAL_HEADER


def test_proxy_v2_refuses_a_header_its_length_cannot_say() -> None:
    identity = ClientIdentity("CN=a", "CN=b", (), ("x" * 250,) * 300, (), b"\x00" * 32)
    info = TLSInfo("TLSv1.3", "", None, None, client_auth=True, client_identity=identity)
    with pytest.raises(ValueError, match="cannot hold"):
        encode_v2(("10.0.0.1", 1), ("10.0.0.2", 2), info)


# --- the relay, over real loopback TCP connections -------------------------------------------


def _stream_pair() -> tuple[TCPStream, TCPStream]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        near = socket.create_connection(server.getsockname())
        far, _ = server.accept()
    return TCPStream(near), TCPStream(far)


async def _read_to_end(stream: TCPStream) -> bytes:
    data = b""
    while chunk := await stream.receive_some():
        data += chunk
    return data


def test_relay_carries_half_closes_both_ways_and_counts_bytes() -> None:
    async def main() -> None:
        client, client_side = _stream_pair()
        upstream_side, upstream = _stream_pair()
        moved: list[tuple[Side, int]] = []
        relay = Relay(client_side, upstream_side, 10, on_moved=lambda *m: moved.append(m))
        ended: list[RelayEnd] = []
        with trio.fail_after(5):  # a relay that loses a half-close never ends
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_run_into, relay, ended)
                await client.send_all(b"request")
                await client.send_eof()  # the client is done talking ...
                assert await _read_to_end(upstream) == b"request"  # ... the upstream hears it
                await upstream.send_all(b"answer after your end")  # and still answers
                await upstream.send_eof()
                assert await _read_to_end(client) == b"answer after your end"
        assert (ended[0].closed_by, ended[0].broken) == ("client", None)
        assert (relay.bytes_up, relay.bytes_down) == (7, 21)
        assert moved == [(Side.CLIENT, 7), (Side.UPSTREAM, 21)]
        for stream in (client, client_side, upstream_side, upstream):
            stream.close()

    trio.run(main)


async def _run_into(relay: Relay, ended: list[RelayEnd]) -> None:
    ended.append(await relay.run())


def test_relay_ends_at_the_idle_timeout_and_at_the_max_lifetime() -> None:
    async def chatter(stream: TCPStream) -> None:
        while True:
            await stream.send_all(b".")
            await trio.sleep(0.05)

    async def main() -> None:
        for idle, lifetime, expected in ((0.3, None, "idle_timeout"), (10, 0.3, "max_lifetime")):
            client, client_side = _stream_pair()
            upstream_side, upstream = _stream_pair()
            relay = Relay(client_side, upstream_side, idle, lifetime)
            started = time.monotonic()
            async with trio.open_nursery() as nursery:
                if lifetime:  # bytes keep moving: the lifetime, not idleness, ends this one
                    nursery.start_soon(chatter, client)
                ended = await relay.run()
                nursery.cancel_scope.cancel()
            assert ended.closed_by == expected
            assert 0.25 < time.monotonic() - started < 2
            for stream in (client, client_side, upstream_side, upstream):
                stream.close()

    trio.run(main)


def test_relay_reports_the_side_that_broke() -> None:
    async def main() -> None:
        client, client_side = _stream_pair()
        upstream_side, upstream = _stream_pair()
        relay = Relay(client_side, upstream_side, 10)
        upstream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        upstream.close()  # a reset
        ended = await relay.run()
        assert (ended.closed_by, ended.broken) == ("upstream", Side.UPSTREAM)
        assert "reset" in ended.reason.lower()
        for stream in (client, client_side, upstream_side):
            stream.close()

    trio.run(main)


# --- the balancer shared by the HTTP pool and the TCP handler --------------------------------


def test_balancer_rotates_and_skips_an_address_marked_down() -> None:
    servers = tuple(UpstreamConfig(f"10.0.0.{n}", 1, scheme="tcp") for n in (1, 2, 3))
    balancer = Balancer(UpstreamGroup("g", servers), down_time=60)
    assert [balancer.candidates()[0] for _ in range(3)] == list(servers)
    balancer.mark_down(servers[1], "refused")
    assert [balancer.candidates() for _ in range(3)] == [
        [servers[0], servers[2]],
        [servers[2], servers[0]],  # the down address's turn goes to the next one
        [servers[2], servers[0]],
    ]
    for server in servers:
        balancer.mark_down(server, "refused")
    assert len(balancer.candidates()) == 3  # all down: all are tried rather than none
    balancer.mark_up(servers[1])
    assert balancer.candidates() == [servers[1]]
