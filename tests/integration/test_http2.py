"""HTTP/2 to clients, end to end: curl --http2, httpx with HTTP/2 and h2load through the
proxy, each stream one HTTP/1.1 request to a real upstream on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import trustme
from hyperframe.frame import DataFrame, GoAwayFrame, PingFrame, RstStreamFrame, WindowUpdateFrame

from tests.support import HSM, ProxyFactory, ProxyProcess, RecordingUpstream, issue_chain
from tests.support.h2raw import NO_ERROR, REFUSED_STREAM, RawH2, request
from tests.support.http import ScriptedUpstream, respond, streaming_handler, write_ca
from tests.support.tcp import closed_port


def _trusting(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


needs_curl = pytest.mark.skipif(
    shutil.which("curl") is None, reason="setup.sh --test installs curl"
)


@needs_curl
def test_curl_speaks_http2_through_the_proxy(
    proxy_factory: ProxyFactory, ca: trustme.CA, upstream: RecordingUpstream, tmp_path: Path
) -> None:
    proxy = proxy_factory("ec256")
    result = subprocess.run(
        [
            "curl",
            "-sS",
            "--http2",
            "--cacert",
            str(write_ca(ca, tmp_path)),
            "-H",
            "X-Forwarded-For: 203.0.113.9",
            "-H",
            "X-Client-Cert-Subject: CN=forged",
            "-w",
            "\n%{http_version} %{http_code}",
            f"{proxy.url}/h2/curl?x=1",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    body, _, last = result.stdout.rpartition("\n")
    assert last == "2 200"
    seen = json.loads(body)
    assert seen["path"] == "/h2/curl?x=1"
    headers = {name.lower(): value for name, value in seen["headers"].items()}
    assert headers["host"] == f"localhost:{proxy.port}"  # from :authority
    assert headers["x-forwarded-for"] == "203.0.113.9, 127.0.0.1"
    assert headers["x-forwarded-proto"] == "https"
    assert "x-client-cert-subject" not in headers  # identity headers: only the proxy's own
    access = proxy.wait_for_log(lambda entry: entry.get("path") == "/h2/curl?x=1")
    assert access["protocol"] == "HTTP/2"
    assert access["stream_id"] == 1
    assert access["status"] == 200


def test_httpx_http2_posts_and_gets_on_one_connection(
    proxy_factory: ProxyFactory, ca: trustme.CA, upstream: RecordingUpstream, tmp_path: Path
) -> None:
    proxy = proxy_factory("ec256")
    with httpx.Client(http2=True, verify=_trusting(ca), http1=False) as client:
        posted = client.post(f"{proxy.url}/upload", content=b"x" * 100_000)
        assert posted.http_version == "HTTP/2"
        assert posted.status_code == 200
        assert posted.json()["body_length"] == 100_000
        for number in range(5):
            answer = client.get(f"{proxy.url}/get/{number}", headers={"Cookie": "a=1"})
            assert answer.json()["path"] == f"/get/{number}"
    assert proxy.signatures() == 1
    assert [request.path for request in upstream.requests] == [
        "/upload",
        *(f"/get/{number}" for number in range(5)),
    ]


def test_one_token_signature_for_100_multiplexed_requests(
    proxy_factory: ProxyFactory, ca: trustme.CA, upstream: RecordingUpstream
) -> None:
    """A page of 100 requests over one HTTP/2 connection costs one handshake and one
    token signature; every request reaches the upstream once."""
    proxy = proxy_factory("ec256")

    async def page() -> list[int]:
        async with httpx.AsyncClient(http2=True, http1=False, verify=_trusting(ca)) as client:
            answers = await asyncio.gather(
                *(client.get(f"{proxy.url}/asset/{number}") for number in range(100))
            )
        assert {answer.http_version for answer in answers} == {"HTTP/2"}
        return [answer.status_code for answer in answers]

    assert asyncio.run(page()) == [200] * 100
    assert proxy.signatures() == 1
    assert sorted(request.path for request in upstream.requests) == sorted(
        f"/asset/{number}" for number in range(100)
    )
    streams = [
        entry["stream_id"]
        for entry in proxy.lines()
        if entry.get("protocol") == "HTTP/2" and entry.get("path", "").startswith("/asset/")
    ]
    assert len(set(streams)) == 100
    assert len({entry["connection_id"] for entry in proxy.lines() if entry.get("protocol")}) == 1


@pytest.mark.skipif(
    shutil.which("h2load") is None, reason="setup.sh --test installs nghttp2-client"
)
def test_h2load_many_concurrent_streams_without_errors(
    proxy_factory: ProxyFactory, upstream: RecordingUpstream
) -> None:
    proxy = proxy_factory("ec256")
    result = subprocess.run(
        ["h2load", "-n", "2000", "-c", "4", "-m", "50", f"{proxy.url}/load"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "requests: 2000 total, 2000 started, 2000 done, 2000 succeeded, 0 failed, 0 errored" in (
        result.stdout
    ), result.stdout
    assert "status codes: 2000 2xx" in result.stdout
    assert "Application protocol: h2" in result.stdout
    assert len(upstream.requests) == 2000
    assert proxy.signatures() == 4  # one handshake per connection


def test_large_upload_and_download_with_flow_control(
    tmp_path: Path, hsm: HSM, ca: trustme.CA
) -> None:
    """64 MiB each way, several times the windows: the body only moves as windows open,
    and arrives whole (Content-Length and chunked responses, a chunked upload)."""
    backend = ScriptedUpstream(streaming_handler)
    proxy = ProxyProcess.start(tmp_path, hsm, ca, backend.url, "ec256")
    size = 64 << 20
    try:
        with httpx.Client(http2=True, http1=False, verify=_trusting(ca), timeout=120) as client:
            for path in (f"/bytes/{size}", f"/chunked/{size}"):
                with client.stream("GET", f"{proxy.url}{path}") as download:
                    assert download.http_version == "HTTP/2"
                    received = sum(len(piece) for piece in download.iter_raw())
                assert received == size

            def body() -> Iterator[bytes]:
                block = b"u" * (1 << 20)
                for _ in range(size >> 20):
                    yield block

            upload = client.post(f"{proxy.url}/sink", content=body())
            assert upload.text == str(size)  # the upstream counted every byte
    finally:
        proxy.stop()
        backend.stop()


def _trailers_handler(sock: socket.socket, server: ScriptedUpstream) -> None:
    """Answers every request chunked, with a trailer naming the request's own trailer."""
    buffer = bytearray()
    while server.read_head(sock, buffer) is not None:
        while b"0\r\n" not in buffer or not bytes(buffer).endswith(b"\r\n\r\n"):
            buffer += sock.recv(65536)
        server.heads.append(bytes(buffer))  # the chunked body and its trailer section
        buffer.clear()
        sock.sendall(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-checksum\r\n\r\n"
            b"5\r\nhello\r\n0\r\nx-checksum: abc123\r\n\r\n"
        )


