"""HTTP forwarding end to end: real clients (raw TLS sockets, httpx, curl, websockets), the
proxy as a subprocess on a real token, real upstream servers on loopback."""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme

from tests.support import (
    ProxyFactory,
    RecordingUpstream,
    StartProxy,
    client_context,
    https_request,
    run_cli,
)
from tests.support.http import (
    ScriptedUpstream,
    exchange_raw,
    read_all,
    read_body,
    read_response,
    respond,
    status_of,
    tls_connect,
    wait_until,
)


def get(path: str, host: str = "localhost", extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


# --- keep-alive, pipelining, pooling -------------------------------------------------------


def test_pipelined_requests_are_answered_in_order(
    start_proxy: StartProxy, upstream: RecordingUpstream, ca: trustme.CA
) -> None:
    proxy = start_proxy(upstream.url)
    payload = get("/one") + get("/two") + get("/three", extra="Connection: close\r\n")
    data = exchange_raw(proxy.port, ca, payload)
    paths = [json.loads(part)["path"] for part in _bodies(data)]
    assert paths == ["/one", "/two", "/three"]


def test_an_http10_request_without_host_is_forwarded_with_one(
    start_proxy: StartProxy, upstream: RecordingUpstream, ca: trustme.CA
) -> None:
    proxy = start_proxy(upstream.url)
    data = exchange_raw(proxy.port, ca, b"GET /old HTTP/1.0\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200 ")  # h11 answers 1.0 clients with a 1.1 status line
    assert upstream.requests[-1].headers["Host"] == "localhost"  # the SNI name


def _bodies(data: bytes) -> list[bytes]:
    bodies = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
        bodies.append(rest[:length])
        data = rest[length:]
    return bodies


def test_upstream_connections_are_pooled_across_client_connections(
    start_proxy: StartProxy, upstream: RecordingUpstream, ca: trustme.CA
) -> None:
    proxy = start_proxy(upstream.url)
    for number in range(5):
        with httpx.Client(verify=client_context(ca)) as client:
            assert client.get(f"{proxy.url}/pooled/{number}").status_code == 200
    assert len(upstream.requests) == 5
    assert upstream.connections == 1


def test_pool_size_zero_and_idle_expiry_open_new_connections(
    start_proxy: StartProxy, upstream: RecordingUpstream, ca: trustme.CA
) -> None:
    proxy = start_proxy(upstream.url, http="pool_size = 0")
    with httpx.Client(verify=client_context(ca)) as client:
        for _ in range(3):
            assert client.get(f"{proxy.url}/").status_code == 200
    assert upstream.connections == 3
    proxy.stop()
    expiring = start_proxy(upstream.url, http="pool_idle_timeout = 2")
    with httpx.Client(verify=client_context(ca)) as client:
        assert client.get(f"{expiring.url}/").status_code == 200
        assert client.get(f"{expiring.url}/").status_code == 200  # reused
        assert upstream.connections == 3 + 1
        # The pool closes the idle connection once it expires: the upstream sees it end.
        closed = upstream.closed
        wait_until(lambda: upstream.closed > closed, timeout=30)
        assert client.get(f"{expiring.url}/").status_code == 200  # expired: a new one
    assert upstream.connections == 3 + 2


def test_a_pooled_connection_the_upstream_dropped_is_retried_on_a_fresh_one(
    start_proxy: StartProxy, scripted: Callable[..., ScriptedUpstream], ca: trustme.CA
) -> None:
    """A backend that closes a kept-alive connection the moment the next request arrives
    (its keep-alive timeout firing in the race): an idempotent bodyless request is resent on
    a new connection; a POST, which the backend may have acted on, is not."""

    def handler(sock: socket.socket, server: ScriptedUpstream) -> None:
        buffer = bytearray()
        head = server.read_head(sock, buffer)
        if head is None:
            return
        read_body(sock, head, buffer)
        respond(sock, body=b"first answer on this connection")
        server.read_head(sock, buffer)  # the next request: dropped without an answer

    backend = scripted(handler)
    proxy = start_proxy(backend.url)
    with httpx.Client(verify=client_context(ca)) as client:
        assert client.get(f"{proxy.url}/a").status_code == 200
        retried = client.get(f"{proxy.url}/b")
        assert retried.status_code == 200
        assert backend.connections == 2
        assert client.post(f"{proxy.url}/c", content=b"pay once").status_code == 502
    assert backend.connections == 2


# --- routing -------------------------------------------------------------------------------


def test_routes_choose_upstreams_by_host_and_path_and_round_robin_skips_a_dead_address(
    start_proxy: StartProxy, upstream: RecordingUpstream, ca: trustme.CA
) -> None:
    api_a, api_b = RecordingUpstream(), RecordingUpstream()
    with socket.socket() as dead:
        dead.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{dead.getsockname()[1]}"  # bound, not listening
        try:
            proxy = start_proxy(
                upstream.url,
                http="down_time = 60",
                extra=(
                    f'\n[upstreams.api]\nservers = ["{api_a.url}", "{dead_url}", "{api_b.url}"]\n'
                    '\n[[routes]]\nhosts = ["api.example"]\npath_prefix = "/v1"\n'
                    'upstream = "api"\n'
                ),
            )
            with httpx.Client(verify=client_context(ca)) as client:
                for number in range(6):
                    response = client.get(
                        f"{proxy.url}/v1/items/{number}", headers={"Host": "api.example"}
                    )
                    assert response.status_code == 200
                assert client.get(f"{proxy.url}/v1/x").status_code == 200  # other host
                assert (
                    client.get(f"{proxy.url}/v2", headers={"Host": "api.example"}).status_code
                    == 200
                )
            assert len(api_a.requests) + len(api_b.requests) == 6
            assert len(api_a.requests) >= 2
            assert len(api_b.requests) >= 2
            assert [request.path for request in upstream.requests] == ["/v1/x", "/v2"]
            down = [entry for entry in proxy.lines() if entry.get("event") == "upstream_down"]
            assert len(down) == 1  # the dead address was tried once, then skipped
        finally:
            api_a.stop()
            api_b.stop()


# --- bodies, framing, special responses ------------------------------------------------------


def test_chunked_upload_and_download_stream_through(
    start_proxy: StartProxy, scripted: Callable[..., ScriptedUpstream], ca: trustme.CA
) -> None:
    from tests.support.http import streaming_handler

    backend = scripted(streaming_handler)
    proxy = start_proxy(backend.url)

    def chunks() -> Iterator[bytes]:
        for _ in range(40):
            yield b"z" * 100_000

    with httpx.Client(verify=client_context(ca)) as client:
        response = client.post(f"{proxy.url}/sink", content=chunks())
        assert response.text == "4000000"
        assert b"transfer-encoding: chunked" in backend.heads[-1].lower()
        download = client.get(f"{proxy.url}/chunked/3000000")
        assert len(download.content) == 3_000_000
        assert download.headers["transfer-encoding"] == "chunked"


def test_expect_100_continue_is_answered_before_the_body_is_sent(
    start_proxy: StartProxy, upstream: RecordingUpstream, ca: trustme.CA
) -> None:
    proxy = start_proxy(upstream.url)
    with tls_connect(proxy.port, ca) as tls:
        tls.sendall(
            b"PUT /upload HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n"
            b"Expect: 100-continue\r\nConnection: close\r\n\r\n"
        )
        interim = tls.recv(4096)
        assert interim.startswith(b"HTTP/1.1 100 ")
        tls.sendall(b"hello")
        final = read_all(tls)
    assert status_of(final) == 200
    assert upstream.requests[-1].body == b"hello"
    assert "Expect" not in upstream.requests[-1].headers


def test_head_204_and_304_responses_have_no_body(
    start_proxy: StartProxy, scripted: Callable[..., ScriptedUpstream], ca: trustme.CA
) -> None:
    def handler(sock: socket.socket, server: ScriptedUpstream) -> None:
        buffer = bytearray()
        while (head := server.read_head(sock, buffer)) is not None:
            method, target = head.split(b" ")[:2]
            if method == b"HEAD":
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
            elif target == b"/204":
                sock.sendall(b"HTTP/1.1 204 No Content\r\n\r\n")
            elif target == b"/304":
                sock.sendall(b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\n\r\n')
            else:
                respond(sock, body=b"after")

    proxy = start_proxy(scripted(handler).url)
    payload = (
        b"HEAD /head HTTP/1.1\r\nHost: localhost\r\n\r\n"
        + get("/204")
        + get("/304")
        + get("/after", extra="Connection: close\r\n")
    )
    data = exchange_raw(proxy.port, ca, payload)
    assert data.count(b"HTTP/1.1 ") == 4
    head, no_content, not_modified, after = data.split(b"HTTP/1.1 ")[1:]
    assert head.startswith(b"200")
    assert head.endswith(b"\r\n\r\n")
    assert b"content-length: 1234" in head.lower()
    assert no_content.startswith(b"204")
    assert no_content.endswith(b"\r\n\r\n")
    assert not_modified.startswith(b"304")
    assert not_modified.endswith(b"\r\n\r\n")
    assert after.endswith(b"\r\n\r\nafter")


def test_a_response_framed_by_connection_close_reaches_the_client_whole(
    start_proxy: StartProxy, scripted: Callable[..., ScriptedUpstream], ca: trustme.CA
) -> None:
    def handler(sock: socket.socket, server: ScriptedUpstream) -> None:
        server.read_head(sock, bytearray())
        sock.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"a" * 50_000)

    proxy = start_proxy(scripted(handler).url)
    with httpx.Client(verify=client_context(ca)) as client:
        response = client.get(f"{proxy.url}/close-framed")
    assert response.status_code == 200
    assert response.content == b"a" * 50_000


def test_an_upstream_dying_mid_response_is_not_passed_off_as_complete(
    start_proxy: StartProxy, scripted: Callable[..., ScriptedUpstream], ca: trustme.CA
) -> None:
    def handler(sock: socket.socket, server: ScriptedUpstream) -> None:
        server.read_head(sock, bytearray())
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"a" * 1000)
        time.sleep(0.2)

    proxy = start_proxy(scripted(handler).url)
    with httpx.Client(verify=client_context(ca)) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            client.get(f"{proxy.url}/truncated")


