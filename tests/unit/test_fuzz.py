"""Property tests (hypothesis) on what hostile clients and careless operators feed the proxy.

The HTTP core is sans-IO (http.py on h11), so it is driven here exactly as server.py drives
it, without sockets: client bytes in (cut at random places, then end of stream), forwarded
requests out. The properties:

* the core never raises anything but ``h11.RemoteProtocolError`` (which server.py turns
  into a 4xx and a closed connection), and its checks (``check_request_head``,
  ``check_request``) refuse what h11 would tolerate;
* every forwarded request is unambiguous: re-parsed by a strict HTTP/1.1 parser it is one
  request with one framing (Content-Length xor chunked), its body is the client's body,
  nothing follows it (no smuggled second request), no hop-by-hop header, exactly one
  X-Forwarded-Proto, and no identity header the client wrote.

The config loader gets arbitrary TOML-shaped data and arbitrary bytes: it returns a config
or raises ConfigError, never anything else.

Run time is bounded for CI: a fixed number of examples, no per-example deadline (the
machine is shared and noisy), no example database written to the work tree.
"""

from __future__ import annotations

import itertools
import string
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from proxy.config import HTTPConfig, ProxyConfig, load_config, parse_config
from proxy.errors import ConfigError
from proxy.http.rules import (
    HOP_BY_HOP,
    ClientInfo,
    check_request,
    check_request_head,
    upstream_request,
)
from proxy.tls.clientauth import is_identity_header

