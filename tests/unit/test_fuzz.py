"""Property tests (hypothesis) on what hostile clients and careless operators feed the proxy.

The HTTP/1.1 handler itself (``HTTP1Handler.serve`` in proxy/http/exchange.py, the code
that serves every decrypted connection) is driven here: client bytes go in over an
in-memory stream (cut at random places, then end of stream), and it forwards to a real
upstream listening on loopback that records every byte it receives and answers each
request it can parse. Only the TLS handshake is left out: the handler starts after it. The
properties:

* the handler never raises (a refused request is an answer and a closed connection), and
  its checks refuse what h11 would tolerate;
* every request the upstream receives is unambiguous: re-parsed by a strict HTTP/1.1
  parser it is one request with one framing (Content-Length xor chunked), the next one
  the client sent (same method, target and body: nothing smuggled in between, nothing
  after it but the client's next request), no hop-by-hop header, exactly one
  X-Forwarded-Proto, and no identity header the client wrote.

The strategies are built to reach that check: most generated requests are well formed with
a few hostile parts, and the arbitrary bytes are spliced into and around valid requests.
Each example reports what happened to it (``event``) and how many forwarded requests it
checked (``target``): ``pytest --hypothesis-show-statistics tests/unit/test_fuzz.py``
shows the spread, and each property test fails if too few examples reach the check.

The config loader gets arbitrary TOML-shaped data and arbitrary bytes: it returns a config
or raises ConfigError naming the key at fault, never anything else.

Run time is bounded for CI: a fixed number of examples, no per-example deadline (the
machine is shared and noisy), no example database written to the work tree.
"""

from __future__ import annotations

import itertools
import re
import string
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import h11
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, event, given, settings, target
from hypothesis import strategies as st

from proxy.config import ProxyConfig, load_config, parse_config
from proxy.errors import ConfigError
from proxy.generation.holder import GenerationHolder
from proxy.generation.model import Generation
from proxy.http.exchange import HTTP1Handler
from proxy.http.rules import HOP_BY_HOP
from proxy.net.limits import HandshakeLimiter
from proxy.net.pipeline import HTTP1, Client, Handlers, ServerState
from proxy.tls.clientauth import is_identity_header
from proxy.tls.stream import TLSInfo