def test_a_close_framed_response_that_breaks_off_ends_without_close_notify(
    start_proxy: StartProxy, scripted: Callable[..., ScriptedUpstream], ca: trustme.CA
) -> None:
    """An HTTP/1.0 client gets a chunked upstream response framed by the connection's end;
    when the upstream dies mid-body the proxy must not close cleanly (close_notify), or
    the client would take the truncated body for the whole."""

    def handler(sock: socket.socket, server: ScriptedUpstream) -> None:
        server.read_head(sock, bytearray())
        sock.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        time.sleep(0.2)

    proxy = start_proxy(scripted(handler).url)
    raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    context = client_context(ca)
    context.options &= ~ssl.OP_IGNORE_UNEXPECTED_EOF  # tell close_notify from a bare close
    with context.wrap_socket(raw, server_hostname="localhost", suppress_ragged_eofs=False) as tls:
        tls.sendall(b"GET /breaks HTTP/1.0\r\nHost: localhost\r\n\r\n")
        data = b""
        ending: Exception | None = None
        try:
            while chunk := tls.recv(65536):
                data += chunk
        except ssl.SSLError as exc:  # UNEXPECTED_EOF_WHILE_READING: no close_notify came
            ending = exc
    assert data.endswith(b"\r\n\r\nhello")
    assert ending is not None, "the truncated response ended with close_notify"
    assert "EOF" in str(ending)


