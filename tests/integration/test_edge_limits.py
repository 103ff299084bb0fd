"""The limits at the edge, end to end against the proxy as a subprocess on the test token:
idle upgraded tunnels, connections beyond max_connections, handshake rates per client,
early upstream answers, upstream connections after an aborted request."""

from __future__ import annotations

import ssl
import threading

import pytest
import trustme
from websockets.exceptions import ConnectionClosed

from tests.integration.test_hardening import handshake_refused
from tests.support import RecordingUpstream, StartProxy, client_context
from tests.support.http import exchange_raw, status_of, tls_connect
from tests.support.operating import admin_section, admin_url, scrape, value, wait_until


def test_an_idle_websocket_tunnel_is_closed_after_tunnel_idle_timeout(
    start_proxy: StartProxy, ca: trustme.CA
) -> None:
    from websockets.sync.client import connect
    from websockets.sync.server import ServerConnection, serve

    upstream_closed = threading.Event()

    def quiet(connection: ServerConnection) -> None:
        connection.send("hello")
        try:
            for message in connection:
                connection.send(message)
        finally:
            upstream_closed.set()

    with serve(quiet, "127.0.0.1", 0) as server:
        port = server.socket.getsockname()[1]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        proxy = start_proxy(f"http://127.0.0.1:{port}", http="tunnel_idle_timeout = 1")
        with connect(
            f"wss://localhost:{proxy.port}/socket", ssl=client_context(ca, alpn=[])
        ) as websocket:
            assert websocket.recv(timeout=10) == "hello"
            websocket.send("ping")
            assert websocket.recv(timeout=10) == "ping"
            # Then silence: the proxy ends the tunnel, both ways.
            try:
                websocket.recv(timeout=30)
                raise AssertionError("the tunnel carried a message nobody sent")
            except ConnectionClosed:
                pass
        assert upstream_closed.wait(10)
        server.shutdown()
    proxy.wait_for_log(lambda entry: entry.get("event") == "tunnel_idle")
    access = proxy.wait_for_log(lambda entry: entry.get("path") == "/socket")
    assert access["status"] == 101


def test_max_connections_refuse_mode_closes_at_once_logs_and_counts(
    start_proxy: StartProxy, upstream: RecordingUpstream, ca: trustme.CA
) -> None:
    proxy = start_proxy(
        upstream.url,
        http='max_connections = 2\nmax_connections_mode = "refuse"',
        extra=admin_section(probe_interval=60),
    )
    admin = admin_url(proxy.lines())
    held = [tls_connect(proxy.port, ca) for _ in range(2)]
    try:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            tls_connect(proxy.port, ca)  # closed before its handshake, not left waiting
        line = proxy.wait_for_log(lambda entry: entry.get("event") == "connection_limit")
        assert "over http.max_connections" in line["message"]
        refused = value(
            scrape(admin), "hsm_proxy_connections_refused_total", reason="max_connections"
        )
        assert refused == 1
    finally:
        for tls in held:
            tls.close()
    wait_until(lambda: value(scrape(admin), "hsm_proxy_connections_open") == 0)
    reply = exchange_raw(proxy.port, ca, b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert status_of(reply) == 200


def test_a_client_over_its_handshake_rate_is_refused_and_others_are_not(
    start_proxy: StartProxy, upstream: RecordingUpstream, ca: trustme.CA
) -> None:
    proxy = start_proxy(
        upstream.url,
        extra=(
            "\n[security]\nhandshake_rate_per_client = 0.001\nhandshake_burst_per_client = 2\n"
            + admin_section(probe_interval=60)
        ),
    )
    admin = admin_url(proxy.lines())
    assert not handshake_refused(proxy.port, ca, "127.0.0.1")
    assert not handshake_refused(proxy.port, ca, "127.0.0.1")
    assert handshake_refused(proxy.port, ca, "127.0.0.1")  # the burst is spent
    assert not handshake_refused(proxy.port, ca, "127.0.0.2")  # a bucket of its own
    samples = scrape(admin)
    assert value(samples, "hsm_proxy_connections_refused_total", reason="handshake_rate") == 1
    assert value(samples, "hsm_proxy_connections_refused_total", reason="handshake_limit") == 0
    line = proxy.wait_for_log(lambda entry: entry.get("event") == "handshake_limit")
    assert "handshake_rate" in line["message"]