def test_trailers_both_ways_where_chunked_carries_them(
    tmp_path: Path, hsm: HSM, ca: trustme.CA
) -> None:
    backend = ScriptedUpstream(_trailers_handler)
    proxy = ProxyProcess.start(tmp_path, hsm, ca, backend.url, "ec256")
    try:
        with RawH2(proxy.port, ca) as client:
            client.send(
                client.headers(1, [*request("/t", "POST"), (b"te", b"trailers")], False),
                client.data(1, b"payload"),
                client.headers(1, [(b"x-request-sum", b"42")], end_stream=True),
            )
            head, body = client.response(1)
            assert head[b":status"] == b"200"
            assert body == b"hello"
            assert client.heads[1][-1] == {b"x-checksum": b"abc123"}
        request_head, request_body = backend.heads[0], backend.heads[1]
        assert b"transfer-encoding: chunked" in request_head.lower()
        assert request_body == b"7\r\npayload\r\n0\r\nx-request-sum: 42\r\n\r\n"
    finally:
        proxy.stop()
        backend.stop()


def test_ping_is_answered_and_an_idle_connection_gets_goaway(
    proxy_factory: ProxyFactory, ca: trustme.CA, upstream: RecordingUpstream
) -> None:
    proxy = proxy_factory("ec256", extra="\n[http]\nidle_timeout = 1.0\n")
    with RawH2(proxy.port, ca) as client:
        client.send(client.headers(1, request("/before-idle")))
        head, _ = client.response(1)
        assert head[b":status"] == b"200"
        client.send(PingFrame(0, opaque_data=b"hsmproxy"))
        pong = client.until(lambda frame: isinstance(frame, PingFrame))
        assert isinstance(pong, PingFrame)
        assert "ACK" in pong.flags
        assert pong.opaque_data == b"hsmproxy"
        goaway = client.goaway()  # after http.idle_timeout without a stream
        assert (goaway.error_code, goaway.last_stream_id) == (NO_ERROR, 1)
        assert client.next_frame() is None


