"""The HTTP/2 handler's pure parts: the [http] alpn and [http2] keys, the mapping of an
HTTP/2 request head to HTTP/1.1 fields, the flood guard and the names of h2's errors."""

from __future__ import annotations

import pytest
from h2.exceptions import DenialOfServiceError, InvalidBodyLengthError, ProtocolError

from proxy.config import HTTP2Config
from proxy.errors import ConfigError
from proxy.http2.guard import FloodGuard, error_kind
from proxy.http2.messages import Malformed, request_head
from tests.support.configs import minimal_config

config = minimal_config


def test_alpn_offers_h2_then_http11_by_default_and_can_turn_http2_off() -> None:
    assert config("").alpn_offer() == ((b"h2", b"http/1.1"), False)
    off = config('[http]\nalpn = ["http/1.1"]\n')
    assert off.alpn_offer() == ((b"http/1.1",), False)
    assert config('[http]\nalpn = ["http/1.1", "h2"]\n').http.alpn == ("http/1.1", "h2")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('[http]\nalpn = ["spdy/3"]\n', "http.alpn: lists the HTTP protocols"),
        ("[http]\nalpn = []\n", "http.alpn: lists the HTTP protocols"),
        ('[http]\nalpn = ["h2", "h2"]\n', "listed twice"),
        ("[http2]\nmax_concurrent_streams = 0\n", "http2.max_concurrent_streams: must be from 1"),
        ("[http2]\ninitial_window_size = 2147483648\n", "http2.initial_window_size"),
        ("[http2]\nflood_window = 0\n", "http2.flood_window"),
        ("[http2]\nmax_streams = 3\n", "max_streams"),
    ],
)
def test_bad_http2_settings_name_the_key(extra: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config(extra)


def test_http2_settings_are_read() -> None:
    loaded = config(
        "[http2]\nmax_concurrent_streams = 16\nmax_resets = 5\nflood_window = 2\n"
        "initial_window_size = 131072\nconnection_window_size = 4194304\n"
        "max_control_frames = 50\n"
    )
    assert loaded.http2 == HTTP2Config(16, 131072, 4194304, 5, 50, 2.0)
    assert config("").http2 == HTTP2Config()


def test_authority_becomes_host_and_cookies_are_joined() -> None:
    head = request_head(
        [
            (b":method", b"GET"),
            (b":scheme", b"https"),
            (b":authority", b"example.test:8443"),
            (b":path", b"/a?b=c"),
            (b"cookie", b"a=1"),
            (b"accept", b"*/*"),
            (b"cookie", b"b=2"),
        ]
    )
    assert (head.method, head.target, head.authority) == (b"GET", b"/a?b=c", b"example.test:8443")
    assert head.fields == [
        (b"host", b"example.test:8443"),
        (b"accept", b"*/*"),
        (b"cookie", b"a=1; b=2"),
    ]


def test_a_host_field_is_kept_once_beside_the_same_authority() -> None:
    head = request_head(
        [(b":method", b"GET"), (b":authority", b"a.test"), (b":path", b"/"), (b"host", b"a.test")]
    )
    assert head.fields == [(b"host", b"a.test")]


@pytest.mark.parametrize(
    "headers",
    [
        [(b":method", b"GET"), (b":authority", b"user@a.test"), (b":path", b"/")],
        [(b":method", b"GET"), (b":authority", b"a.test")],
        [(b":authority", b"a.test"), (b":path", b"/")],
    ],
    ids=["userinfo", "no-path", "no-method"],
)
def test_malformed_heads_are_refused(headers: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(Malformed):
        request_head(headers)


def test_expect_continue_is_noted() -> None:
    head = request_head(
        [(b":method", b"PUT"), (b":path", b"/"), (b"expect", b"100-Continue"), (b"host", b"a")]
    )
    assert head.expect_continue


def test_flood_guard_counts_per_window() -> None:
    now = [0.0]
    guard = FloodGuard(
        HTTP2Config(max_resets=3, max_control_frames=2, flood_window=10.0), lambda: now[0]
    )
    assert [guard.reset_received() for _ in range(4)] == [False, False, False, True]
    assert [guard.control_frame() for _ in range(3)] == [False, False, True]
    now[0] = 10.0  # a new window starts from zero
    assert not guard.reset_received()
    assert not guard.control_frame()


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (DenialOfServiceError("Oversized header block"), "header_list_size"),
        (InvalidBodyLengthError(5, 3), "content_length"),
        (ProtocolError("Received uppercase header name b'Foo'."), "uppercase_header"),
        (
            ProtocolError("Connection-specific header field present: b'connection'."),
            "connection_header",
        ),
        (ProtocolError("Received duplicate pseudo-header field b':path'"), "pseudo_header"),
        (
            ProtocolError("Request header block has mismatched :authority and Host headers"),
            "authority_host",
        ),
        (ProtocolError("Too many continuation frames received."), "continuation_flood"),
        (ProtocolError("something else"), "protocol"),
    ],
)
def test_h2_errors_get_a_kind(error: ProtocolError, kind: str) -> None:
    assert error_kind(error) == kind


def test_metrics_per_protocol_and_http2_counters() -> None:
    from prometheus_client import generate_latest

    from proxy.ops.admin import Metrics

    metrics = Metrics()
    metrics.request_answered(200)  # HTTP/1.1, as the HTTP/1.1 handler calls it
    metrics.request_answered(404, "h2")
    metrics.http2_reset(sent=True)
    metrics.http2_reset(sent=False)
    metrics.http2_reset(sent=False)
    metrics.http2_protocol_error("rapid_reset")
    metrics.http2_streams_active.inc()
    text = generate_latest(metrics.registry).decode()
    assert 'hsm_proxy_requests_total{status_class="2xx"} 1.0' in text  # the old name stays
    assert 'hsm_proxy_requests_total{status_class="4xx"} 1.0' in text
    assert 'hsm_proxy_protocol_requests_total{protocol="http/1.1"} 1.0' in text
    assert 'hsm_proxy_protocol_requests_total{protocol="h2"} 1.0' in text
    assert 'hsm_proxy_http2_resets_total{direction="sent"} 1.0' in text
    assert 'hsm_proxy_http2_resets_total{direction="received"} 2.0' in text
    assert 'hsm_proxy_http2_protocol_errors_total{kind="rapid_reset"} 1.0' in text
    assert "hsm_proxy_http2_streams_active 1.0" in text
