"""The HTTP forwarding rules without a network (docs/ARCHITECTURE.md, decision 4): h11 events in,
h11 events and decisions out. Plus the [http], [upstreams] and [[routes]] config."""

from __future__ import annotations

from typing import Any

import h11
import pytest

from proxy.config import HTTPConfig, Route, UpstreamConfig, UpstreamGroup
from proxy.errors import ConfigError
from proxy.http.rules import (
    ClientInfo,
    check_request,
    check_request_head,
    choose_upstream,
    client_response,
    is_upgrade,
    switching_response,
    upstream_request,
)
from proxy.tls.clientauth import ClientIdentity
from tests.support.configs import minimal_config

LIMITS = HTTPConfig(max_request_line=100, max_header_bytes=400, max_headers=5, max_body_bytes=1000)


def parse(raw: bytes) -> h11.Request:
    connection = h11.Connection(h11.SERVER)
    connection.receive_data(raw)
    event = connection.next_event()
    assert isinstance(event, h11.Request)
    return event


def names(headers: Any) -> list[bytes]:
    return [bytes(name).lower() for name, _ in headers]


def value(headers: Any, name: bytes) -> bytes | None:
    return next((bytes(v) for n, v in headers if bytes(n).lower() == name), None)


def test_hop_by_hop_headers_and_those_named_by_connection_are_removed() -> None:
    request = parse(
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\n"
        b"Keep-Alive: timeout=5\r\nTE: trailers\r\nProxy-Authorization: Basic x\r\n"
        b"Upgrade: h2c\r\nTrailer: X\r\nX-Kept: yes\r\n\r\n"
    )
    out = upstream_request(request, ClientInfo("192.0.2.1"))
    sent = names(out.headers)
    for gone in (b"connection", b"x-secret", b"keep-alive", b"te", b"proxy-authorization"):
        assert gone not in sent
    assert b"upgrade" not in sent  # Upgrade not named in Connection: not a real upgrade
    assert value(out.headers, b"x-kept") == b"yes"
    response = h11.Response(
        status_code=200,
        headers=[(b"Connection", b"X-Internal"), (b"X-Internal", b"1"), (b"Server", b"b")],
    )
    assert names(client_response(response).headers) == [b"server"]


def test_a_response_with_both_framings_loses_its_content_length() -> None:
    response = h11.Response(
        status_code=200,
        headers=[(b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"5"), (b"X", b"y")],
    )
    assert names(client_response(response).headers) == [b"x"]