def _held_handler(release: threading.Event) -> Callable[[socket.socket, ScriptedUpstream], None]:
    def handler(sock: socket.socket, server: ScriptedUpstream) -> None:
        buffer = bytearray()
        while server.read_head(sock, buffer) is not None:
            release.wait(30)
            respond(sock, body=b"finished")

    return handler


def test_shutdown_sends_goaway_refuses_new_streams_and_finishes_the_taken_ones(
    tmp_path: Path, hsm: HSM, ca: trustme.CA
) -> None:
    release = threading.Event()
    backend = ScriptedUpstream(_held_handler(release))
    proxy = ProxyProcess.start(
        tmp_path, hsm, ca, backend.url, "ec256", extra="\n[http]\nshutdown_grace = 20\n"
    )
    try:
        with RawH2(proxy.port, ca) as client:
            client.send(client.headers(1, request("/slow")))
            while not backend.heads:  # the request reached the upstream, which holds it
                client.tls.settimeout(0.05)
                with contextlib.suppress(TimeoutError):
                    client.next_frame()
            client.tls.settimeout(20)
            proxy.process.send_signal(signal.SIGTERM)
            first = client.goaway()
            assert (first.error_code, first.last_stream_id) == (NO_ERROR, 1)
            client.send(client.headers(3, request("/too-late")))
            refused = client.until(lambda frame: isinstance(frame, RstStreamFrame))
            assert isinstance(refused, RstStreamFrame)
            assert (refused.stream_id, refused.error_code) == (3, REFUSED_STREAM)
            release.set()
            head, body = client.response(1)
            assert (head[b":status"], body) == (b"200", b"finished")
            last = client.goaway()
            assert last.error_code == NO_ERROR
            assert client.next_frame() is None
        assert proxy.process.wait(timeout=20) == 0
        assert len(backend.heads) == 1
    finally:
        release.set()
        proxy.stop()
        backend.stop()


