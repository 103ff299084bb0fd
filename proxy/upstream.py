"""Connections to upstream backends: plaintext HTTP/1.1 over TCP, driven by h11.

Theory of operation. An :class:`UpstreamConnection` is one TCP stream to a backend and the
``h11.Connection(CLIENT)`` that speaks on it. It can carry several requests in turn while
both sides keep it alive (``reusable``). Connect and read timeouts turn into
:class:`UpstreamError` with a ``status`` the server sends to the client: 502 when the
backend cannot be reached or breaks the protocol, 504 when it is too slow.

This module and server.py are the only ones that await on sockets.
"""

from __future__ import annotations

import h11
import trio

from proxy.config import UpstreamConfig
from proxy.errors import UpstreamError

_RECEIVE_SIZE = 65536


class UpstreamFailure(UpstreamError):
    """An upstream error with the HTTP status the client should get for it."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class UpstreamConnection:
    """One keep-alive capable HTTP/1.1 connection to an upstream."""

    def __init__(self, config: UpstreamConfig, stream: trio.SocketStream) -> None:
        self.config = config
        self._stream = stream
        self._h11 = h11.Connection(h11.CLIENT)
        self.bytes_received = 0

    @classmethod
    async def connect(cls, config: UpstreamConfig) -> UpstreamConnection:
        try:
            with trio.fail_after(config.connect_timeout):
                stream = await trio.open_tcp_stream(config.host, config.port)
        except trio.TooSlowError:
            raise UpstreamFailure(
                f"connecting to upstream {config} timed out after {config.connect_timeout:g}s", 504
            ) from None
        except OSError as exc:
            raise UpstreamFailure(
                f"cannot connect to upstream {config}: {exc.strerror or exc}", 502
            ) from None
        return cls(config, stream)

    @property
    def reusable(self) -> bool:
        return self._h11.our_state is h11.IDLE and self._h11.their_state is h11.IDLE

    async def send(self, event: h11.Event) -> None:
        data = self._h11.send(event)
        if data:
            try:
                await self._stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise UpstreamFailure(f"upstream {self.config} closed the connection", 502) from exc

    async def next_event(self) -> h11.Event:
        """The next event from the upstream, reading as needed, within the read timeout."""
        while True:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise UpstreamFailure(
                    f"upstream {self.config} broke HTTP/1.1: {exc}", 502
                ) from None
            if event is not h11.NEED_DATA:
                return event  # type: ignore[return-value]
            try:
                with trio.fail_after(self.config.read_timeout):
                    data = await self._stream.receive_some(_RECEIVE_SIZE)
            except trio.TooSlowError:
                raise UpstreamFailure(
                    f"upstream {self.config} sent nothing for {self.config.read_timeout:g}s", 504
                ) from None
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise UpstreamFailure(f"upstream {self.config} reset the connection", 502) from exc
            self.bytes_received += len(data)
            self._h11.receive_data(data)

    def start_next_cycle(self) -> None:
        self._h11.start_next_cycle()

    async def aclose(self) -> None:
        await self._stream.aclose()
