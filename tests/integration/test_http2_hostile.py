"""Hostile HTTP/2 input (RFC 9113), sent frame by frame with hand-made frames: each case
is answered with GOAWAY or RST_STREAM, logged with its kind, and nothing reaches the
upstream. One proxy serves the whole module; each case breaks only its own connection."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import trustme
from hyperframe.frame import (
    Frame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
)

from tests.support import HSM, ProxyProcess, RecordingUpstream, StartedProxies, start_upstream
from tests.support.h2raw import (
    CANCEL,
    ENHANCE_YOUR_CALM,
    PROTOCOL_ERROR,
    RawH2,
    request,
)

MAX_RESETS = 50
MAX_CONTROL = 50
MAX_STREAMS = 4


@dataclass
class Setup:
    proxy: ProxyProcess
    upstream: RecordingUpstream
    ca: trustme.CA

    def connect(self, settings: dict[int, int] | None = None) -> RawH2:
        return RawH2(self.proxy.port, self.ca, settings)

    def logged(self, kind: str) -> None:
        self.proxy.wait_for_log(
            lambda entry: entry.get("event") == "http2_protocol_error" and entry["kind"] == kind
        )


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, hsm: HSM, ca: trustme.CA) -> Iterator[Setup]:
    upstream = start_upstream()
    proxies = StartedProxies(tmp_path_factory.mktemp("h2-hostile"), hsm, ca)
    proxy = proxies.start(
        upstream.url,
        extra=(
            "\n[http]\nbody_timeout = 1.0\n"
            f"[http2]\nmax_resets = {MAX_RESETS}\nmax_control_frames = {MAX_CONTROL}\n"
            f"max_concurrent_streams = {MAX_STREAMS}\n"
        ),
    )
    try:
        yield Setup(proxy, upstream, ca)
    finally:
        proxies.stop_all()
        upstream.stop()


Frames = Callable[[RawH2], list[Frame | bytes]]


def _with(*extra: tuple[bytes, bytes]) -> Frames:
    return lambda client: [client.headers(1, [*request("/hostile"), *extra])]


def _block(headers: list[tuple[bytes, bytes]]) -> Frames:
    return lambda client: [client.headers(1, headers)]


def _hpack_bomb(client: RawH2) -> list[Frame | bytes]:
    # One 2 KiB field into the HPACK table, then the same field by its index 39 times:
    # about 2 KiB on the wire, 80 KiB decoded (the proxy announces 32 KiB).
    return [client.headers(1, [*request("/bomb"), *[(b"x-bomb", b"a" * 2000)] * 40])]


def _continuation_flood(client: RawH2) -> list[Frame | bytes]:
    first = client.headers(1, request("/flood"), end_headers=False)
    return [first, *(client.continuation(1, b"") for _ in range(100))]


def _content_length_over(client: RawH2) -> list[Frame | bytes]:
    head = client.headers(1, [*request("/cl", "POST"), (b"content-length", b"10")], False)
    return [head, client.data(1, b"x" * 20, end_stream=True)]


def _content_length_under(client: RawH2) -> list[Frame | bytes]:
    head = client.headers(1, [*request("/cl", "POST"), (b"content-length", b"10")], False)
    return [head, client.data(1, b"x" * 5, end_stream=True)]


def _rapid_reset(client: RawH2) -> list[Frame | bytes]:
    frames: list[Frame | bytes] = []
    for number in range(MAX_RESETS + 20):
        stream_id = 1 + 2 * number
        frames += [client.headers(stream_id, request(f"/reset/{number}")), client.reset(stream_id)]
    return frames


def _settings_flood(client: RawH2) -> list[Frame | bytes]:
    return [SettingsFrame(0) for _ in range(MAX_CONTROL + 20)]


def _ping_flood(client: RawH2) -> list[Frame | bytes]:
    return [PingFrame(0, opaque_data=b"12345678") for _ in range(MAX_CONTROL + 20)]


def _too_many_streams(client: RawH2) -> list[Frame | bytes]:
    return [
        client.headers(1 + 2 * number, request("/open", "POST"), end_stream=False)
        for number in range(MAX_STREAMS + 1)
    ]


CASES: dict[str, tuple[Frames, int, str]] = {
    "uppercase-name": (_with((b"X-Upper", b"1")), PROTOCOL_ERROR, "uppercase_header"),
    "connection": (_with((b"connection", b"keep-alive")), PROTOCOL_ERROR, "connection_header"),
    "transfer-encoding": (
        _with((b"transfer-encoding", b"chunked")),
        PROTOCOL_ERROR,
        "connection_header",
    ),
    "te-not-trailers": (_with((b"te", b"gzip")), PROTOCOL_ERROR, "connection_header"),
    "pseudo-after-regular": (
        _block(
            [(b":method", b"GET"), (b"accept", b"*/*"), (b":path", b"/"), (b":scheme", b"https")]
        ),
        PROTOCOL_ERROR,
        "pseudo_header",
    ),
    "duplicate-path": (_with((b":path", b"/other")), PROTOCOL_ERROR, "pseudo_header"),
    "unknown-pseudo": (_with((b":protocol", b"websocket")), PROTOCOL_ERROR, "pseudo_header"),
    "missing-path": (
        _block([(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"localhost")]),
        PROTOCOL_ERROR,
        "pseudo_header",
    ),
    "authority-vs-host": (_with((b"host", b"elsewhere.test")), PROTOCOL_ERROR, "authority_host"),
    "crlf-in-value": (_with((b"x-a", b"1\r\nx-b: 2")), PROTOCOL_ERROR, "field_value"),
    "content-length-over": (_content_length_over, PROTOCOL_ERROR, "content_length"),
    "content-length-under": (_content_length_under, PROTOCOL_ERROR, "content_length"),
    "hpack-bomb": (_hpack_bomb, ENHANCE_YOUR_CALM, "header_list_size"),
    "continuation-flood": (_continuation_flood, PROTOCOL_ERROR, "continuation_flood"),
    "even-stream-id": (
        lambda client: [client.headers(2, request("/even"))],
        PROTOCOL_ERROR,
        "stream_id",
    ),
    "data-on-idle-stream": (
        lambda client: [client.data(7, b"x", end_stream=True)],
        PROTOCOL_ERROR,
        "protocol",
    ),
    "rapid-reset": (_rapid_reset, ENHANCE_YOUR_CALM, "rapid_reset"),
    "settings-flood": (_settings_flood, ENHANCE_YOUR_CALM, "control_flood"),
    "ping-flood": (_ping_flood, ENHANCE_YOUR_CALM, "control_flood"),
    "too-many-streams": (_too_many_streams, PROTOCOL_ERROR, "too_many_streams"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_input_gets_goaway_and_nothing_reaches_the_upstream(
    case: str, setup: Setup
) -> None:
    frames, code, kind = CASES[case]
    before = len(setup.upstream.requests)
    with setup.connect() as client:
        client.send(*frames(client))
        goaway = client.goaway()
        assert goaway.error_code == code
        assert client.next_frame() is None  # and the connection ends
    setup.logged(kind)
    assert setup.upstream.requests[before:] == []
    # The proxy serves the next client as ever.
    with setup.connect() as client:
        client.send(client.headers(1, request(f"/after/{case}")))
        head, _ = client.response(1)
        assert head[b":status"] == b"200"


def test_a_window_that_never_opens_resets_the_stream(setup: Setup) -> None:
    """The client announces a zero window and never opens it: after http.body_timeout the
    stream is reset (CANCEL) and its upstream connection not kept."""
    with setup.connect({SettingsFrame.INITIAL_WINDOW_SIZE: 0}) as client:
        client.send(client.headers(1, request("/zero-window")))
        reset = client.until(lambda frame: isinstance(frame, RstStreamFrame))
        assert isinstance(reset, RstStreamFrame)
        assert (reset.stream_id, reset.error_code) == (1, CANCEL)
        # The connection itself goes on.
        client.send(
            client.window_update(0, 1 << 20),
            SettingsFrame(0, settings={SettingsFrame.INITIAL_WINDOW_SIZE: 65535}),
        )
        client.send(client.headers(3, request("/zero-window/after")))
        head, _ = client.response(3)
        assert head[b":status"] == b"200"
    setup.logged("zero_window")
    assert [seen.path for seen in setup.upstream.requests[-2:]] == [
        "/zero-window",
        "/zero-window/after",
    ]


def test_a_reset_stream_is_not_answered_and_others_go_on(setup: Setup) -> None:
    """A client's RST_STREAM on a stream whose body is still coming ends that stream only."""
    with setup.connect() as client:
        client.send(client.headers(1, request("/upload", "POST"), end_stream=False))
        client.send(client.data(1, b"abc"), client.reset(1))
        client.send(client.headers(3, request("/next")))
        head, _ = client.response(3)
        assert head[b":status"] == b"200"
        assert 1 not in client.heads  # the reset stream got no answer
    assert setup.upstream.requests[-1].path == "/next"
