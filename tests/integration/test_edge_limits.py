"""The limits at the edge, end to end against the proxy as a subprocess on the test token:
idle upgraded tunnels, connections beyond max_connections, handshake rates per client,
early upstream answers, upstream connections after an aborted request."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import trustme
from websockets.exceptions import ConnectionClosed

from tests.faulthsm import FaultControl, read_stats
from tests.integration.test_hardening import handshake_refused
from tests.integration.test_token_resilience import _handshake_all as handshake_all
from tests.support import (
    HSM,
    REPO,
    TOKEN_PIN,
    RecordingUpstream,
    StartOnFaulthsm,
    StartProxy,
    client_context,
)
from tests.support.http import (
    ScriptedUpstream,
    exchange_raw,
    read_all,
    read_body,
    respond,
    status_of,
    tls_connect,
)
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


def test_no_session_is_left_open_after_lost_sessions_or_a_lost_login(
    hsm: HSM, faulthsm: Path, tmp_path: Path
) -> None:
    """A lost session or login rebuilds the token's pool while handshakes still hold
    sessions of the old one: those must be closed when they come back, not kept until the
    process ends (a token has few sessions); and a lost login's session is closed once the
    process has logged in again."""
    env = {
        **os.environ,
        "FAULTHSM_MODULE": hsm.module,
        "FAULTHSM_CONTROL": str(tmp_path / "control"),
    }
    result = subprocess.run(
        [sys.executable, "-m", "tests.support.session_count", str(faulthsm), str(hsm.uri("ec256"))],
        input=TOKEN_PIN,
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    # Three rebuilds, none of the three sessions held across them left open; four with
    # the lost login, and the lost login's session closed.
    assert result.stdout.split() == ["0", "4", "0"], result.stderr


def test_a_reload_that_changes_the_session_pool_resizes_the_signing_limiter(
    on_faulthsm: StartOnFaulthsm, fault: FaultControl, ca: trustme.CA, tmp_path: Path
) -> None:
    proxy = on_faulthsm(sessions=1, settings={"delay_ms": 50})
    stats = fault.path.with_name("faulthsm.stats")
    assert handshake_all(proxy.port, client_context(ca), 6) == [200] * 6
    assert read_stats(stats)["max_in_flight"] == 1  # one session: one signature at a time
    config = tmp_path / "proxy.toml"
    config.write_text(config.read_text().replace("sessions = 1\n", "sessions = 4\n"))
    proxy.process.send_signal(signal.SIGHUP)
    proxy.wait_for_log(lambda entry: entry.get("event") == "reloaded", timeout=30)
    assert handshake_all(proxy.port, client_context(ca), 12) == [200] * 12
    assert read_stats(stats)["max_in_flight"] >= 2  # the new pool's four sessions in use


def test_an_early_answer_reaches_the_client_while_it_still_sends_its_body(
    start_proxy: StartProxy, scripted: Callable[..., ScriptedUpstream], ca: trustme.CA
) -> None:
    """Full duplex: the upstream answers 413 from the head alone, keeps its connection open
    and stops reading. The client, with most of its body still to send, gets that answer at
    once (not after the read timeout), the upstream connection that carried part of the
    request is closed and never reused, and the next request goes on a new one."""
    upstream_saw_eof = threading.Event()

    def handler(sock: socket.socket, server: ScriptedUpstream) -> None:
        buffer = bytearray()
        head = server.read_head(sock, buffer)
        if head is None:
            return
        if b"/upload" not in head:
            read_body(sock, head, buffer)
            respond(sock, body=b"fresh connection")
            return
        respond(sock, 413, b"upstream says: too large")  # keep-alive, and read no more
        while True:
            try:
                if not sock.recv(65536):
                    break
            except OSError:
                break
        upstream_saw_eof.set()

    backend = scripted(handler)
    proxy = start_proxy(backend.url, http="read_timeout = 300\nbody_timeout = 300")
    with tls_connect(proxy.port, ca) as tls:
        tls.sendall(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 67108864\r\n\r\n")
        tls.sendall(b"x" * (1 << 20))  # a first MiB of 64, and the client waits to hear
        data = read_all(tls)
    assert status_of(data) == 413
    assert data.endswith(b"upstream says: too large")
    assert b"connection: close" in data.lower()
    assert upstream_saw_eof.wait(10)  # the half-sent upstream connection was closed
    after = exchange_raw(
        proxy.port, ca, b"GET /next HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    )
    assert after.endswith(b"fresh connection")
    assert backend.connections == 2
