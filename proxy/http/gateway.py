"""HTTP/1.1 upstream exchanges for clients that do not speak HTTP/1.1 (HTTP/2).

Theory of operation. The HTTP/2 handler (proxy/http2/) turns each stream into one request
to an HTTP/1.1 upstream; it must not speak HTTP/1.1 itself (h11 is this package's alone).
This module is its way in: plain bytes and header lists go in, and the same forwarding
rules, routing, limits and pools as the HTTP/1.1 handler's are applied.

:func:`prepare` builds the request the HTTP/1.1 handler would build: it has h11 validate
the method, target and every field as it makes the event (a field that could not be
written on an HTTP/1.1 wire is a 400, never a smuggled line), applies
:func:`rules.check_request` (413, 501), the head limits (414, 431), picks the upstream
group with :func:`rules.choose_upstream` by the normalised path (target.py, the path that
is also forwarded) and rewrites the head with :func:`rules.upstream_request` (hop-by-hop
headers, X-Forwarded-*, identity headers). A
body without a Content-Length goes upstream chunked, so it can end with trailers.

:class:`UpstreamCall` is one exchange on a connection lent by the group's
:class:`UpstreamPool`: the head, the body as it arrives, the end (with trailers when
chunked), then the response head as a status and end-to-end fields (lowercase names,
ready for an HTTP/2 HEADERS frame) and the body piece by piece. A reused keep-alive
connection that fails before anything of the request reached it, or that closes without
a byte of answer to a bodiless idempotent request, is replaced by a fresh one and the
request sent again, as the HTTP/1.1 handler does. Failures are :class:`UpstreamFailure`
with the status the client should get.
"""

from __future__ import annotations

import h11
import trio

from proxy.config import HTTPConfig
from proxy.http.rules import (
    HOP_BY_HOP,
    IDEMPOTENT_METHODS,
    ClientInfo,
    ReceivedHead,
    check_request,
    choose_upstream,
    upstream_request,
)
from proxy.http.target import TargetError, parse_target
from proxy.http.upstream import Routing, UpstreamConnection, UpstreamFailure, UpstreamPool
from proxy.tls.stream import LINGER_SECONDS

Field = tuple[bytes, bytes]
_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})