@needs_curl
def test_alpn_without_h2_turns_http2_off(
    proxy_factory: ProxyFactory, ca: trustme.CA, upstream: RecordingUpstream, tmp_path: Path
) -> None:
    proxy = proxy_factory("ec256", extra='\n[http]\nalpn = ["http/1.1"]\n')
    result = subprocess.run(
        [
            "curl",
            "-sS",
            "--http2",
            "--cacert",
            str(write_ca(ca, tmp_path)),
            "-o",
            "/dev/null",
            "-w",
            "%{http_version} %{http_code}",
            f"{proxy.url}/no-h2",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "1.1 200"


def test_a_client_goaway_lets_its_open_streams_finish(
    tmp_path: Path, hsm: HSM, ca: trustme.CA
) -> None:
    """RFC 9113, 6.8: after the client's GOAWAY(NO_ERROR) (what h2load sends at the end of
    a timed run) the streams it opened are still answered, then the connection closes."""
    release = threading.Event()
    backend = ScriptedUpstream(_held_handler(release))
    proxy = ProxyProcess.start(tmp_path, hsm, ca, backend.url, "ec256")
    try:
        with RawH2(proxy.port, ca) as client:
            client.send(client.headers(1, request("/in-flight")))
            while not backend.heads:
                client.tls.settimeout(0.05)
                with contextlib.suppress(TimeoutError):
                    client.next_frame()
            client.tls.settimeout(20)
            client.send(GoAwayFrame(0, last_stream_id=0, error_code=NO_ERROR))
            release.set()
            head, body = client.response(1)
            assert (head[b":status"], body) == (b"200", b"finished")
            assert client.goaway().error_code == NO_ERROR
            assert client.next_frame() is None
    finally:
        release.set()
        proxy.stop()
        backend.stop()


def test_a_request_for_a_name_another_certificate_serves_gets_421(
    tmp_path: Path, hsm: HSM, ca: trustme.CA, upstream: RecordingUpstream
) -> None:
    """A client may reuse an HTTP/2 connection for any name its certificate covers (RFC
    9113, 9.1.1); a request naming a host that another [[tls.sni]] site serves, with its
    own certificate, client rules and upstream, is misdirected (421) and not forwarded."""
    other = tmp_path / "chain-other.pem"
    other.write_bytes(issue_chain(ca, hsm.public_keys["ec384"], ("other.test",)))
    site = f'\n[[tls.sni]]\ncertificate = "{other}"\nkey = "{hsm.uri("ec384")}"\n'
    proxy = ProxyProcess.start(tmp_path, hsm, ca, upstream.url, "ec256", extra=site)
    try:
        with RawH2(proxy.port, ca) as client:  # SNI localhost: the default certificate
            client.send(client.headers(1, request("/elsewhere", authority="other.test")))
            head, body = client.response(1)
            assert head[b":status"] == b"421"
            assert body == b"421 Misdirected Request\n"
            client.send(client.headers(3, request("/here", authority=f"localhost:{proxy.port}")))
            head, _ = client.response(3)
            assert head[b":status"] == b"200"
        assert [seen.path for seen in upstream.requests] == ["/here"]
    finally:
        proxy.stop()


def test_http_limits_and_upstream_failures_answer_the_stream(
    tmp_path: Path, hsm: HSM, ca: trustme.CA, upstream: RecordingUpstream
) -> None:
    """[http] limits apply per stream as they do per HTTP/1.1 request (413, 431), nothing
    of a refused request reaches the upstream, and the connection serves on; an
    unreachable upstream is a 502 on its stream."""
    proxy = ProxyProcess.start(
        tmp_path,
        hsm,
        ca,
        upstream.url,
        "ec256",
        extra="\n[http]\nmax_body_bytes = 10\nmax_headers = 5\n",
    )
    try:
        with httpx.Client(http2=True, http1=False, verify=_trusting(ca)) as client:
            assert client.post(f"{proxy.url}/big", content=b"x" * 11).status_code == 413
            many = {f"x-h{number}": "1" for number in range(6)}
            assert client.get(f"{proxy.url}/many", headers=many).status_code == 431
            assert client.post(f"{proxy.url}/small", content=b"x" * 10).status_code == 200
        assert [seen.path for seen in upstream.requests] == ["/small"]
    finally:
        proxy.stop()
    dead = ProxyProcess.start(tmp_path, hsm, ca, f"http://127.0.0.1:{closed_port()}", "ec256")
    try:
        with httpx.Client(http2=True, http1=False, verify=_trusting(ca)) as client:
            answer = client.get(f"{dead.url}/nobody-home")
            assert (answer.http_version, answer.status_code) == ("HTTP/2", 502)
            assert answer.text == "502 Bad Gateway\n"
    finally:
        dead.stop()


def _refusing_handler(sock: socket.socket, server: ScriptedUpstream) -> None:
    """Answers 413 from the head alone and closes, without reading the body."""
    if server.read_head(sock, bytearray()) is not None:
        respond(sock, 413, b"too big for me", extra="Connection: close\r\n")


def test_an_upstream_answer_before_the_whole_upload_is_relayed(
    tmp_path: Path, hsm: HSM, ca: trustme.CA
) -> None:
    """An upstream that answers (413) from the head and closes while the body is still
    coming: the client gets that answer, not a 502, and the rest of its body is refused
    with RST_STREAM(NO_ERROR) (RFC 9113, 8.1)."""
    backend = ScriptedUpstream(_refusing_handler)
    proxy = ProxyProcess.start(tmp_path, hsm, ca, backend.url, "ec256")
    size = 64 << 20
    try:
        with RawH2(proxy.port, ca) as client:
            client.send(
                client.headers(
                    1, [*request("/upload", "POST"), (b"content-length", b"%d" % size)], False
                )
            )
            windows = {0: 65535, 1: 65535}
            sent = 0
            while 1 not in client.heads:  # until the answer's HEADERS frame
                room = min(windows[0], windows[1], size - sent)
                if room > 0:
                    client.send(
                        *(
                            client.data(1, b"u" * min(16384, room - at))
                            for at in range(0, room, 16384)
                        )
                    )
                    sent += room
                    windows[0] -= room
                    windows[1] -= room
                frame = client.next_frame()
                assert frame is not None
                if isinstance(frame, WindowUpdateFrame):
                    windows[frame.stream_id] += frame.window_increment
            assert client.heads[1][0][b":status"] == b"413"
            body = b""
            while True:
                frame = client.next_frame()
                assert frame is not None
                if isinstance(frame, DataFrame) and frame.stream_id == 1:
                    body += frame.data
                if isinstance(frame, RstStreamFrame) and frame.stream_id == 1:
                    assert frame.error_code == NO_ERROR
                    break
            assert body == b"too big for me"
            assert sent < size
    finally:
        proxy.stop()
        backend.stop()