FUZZ = settings(
    max_examples=400,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
CLIENT = ClientInfo("192.0.2.7", "localhost")
LIMITS = HTTPConfig()


@dataclass
class Forwarded:
    head: h11.Request
    wire: bytes
    body: bytes = b""
    complete: bool = False
    received_body: bytes = b""
    sent: list[bytes] = field(default_factory=list)


def drive(data: bytes, cuts: list[int]) -> list[Forwarded]:
    """Feed ``data`` (in pieces) to the proxy's HTTP core, as server.py does: the raw head
    check while a request head is awaited, h11, the parsed-request check, then the rules."""
    server = h11.Connection(h11.SERVER)
    forwarded: list[Forwarded] = []
    upstream: h11.Connection | None = None
    positions = sorted({cut % (len(data) + 1) for cut in cuts} | {0, len(data)})
    pieces = [data[a:b] for a, b in itertools.pairwise(positions)] + [b""]
    for piece in pieces:
        server.receive_data(piece)
        while True:
            buffered = server.trailing_data[0]
            waiting = server.their_state is h11.IDLE and buffered
            if waiting and check_request_head(buffered, LIMITS) is not None:
                return forwarded  # refused before parsing (obs-fold, limits)
            try:
                event = server.next_event()
            except h11.RemoteProtocolError:
                return forwarded  # the proxy answers 4xx and closes: nothing more goes up
            if event is h11.NEED_DATA or event is h11.PAUSED:
                break
            if isinstance(event, h11.Request):
                if check_request(event, LIMITS) is not None:
                    return forwarded  # ambiguous framing, CONNECT, too large: refused
                outgoing = upstream_request(event, CLIENT)
                upstream = h11.Connection(h11.CLIENT)
                current = Forwarded(event, upstream.send(outgoing) or b"")
                forwarded.append(current)
            elif isinstance(event, h11.Data):
                assert upstream is not None
                current.received_body += event.data
                current.wire += upstream.send(h11.Data(data=event.data)) or b""
            elif isinstance(event, h11.EndOfMessage):
                assert upstream is not None
                current.wire += upstream.send(h11.EndOfMessage()) or b""
                current.complete = True
                server.send(h11.Response(status_code=200, headers=[(b"content-length", b"0")]))
                server.send(h11.EndOfMessage())
                if server.our_state is not h11.DONE or server.their_state is not h11.DONE:
                    return forwarded
                server.start_next_cycle()
            else:  # ConnectionClosed
                return forwarded
    return forwarded


def check_unambiguous(request: Forwarded) -> None:
    parser = h11.Connection(h11.SERVER)
    parser.receive_data(request.wire)
    head = parser.next_event()
    assert isinstance(head, h11.Request), head
    assert (head.method, head.target) == (request.head.method, request.head.target)
    names = [name.lower() for name, _ in head.headers.raw_items()]
    framing = [name for name in names if name in (b"content-length", b"transfer-encoding")]
    assert len(framing) <= 1, framing
    assert not HOP_BY_HOP.intersection(names) - {b"transfer-encoding"}
    assert names.count(b"x-forwarded-proto") == 1
    assert not any(is_identity_header(name) for name in names)
    body = b""
    while True:
        event = parser.next_event()
        if isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            break
        else:
            raise AssertionError(f"forwarded request is truncated or malformed: {event!r}")
    assert body == request.received_body
    parser.send(h11.Response(status_code=204, headers=[]))
    parser.send(h11.EndOfMessage())
    parser.start_next_cycle()
    assert parser.next_event() is h11.NEED_DATA  # nothing smuggled behind it


# --- strategies: requests a hostile client would write --------------------------------------

TOKENS = st.text(string.ascii_letters + string.digits + "-_.!#$%&'*+^`|~", min_size=1, max_size=12)
EVIL_HEADERS = st.sampled_from(
    [
        b"Content-Length: 5",
        b"Content-Length: 0",
        b"Content-Length: 5, 5",
        b"Content-Length: 5, 6",
        b"Content-Length: +5",
        b"Content-Length: 0x5",
        b"Content-Length : 5",
        b"Content-Length:5",
        b"Transfer-Encoding: chunked",
        b"Transfer-Encoding: CHUNKED",
        b"Transfer-Encoding: gzip, chunked",
        b"Transfer-Encoding: chunked, identity",
        b"Transfer-Encoding:\tchunked",
        b"Transfer-Encoding : chunked",
        b"Transfer-Encoding\x0b: chunked",
        b" Transfer-Encoding: chunked",
        b"X-Folded: a\r\n b",
        b"Connection: close",
        b"Connection: keep-alive, X-Forwarded-For",
        b"Connection: Content-Length",
        b"Keep-Alive: timeout=5",
        b"Upgrade: websocket",
        b"TE: trailers",
        b"Expect: 100-continue",
        b"Host: a",
        b"Host: b",
        b"X-Forwarded-Proto: http",
        b"X-Forwarded-For: 10.0.0.1",
        b"X-Client-Cert-CN: admin",
        b"x-client-cert-verified: success",
        b"X-Forwarded-Client-Cert: By=x",
        b"X-Nul: a\x00b",
        b"X-Bare-CR: a\rb",
        b"",
    ]
)
RANDOM_HEADER = st.builds(
    lambda name, value: name.encode() + b": " + value,
    TOKENS,
    st.binary(max_size=20).filter(lambda v: b"\n" not in v and b"\r" not in v),
)


def chunked(body: bytes, sizes: list[int], extension: bool) -> bytes:
    out, position = b"", 0
    for size in sizes:
        part = body[position : position + size]
        if not part:
            break
        out += b"%x%s\r\n%s\r\n" % (len(part), b";x=y" if extension else b"", part)
        position += len(part)
    return out + b"0\r\n\r\n"


@st.composite
def hostile_requests(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT", b"HEAD", b"OPTIONS", b"G ET", b""]))
    target = draw(st.sampled_from([b"/", b"/a?b=c", b"*", b"http://x/y", b"/%00", b"/ x", b""]))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1 "]))
    headers = draw(st.lists(st.one_of(EVIL_HEADERS, RANDOM_HEADER), max_size=8))
    if draw(st.booleans()):
        headers.append(b"Host: example.test")
    line_end = draw(st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n"]))
    body = draw(st.binary(max_size=40))
    encoded = draw(
        st.sampled_from(["raw", "chunked", "chunked-ext", "bad-chunk"]).map(
            lambda how: (
                body
                if how == "raw"
                else chunked(body, [3, 7, 50], how == "chunked-ext")
                if how != "bad-chunk"
                else b"zz\r\n" + body
            )
        )
    )
    head = method + b" " + target + b" " + version + line_end
    head += b"".join(header + line_end for header in headers if header) + line_end
    message = head + encoded
    return message * draw(st.integers(min_value=1, max_value=2))


@FUZZ
@given(hostile_requests(), st.lists(st.integers(min_value=0), max_size=4))
def test_hostile_requests_are_refused_or_forwarded_unambiguously(
    data: bytes, cuts: list[int]
) -> None:
    for request in drive(data, cuts):
        if request.complete:
            check_unambiguous(request)


@FUZZ
@given(st.binary(max_size=600), st.lists(st.integers(min_value=0), max_size=4))
def test_arbitrary_bytes_never_break_the_core(data: bytes, cuts: list[int]) -> None:
    for request in drive(data, cuts):
        if request.complete:
            check_unambiguous(request)


def test_connection_naming_content_length_keeps_the_body_framed() -> None:
    # Found by the property test above: Connection: Content-Length used to strip the length
    # of a body the proxy had read by it, so the next hop could not delimit it.
    request = (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nConnection: Content-Length\r\n\r\n"
    )
    [forwarded] = drive(request + b"hello", [])
    assert forwarded.complete
    check_unambiguous(forwarded)
    assert forwarded.received_body == b"hello"
    host = next(value for name, value in forwarded.head.headers if name == b"host")
    assert host == b"a"
    routed = drive(b"GET / HTTP/1.1\r\nHost: b\r\nConnection: Host\r\n\r\n", [])
    assert b"\r\nHost: b\r\n" in routed[0].wire


def test_content_length_with_transfer_encoding_is_refused_not_forwarded() -> None:
    smuggle = (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nGET /admin HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    assert drive(smuggle, []) == []


# --- the config loader ----------------------------------------------------------------------

KNOWN_KEYS = [
    "listen",
    "upstream",
    "token",
    "tls",
    "security",
    "module",
    "pin",
    "pin_file",
    "pin_env",
    "pin_aws_secret",
    "certificate_aws_secret",
    "session_ticket_keys",
    "sessions",
    "certificate",
    "key",
    "handshake_timeout",
    "policy",
    "ocsp_response",
    "client_auth",
    "mode",
    "ca",
    "allow_cn",
    "allow_dns",
    "allow_uri",
    "allow_spki_sha256",
    "allow_any",
    "user",
    "max_handshakes",
    "max_handshakes_per_client",
    "allow_insecure_secret_files",
]
SCALARS = st.one_of(
    st.text(max_size=30),
    st.sampled_from(
        [
            "127.0.0.1:8443",
            "[::1]:0",
            "http://127.0.0.1:8080",
            "pkcs11:token=t;object=k;id=%01",
            "pkcs11:token=t;pin-value=1234",
            "require",
            "optional",
            "modern",
            "intermediate",
            "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=",
            "spiffe://example.org/x",
            "file:/run/secrets/pin",
            "env:HSM_PIN",
            "aws-sm:prod/pin",
            "vault:kv/pin",
        ]
    ),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True),
    st.booleans(),
)


def toml_like() -> st.SearchStrategy[Any]:
    return st.recursive(
        SCALARS,
        lambda children: st.one_of(
            st.lists(children, max_size=4),
            st.dictionaries(
                st.one_of(st.sampled_from(KNOWN_KEYS), st.text(max_size=8)), children, max_size=6
            ),
        ),
        max_leaves=20,
    )


REQUIRED_KEYS = frozenset({"upstream", "listen", "token", "tls"})


def plausible_config() -> st.SearchStrategy[dict[str, Any]]:
    section = st.dictionaries(st.sampled_from(KNOWN_KEYS), toml_like(), max_size=8)
    return st.fixed_dictionaries(
        {"upstream": SCALARS, "token": section, "tls": section},
        optional={"listen": SCALARS, "security": section, "extra": toml_like()},
    )


@FUZZ
@given(st.one_of(plausible_config(), st.dictionaries(st.text(max_size=10), toml_like())))
def test_config_loader_returns_a_config_or_a_config_error(data: dict[str, Any]) -> None:
    message = ""
    try:
        config = parse_config(data, base=Path("/etc/hsm-proxy"), source="fuzz")
    except ConfigError as error:
        message = str(error)
    if message:
        # A clear, specific error: "KEY.PATH: what is wrong", the key one the data has or
        # one it lacks, never a bare message or an exception of another kind.
        where, separator, problem = message.partition(": ")
        assert separator, message
        assert problem.strip(), message
        section = where.split(".")[0].split("[")[0]
        assert section in data or section in REQUIRED_KEYS, message
        event(f"refused at {section}")
        return
    assert isinstance(config, ProxyConfig)
    event("accepted")


@FUZZ
@given(st.binary(max_size=400))
def test_config_file_of_any_bytes_is_read_or_refused_clearly(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "proxy.toml"
        path.write_bytes(data)
        message = str(path)
        try:
            load_config(path)
        except ConfigError as error:
            message = str(error)
        assert str(path) in message
