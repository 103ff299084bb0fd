"""The HTTP/2 protocol handler: many streams on one client connection, each forwarded as
one HTTP/1.1 request.

Theory of operation. The pipeline (net/pipeline.py) picks :class:`HTTP2Handler` when ALPN
settled on ``h2``. One ``h2.connection.H2Connection`` (sans-IO, like h11) holds the
connection's state; around it run three kinds of trio task:

* the **reader** receives TLS bytes, feeds h2, and acts on its events at once and without
  waiting: a new stream gets a task, request body bytes are queued on their stream, a
  RST_STREAM cancels its stream's task, WINDOW_UPDATEs wake the streams waiting for
  window, PING and SETTINGS are answered by h2 and counted (guard.py);
* the **writer** is the only task that sends: whatever h2 produced is queued by whoever
  produced it and sent in one batch, so frames of many streams leave in one TLS write;
* one **stream task** per request: messages.py maps the HTTP/2 head to HTTP/1.1 fields,
  http/gateway.py applies the forwarding rules, routing, limits and pools of the HTTP/1.1
  handler and carries the exchange; the response goes back as HEADERS, DATA and, when the
  upstream sent chunked trailers, a trailing HEADERS frame.

Flow control and backpressure, both ways. A request body is acknowledged to h2 (which then
sends WINDOW_UPDATE) only once the upstream took it, so a slow upstream stops the client
after one stream window (``http2.initial_window_size``) per stream and one connection
window (``http2.connection_window_size``) in all. A response is sent only as the client's
windows allow; while a stream waits for window, the upstream is not read (TCP stops it).
A window that stays shut for ``http.body_timeout`` resets the stream. The writer's queue is
bounded: past :data:`_HIGH_WATER` bytes, stream tasks wait for it to drain.

Hostile input (RFC 9113) is refused before anything reaches an upstream: h2 rejects
malformed header blocks (uppercase or connection-specific fields, pseudo-header misuse,
:authority and Host that differ), DATA that disagrees with content-length, oversized
header lists (we announce ``http.max_header_bytes`` and h2's decoder stops there),
CONTINUATION floods and stream id misuse with GOAWAY; guard.py caps resets (rapid reset,
CVE-2023-44487) and PING/SETTINGS floods. Each is logged (``event=http2_protocol_error``)
and counted by kind.

Shutdown: when the server drains, a GOAWAY naming the last stream taken goes out, later
streams are refused (REFUSED_STREAM), the taken ones finish, then the final GOAWAY and the
close. (h2 considers a connection closed once it sent GOAWAY, so the first one is written
by hand.) A connection without streams closes after ``http.idle_timeout`` (the first
request must come within ``http.header_timeout``).
"""

from __future__ import annotations

import math
import time

import trio
from h2.config import H2Configuration
from h2.connection import ConnectionState, H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    PingReceived,
    RemoteSettingsChanged,
    RequestReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
    WindowUpdated,
)
from h2.exceptions import ProtocolError, StreamClosedError
from h2.settings import SettingCodes, Settings
from hyperframe.frame import GoAwayFrame

from proxy.config import HTTP2Config, HTTPConfig
from proxy.http.gateway import Field, Refused, UpstreamCall, prepare
from proxy.http.rules import REASONS, ClientInfo
from proxy.http.upstream import Routing, UpstreamFailure, UpstreamPools
from proxy.http2.guard import FloodGuard, error_kind
from proxy.http2.messages import Malformed, RequestHead, request_head
from proxy.net.pipeline import Client, ServerState
from proxy.ops.admin import Metrics
from proxy.ops.logs import access_log, connection_context, info_line, log
from proxy.tls.stream import CloseMode

_RECEIVE_SIZE = 65536
# Bytes queued for the client beyond which stream tasks wait for the writer.
_HIGH_WATER = 256 * 1024


class HTTP2Handler:
    """HTTP/2 to clients, forwarded to HTTP/1.1 upstreams through the shared pools."""

    def __init__(self, pools: UpstreamPools) -> None:
        self._pools = pools

    def sweep(self) -> None:
        """The pools are shared with the HTTP/1.1 handler, which sweeps them."""

    def close(self) -> None:
        """The pools are shared with the HTTP/1.1 handler, which closes them."""

    async def serve(self, client: Client) -> CloseMode:
        config = client.generation.config
        connection = _Connection(client, self._pools.routing(config))
        return await connection.run()