class Refused(Exception):
    """The request is answered with ``status`` and never forwarded."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class Prepared:
    """A request checked, routed and rewritten for its upstream."""

    __slots__ = ("chunked", "has_body", "method", "outgoing", "pool", "target")

    def __init__(
        self, outgoing: h11.Request, pool: UpstreamPool, has_body: bool, chunked: bool
    ) -> None:
        self.outgoing = outgoing
        self.pool = pool
        self.has_body = has_body
        self.chunked = chunked
        self.method = outgoing.method
        self.target = outgoing.target


def prepare(
    method: bytes,
    target: bytes,
    fields: list[Field],
    *,
    has_body: bool,
    client: ClientInfo,
    http: HTTPConfig,
    routing: Routing,
    default_upstream: str,
) -> Prepared:
    """The request to send upstream, or :class:`Refused`. ``fields`` are the regular
    fields (a Host among them when the client named an authority); ``has_body``: more
    than the head is coming."""
    if len(target) > http.max_request_line:
        raise Refused(414, "request target too long")
    if len(fields) > http.max_headers:
        raise Refused(431, "too many header fields")
    chunked = False
    if has_body:
        if not any(name == b"content-length" for name, _ in fields):
            fields = [*fields, (b"transfer-encoding", b"chunked")]
            chunked = True
    elif method in _BODY_METHODS and not any(name == b"content-length" for name, _ in fields):
        fields = [*fields, (b"content-length", b"0")]  # many servers want a length for these
    try:
        request = h11.Request(method=method, target=target, headers=fields)
    except h11.LocalProtocolError as exc:
        raise Refused(400, f"request cannot be forwarded as HTTP/1.1: {exc}") from None
    head = ReceivedHead(request.headers)
    status = check_request(request, http, head)
    if status is not None:
        raise Refused(status, "request refused by the forwarding rules")
    try:  # the same normalised path as HTTP/1.1: routed by it, forwarded as it (target.py)
        parsed = parse_target(target, method, http.allow_ambiguous_paths)
    except TargetError as refused:
        raise Refused(refused.status, str(refused)) from None
    chosen = choose_upstream(
        routing.routes, request, client.server_name, head, default_upstream, parsed
    )
    pool = routing.pools[chosen]
    try:
        outgoing = upstream_request(request, client, pool.authority, head, parsed)
    except h11.LocalProtocolError as exc:
        raise Refused(400, str(exc)) from None
    return Prepared(outgoing, pool, has_body, chunked)


def response_fields(response: h11.Response) -> list[Field]:
    """The upstream's end-to-end fields for an HTTP/2 client: lowercase names, no
    hop-by-hop or connection-specific field, no Content-Length beside chunked framing."""
    head = ReceivedHead(response.headers)
    chunked = b"transfer-encoding" in head.names
    return [
        (lower, value)
        for _, lower, value in head.end_to_end()
        if not (chunked and lower == b"content-length")
    ]


def _trailer_fields(fields: list[Field]) -> list[Field]:
    lowered = ((bytes(name).lower(), bytes(value)) for name, value in fields)
    return [(name, value) for name, value in lowered if name not in HOP_BY_HOP]


class UpstreamCall:
    """One request and its response on a connection from the request's pool."""

    def __init__(self, prepared: Prepared) -> None:
        self.prepared = prepared
        self.where = prepared.pool.group.name
        self.trailers: list[Field] = []
        self._connection: UpstreamConnection | None = None
        self._reused = False
        self._whole: bytes | None = None  # the whole request, while it may be sent again

    async def _connect(self, fresh: bool) -> UpstreamConnection:
        pool = self.prepared.pool
        if fresh:
            connection, self._reused = await pool.connect(), False
        else:
            connection, self._reused = await pool.acquire()
        self._connection = connection
        self.where = connection.label
        return connection

    async def send_head(
        self, body: bytes = b"", end: bool = False, trailers: list[Field] | None = None
    ) -> None:
        """The head, with the first body bytes and, when ``end``, the end of the request
        (with ``trailers``, as :meth:`end`)."""
        connection = await self._connect(fresh=False)
        while True:
            data = self._encode_head(connection, body, end, trailers)
            try:
                await connection.send_data(data)
            except UpstreamFailure as failure:
                if not (self._reused and failure.sent_nothing):
                    raise
                await self._discard()
                connection = await self._connect(fresh=True)
                continue
            if end and not body and self.prepared.method in IDEMPOTENT_METHODS:
                self._whole = data
            return

    def _encode_head(
        self,
        connection: UpstreamConnection,
        body: bytes,
        end: bool,
        trailers: list[Field] | None,
    ) -> bytes:
        pieces = [connection.encode(self.prepared.outgoing)]
        if body:
            pieces.append(connection.encode(h11.Data(data=body)))
        if end:
            pieces.append(self._encode_end(connection, trailers))
        return b"".join(pieces)

    def _encode_end(self, connection: UpstreamConnection, trailers: list[Field] | None) -> bytes:
        fields = _trailer_fields(trailers) if trailers and self.prepared.chunked else []
        try:
            return connection.encode(h11.EndOfMessage(headers=fields))
        except h11.LocalProtocolError:  # a trailer h11 will not write (Content-Length ...)
            return connection.encode(h11.EndOfMessage())

    async def send_body(self, data: bytes) -> None:
        assert self._connection is not None
        await self._connection.send_data(self._connection.encode(h11.Data(data=data)))

    async def end(self, trailers: list[Field] | None = None) -> None:
        """The end of the request body; ``trailers`` go upstream when the body is chunked."""
        assert self._connection is not None
        await self._connection.send_data(self._encode_end(self._connection, trailers))

    async def response(self) -> tuple[int, list[Field]]:
        """The final response's status and fields (1xx answers are skipped)."""
        assert self._connection is not None
        while True:
            try:
                event = await self._connection.next_event()
                while isinstance(event, h11.InformationalResponse):
                    event = await self._connection.next_event()
                break
            except UpstreamFailure:
                resend = self._whole
                if not (self._reused and resend is not None and not self._received()):
                    raise
                await self._discard()
                connection = await self._connect(fresh=True)
                await connection.send_data(resend)
        self._whole = None
        if not isinstance(event, h11.Response):
            raise UpstreamFailure(
                f"upstream {self.where} sent {type(event).__name__} first", 502, kind="protocol"
            )
        return event.status_code, response_fields(event)

    async def early_response(self) -> tuple[int, list[Field]] | None:
        """A response the upstream sent before it stopped taking the request (a 413 or
        401 from the head alone), if any, within a short wait."""
        connection = self._connection
        if connection is None or not connection.may_answer_early:
            return None
        try:
            with trio.move_on_after(LINGER_SECONDS):
                event = await connection.next_event()
                while isinstance(event, h11.InformationalResponse):
                    event = await connection.next_event()
                if isinstance(event, h11.Response):
                    return event.status_code, response_fields(event)
        except UpstreamFailure:
            return None
        return None

    def _received(self) -> bool:
        return self._connection is not None and self._connection.bytes_received > 0

    def body_nowait(self) -> bytes | bool | None:
        """The next body bytes already received, None at the end of the response (trailers
        in :attr:`trailers`), or False when more must be read (:meth:`receive_more`)."""
        assert self._connection is not None
        event = self._connection.next_event_nowait()
        if isinstance(event, h11.Data):
            return bytes(event.data)
        if isinstance(event, h11.EndOfMessage):
            if event.headers:
                self.trailers = _trailer_fields(list(event.headers.raw_items()))
            return None
        if event is h11.NEED_DATA:
            return False
        raise UpstreamFailure(
            f"upstream {self.where} ended the response early", 502, kind="protocol"
        )

    async def receive_more(self) -> None:
        assert self._connection is not None
        await self._connection.receive_more()

    async def release(self) -> None:
        """Back to the pool after a complete exchange."""
        connection, self._connection = self._connection, None
        if connection is not None:
            await self.prepared.pool.release(connection)

    async def _discard(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            await connection.aclose()

    def abort(self) -> None:
        """Close the connection at once (the exchange broke off: never reuse it)."""
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.stream.close()