def test_small_response_head_and_body_leave_in_one_tls_record(
    start_proxy: StartProxy, scripted: Callable[..., ScriptedUpstream], ca: trustme.CA
) -> None:
    def handler(sock: socket.socket, server: ScriptedUpstream) -> None:
        server.read_head(sock, bytearray())
        respond(sock, body=b"small")  # head and body in one write

    proxy = start_proxy(scripted(handler).url)
    context = client_context(ca, ssl.TLSVersion.TLSv1_2)  # records after the handshake are data
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as raw:
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                raw.sendall(outgoing.read())
                incoming.write(raw.recv(65536))
        raw.sendall(outgoing.read())
        tls.write(get("/small", extra="Connection: close\r\n"))
        raw.sendall(outgoing.read())
        wire = b""
        while chunk := raw.recv(65536):
            wire += chunk
    records = []
    while len(wire) >= 5:
        length = int.from_bytes(wire[3:5], "big")
        records.append(wire[0])
        wire = wire[5 + length :]
    data_records = [kind for kind in records if kind == 23]  # application data
    assert len(data_records) == 1, records


# --- malformed and smuggling requests ------------------------------------------------------

SMUGGLING = {
    "CL.TE": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 13\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nSMUGGLED",
    "TE.CL": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
    b"Content-Length: 3\r\n\r\n8\r\nSMUGGLED\r\n0\r\n\r\n",
    "TE.TE duplicate": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
    b"Transfer-Encoding: identity\r\n\r\n0\r\n\r\n",
    "TE.TE xchunked": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n",
    "TE.TE space before colon": b"POST / HTTP/1.1\r\nHost: a\r\n"
    b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    "TE.TE obs-fold": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\r\n chunked\r\n"
    b"\r\n0\r\n\r\n",
    "TE.TE list": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
    "duplicate CL": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n"
    b"Content-Length: 8\r\n\r\nSMUGGLED",
    "CL list": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 8\r\n\r\nSMUGGLED",
    "signed CL": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +3\r\n\r\nabc",
    "bad chunk size": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"zz\r\nSMUGGLED\r\n0\r\n\r\n",
    "chunk size overflow": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"1" + b"0" * 40 + b"\r\nx\r\n0\r\n\r\n",
    "obs-fold": b"GET / HTTP/1.1\r\nHost: a\r\nX-Note: a\r\n\tb\r\n\r\n",
    "no host": b"GET / HTTP/1.1\r\n\r\n",
    "two hosts": b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "connect": b"CONNECT internal:22 HTTP/1.1\r\nHost: internal:22\r\n\r\n",
}