def test_forwarding_headers_are_appended_or_replaced() -> None:
    request = parse(
        b"GET / HTTP/1.1\r\nHost: app.example:8443\r\nX-Forwarded-For: 198.51.100.7\r\n"
        b"X-Forwarded-Proto: http\r\nX-Forwarded-Host: evil\r\nForwarded: for=198.51.100.7\r\n\r\n"
    )
    out = upstream_request(request, ClientInfo("2001:db8::1", forwarded=True))
    assert value(out.headers, b"x-forwarded-for") == b"198.51.100.7, 2001:db8::1"
    assert value(out.headers, b"x-forwarded-proto") == b"https"
    assert value(out.headers, b"x-forwarded-host") == b"app.example:8443"
    assert value(out.headers, b"forwarded") == (
        b'for=198.51.100.7, for="[2001:db8::1]";proto=https;host="app.example:8443"'
    )
    assert value(out.headers, b"host") == b"app.example:8443"
    plain = upstream_request(parse(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"), ClientInfo("10.0.0.1"))
    assert value(plain.headers, b"forwarded") is None  # http.forwarded is off by default


def test_a_request_without_host_gets_one_for_the_upstream() -> None:
    request = parse(b"GET / HTTP/1.0\r\n\r\n")
    with_sni = upstream_request(request, ClientInfo("10.0.0.1", server_name="app.example"))
    assert value(with_sni.headers, b"host") == b"app.example"
    without = upstream_request(request, ClientInfo("10.0.0.1"), "10.0.0.5:8080")
    assert value(without.headers, b"host") == b"10.0.0.5:8080"
    assert value(without.headers, b"x-forwarded-host") is None


def test_client_sent_identity_headers_never_reach_the_upstream() -> None:
    request = parse(
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Client-Cert-Subject: CN=admin\r\n"
        b"X-Forwarded-Client-Cert: By=spoof\r\n\r\n"
    )
    anonymous = upstream_request(request, ClientInfo("10.0.0.1"))
    assert b"x-client-cert-subject" not in names(anonymous.headers)
    assert b"x-forwarded-client-cert" not in names(anonymous.headers)
    verified = upstream_request(
        request,
        ClientInfo(
            "10.0.0.1",
            identity=ClientIdentity(
                subject="CN=alice,O=Example",
                issuer="CN=CA",
                common_names=("alice",),
                dns_names=(),
                uris=(),
                spki_sha256=bytes(32),
                fingerprint_sha256="ab12",
            ),
        ),
    )
    assert value(verified.headers, b"x-client-cert-subject") == b"CN=alice,O=Example"
    assert value(verified.headers, b"x-client-cert-fingerprint") == b"ab12"


def test_websocket_upgrade_keeps_upgrade_and_connection() -> None:
    request = parse(
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    assert is_upgrade(request)
    out = upstream_request(request, ClientInfo("10.0.0.1"))
    assert value(out.headers, b"upgrade") == b"websocket"
    assert value(out.headers, b"connection") == b"upgrade"
    assert value(out.headers, b"sec-websocket-key") == b"dGhlIHNhbXBsZSBub25jZQ=="
    answer = h11.InformationalResponse(
        status_code=101,
        headers=[(b"Upgrade", b"websocket"), (b"Connection", b"Upgrade"), (b"Sec-A", b"x")],
    )
    back = switching_response(answer)
    assert value(back.headers, b"upgrade") == b"websocket"
    assert value(back.headers, b"connection") == b"upgrade"


def test_chunked_request_stays_chunked_upstream() -> None:
    request = parse(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    out = upstream_request(request, ClientInfo("10.0.0.1"))
    assert value(out.headers, b"transfer-encoding") == b"chunked"


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET /" + b"a" * 200 + b" HTTP/1.1\r\n", 414),  # request line still arriving
        (b"GET /" + b"a" * 200 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\n" + b"X: " + b"v" * 500 + b"\r\n", 431),
        (b"GET / HTTP/1.1\r\n" + b"X: v\r\n" * 6 + b"\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n", 400),  # obs-fold
        (b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\r\n\tchunked\r\n\r\n", 400),
        (b"GET / HTTP/1.1\nHost: a\nX: a\n b\n\n", 400),  # obs-fold with bare LF
        (b"GET / HTTP/1.1\r\nHost: a\r\n", None),  # incomplete but fine so far
        (b"\r\nGET / HTTP/1.1\r\nHost: a\r\n\r\n", None),
        (b"GET / HTTP/1.1\r\n" + b"X: v\r\n" * 5 + b"\r\nbody with\r\n leading space", None),
    ],
)
def test_raw_head_checks(raw: bytes, status: int | None) -> None:
    assert check_request_head(raw, LIMITS) == status


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n",
            400,
        ),
        (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Length: 5\r\n\r\n",
            400,
        ),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1001\r\n\r\n", 413),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\n", None),
        (b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", 501),
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", None),
    ],
)
def test_parsed_request_checks(raw: bytes, status: int | None) -> None:
    assert check_request(parse(raw), LIMITS) == status


def test_body_size_is_unlimited_by_default() -> None:
    request = parse(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999\r\n\r\n")
    assert check_request(request, HTTPConfig()) is None


ROUTES = (
    Route("api", hosts=("api.example.com",), path_prefix="/v1"),
    Route("static", hosts=("*.cdn.example",)),
    Route("admin", path_prefix="/admin/"),
)


@pytest.mark.parametrize(
    ("host", "path", "sni", "expected"),
    [
        ("api.example.com", "/v1", None, "api"),
        ("API.example.com:8443", "/v1/users?x=1", None, "api"),
        ("api.example.com", "/v1?x", None, "api"),
        ("api.example.com", "/v10", None, "default"),  # a prefix matches whole segments
        ("api.example.com", "/v2", None, "default"),
        ("img.cdn.example", "/a.png", None, "static"),
        ("cdn.example", "/a.png", None, "default"),  # *.x matches subdomains only
        ("other", "/admin/users", None, "admin"),
        ("other", "/admin", None, "default"),
        (None, "/v1/x", "api.example.com", "api"),  # HTTP/1.0 without Host: SNI decides
    ],
)
def test_routes_first_match_wins(
    host: str | None, path: str, sni: str | None, expected: str
) -> None:
    head = f"GET {path} HTTP/1.{'1' if host else '0'}\r\n"
    if host:
        head += f"Host: {host}\r\n"
    request = parse((head + "\r\n").encode())
    assert choose_upstream(ROUTES, request, sni) == expected


config = minimal_config


def test_http_config_defaults_and_routes() -> None:
    assert config("").http == HTTPConfig()
    loaded = config(
        """
[http]
max_body_bytes = 1048576
idle_timeout = 5
forwarded = true
[upstreams.api]
servers = ["http://10.0.0.1:8080", "http://10.0.0.2"]
[[routes]]
hosts = ["API.example.com"]
path_prefix = "/v1/"
upstream = "api"
"""
    )
    assert loaded.http.max_body_bytes == 1048576
    assert loaded.http.idle_timeout == 5.0
    assert loaded.http.forwarded is True
    assert loaded.upstreams == (
        UpstreamGroup("api", (UpstreamConfig("10.0.0.1", 8080), UpstreamConfig("10.0.0.2", 80))),
    )
    assert loaded.routes == (Route("api", ("api.example.com",), "/v1/"),)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("[http]\nmax_headers = 0\n", "http.max_headers: must be from 1 to 10000, got 0"),
        ("[http]\nread_timeout = 0\n", "http.read_timeout: must be greater than 0"),
        ("[http]\nidle = 3\n", "http.idle: unknown key"),
        ("[http]\nforwarded = 1\n", "http.forwarded: expected true/false"),
        ("[upstreams.api]\nservers = []\n", "upstreams.api.servers: needs at least one"),
        ("[upstreams.api]\nservers = ['https://x']\n", "must be an http:// URL"),
        ("[upstreams.default]\nservers = ['http://x']\n", "is the top-level upstream"),
        ("[[routes]]\nupstream = 'nope'\n", "routes[0].upstream: no upstream named 'nope'"),
        ("[[routes]]\nupstream = 'default'\npath_prefix = 'v1'\n", "must start with /"),
        ("[[routes]]\nupstream = 'default'\nhosts = ['a:443']\n", "without a port"),
    ],
)
def test_http_config_errors_name_the_key(extra: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config(extra)
    assert message in str(caught.value)
