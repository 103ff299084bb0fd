"""Flood caps and the names of HTTP/2 protocol errors, sans-IO.

Theory of operation. A client can make a server work without ever sending a request the
server could refuse: reset every stream it opens (rapid reset, CVE-2023-44487), or send
PING and SETTINGS frames that each must be answered. :class:`FloodGuard` counts those per
connection in windows of ``flood_window`` seconds; past ``max_resets`` resets received or
``max_control_frames`` PING and SETTINGS frames in one window, the handler ends the
connection with GOAWAY(ENHANCE_YOUR_CALM). The other floods are h2's to stop: a header
block larger than the SETTINGS_MAX_HEADER_LIST_SIZE we announce (HPACK bombs: h2 stops
decoding at the limit), more than 64 CONTINUATION frames for one block, more streams than
SETTINGS_MAX_CONCURRENT_STREAMS.

:func:`error_kind` names an h2 protocol error for logs and the
``hsm_proxy_http2_protocol_errors`` metric, from its type and h2's message.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from h2.exceptions import (
    DenialOfServiceError,
    FlowControlError,
    FrameTooLargeError,
    InvalidBodyLengthError,
    ProtocolError,
    TooManyStreamsError,
)

from proxy.config import HTTP2Config


class FloodGuard:
    """Resets and control frames received on one connection, per window."""

    __slots__ = ("_clock", "_control", "_limits", "_resets", "_started")

    def __init__(self, limits: HTTP2Config, clock: Callable[[], float] = time.monotonic) -> None:
        self._limits = limits
        self._clock = clock
        self._started = clock()
        self._resets = 0
        self._control = 0

    def _roll(self) -> None:
        now = self._clock()
        if now - self._started >= self._limits.flood_window:
            self._started = now
            self._resets = self._control = 0

    def reset_received(self) -> bool:
        """Count a RST_STREAM from the client; True when past the cap."""
        self._roll()
        self._resets += 1
        return self._resets > self._limits.max_resets

    def control_frame(self) -> bool:
        """Count a PING or SETTINGS frame from the client; True when past the cap."""
        self._roll()
        self._control += 1
        return self._control > self._limits.max_control_frames


# h2's messages, as of h2 4.x, for the errors that have no type of their own.
_MESSAGES = (
    ("uppercase header name", "uppercase_header"),
    ("connection-specific header", "connection_header"),
    ("pseudo-header", "pseudo_header"),
    ("pseudo header", "pseudo_header"),
    ("mandatory", "pseudo_header"),
    (":path", "pseudo_header"),
    ("mismatched :authority", "authority_host"),
    ("multiple host", "authority_host"),
    ("illegal character", "field_value"),
    ("whitespace", "field_value"),
    ("te header", "connection_header"),
    ("continuation", "continuation_flood"),
    ("header block", "header_block"),
    ("stream id", "stream_id"),
    ("stream_id", "stream_id"),
    ("streams", "stream_id"),
)


def error_kind(error: ProtocolError) -> str:
    """A short name for what the client did wrong."""
    if isinstance(error, DenialOfServiceError):
        return "header_list_size"
    if isinstance(error, InvalidBodyLengthError):
        return "content_length"
    if isinstance(error, TooManyStreamsError):
        return "too_many_streams"
    if isinstance(error, FlowControlError):
        return "flow_control"
    if isinstance(error, FrameTooLargeError):
        return "frame_size"
    message = str(error).lower()
    for fragment, kind in _MESSAGES:
        if fragment in message:
            return kind
    return "protocol"