def test_ambiguous_or_malformed_requests_are_rejected_and_never_forwarded(
    start_proxy: StartProxy, upstream: RecordingUpstream, ca: trustme.CA
) -> None:
    proxy = start_proxy(upstream.url)
    for name, payload in SMUGGLING.items():
        data = exchange_raw(proxy.port, ca, payload + get("/after-smuggling"))
        assert data.startswith(b"HTTP/1.1 "), name
        assert status_of(data) in (400, 501), (name, data[:80])
        assert data.count(b"HTTP/1.1 ") == 1, name  # the connection was closed after it
        assert b"connection: close" in data.lower(), name
        assert b"h11" not in data.lower(), name  # no internal detail in error bodies
        assert b"trio" not in data.lower(), name
    assert [request.body for request in upstream.requests] == []


def test_limits_give_414_431_413(
    start_proxy: StartProxy, upstream: RecordingUpstream, ca: trustme.CA
) -> None:
    proxy = start_proxy(
        upstream.url,
        http="max_request_line = 200\nmax_header_bytes = 1024\nmax_headers = 10\n"
        "max_body_bytes = 1000",
    )
    long_line = exchange_raw(proxy.port, ca, get("/" + "a" * 300))
    assert status_of(long_line) == 414
    many = exchange_raw(proxy.port, ca, get("/", extra="X-A: 1\r\n" * 11))
    assert status_of(many) == 431
    big = exchange_raw(proxy.port, ca, get("/", extra=f"X-A: {'v' * 1100}\r\n"))
    assert status_of(big) == 431
    declared = exchange_raw(
        proxy.port, ca, b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1001\r\n\r\n"
    )
    assert status_of(declared) == 413
    chunked = exchange_raw(
        proxy.port,
        ca,
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"200\r\n"
        + b"x" * 512
        + b"\r\n"
        + b"200\r\n"
        + b"x" * 512
        + b"\r\n0\r\n\r\n",
    )
    assert status_of(chunked) == 413
    assert upstream.requests == []
    refused = [entry["status"] for entry in proxy.lines() if entry.get("path") == "-"]
    assert refused == [414, 431, 431]  # heads refused before parsing still get an access line
    ok = exchange_raw(proxy.port, ca, get("/", extra="X-A: 1\r\n" * 8 + "Connection: close\r\n"))
    assert status_of(ok) == 200


