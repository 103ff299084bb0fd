"""A hand-driven HTTP/2 client for hostile-input tests: frames made with hyperframe, header
blocks with hpack, no validation of what it sends, over a real TLS connection (ALPN h2)."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable, Iterable

import trustme
from hpack import Decoder, Encoder
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from tests.support import client_context

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# RFC 9113, section 7
NO_ERROR, PROTOCOL_ERROR, CANCEL, ENHANCE_YOUR_CALM = 0x0, 0x1, 0x8, 0xB
REFUSED_STREAM = 0x7


def request(
    path: str = "/", method: str = "GET", authority: str = "localhost"
) -> list[tuple[bytes, bytes]]:
    return [
        (b":method", method.encode()),
        (b":scheme", b"https"),
        (b":authority", authority.encode()),
        (b":path", path.encode()),
    ]


class RawH2:
    """One HTTP/2 connection to the proxy; the test says every frame it sends."""

    def __init__(self, port: int, ca: trustme.CA, settings: dict[int, int] | None = None) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=20)
        self.tls: ssl.SSLSocket = client_context(ca, alpn=["h2"]).wrap_socket(
            raw, server_hostname="localhost"
        )
        assert self.tls.selected_alpn_protocol() == "h2"
        self.encoder = Encoder()
        self.decoder = Decoder()
        self._buffer = b""
        self.closed = False
        self.heads: dict[int, list[dict[bytes, bytes]]] = {}  # decoded HEADERS per stream
        hello = SettingsFrame(0)
        hello.settings.update(settings or {})
        self.tls.sendall(PREFACE + hello.serialize())

    def close(self) -> None:
        self.tls.close()

    def __enter__(self) -> RawH2:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def send(self, *frames: Frame | bytes) -> None:
        """All ``frames`` in one write (one TLS record when small)."""
        self.tls.sendall(
            b"".join(frame if isinstance(frame, bytes) else frame.serialize() for frame in frames)
        )

    def block(self, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
        return self.encoder.encode(list(headers), huffman=False)

    def headers(
        self,
        stream_id: int,
        headers: Iterable[tuple[bytes, bytes]],
        end_stream: bool = True,
        end_headers: bool = True,
    ) -> HeadersFrame:
        frame = HeadersFrame(stream_id)
        frame.data = self.block(headers)
        if end_stream:
            frame.flags.add("END_STREAM")
        if end_headers:
            frame.flags.add("END_HEADERS")
        return frame

    @staticmethod
    def data(stream_id: int, data: bytes, end_stream: bool = False) -> DataFrame:
        frame = DataFrame(stream_id)
        frame.data = data
        if end_stream:
            frame.flags.add("END_STREAM")
        return frame

    @staticmethod
    def continuation(stream_id: int, data: bytes, end_headers: bool = False) -> ContinuationFrame:
        frame = ContinuationFrame(stream_id)
        frame.data = data
        if end_headers:
            frame.flags.add("END_HEADERS")
        return frame

    @staticmethod
    def reset(stream_id: int, code: int = CANCEL) -> RstStreamFrame:
        return RstStreamFrame(stream_id, error_code=code)

    @staticmethod
    def window_update(stream_id: int, increment: int) -> WindowUpdateFrame:
        return WindowUpdateFrame(stream_id, window_increment=increment)

    def next_frame(self) -> Frame | None:
        """The next frame from the proxy; None when it closed the connection."""
        while True:
            if len(self._buffer) >= 9:
                frame, length = Frame.parse_frame_header(memoryview(self._buffer[:9]))
                if len(self._buffer) >= 9 + length:
                    frame.parse_body(memoryview(self._buffer[9 : 9 + length]))
                    self._buffer = self._buffer[9 + length :]
                    if isinstance(frame, SettingsFrame) and "ACK" not in frame.flags:
                        self.send(SettingsFrame(0, flags=["ACK"]))
                    if isinstance(frame, HeadersFrame):
                        # Every block, read or skipped, updates the HPACK table.
                        decoded = self.decoder.decode(frame.data, raw=True)
                        self.heads.setdefault(frame.stream_id, []).append(dict(decoded))
                    return frame
            try:
                data = self.tls.recv(65536)
            except (ConnectionResetError, ssl.SSLError):
                data = b""
            if not data:
                self.closed = True
                return None
            self._buffer += data

    def until(self, wanted: Callable[[Frame], bool]) -> Frame | None:
        """Frames until one is ``wanted``; None if the connection ends first."""
        while (frame := self.next_frame()) is not None:
            if wanted(frame):
                return frame
        return None

    def goaway(self) -> GoAwayFrame:
        frame = self.until(lambda frame: isinstance(frame, GoAwayFrame))
        assert isinstance(frame, GoAwayFrame), "the connection ended without GOAWAY"
        return frame

    def response(self, stream_id: int) -> tuple[dict[bytes, bytes], bytes]:
        """The response on ``stream_id``: its head and whole body (the test's windows
        must allow it)."""
        head: dict[bytes, bytes] = {}
        body = b""
        while True:
            frame = self.next_frame()
            assert frame is not None, "the connection ended before the response did"
            if frame.stream_id != stream_id:
                continue
            if isinstance(frame, HeadersFrame):
                head.update(self.heads[stream_id][-1])
            elif isinstance(frame, DataFrame):
                body += frame.data
            elif isinstance(frame, RstStreamFrame):
                raise AssertionError(f"stream reset with code {frame.error_code}")
            if "END_STREAM" in frame.flags:
                return head, body
