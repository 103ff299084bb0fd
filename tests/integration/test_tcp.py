"""TCP passthrough end to end: one proxy process on a real token, real TCP upstreams on
loopback (redis-server, a plaintext gRPC server, scripted byte servers), real clients
(redis-cli, grpcio, Python's ssl), and the proxy's own access lines and metrics.

Each server name NAME.test has its own tcp:// upstream group; localhost stays HTTP, so
one listener serves both protocols, chosen by the server name's site."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from tests.support import (
    REPO,
    ProxyFactory,
    ProxyProcess,
    client_context,
    https_request,
    peak_rss_kib,
    proxy_command,
)
from tests.support.http import ScriptedUpstream, wait_until
from tests.support.mtls import issue_client_cert
from tests.support.operating import admin_url, scrape, value
from tests.support.tcp import BLOCK, Aborted, TCPSetup, TLSClient, pattern_digest

GIB = 1 << 30
RSS_LIMIT_KIB = 150 * 1024


def tls_context(ca: trustme.CA, alpn: list[str] | None = None) -> ssl.SSLContext:
    return client_context(ca, alpn=alpn if alpn is not None else [])


def connect(setup: TCPSetup, ca: trustme.CA, name: str, **options: object) -> TLSClient:
    alpn = options.pop("alpn", None)
    context = tls_context(ca, alpn)  # type: ignore[arg-type]
    return TLSClient(setup.proxy.port, context, f"{name}.test")


# --- real clients: redis-cli and gRPC ------------------------------------------------------


def redis_cli(setup: TCPSetup, *command: str) -> str:
    result = subprocess.run(
        [
            "redis-cli",
            "--tls",
            "--cacert",
            str(setup.ca_file),
            "--sni",
            "redis.test",
            "-h",
            "127.0.0.1",
            "-p",
            str(setup.proxy.port),
            *command,
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.skipif(shutil.which("redis-cli") is None, reason="redis-tools: setup.sh --test")
def test_redis_cli_over_tls_reaches_redis_server(tcp_setup: TCPSetup) -> None:
    since = len(tcp_setup.proxy.lines())
    assert redis_cli(tcp_setup, "PING") == "PONG"
    assert redis_cli(tcp_setup, "SET", "hsm-proxy", "kept in redis") == "OK"
    assert redis_cli(tcp_setup, "GET", "hsm-proxy") == "kept in redis"
    entry = tcp_setup.wait_for_access(since, "redis.test")
    assert entry["upstream"] == f"tcp://127.0.0.1:{tcp_setup.redis_port}"
    assert entry["closed_by"] == "client"
    assert entry["bytes_up"] > 0
    assert entry["bytes_down"] > 0


def test_grpc_unary_and_bidirectional_streaming_over_tls_with_alpn_h2(
    tcp_setup: TCPSetup,
) -> None:
    import grpc

    credentials = grpc.ssl_channel_credentials(root_certificates=tcp_setup.ca_file.read_bytes())
    since = len(tcp_setup.proxy.lines())
    with grpc.secure_channel(
        f"127.0.0.1:{tcp_setup.proxy.port}",
        credentials,
        options=[("grpc.ssl_target_name_override", "grpc.test")],
    ) as channel:
        unary = channel.unary_unary("/test.Echo/Unary")
        assert unary(b"ping", timeout=10) == b"echo:ping"
        reverse = channel.stream_stream("/test.Echo/Reverse")
        messages = [b"abc", b"hsm-proxy", bytes(range(256)) * 64]
        assert list(reverse(iter(messages), timeout=10)) == [m[::-1] for m in messages]
    entry = tcp_setup.wait_for_access(since, "grpc.test")
    assert entry["alpn"] == "h2"
    assert entry["upstream"] == f"tcp://127.0.0.1:{tcp_setup.grpc_port}"


# --- ALPN ------------------------------------------------------------------------------------


def test_alpn_h2_is_selected_for_an_h2_upstream(tcp_setup: TCPSetup, ca: trustme.CA) -> None:
    with connect(tcp_setup, ca, "grpc", alpn=["h2", "http/1.1"]) as client:
        assert client.alpn == "h2"
    with connect(tcp_setup, ca, "grpc") as client:
        assert client.alpn is None  # a client that offers no ALPN is let through


def test_a_client_offering_only_http11_to_an_h2_upstream_is_refused(
    tcp_setup: TCPSetup, ca: trustme.CA
) -> None:
    with pytest.raises(ssl.SSLError, match="no application protocol"):
        connect(tcp_setup, ca, "grpc", alpn=["http/1.1"]).close()
    # The same listener still serves HTTP (and http/1.1) for localhost.
    reply = https_request(tcp_setup.proxy.port, client_context(ca), path="/still-http")
    assert reply.status == 200
    assert reply.alpn == "http/1.1"
    assert tcp_setup.http_upstream.requests[-1].path == "/still-http"


def test_an_upstream_without_alpn_selects_none(tcp_setup: TCPSetup, ca: trustme.CA) -> None:
    with connect(tcp_setup, ca, "bytes", alpn=["h2", "http/1.1"]) as client:
        assert client.alpn is None
        client.send(b"ECHO\nhello")
        assert client.receive() == b"hello"


# --- bytes: exact, both ways, with backpressure and bounded memory --------------------------


@pytest.mark.slow
def test_one_gib_each_way_byte_exact_with_bounded_memory(
    tcp_setup: TCPSetup, ca: trustme.CA
) -> None:
    context = tls_context(ca)
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", tcp_setup.proxy.port), timeout=60) as raw:
        with context.wrap_socket(raw, server_hostname="bytes.test") as tls:
            tls.sendall(f"SINK {GIB}\n".encode())
            for _ in range(GIB // len(BLOCK)):
                tls.sendall(BLOCK)
            answer = b""
            while chunk := tls.recv(128):
                answer += chunk
    assert answer.decode() == pattern_digest(GIB)
    upload = time.monotonic() - started
    started = time.monotonic()
    digest = hashlib.sha256()
    received = 0
    buffer = bytearray(1 << 20)
    with socket.create_connection(("127.0.0.1", tcp_setup.proxy.port), timeout=60) as raw:
        with context.wrap_socket(raw, server_hostname="bytes.test") as tls:
            tls.sendall(f"SOURCE {GIB}\n".encode())
            while size := tls.recv_into(buffer):
                digest.update(memoryview(buffer)[:size])
                received += size
    assert received == GIB
    assert digest.hexdigest() == pattern_digest(GIB)
    download = time.monotonic() - started
    assert peak_rss_kib(tcp_setup.proxy.process.pid) < RSS_LIMIT_KIB, (upload, download)


# --- half-close, carried both ways -----------------------------------------------------------


@pytest.mark.parametrize("how", ["close_notify", "fin"])
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
def test_the_client_half_closes_and_still_receives(
    tcp_setup: TCPSetup, ca: trustme.CA, how: str, version: ssl.TLSVersion
) -> None:
    since = len(tcp_setup.proxy.lines())
    context = client_context(ca, version, alpn=[])
    with TLSClient(tcp_setup.proxy.port, context, "bytes.test") as client:
        client.send(b"AFTER-EOF\nlast words")
        if how == "close_notify":
            client.close_write()
        else:
            client.fin()
        # The upstream answers only once it read the end of stream: the half-close reached it.
        assert client.receive_until_end() == b"got last words"
    entry = tcp_setup.wait_for_access(since, "bytes.test")
    assert entry["closed_by"] == "client"
    assert entry["bytes_up"] == len(b"AFTER-EOF\nlast words")
    assert entry["bytes_down"] == len(b"got last words")


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2])
def test_the_upstream_half_closes_and_still_receives(
    tcp_setup: TCPSetup, ca: trustme.CA, version: ssl.TLSVersion
) -> None:
    since = len(tcp_setup.proxy.lines())
    context = client_context(ca, version, alpn=[])
    with TLSClient(tcp_setup.proxy.port, context, "bytes.test") as client:
        client.send(b"HALF\n")
        # The upstream's FIN arrives as close_notify (receive says b"", no SSLEOFError) ...
        assert client.receive_until_end() == b"bye"
        # ... and the other direction still flows to the upstream.
        client.send(b"still here")
        client.close_write()
        wait_until(lambda: b"still here" in tcp_setup.bytes_upstream.heads)
    entry = tcp_setup.wait_for_access(since, "bytes.test")
    assert entry["closed_by"] == "upstream"


def test_an_upstream_reset_aborts_the_client_connection(
    tcp_setup: TCPSetup, ca: trustme.CA
) -> None:
    since = len(tcp_setup.proxy.lines())
    with connect(tcp_setup, ca, "bytes") as client:
        client.send(b"RESET\n")
        # No close_notify: the client can tell a broken connection from a clean end.
        with pytest.raises(Aborted):
            client.receive_until_end()
    entry = tcp_setup.wait_for_access(since, "bytes.test")
    assert entry["closed_by"] == "upstream"
    assert "broke" in entry["reason"]


def test_an_idle_tunnel_is_closed_after_the_idle_timeout(
    tcp_setup: TCPSetup, ca: trustme.CA
) -> None:
    since = len(tcp_setup.proxy.lines())
    with connect(tcp_setup, ca, "bytes") as client:
        client.send(b"ECHO\nonce")
        assert client.receive() == b"once"
        started = time.monotonic()
        assert client.receive_until_end() == b""  # a clean close_notify, tcp.idle_timeout = 3
        assert 2.5 < time.monotonic() - started < 8
    entry = tcp_setup.wait_for_access(since, "bytes.test")
    assert entry["closed_by"] == "idle_timeout"


# --- upstreams that refuse or never answer ----------------------------------------------------


@pytest.mark.parametrize(("name", "kind"), [("refused", "connect"), ("silent", "connect_timeout")])
def test_an_unreachable_upstream_closes_the_client_connection(
    tcp_setup: TCPSetup, ca: trustme.CA, name: str, kind: str
) -> None:
    admin = admin_url(tcp_setup.proxy.lines())
    before = value(scrape(admin), "hsm_proxy_tcp_upstream_connect_failures_total", kind=kind)
    since = len(tcp_setup.proxy.lines())
    with connect(tcp_setup, ca, name) as client:
        client.send(b"anyone there?")
        with pytest.raises(Aborted):
            client.receive_until_end()
    entry = tcp_setup.wait_for_access(since, f"{name}.test")
    assert entry["closed_by"] == "error"
    assert entry["upstream"] == "-"
    assert entry["bytes_up"] == entry["bytes_down"] == 0
    reason = "timed out" if name == "silent" else "Connection refused"
    assert reason in entry["reason"]
    after = value(scrape(admin), "hsm_proxy_tcp_upstream_connect_failures_total", kind=kind)
    assert after == before + 1
    assert any(line.get("event") == "upstream_error" for line in tcp_setup.proxy.lines()[since:])


# --- PROXY protocol v2 ------------------------------------------------------------------------


def test_proxy_protocol_v2_header_tells_the_upstream_who_connected(
    tcp_setup: TCPSetup, ca: trustme.CA
) -> None:
    with connect(tcp_setup, ca, "pp", alpn=["h2"]) as client:
        client.send(b"after the header")
        assert client.receive() == b"after the header"  # relayed untouched after it
        cipher = client.tls.cipher()
        client_address = client.sock.getsockname()
    header = tcp_setup.pp_upstream.headers[-1]
    assert (header.command, header.family) == (1, 0x11)  # PROXY, TCP over IPv4
    assert header.source == client_address
    assert header.destination == ("127.0.0.1", tcp_setup.proxy.port)
    assert header.tlvs[0x01] == [b"h2"]  # PP2_TYPE_ALPN
    assert header.tlvs[0x02] == [b"pp.test"]  # PP2_TYPE_AUTHORITY
    assert header.ssl_client == 0x01  # PP2_CLIENT_SSL, no certificate
    assert header.ssl_verify != 0
    assert header.ssl_tlvs[0x21] == [b"TLSv1.3"]  # PP2_SUBTYPE_SSL_VERSION
    assert cipher is not None
    assert header.ssl_tlvs[0x23] == [cipher[0].encode()]  # PP2_SUBTYPE_SSL_CIPHER
    assert 0x22 not in header.ssl_tlvs  # no client certificate, no CN
    assert not any(0xE0 <= kind <= 0xEF for kind in header.tlvs)


def test_proxy_protocol_v2_carries_the_verified_client_identity(
    tcp_setup: TCPSetup, ca: trustme.CA
) -> None:
    cert = issue_client_cert(
        tcp_setup.directory,
        tcp_setup.client_ca,
        "pp",
        common_name="billing",
        dns=("billing.internal",),
        uris=("spiffe://example.org/ns/prod/sa/billing", "urn:example:second"),
    )
    context = tls_context(ca, ["h2"])
    context.load_cert_chain(cert.cert_path, cert.key_path)
    since = len(tcp_setup.proxy.lines())
    with TLSClient(tcp_setup.proxy.port, context, "pp.test") as client:
        client.send(b"who am I")
        assert client.receive() == b"who am I"
    header = tcp_setup.pp_upstream.headers[-1]
    assert header.ssl_client == 0x07  # SSL, certificate on this connection and session
    assert header.ssl_verify == 0
    assert header.ssl_tlvs[0x22] == [b"billing"]  # PP2_SUBTYPE_SSL_CN
    issuer = x509.load_pem_x509_certificate(tcp_setup.client_ca.cert_pem.bytes())
    assert header.tlvs[0xE0] == [b"CN=billing"]
    assert header.tlvs[0xE1] == [issuer.subject.rfc4514_string().encode()]
    assert header.tlvs[0xE2] == [b"spiffe://example.org/ns/prod/sa/billing", b"urn:example:second"]
    assert header.tlvs[0xE3] == [b"billing.internal"]
    spki = cert.certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert header.tlvs[0xE4] == [hashlib.sha256(spki).digest()]
    assert header.tlvs[0xE5] == [cert.certificate.fingerprint(hashes.SHA256())]
    entry = tcp_setup.wait_for_access(since, "pp.test")
    assert entry["client_cert"] == "CN=billing"


# --- metrics ----------------------------------------------------------------------------------


def test_tunnel_metrics_count_bytes_by_direction_and_open_tunnels(
    tcp_setup: TCPSetup, ca: trustme.CA
) -> None:
    admin = admin_url(tcp_setup.proxy.lines())
    before = scrape(admin)
    with connect(tcp_setup, ca, "bytes") as client:
        client.send(b"ECHO\n" + b"x" * 1000)
        echoed = b""
        while len(echoed) < 1000:
            echoed += client.receive()
        assert value(scrape(admin), "hsm_proxy_tcp_tunnels_open") == 1
        client.close_write()
        assert client.receive_until_end() == b""
    wait_until(lambda: value(scrape(admin), "hsm_proxy_tcp_tunnels_open") == 0)
    after = scrape(admin)

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("hsm_proxy_tcp_bytes_total", direction="up") == 1005
    assert grew("hsm_proxy_tcp_bytes_total", direction="down") == 1000
    assert grew("hsm_proxy_tcp_connections_total", closed_by="client") == 1


# --- limits and shutdown (a proxy of their own) ------------------------------------------------


def test_sigterm_drain_keeps_open_tunnels_for_the_grace_then_closes_them(
    tcp_proxy: ProxyFactory, ca: trustme.CA
) -> None:
    proxy = tcp_proxy(extra="\n[http]\nshutdown_grace = 3\n")
    with TLSClient(proxy.port, tls_context(ca), "localhost") as client:
        client.send(b"ECHO\nbefore")
        assert client.receive() == b"before"
        proxy.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        proxy.wait_for_log(lambda entry: "received SIGTERM" in entry.get("message", ""))
        # New connections are refused: the listeners are closed ...
        wait_until(lambda: _refused(proxy.port))
        # ... while the open tunnel keeps relaying within the grace period.
        client.send(b"during the grace")
        assert client.receive() == b"during the grace"
        with contextlib.suppress(Aborted):  # cancelled: a close_notify, or a cut record
            client.receive_until_end()
        assert 2.5 < time.monotonic() - signalled < 9
    entry = proxy.wait_for_log(lambda entry: entry.get("message") == "tunnel")
    assert entry["closed_by"] == "drain"
    assert proxy.process.wait(timeout=10) == 0


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def test_max_connections_counts_tunnels(tcp_proxy: ProxyFactory, ca: trustme.CA) -> None:
    proxy = tcp_proxy(extra="\n[http]\nmax_connections = 1\n")
    second: list[TLSClient] = []
    with TLSClient(proxy.port, tls_context(ca), "localhost") as first:
        first.send(b"ECHO\nfirst")
        assert first.receive() == b"first"
        # The second connection waits in the listen backlog: no handshake while the first
        # tunnel is open.
        waiting = threading.Thread(
            target=lambda: second.append(TLSClient(proxy.port, tls_context(ca), "localhost"))
        )
        waiting.start()
        time.sleep(1.0)
        assert not second
        first.close_write()
        assert first.receive_until_end() == b""
    waiting.join(timeout=10)
    assert second, "the second connection was never served"
    with second[0] as client:
        client.send(b"ECHO\nsecond")
        assert client.receive() == b"second"


def test_dev_mode_relays_to_a_tcp_upstream(tmp_path: Path, byte_upstream: ScriptedUpstream) -> None:
    state, log = tmp_path / "state", tmp_path / "dev.log"
    env = {key: value for key, value in os.environ.items() if key != "SOFTHSM2_CONF"}
    upstream = f"tcp://127.0.0.1:{byte_upstream.port}"
    command = proxy_command("dev", "--state-dir", str(state), "--listen", "127.0.0.1:0")
    with log.open("w") as sink:
        process = subprocess.Popen(
            [*command, "--upstream", upstream],
            stdout=sink,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=REPO,
            env=env,
        )
    try:
        pattern = r"openssl s_client -CAfile \S+ -connect localhost:(\d+)"
        wait_until(lambda: re.search(pattern, log.read_text()) is not None, timeout=60)
        match = re.search(pattern, log.read_text())
        assert match is not None
        assert f"upstream: {upstream}" in log.read_text()
        context = ssl.create_default_context(cafile=str(state / "ca.pem"))
        with TLSClient(int(match.group(1)), context, "localhost") as client:
            client.send(b"ECHO\nthrough dev mode")
            assert client.receive() == b"through dev mode"
    finally:
        ProxyProcess(process, log).stop()  # fails unless it stopped cleanly