class _StreamGone(Exception):
    """The stream was reset or the connection closed: nothing more can be sent on it."""


class _Stalled(Exception):
    """The client's flow-control window stayed shut for ``http.body_timeout``."""


class _Stream:
    """One request stream, as the reader and its task share it."""

    __slots__ = (
        "bodiless",
        "body",
        "ended",
        "headers",
        "id",
        "reading",
        "reset",
        "response_started",
        "scope",
        "trailers",
        "wake",
        "window",
    )

    def __init__(self, stream_id: int, headers: list[Field], ended: bool) -> None:
        self.id = stream_id
        self.headers = headers
        self.ended = ended
        self.bodiless = ended  # END_STREAM on the HEADERS frame: no body at all
        self.body: list[tuple[bytes, int]] = []  # (data, flow-controlled length)
        self.trailers: list[Field] | None = None
        self.wake: trio.Event | None = None  # body bytes or the end arrived
        self.window: trio.Event | None = None  # the client opened its window
        self.scope = trio.CancelScope()
        self.reading = True  # the task still wants the request body
        self.reset = False  # the client reset it
        self.response_started = False

    def poke(self) -> None:
        if self.wake is not None:
            self.wake.set()
            self.wake = None


class _Connection:
    """One client connection speaking HTTP/2."""

    def __init__(self, client: Client, routing: Routing) -> None:
        config = client.generation.config
        self.client = client
        self.stream = client.stream
        self.state: ServerState = client.server
        self.metrics: Metrics = client.server.metrics
        self.http: HTTPConfig = config.http
        self.limits: HTTP2Config = config.http2
        self.routing = routing
        self.default_upstream = client.generation.upstream_serving(client.tls.context).name
        self.info = ClientInfo(
            client.address,
            client.tls.server_name,
            identity=client.tls.client_identity,
            client_auth=client.tls.client_auth,
            forwarded=config.http.forwarded,
        )
        self.guard = FloodGuard(self.limits)
        self.h2 = H2Connection(
            H2Configuration(
                client_side=False,
                header_encoding=None,
                validate_inbound_headers=True,
                normalize_inbound_headers=False,  # messages.py joins cookies
                # gateway.py hands over lowercase end-to-end fields that h11 validated
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
            )
        )
        self.h2.local_settings = Settings(
            client=False,
            initial_values={
                SettingCodes.MAX_CONCURRENT_STREAMS: self.limits.max_concurrent_streams,
                SettingCodes.MAX_HEADER_LIST_SIZE: self.http.max_header_bytes,
                SettingCodes.INITIAL_WINDOW_SIZE: self.limits.initial_window_size,
            },
        )
        self.h2.decoder.max_header_list_size = self.http.max_header_bytes
        self.streams: dict[int, _Stream] = {}
        self.nursery: trio.Nursery | None = None
        # What the writer sends next, and how many bytes that is.
        self.out: list[bytes] = []
        self.out_size = 0
        self.wake_writer = trio.Event()
        self.room: trio.Event | None = None
        self.closing = False
        self.broken = False
        self.goaway_sent = False
        self.read_scope: trio.CancelScope | None = None
        self.last_stream: int | None = None  # set by the first GOAWAY of a drain
        self.window_waiters: set[_Stream] = set()

    # -- output ---------------------------------------------------------------------------

    def close_connection(self, code: ErrorCodes) -> None:
        """The final GOAWAY (h2 sends nothing after it)."""
        self.h2.close_connection(code)
        self.goaway_sent = True
        self.flush()

    def flush(self) -> None:
        """Queue what h2 produced for the writer (no I/O)."""
        data = self.h2.data_to_send()
        if data:
            self.out.append(data)
            self.out_size += len(data)
            self.wake_writer.set()

    def queue_raw(self, data: bytes) -> None:
        self.flush()  # keep frames in the order they were made
        self.out.append(data)
        self.out_size += len(data)
        self.wake_writer.set()

    async def writer(self) -> None:
        try:
            while True:
                if not self.out:
                    if self.closing:
                        return
                    await self.wake_writer.wait()
                    self.wake_writer = trio.Event()
                    continue
                data = self.out[0] if len(self.out) == 1 else b"".join(self.out)
                self.out.clear()
                await self.stream.send_all(data)
                self.out_size -= len(data)
                if self.room is not None and self.out_size <= _HIGH_WATER:
                    self.room.set()
                    self.room = None
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
            self.broken = True
            assert self.nursery is not None
            self.nursery.cancel_scope.cancel()

    async def room_to_send(self) -> None:
        while self.out_size > _HIGH_WATER:
            if self.room is None:
                self.room = trio.Event()
            await self.room.wait()

    # -- the connection -------------------------------------------------------------------

    async def run(self) -> CloseMode:
        h2 = self.h2
        h2.initiate_connection()
        extra = self.limits.connection_window_size - 65535
        if extra > 0:
            h2.increment_flow_control_window(extra)
        self.flush()
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            nursery.start_soon(self.writer)
            try:
                await self.reader()
            finally:
                for stream in self.streams.values():
                    stream.scope.cancel()
                self.closing = True
                self.wake_writer.set()
        if self.broken:
            return CloseMode.ABORT
        # When the proxy ended the connection (GOAWAY), linger: a client still sending (a
        # SETTINGS ACK, a request racing the GOAWAY) reads the GOAWAY instead of a reset.
        return CloseMode.LINGER if self.goaway_sent else CloseMode.CLOSE_NOTIFY

    async def reader(self) -> None:
        state = self.state
        first = True
        while True:
            if state.draining and self.last_stream is None:
                self.announce_drain()
            if self.last_stream is not None and not self.streams:
                self.close_connection(ErrorCodes.NO_ERROR)
                return
            idle = not self.streams
            deadline = math.inf
            if idle:
                wait = self.http.header_timeout if first else self.http.idle_timeout
                deadline = trio.current_time() + wait
            with trio.CancelScope(deadline=deadline) as scope:
                self.read_scope = scope
                state.idle_scopes.add(scope)
                try:
                    data = await self.stream.receive_some(_RECEIVE_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                finally:
                    state.idle_scopes.discard(scope)
                    self.read_scope = None
            if scope.cancelled_caught:
                if idle and not state.draining and trio.current_time() >= deadline:
                    self.close_connection(ErrorCodes.NO_ERROR)  # idle too long
                    return
                continue  # draining, or the last stream of a drain finished
            if not data:
                return  # the client closed the connection
            first = False
            try:
                events = self.h2.receive_data(data)
            except ProtocolError as exc:
                self.protocol_error(error_kind(exc), str(exc))
                self.goaway_sent = True  # h2 queued its GOAWAY
                self.flush()
                return
            for event in events:
                if not self.dispatch(event):
                    self.flush()
                    return
            self.flush()

    def protocol_error(self, kind: str, detail: str, stream_id: int | None = None) -> None:
        self.metrics.http2_protocol_error(kind)
        fields: dict[str, object] = {"event": "http2_protocol_error", "kind": kind}
        fields.update(connection_context.get() or {})
        if stream_id is not None:
            fields["stream_id"] = stream_id
        log.warning(f"HTTP/2 client refused ({kind}): {detail}", extra={"fields": fields})

    def calm_down(self, kind: str, detail: str) -> bool:
        self.protocol_error(kind, detail)
        self.close_connection(ErrorCodes.ENHANCE_YOUR_CALM)
        return False

    def announce_drain(self) -> None:
        """The first GOAWAY of a graceful close: no stream after the last one taken."""
        self.last_stream = self.h2.highest_inbound_stream_id
        frame = GoAwayFrame(0)
        frame.last_stream_id = self.last_stream
        frame.error_code = ErrorCodes.NO_ERROR
        self.queue_raw(frame.serialize())

    def dispatch(self, event: object) -> bool:
        """Act on one h2 event; False ends the connection (GOAWAY queued)."""
        kind = type(event)
        if kind is RequestReceived:
            assert isinstance(event, RequestReceived)
            self.open_stream(event)
        elif kind is DataReceived:
            assert isinstance(event, DataReceived)
            stream = self.streams.get(event.stream_id)  # type: ignore[arg-type]
            if stream is None or not stream.reading:
                self.h2.acknowledge_received_data(
                    event.flow_controlled_length,  # type: ignore[arg-type]
                    event.stream_id,  # type: ignore[arg-type]
                )
            else:
                stream.body.append((event.data, event.flow_controlled_length))  # type: ignore[arg-type]
                stream.poke()
        elif kind is StreamEnded:
            stream = self.streams.get(event.stream_id)  # type: ignore[attr-defined]
            if stream is not None:
                stream.ended = True
                stream.poke()
        elif kind is WindowUpdated:
            assert isinstance(event, WindowUpdated)
            self.window_opened(event.stream_id or 0)
        elif kind is TrailersReceived:
            assert isinstance(event, TrailersReceived)
            stream = self.streams.get(event.stream_id)  # type: ignore[arg-type]
            if stream is not None:
                stream.trailers = list(event.headers or [])  # type: ignore[arg-type]
        elif kind is StreamReset:
            assert isinstance(event, StreamReset)
            self.metrics.http2_reset(sent=False)
            stream = self.streams.get(event.stream_id)  # type: ignore[arg-type]
            if stream is not None:
                stream.reset = True
                stream.scope.cancel()
            if self.guard.reset_received():
                return self.calm_down("rapid_reset", "too many streams reset by the client")
        elif kind is PingReceived:
            if self.guard.control_frame():
                return self.calm_down("control_flood", "too many PING and SETTINGS frames")
        elif kind is RemoteSettingsChanged:
            if self.guard.control_frame():
                return self.calm_down("control_flood", "too many PING and SETTINGS frames")
            self.window_opened(0)  # a new initial window size changes every stream's window
        elif kind is ConnectionTerminated:
            assert isinstance(event, ConnectionTerminated)
            if event.error_code != ErrorCodes.NO_ERROR:
                return False  # the client gave up on the connection: so do we
            if not self.streams:
                self.close_connection(ErrorCodes.NO_ERROR)  # GOAWAY for GOAWAY, then close
                return False
            # A client's graceful GOAWAY (h2load at the end of its run, a browser leaving):
            # RFC 9113, 6.8 lets the streams it opened finish. h2 takes any GOAWAY as the
            # end and would refuse to send their answers; reopen it, and take no new stream.
            self.h2.state_machine.state = ConnectionState.SERVER_OPEN
            if self.last_stream is None:
                self.last_stream = self.h2.highest_inbound_stream_id
        return True

    def window_opened(self, stream_id: int) -> None:
        if stream_id == 0:
            waiters = list(self.window_waiters)
        else:
            stream = self.streams.get(stream_id)
            waiters = [stream] if stream is not None and stream in self.window_waiters else []
        for stream in waiters:
            self.window_waiters.discard(stream)
            if stream.window is not None:
                stream.window.set()
                stream.window = None

    def open_stream(self, event: RequestReceived) -> None:
        stream_id = event.stream_id
        assert stream_id is not None
        if self.last_stream is not None and stream_id > self.last_stream:
            self.send_reset(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        stream = _Stream(stream_id, list(event.headers or []), event.stream_ended is not None)  # type: ignore[arg-type]
        self.streams[stream_id] = stream
        assert self.nursery is not None
        self.nursery.start_soon(self.serve_stream, stream)

    def send_reset(self, stream_id: int, code: ErrorCodes) -> None:
        try:
            self.h2.reset_stream(stream_id, code)
        except ProtocolError:
            return  # already closed, or the connection is
        self.metrics.http2_reset(sent=True)
        self.flush()

    # -- one stream -----------------------------------------------------------------------

    async def serve_stream(self, stream: _Stream) -> None:
        metrics = self.metrics
        metrics.http2_streams_active.inc()
        started = time.perf_counter()
        log_fields: dict[str, object] = {"status": 499, "upstream": "-", "bytes_sent": 0}
        head: RequestHead | None = None
        try:
            with stream.scope:
                if stream.reset:
                    return  # reset before its task began: nothing was forwarded
                try:
                    head = request_head(stream.headers)
                except Malformed as exc:
                    self.protocol_error("pseudo_header", str(exc), stream.id)
                    self.send_reset(stream.id, ErrorCodes.PROTOCOL_ERROR)
                    log_fields["status"] = 400
                    return
                await self.forward(stream, head, log_fields)
        except _StreamGone:
            pass
        except Exception:
            # A bug serving one stream must not take the connection's other streams along.
            log.exception(
                "HTTP/2 stream failed unexpectedly", extra={"fields": {"stream_id": stream.id}}
            )
            log_fields["status"] = 500
            self.send_reset(stream.id, ErrorCodes.INTERNAL_ERROR)
        finally:
            stream.reading = False
            self.release_body(stream)
            self.window_waiters.discard(stream)
            del self.streams[stream.id]
            metrics.http2_streams_active.dec()
            status = log_fields["status"]
            assert isinstance(status, int)
            metrics.request_answered(status, "h2")
            self.access(stream, head, log_fields, started)
            if self.last_stream is not None and not self.streams and self.read_scope is not None:
                self.read_scope.cancel()  # the drain's last stream: let the reader close

    def release_body(self, stream: _Stream) -> None:
        """Give back the window of request body bytes that will never be forwarded."""
        if stream.body:
            size = sum(length for _, length in stream.body)
            stream.body.clear()
            try:
                self.h2.acknowledge_received_data(size, stream.id)
            except ProtocolError:
                return
            self.flush()

    def misdirected(self, head: RequestHead) -> bool:
        """A request for a name that another certificate serves (a client reusing this
        connection for it): 421, RFC 9110, 15.5.20."""
        if not self.client.generation.sites:
            return False
        host = head.authority or next((v for n, v in head.fields if n == b"host"), None)
        if not host:
            return False
        name = host.decode("ascii", "replace")
        name = name[1 : name.find("]")] if name.startswith("[") else name.rpartition(":")[0] or name
        generation = self.client.generation
        return generation.context_for_name(name) is not self.client.tls.context

    async def forward(
        self, stream: _Stream, head: RequestHead, log_fields: dict[str, object]
    ) -> None:
        if self.misdirected(head):
            await self.send_error(stream, 421, log_fields)
            return
        try:
            prepared = prepare(
                head.method,
                head.target,
                head.fields,
                has_body=not stream.bodiless,
                client=self.info,
                http=self.http,
                routing=self.routing,
                default_upstream=self.default_upstream,
            )
        except Refused as refused:
            await self.send_error(stream, refused.status, log_fields)
            return
        call = UpstreamCall(prepared)
        log_fields["upstream"] = call.where
        early = False
        try:
            try:
                await self.send_request(stream, head, call)
            except UpstreamFailure:
                # The upstream may have answered (413, 401 ...) and closed before it took
                # the whole body: relay its answer, as over HTTP/1.1; the rest is unwanted.
                answer = await call.early_response()
                if answer is None:
                    raise
                status, fields = answer
                early = True
                stream.reading = False
                self.release_body(stream)
            else:
                status, fields = await call.response()
            log_fields["status"] = status
            log_fields["upstream"] = call.where
            await self.relay_response(stream, call, status, fields, log_fields)
        except UpstreamFailure as failure:
            call.abort()
            log.warning(
                str(failure), extra={"fields": {"event": "upstream_error", "kind": failure.kind}}
            )
            self.metrics.upstream_failed(failure.kind)
            log_fields["upstream"] = call.where
            if stream.response_started:
                log_fields["status"] = log_fields.get("status") or failure.status
                self.send_reset(stream.id, ErrorCodes.INTERNAL_ERROR)
            else:
                await self.send_error(stream, failure.status, log_fields)
            return
        except Refused as refused:  # the body broke a limit (413) or stalled (408)
            call.abort()
            await self.send_error(stream, refused.status, log_fields)
            return
        except _Stalled:
            call.abort()
            self.protocol_error("zero_window", "the client kept its window shut", stream.id)
            self.send_reset(stream.id, ErrorCodes.CANCEL)
            return
        except BaseException:
            call.abort()  # reset by the client, or the connection ended
            raise
        if early:
            call.abort()  # the upstream closed it
            if not stream.ended:
                self.send_reset(stream.id, ErrorCodes.NO_ERROR)  # RFC 9113, 8.1
            return
        await call.release()

    async def send_request(self, stream: _Stream, head: RequestHead, call: UpstreamCall) -> None:
        """The head and the whole body to the upstream, acknowledging the body to the
        client only as the upstream takes it."""
        if stream.bodiless:
            await call.send_head(end=True)
            return
        if head.expect_continue and not stream.body and not stream.ended:
            self.send_headers(stream, [(b":status", b"100")], end=False, final=False)
        limit = self.http.max_body_bytes
        first = self.take_body(stream)
        received = len(first)
        if limit and received > limit:
            raise Refused(413, "request body too large")
        if stream.ended:  # the whole request is here: one write upstream
            stream.reading = False
            await call.send_head(first, end=True, trailers=stream.trailers)
            return
        await call.send_head(first)
        while not stream.ended or stream.body:
            if stream.body:
                data = self.take_body(stream)
                received += len(data)
                if limit and received > limit:
                    raise Refused(413, "request body too large")
                await call.send_body(data)
                continue
            stream.wake = trio.Event()
            with trio.move_on_after(self.http.body_timeout):
                await stream.wake.wait()
                continue
            raise Refused(408, "request body stalled")
        stream.reading = False
        await call.end(stream.trailers)

    def take_body(self, stream: _Stream) -> bytes:
        """The buffered request body bytes, acknowledged to h2 (their window reopens)."""
        if not stream.body:
            return b""
        chunks = stream.body
        stream.body = []
        size = sum(length for _, length in chunks)
        data = chunks[0][0] if len(chunks) == 1 else b"".join(chunk for chunk, _ in chunks)
        try:
            self.h2.acknowledge_received_data(size, stream.id)
        except ProtocolError:
            raise _StreamGone from None
        self.flush()
        return data

    def send_headers(
        self, stream: _Stream, headers: list[Field], end: bool, final: bool = True
    ) -> None:
        try:
            self.h2.send_headers(stream.id, headers, end_stream=end)
        except (ProtocolError, StreamClosedError):
            raise _StreamGone from None
        if final:
            stream.response_started = True
        self.flush()

    async def send_error(self, stream: _Stream, status: int, log_fields: dict[str, object]) -> None:
        log_fields["status"] = status
        if stream.response_started:
            self.send_reset(stream.id, ErrorCodes.INTERNAL_ERROR)
            return
        body = b"%d %s\n" % (status, REASONS.get(status, b"Error"))
        headers = [
            (b":status", b"%d" % status),
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", b"%d" % len(body)),
            (b"cache-control", b"no-store"),
        ]
        self.send_headers(stream, headers, end=False)
        await self.send_data(stream, body, end=True)
        log_fields["bytes_sent"] = len(body)
        if not stream.ended:
            # RFC 9113, 8.1: the answer is complete; the rest of the body is not wanted.
            stream.reading = False
            self.release_body(stream)
            self.send_reset(stream.id, ErrorCodes.NO_ERROR)

    async def relay_response(
        self,
        stream: _Stream,
        call: UpstreamCall,
        status: int,
        fields: list[Field],
        log_fields: dict[str, object],
    ) -> None:
        self.send_headers(stream, [(b":status", b"%d" % status), *fields], end=False)
        sent = 0
        while True:
            piece = call.body_nowait()
            if piece is False:
                await call.receive_more()
                continue
            if piece is None:
                break
            assert isinstance(piece, bytes)
            await self.send_data(stream, piece, end=False)
            sent += len(piece)
            log_fields["bytes_sent"] = sent
        if call.trailers:
            self.send_headers(stream, call.trailers, end=True)
        else:
            await self.send_data(stream, b"", end=True)

    async def send_data(self, stream: _Stream, data: bytes, end: bool) -> None:
        """DATA frames within the client's windows; waits (at most ``http.body_timeout``)
        for a window to open, and for the writer when too much is queued."""
        h2 = self.h2
        stream_id = stream.id
        try:
            while True:
                window = h2.local_flow_control_window(stream_id)
                size = len(data)
                frame = h2.max_outbound_frame_size
                if size <= window and size <= frame:
                    h2.send_data(stream_id, data, end_stream=end)
                    break
                if window <= 0:
                    self.flush()
                    await self.wait_for_window(stream)
                    continue
                step = min(window, frame)
                h2.send_data(stream_id, data[:step])
                data = data[step:]
        except (ProtocolError, StreamClosedError):
            raise _StreamGone from None
        self.flush()
        if self.out_size > _HIGH_WATER:
            await self.room_to_send()

    async def wait_for_window(self, stream: _Stream) -> None:
        stream.window = trio.Event()
        self.window_waiters.add(stream)
        with trio.move_on_after(self.http.body_timeout):
            await stream.window.wait()
            return
        raise _Stalled

    def access(
        self,
        stream: _Stream,
        head: RequestHead | None,
        log_fields: dict[str, object],
        started: float,
    ) -> None:
        tls = self.client.tls
        fields: dict[str, object] = {
            "connection_id": self.client.id,
            "client": self.client.address,
            "sni": tls.server_name,
            "tls_version": tls.version,
            "protocol": "HTTP/2",
            "stream_id": stream.id,
            "method": head.method.decode("ascii", "replace") if head else "-",
            "path": head.target.decode("ascii", "replace") if head else "-",
            **log_fields,
            "duration_ms": round((time.perf_counter() - started) * 1000, 3),
        }
        if tls.client_auth:
            identity = tls.client_identity
            fields["client_cert"] = identity.subject if identity else None
        info_line(access_log, "request", fields)