FUZZ = settings(
    max_examples=300,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# A handler that has not finished an example in this long is stuck (all input is in
# memory and ends with end-of-stream): a failure, not a slow machine.
STUCK_SECONDS = 30


# --- the real handler over an in-memory client stream, a recording upstream on loopback ----


@dataclass
class Served:
    """One example: what the upstream received (per connection, in order), what the client
    read back, and the requests the client sent as a strict parser reads them."""

    upstream_wires: list[bytearray] = field(default_factory=list)
    upstream_errors: list[str] = field(default_factory=list)
    answer: bytes = b""


async def _upstream_connection(stream: trio.SocketStream, served: Served) -> None:
    wire = bytearray()
    served.upstream_wires.append(wire)
    parser = h11.Connection(h11.SERVER)
    async with stream:
        while True:
            try:
                event_ = parser.next_event()
            except h11.RemoteProtocolError as error:
                served.upstream_errors.append(f"upstream could not parse it: {error}")
                return
            if event_ is h11.NEED_DATA:
                try:
                    data = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    return
                if not data:
                    return  # the proxy closed: a request cut short is judged from the wire
                wire += data
                parser.receive_data(data)
                continue
            if isinstance(event_, h11.EndOfMessage):
                reply = parser.send(
                    h11.Response(status_code=200, headers=[(b"content-length", b"0")])
                )
                reply = (reply or b"") + (parser.send(h11.EndOfMessage()) or b"")
                try:
                    await stream.send_all(reply)
                except trio.BrokenResourceError:
                    return
                if parser.our_state is not h11.DONE or parser.their_state is not h11.DONE:
                    return
                parser.start_next_cycle()
            elif isinstance(event_, h11.ConnectionClosed):
                return


def _config(upstream_port: int) -> ProxyConfig:
    return parse_config(
        {
            "upstream": f"http://127.0.0.1:{upstream_port}",
            "token": {"module": "/nowhere/libsofthsm2.so", "pin": "env:HSM_PIN"},
            "tls": {"certificate": "/nowhere/chain.pem", "key": "pkcs11:token=t;object=k"},
        },
        base=Path("/etc/hsm-proxy"),
        source="fuzz",
    )


def _client(stream: trio.abc.Stream, config: ProxyConfig) -> Client:
    """What the connection pipeline hands the HTTP handler after a handshake. The handler
    reads only the configuration from its generation; the token, keys and SSL contexts
    serve the handshake, which this in-memory connection does not have."""
    nothing: Any = None
    generation = Generation(1, config, nothing, nothing, nothing, nothing)
    handler = HTTP1Handler()
    state = ServerState(
        GenerationHolder(generation),
        trio.CapacityLimiter(1),
        Handlers({HTTP1: handler}),
        HandshakeLimiter(config.security.max_handshakes, config.security.max_handshakes_per_client),
    )
    info = TLSInfo("TLSv1.3", "TLS_AES_128_GCM_SHA256", HTTP1, "localhost")
    return Client(1, "192.0.2.7", cast(Any, stream), info, generation, state)


def serve(data: bytes, cuts: list[int]) -> Served:
    """``data`` (in pieces, then end of stream) through the real HTTP/1.1 handler."""
    served = Served()
    positions = sorted({cut % (len(data) + 1) for cut in cuts} | {0, len(data)})
    pieces = [data[a:b] for a, b in itertools.pairwise(positions)]

    async def main() -> None:
        with trio.fail_after(STUCK_SECONDS):
            async with trio.open_nursery() as nursery:
                listeners = await nursery.start(
                    trio.serve_tcp,
                    lambda stream: _upstream_connection(stream, served),
                    0,
                )
                port = listeners[0].socket.getsockname()[1]
                config = _config(port)
                client_side, server_side = trio.testing.memory_stream_pair()
                client = _client(server_side, config)
                handler = client.server.handlers.choose(client.generation, client.tls)

                async def send() -> None:
                    try:
                        for piece in pieces:
                            await client_side.send_all(piece)
                        await client_side.send_eof()
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass  # the handler closed the connection first

                async def receive() -> None:
                    while chunk := await client_side.receive_some(65536):
                        served.answer += chunk

                async with trio.open_nursery() as talk:
                    talk.start_soon(send)
                    talk.start_soon(receive)
                    await handler.serve(client)  # never raises: that is a property
                    await server_side.aclose()
                handler.close()
                nursery.cancel_scope.cancel()

    trio.run(main)
    return served


@dataclass
class ClientRequest:
    method: bytes
    target: bytes
    body: bytes
    complete: bool = False


def client_requests(data: bytes) -> list[ClientRequest]:
    """The requests in ``data`` as a strict parser reads them, up to the first one it
    cannot parse (the proxy refuses at that point, or earlier); the last may be incomplete
    (the client's bytes ended in its body)."""
    parser = h11.Connection(h11.SERVER)
    parser.receive_data(data)
    parser.receive_data(b"")
    requests: list[ClientRequest] = []
    while True:
        try:
            event_ = parser.next_event()
        except h11.RemoteProtocolError:
            return requests
        if isinstance(event_, h11.Request):
            requests.append(ClientRequest(event_.method, event_.target, b""))
        elif isinstance(event_, h11.Data):
            requests[-1].body += event_.data
        elif isinstance(event_, h11.EndOfMessage):
            requests[-1].complete = True
            # Not a 2xx: a CONNECT or an Upgrade stays HTTP, as the proxy refuses or forwards it.
            parser.send(h11.Response(status_code=404, headers=[(b"content-length", b"0")]))
            parser.send(h11.EndOfMessage())
            if parser.our_state is not h11.DONE or parser.their_state is not h11.DONE:
                return requests
            parser.start_next_cycle()
        else:  # NEED_DATA cannot follow end of stream; ConnectionClosed; PAUSED
            return requests


def origin_form(request_target: bytes) -> bytes:
    if not request_target.lower().startswith((b"http://", b"https://")):
        return request_target
    parts = urlsplit(request_target)
    return (parts.path or b"/") + (b"?" + parts.query if parts.query else b"")


def check_unambiguous(served: Served, sent: list[ClientRequest]) -> int:
    """Every request on the upstream's wire is the client's next one, framed once, cleaned
    of hop-by-hop and identity headers; returns how many complete ones were checked."""
    assert served.upstream_errors == []
    checked = 0
    wires = [wire for wire in served.upstream_wires if wire]
    for number, wire in enumerate(wires):
        parser = h11.Connection(h11.SERVER)
        parser.receive_data(bytes(wire))
        last_wire = number == len(wires) - 1
        while True:
            head = parser.next_event()
            if head is h11.NEED_DATA:
                break  # all of this connection's bytes are read
            assert isinstance(head, h11.Request), head
            assert checked < len(sent), f"a request the client never sent: {head!r}"
            expected = sent[checked]
            assert head.method == expected.method
            # An absolute-form target goes out in origin-form (RFC 9112, 3.2.2).
            assert head.target == origin_form(expected.target), (head.target, expected.target)
            names = [name.lower() for name, _ in head.headers.raw_items()]
            framing = [name for name in names if name in (b"content-length", b"transfer-encoding")]
            assert len(framing) <= 1, framing
            # An Upgrade request (WebSocket) keeps its Upgrade and "Connection: upgrade" and
            # no other hop-by-hop header; any other request keeps none.
            kept = {b"transfer-encoding"}
            if b"upgrade" in names:
                kept |= {b"upgrade", b"connection"}
                connection = [value for name, value in head.headers if name == b"connection"]
                assert connection == [b"upgrade"], connection
            assert not HOP_BY_HOP.intersection(names) - kept, names
            assert names.count(b"x-forwarded-proto") == 1
            assert not any(is_identity_header(name) for name in names)
            body = b""
            while True:
                piece = parser.next_event()
                if isinstance(piece, h11.Data):
                    body += piece.data
                elif isinstance(piece, h11.EndOfMessage):
                    break
                else:
                    # Cut short: only the last request may be, when the client left mid-body.
                    assert piece is h11.NEED_DATA, piece
                    assert last_wire, "a cut-short request on a connection that was reused"
                    assert not expected.complete, "the client's whole request went up cut short"
                    assert expected.body.startswith(body)
                    return checked
            assert expected.complete, "a request forwarded whole that the client never finished"
            assert body == expected.body
            checked += 1
            parser.send(h11.Response(status_code=204, headers=[]))
            parser.send(h11.EndOfMessage())
            parser.start_next_cycle()
    return checked


def run_and_check(data: bytes, cuts: list[int], tally: Counter[str]) -> None:
    """Serve one example, check what reached the upstream, and report where it went."""
    served = serve(data, cuts)
    checked = check_unambiguous(served, client_requests(data))
    statuses = [int(code) for code in re.findall(rb"^HTTP/1\.1 (\d{3}) ", served.answer, re.M)]
    # The upstream is healthy and answers whatever it can parse: a 5xx (but 501 for a
    # CONNECT) means the proxy accepted a request it then could not forward.
    assert [code for code in statuses if code >= 500 and code != 501] == [], served.answer
    status = str(statuses[0]) if statuses else "none"
    tally["examples"] += 1
    if checked:
        tally["reached"] += 1
        event("reached the unambiguity check")
    else:
        event(f"nothing forwarded (first answer: {status})")
    target(float(checked), label="requests forwarded and checked")


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
    st.one_of(
        st.text(string.printable.strip(), max_size=20).map(str.encode),
        st.binary(max_size=20).filter(lambda v: b"\n" not in v and b"\r" not in v),
    ),
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


FRAMINGS = ["content-length", "content-length", "chunked", "chunked", "none", "mismatched"]


@st.composite
def hostile_requests(draw: st.DrawFn) -> bytes:
    """Mostly well-formed requests (so that many reach the upstream) with hostile parts:
    odd methods, targets and versions, evil headers, framing that lies, pipelining."""
    valid_methods = [b"GET", b"POST", b"PUT", b"HEAD", b"OPTIONS", b"DELETE"]
    method = draw(st.sampled_from(valid_methods * 3 + [b"G ET", b"", b"CONNECT"]))
    target = draw(
        st.sampled_from(
            [b"/", b"/a?b=c", b"/x/y"] * 3 + [b"*", b"http://x/y", b"/%00", b"/ x", b""]
        )
    )
    version = draw(st.sampled_from([b"HTTP/1.1"] * 6 + [b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1 "]))
    headers = draw(st.lists(st.one_of(EVIL_HEADERS, RANDOM_HEADER), max_size=3))
    if draw(st.integers(0, 4)):
        headers.insert(draw(st.integers(0, len(headers))), b"Host: example.test")
    line_end = draw(st.sampled_from([b"\r\n"] * 5 + [b"\n"]))
    body = draw(st.binary(max_size=40))
    framing = draw(st.sampled_from(FRAMINGS))
    if framing == "content-length":
        headers.append(b"Content-Length: %d" % len(body))
        encoded = body
    elif framing == "chunked":
        headers.append(b"Transfer-Encoding: chunked")
        encoded = chunked(
            body, draw(st.lists(st.integers(1, 50), min_size=1, max_size=4)), draw(st.booleans())
        )
    elif framing == "none":
        encoded = b""
    else:  # whatever the evil headers say, and a body that may not match it
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
    return message * draw(st.integers(min_value=1, max_value=3))


@st.composite
def valid_request(draw: st.DrawFn) -> bytes:
    method = draw(st.sampled_from([b"GET", b"POST", b"PUT"]))
    body = draw(st.binary(max_size=30)) if method != b"GET" else b""
    head = b"%s /p%d HTTP/1.1\r\nHost: example.test\r\n" % (method, draw(st.integers(0, 99)))
    if draw(st.booleans()):
        return head + b"Content-Length: %d\r\n\r\n" % len(body) + body
    return head + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(body, [5, 50], False)


@st.composite
def bytes_in_and_around_requests(draw: st.DrawFn) -> bytes:
    """Arbitrary bytes, alone or spliced into, over or after valid requests: what a broken
    or hostile client sends, near enough to HTTP to get past the first line."""
    noise = draw(st.binary(min_size=1, max_size=200))
    how = draw(st.sampled_from(["alone", "insert", "overwrite", "append", "between"]))
    if how == "alone":
        return noise
    requests = draw(st.lists(valid_request(), min_size=1, max_size=3))
    data = b"".join(requests)
    at = draw(st.integers(0, len(data)))
    if how == "insert":
        return data[:at] + noise + data[at:]
    if how == "overwrite":
        return data[:at] + noise + data[at + len(noise) :]
    if how == "append":
        return data + noise
    return requests[0] + noise + b"".join(requests[1:])


CUTS = st.lists(st.integers(min_value=0), max_size=4)


# How many examples of each property reached the unambiguity check (per test run).
TALLIES: dict[str, Counter[str]] = {}


@FUZZ
@given(hostile_requests(), CUTS)
def test_hostile_requests_are_refused_or_forwarded_unambiguously(
    data: bytes, cuts: list[int]
) -> None:
    run_and_check(data, cuts, TALLIES.setdefault("hostile", Counter()))


@FUZZ
@given(bytes_in_and_around_requests(), CUTS)
def test_arbitrary_bytes_never_break_the_handler(data: bytes, cuts: list[int]) -> None:
    run_and_check(data, cuts, TALLIES.setdefault("bytes", Counter()))


@pytest.mark.parametrize(
    ("name", "examples", "share"),
    [
        ("hostile", test_hostile_requests_are_refused_or_forwarded_unambiguously, 0.3),
        ("bytes", test_arbitrary_bytes_never_break_the_handler, 0.5),
    ],
)
def test_most_examples_reach_the_unambiguity_check(
    name: str, examples: Callable[[], None], share: float
) -> None:
    """A property checked on few examples says little: the strategies must get most
    requests past the handler's refusals to the upstream (run alone, it runs them)."""
    if not TALLIES.get(name):
        examples()
    tally = TALLIES[name]
    assert tally["reached"] >= share * tally["examples"], tally


def test_connection_naming_content_length_keeps_the_body_framed() -> None:
    # Found by the property test above: Connection: Content-Length used to strip the length
    # of a body the proxy had read by it, so the next hop could not delimit it.
    request = (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nConnection: Content-Length\r\n\r\n"
    )
    served = serve(request + b"hello", [])
    assert check_unambiguous(served, client_requests(request + b"hello")) == 1
    assert b"\r\nhost: a\r\n" in bytes(served.upstream_wires[0]).lower()
    routed = serve(b"GET / HTTP/1.1\r\nHost: b\r\nConnection: Host\r\n\r\n", [])
    assert b"\r\nhost: b\r\n" in bytes(routed.upstream_wires[0]).lower()


def test_an_error_answer_to_head_has_no_body() -> None:
    # Found by the property test above: the error answer to a HEAD request whose body never
    # came carried a body, which h11 refused to send: the handler raised instead of answering.
    served = serve(b"HEAD / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n", [])
    assert served.answer.startswith(b"HTTP/1.1 400 ")
    assert served.answer.endswith(b"\r\n\r\n")  # the head only


def test_a_host_with_a_control_character_is_refused() -> None:
    # Found by the property test above: h11 lets \x01 through in a field value, and the
    # Host went into X-Forwarded-Host, where the proxy's own check raised.
    served = serve(b"GET / HTTP/1.1\r\nHost:\x01 example.test\r\n\r\n", [])
    assert served.answer.startswith(b"HTTP/1.1 400 ")
    assert not any(served.upstream_wires)


def test_content_length_with_transfer_encoding_is_refused_not_forwarded() -> None:
    smuggle = (
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nGET /admin HTTP/1.1\r\nHost: a\r\n\r\n"
    )
    served = serve(smuggle, [])
    assert served.answer.startswith(b"HTTP/1.1 400 ")
    assert not any(served.upstream_wires)


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