def test_a_refused_upload_is_drained_so_the_client_reads_the_answer(
    start_proxy: StartProxy, upstream: RecordingUpstream, ca: trustme.CA
) -> None:
    """Lingering close: the proxy refuses a large upload at once; the client, still sending
    its body, must see the 413 rather than a connection reset."""
    proxy = start_proxy(upstream.url, http="max_body_bytes = 1000")
    body = b"x" * (4 << 20)
    with tls_connect(proxy.port, ca) as tls:
        tls.sendall(
            f"POST /big HTTP/1.1\r\nHost: a\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        )
        tls.sendall(body)  # the proxy already answered; it must keep reading meanwhile
        data = read_all(tls)
    assert status_of(data) == 413
    assert data.endswith(b"413 Content Too Large\n")


def test_an_upstream_answer_before_the_body_is_taken_reaches_the_client(
    start_proxy: StartProxy, scripted: Callable[..., ScriptedUpstream], ca: trustme.CA
) -> None:
    """A backend that refuses an upload from its head alone and closes: the client gets the
    backend's answer, not a 502."""

    def handler(sock: socket.socket, server: ScriptedUpstream) -> None:
        server.read_head(sock, bytearray())
        respond(sock, 413, b"upstream says: too large", "Connection: close\r\n")

    proxy = start_proxy(scripted(handler).url)
    body = b"x" * (8 << 20)
    with tls_connect(proxy.port, ca) as tls:
        tls.sendall(
            f"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        )
        tls.sendall(body)
        data = read_all(tls)
    assert status_of(data) == 413
    assert data.endswith(b"upstream says: too large")


# --- timeouts --------------------------------------------------------------------------------


def test_slowloris_gets_408_and_does_not_block_others(
    start_proxy: StartProxy, upstream: RecordingUpstream, ca: trustme.CA
) -> None:
    proxy = start_proxy(upstream.url, http="header_timeout = 3")
    with tls_connect(proxy.port, ca) as other, tls_connect(proxy.port, ca) as slow:
        # Both handshakes are done: what follows needs no token signature.
        slow.sendall(b"GET / HTTP/1.1\r\n")
        for number in range(3):
            slow.sendall(b"X-A: 1\r\n")  # dribbling, never finishing the head
            other.sendall(get(f"/other/{number}"))
            assert status_of(read_response(other)) == 200
        # The other connection was served while the slow one was still waiting: it got no
        # answer yet (its 408 comes when the header timeout ends it).
        assert not [line for line in proxy.lines() if line.get("status") == 408]
        data = read_all(slow)
    assert status_of(data) == 408
    assert [request.path for request in upstream.requests] == [f"/other/{n}" for n in range(3)]


def test_idle_keepalive_connections_are_closed(
    start_proxy: StartProxy, upstream: RecordingUpstream, ca: trustme.CA
) -> None:
    proxy = start_proxy(upstream.url, http="idle_timeout = 0.5")
    with tls_connect(proxy.port, ca) as tls:
        tls.sendall(get("/first"))
        assert status_of(read_response(tls)) == 200
        assert read_all(tls) == b""  # closed quietly after the idle timeout, no 408


def test_a_stalled_request_body_gets_408(
    start_proxy: StartProxy, upstream: RecordingUpstream, ca: trustme.CA
) -> None:
    proxy = start_proxy(upstream.url, http="body_timeout = 0.5")
    with tls_connect(proxy.port, ca) as tls:
        tls.sendall(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nonly ten..")
        data = read_all(tls)
    assert status_of(data) == 408
    # The upstream got the head and the ten bytes, then the connection closed: it never
    # saw a complete request.
    assert all(len(request.body) < 100 for request in upstream.requests)


def test_a_client_that_stops_reading_is_dropped_after_the_body_timeout(
    start_proxy: StartProxy, scripted: Callable[..., ScriptedUpstream], ca: trustme.CA
) -> None:
    size = 1 << 30  # far more than the socket buffers between the proxy and the client

    def endless(sock: socket.socket, server: ScriptedUpstream) -> None:
        server.read_head(sock, bytearray())
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        chunk = b"x" * 65536
        try:
            for _ in range(size // len(chunk)):
                sock.sendall(chunk)
        except OSError:
            pass  # the proxy gave up on the client and dropped this exchange

    proxy = start_proxy(scripted(endless).url, http="body_timeout = 0.5")
    with tls_connect(proxy.port, ca) as tls:
        tls.sendall(get("/never-read"))
        # The client reads nothing; the proxy must end the exchange on its own.
        entry = proxy.wait_for_log(lambda line: line.get("path") == "/never-read", timeout=10)
    assert entry["status"] == 200
    assert 0 < entry["bytes_sent"] < size


def test_upstream_read_timeout_gives_504_and_connect_timeout_gives_504(
    start_proxy: StartProxy, scripted: Callable[..., ScriptedUpstream], ca: trustme.CA
) -> None:
    def silent(sock: socket.socket, server: ScriptedUpstream) -> None:
        server.read_head(sock, bytearray())
        time.sleep(5)

    proxy = start_proxy(scripted(silent).url, http="read_timeout = 0.5")
    data = exchange_raw(proxy.port, ca, get("/slow"))
    assert status_of(data) == 504
    assert data.endswith(b"504 Gateway Timeout\n")
    # A listener whose accept queue is full drops new SYNs: connecting never completes.
    with socket.create_server(("127.0.0.1", 0), backlog=0) as full:
        port = full.getsockname()[1]
        fillers = []
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        time.sleep(0.2)
        proxy = start_proxy(f"http://127.0.0.1:{port}", http="connect_timeout = 0.5")
        data = exchange_raw(proxy.port, ca, get("/unreachable"))
        for filler in fillers:
            filler.close()
    assert status_of(data) == 504


# --- connection limit and graceful shutdown -------------------------------------------------


def test_connections_beyond_the_limit_wait_and_the_proxy_survives(
    start_proxy: StartProxy, upstream: RecordingUpstream, ca: trustme.CA
) -> None:
    proxy = start_proxy(upstream.url, http="max_connections = 2")
    held = [tls_connect(proxy.port, ca) for _ in range(2)]
    waiting = socket.create_connection(("127.0.0.1", proxy.port), timeout=1)
    with pytest.raises((TimeoutError, socket.timeout)):
        client_context(ca).wrap_socket(waiting, server_hostname="localhost")
    waiting.close()
    held[0].close()
    reply = exchange_raw(proxy.port, ca, get("/after", extra="Connection: close\r\n"))
    assert status_of(reply) == 200
    held[1].close()
    assert proxy.process.poll() is None


def test_sigterm_lets_in_flight_requests_finish_and_refuses_new_connections(
    start_proxy: StartProxy, scripted: Callable[..., ScriptedUpstream], ca: trustme.CA
) -> None:
    release = threading.Event()

    def held(sock: socket.socket, server: ScriptedUpstream) -> None:
        buffer = bytearray()
        while server.read_head(sock, buffer) is not None:
            release.wait(60)  # the request stays in flight until the test lets it go
            respond(sock, body=b"finished")

    backend = scripted(held)
    proxy = start_proxy(backend.url, http="shutdown_grace = 60")
    results: list[bytes] = []
    idle = tls_connect(proxy.port, ca)  # an idle keep-alive connection is closed at once

    def in_flight() -> None:
        with tls_connect(proxy.port, ca, timeout=60) as tls:
            tls.sendall(get("/slow"))
            results.append(read_all(tls))

    worker = threading.Thread(target=in_flight)
    worker.start()
    try:
        wait_until(lambda: len(backend.heads) == 1)
        proxy.process.send_signal(15)
        proxy.wait_for_log(lambda entry: "received SIGTERM" in entry.get("message", ""))
        try:
            assert read_all(idle) == b""
        finally:
            idle.close()

        def refused() -> bool:
            try:
                socket.create_connection(("127.0.0.1", proxy.port), timeout=5).close()
            except ConnectionRefusedError:
                return True
            return False

        # During the drain window: the listener is closed while the request is in flight.
        wait_until(refused)
        assert proxy.process.poll() is None
        assert results == []
    finally:
        release.set()
        worker.join(timeout=60)
    assert results, "the in-flight request got no answer"
    assert status_of(results[0]) == 200
    assert results[0].endswith(b"finished")
    assert b"connection: close" in results[0].lower()
    assert proxy.process.wait(timeout=30) == 0


def test_workers_pass_sighup_and_sigterm_on_and_refuse_a_pid_file(
    tmp_path: Path, proxy_factory: ProxyFactory, upstream: RecordingUpstream, ca: trustme.CA
) -> None:
    proxy = proxy_factory("ec256", run_args=("--workers", "2"))
    proxy.wait_for_log(lambda entry: entry.get("event") == "workers_ready", timeout=60)
    workers = {e["worker_pid"] for e in proxy.lines() if e.get("event") == "worker_started"}
    assert len(workers) == 2
    # A pid file names one process; with workers, SIGHUP goes to the supervisor instead.
    refused = run_cli(
        "run",
        "--config",
        str(tmp_path / "proxy.toml"),
        "--workers",
        "2",
        "--pid-file",
        str(tmp_path / "proxy.pid"),
    )
    assert refused.returncode == 1
    assert "--pid-file is for one process; with --workers, send SIGHUP" in refused.stderr
    assert not (tmp_path / "proxy.pid").exists()

    def logged_by_every_worker(predicate: Callable[[dict[str, Any]], bool]) -> bool:
        return {e.get("pid") for e in proxy.lines() if predicate(e)} >= workers

    proxy.process.send_signal(signal.SIGHUP)  # the supervisor passes it on
    # Every worker reloads, both logging in to SoftHSM2 at the same moment (which the token
    # layer rides out: test_token_contention.py).
    try:
        wait_until(
            lambda: logged_by_every_worker(
                lambda e: e.get("event") == "reloaded" and e.get("reason") == "SIGHUP"
            ),
            timeout=60,
        )
    except AssertionError:
        raise AssertionError(f"not every worker reloaded:\n{proxy.log_path.read_text()}") from None
    assert https_request(proxy.port, client_context(ca), path="/after-reload").status == 200
    proxy.process.send_signal(signal.SIGTERM)
    assert proxy.process.wait(timeout=60) == 0
    assert logged_by_every_worker(lambda e: "received SIGTERM" in e.get("message", ""))
    for pid in workers:  # reaped by the supervisor before it exited
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_sigterm_grace_period_ends_requests_that_take_too_long(
    start_proxy: StartProxy, scripted: Callable[..., ScriptedUpstream], ca: trustme.CA
) -> None:
    def stuck(sock: socket.socket, server: ScriptedUpstream) -> None:
        server.read_head(sock, bytearray())
        time.sleep(30)

    backend = scripted(stuck)
    proxy = start_proxy(backend.url, http="shutdown_grace = 0.5")
    with tls_connect(proxy.port, ca, timeout=30) as tls:
        tls.sendall(get("/stuck"))
        wait_until(lambda: len(backend.heads) == 1)
        proxy.process.send_signal(15)
        assert proxy.process.wait(timeout=15) == 0
        assert read_all(tls) == b""
    # A second signal does not wait for the (here very long) grace period.
    patient = start_proxy(backend.url, http="shutdown_grace = 600")
    with tls_connect(patient.port, ca, timeout=30) as tls:
        tls.sendall(get("/stuck"))
        wait_until(lambda: len(backend.heads) == 2)
        patient.process.send_signal(15)
        patient.wait_for_log(lambda entry: "in-flight requests get" in entry.get("message", ""))
        patient.process.send_signal(15)
        assert patient.process.wait(timeout=15) == 0
        assert read_all(tls) == b""


# --- WebSocket ----------------------------------------------------------------------------------


def test_websocket_upgrade_becomes_a_tunnel(start_proxy: StartProxy, ca: trustme.CA) -> None:
    from websockets.sync.client import connect
    from websockets.sync.server import ServerConnection, serve

    def echo(connection: ServerConnection) -> None:
        connection.send("hello from upstream")  # the server speaks first, unprompted
        for message in connection:
            connection.send(message)

    with serve(echo, "127.0.0.1", 0) as server:
        port = server.socket.getsockname()[1]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        # The upstream read timeout bounds HTTP exchanges, not a tunnel's quiet periods.
        proxy = start_proxy(f"http://127.0.0.1:{port}", http="read_timeout = 0.5")
        with connect(
            f"wss://localhost:{proxy.port}/socket", ssl=client_context(ca, alpn=[])
        ) as websocket:
            assert websocket.recv(timeout=10) == "hello from upstream"
            websocket.send("ping")
            assert websocket.recv(timeout=10) == "ping"
            large = b"\x00\xff" * 300_000
            websocket.send(large)
            assert websocket.recv(timeout=10) == large
            time.sleep(1.0)
            websocket.send("still there")
            assert websocket.recv(timeout=10) == "still there"
        server.shutdown()
    access = proxy.wait_for_log(lambda entry: entry.get("path") == "/socket")
    assert access["status"] == 101
