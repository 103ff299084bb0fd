"""Property tests (hypothesis) of the HTTP edge end to end: requests with conflicting or
odd framing, pipelined on one TLS connection to the proxy (a subprocess on the test token),
and a strict upstream that parses exactly what reaches it (tests/support/strict.py).

The property: the upstream receives nothing, or exactly one well-framed request per client
request, in order, with the client's body, and nothing else: no request smuggled behind
another, no byte left over on a connection, no request whose framing was ambiguous. Every
request the upstream answered reaches the client, and nothing else does with a 200.

Kept small for a shared 2-core machine: one proxy for the module, a few dozen examples.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import HSM, ProxyProcess, StartedProxies
from tests.support.http import read_all, tls_connect
from tests.support.strict import StrictUpstream

FORWARD, EITHER, REFUSE = "forward", "either", "refuse"
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: localhost\r\n\r\n"


@dataclass(frozen=True)
class Sent:
    """One request as the client wrote it, and what must become of it."""

    raw: bytes
    method: bytes
    target: bytes  # what the upstream must see, when it is forwarded
    body: bytes
    expect: str  # FORWARD, EITHER or REFUSE
    closes: bool  # the connection ends after it (HTTP/1.0)


@dataclass(frozen=True)
class Setup:
    proxy: ProxyProcess
    upstream: StrictUpstream
    ca: trustme.CA


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, hsm: HSM, ca: trustme.CA) -> Iterator[Setup]:
    upstream = StrictUpstream()
    proxies = StartedProxies(Path(tmp_path_factory.mktemp("framing")), hsm, ca)
    # pool_size = 0: every upstream connection closes after its exchange, so the upstream
    # can tell, per example, whether anything was left on one.
    http = "\n[http]\npool_size = 0\nheader_timeout = 300\nbody_timeout = 300\n"
    proxy = proxies.start(upstream.url, extra=http + "max_body_bytes = 4096\n")
    try:
        yield Setup(proxy, upstream, ca)
    finally:
        proxies.stop_all()
        upstream.stop()


def _chunked(body: bytes, draw: st.DrawFn) -> tuple[bytes, str]:
    """``body`` in chunks, with odd but valid size lines, or an invalid one."""
    out, expect, index = b"", FORWARD, 0
    while index < len(body):
        size = draw(st.integers(min_value=1, max_value=len(body) - index))
        style = draw(st.sampled_from(["lower", "upper", "zeros", "ext", "too-long", "bare-lf"]))
        line = b"%x" % size
        if style == "upper":
            line = line.upper()
        elif style == "zeros":
            line = line.rjust(16, b"0")
        elif style == "ext":
            line += b';name="value"'
        elif style == "too-long":
            line = line.rjust(17, b"0")
            expect = REFUSE
        end = b"\n" if style == "bare-lf" else b"\r\n"
        if style == "bare-lf":
            expect = REFUSE
        out += line + end + body[index : index + size] + b"\r\n"
        index += size
    trailer = draw(st.sampled_from([b"", b"X-Trailer: 1\r\n"]))
    return out + b"0\r\n" + trailer + b"\r\n", expect


@st.composite
def requests(draw: st.DrawFn, number: int) -> Sent:
    path = b"/p%d" % number
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT"]))
    version = draw(st.sampled_from([b"1.1", b"1.1", b"1.0"]))
    body = draw(st.sampled_from([b"", b"hello", SMUGGLED, b"x" * 300])) if method != b"GET" else b""
    shape = draw(
        st.sampled_from(
            [
                "length",
                "length-twice",
                "lengths-differ",
                "length-comma",
                "length-plus",
                "chunked",
                "chunked-and-length",
                "chunked-twice",
                "chunked-identity",
                "identity",
                "chunked-upper",
                "none",
            ]
        )
    )
    form = draw(st.sampled_from(["origin", "absolute", "dots", "http09"]))
    target = {
        "origin": path,
        "absolute": b"http://localhost" + path,
        "dots": b"/x/.." + path,
        "http09": path,
    }[form]
    headers = [b"Host: localhost"]
    expect = FORWARD
    payload = body
    if shape == "length":
        headers.append(b"Content-Length: %d" % len(body))
    elif shape == "length-twice":
        headers += [b"Content-Length: %d" % len(body)] * 2
        expect = EITHER  # RFC 9112, 6.3 lets a recipient take identical repeats as one
    elif shape == "lengths-differ":
        headers += [b"Content-Length: %d" % len(body), b"Content-Length: %d" % (len(body) + 1)]
        expect = REFUSE
    elif shape == "length-comma":
        headers.append(b"Content-Length: %d, %d" % (len(body), len(body)))
        expect = EITHER
    elif shape == "length-plus":
        headers.append(b"Content-Length: +%d" % len(body))
        expect = REFUSE
    elif shape == "none":
        body = payload = b""  # unframed bytes would just be the client's next request
    else:
        chunked, expect = _chunked(body, draw)
        payload = chunked
        coding = {
            "chunked": [b"Transfer-Encoding: chunked"],
            "chunked-and-length": [
                b"Transfer-Encoding: chunked",
                b"Content-Length: %d" % len(body),
            ],
            "chunked-twice": [b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"],
            "chunked-identity": [b"Transfer-Encoding: chunked, identity"],
            "identity": [b"Transfer-Encoding: identity"],
            "chunked-upper": [b"Transfer-Encoding: Chunked"],
        }[shape]
        headers += coding
        if shape in ("chunked-and-length", "chunked-twice", "chunked-identity", "identity"):
            expect = REFUSE
        if version == b"1.0":
            expect = REFUSE  # RFC 9112, 6.1
    if form == "http09":
        raw = method + b" " + target + b"\r\n"
        return Sent(raw, method, path, b"", REFUSE, False)
    head = method + b" " + target + b" HTTP/" + version + b"\r\n" + b"\r\n".join(headers)
    raw = head + b"\r\n\r\n" + payload
    return Sent(raw, method, path, body, expect, version == b"1.0")


@st.composite
def conversations(draw: st.DrawFn) -> list[Sent]:
    count = draw(st.integers(min_value=1, max_value=3))
    return [draw(requests(number)) for number in range(count)]


def _converse(setup: Setup, sent: list[Sent]) -> bytes:
    with tls_connect(setup.proxy.port, setup.ca) as tls:
        tls.sendall(b"".join(request.raw for request in sent))
        socket.socket.shutdown(tls, socket.SHUT_WR)  # a TCP half-close under TLS: "no more"
        return read_all(tls)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(conversations())
def test_the_upstream_sees_nothing_or_exactly_the_requests_the_client_framed(
    setup: Setup, sent: list[Sent]
) -> None:
    upstream = setup.upstream
    before = len(upstream.arrived)
    answered = _converse(setup, sent)
    upstream.wait_ended(upstream.connections)
    upstream.assert_clean()
    arrived = upstream.arrived[before:]
    matched = 0
    for request in sent:
        if matched < len(arrived) and arrived[matched].target == request.target:
            seen = arrived[matched]
            assert request.expect != REFUSE, (request.raw, seen)
            assert seen.method == request.method
            assert seen.body == request.body, (request.raw, seen)
            assert seen.http_version == b"1.1"
            matched += 1
            if request.closes:
                break
            continue
        assert request.expect != FORWARD, (request.raw, answered[:200])
        break
    assert matched == len(arrived), ([request.raw for request in sent], arrived)
    assert answered.count(b"HTTP/1.1 200 ") == len(arrived), answered
