"""HTTP forwarding rules, sans-IO, on h11 events.

Theory of operation (ARCHITECTURE.md, decision 4). The proxy holds an ``h11.Connection(SERVER)``
towards the client and an ``h11.Connection(CLIENT)`` towards the upstream; h11 owns the
wire format and framing. This module owns what a reverse proxy must change on the way
through, and nothing else: it takes h11 events and returns h11 events, never touches a
socket, and is tested without a network.

* Hop-by-hop headers (RFC 9110, section 7.6.1) are removed in both directions: Connection,
  Keep-Alive, Proxy-Connection, TE, Trailer, Transfer-Encoding, Upgrade, Proxy-Authenticate,
  Proxy-Authorization, and every header the Connection header names.
* Framing is re-declared for the next hop: a Content-Length is kept; a chunked request
  body is sent on chunked; h11 frames responses towards the client itself.
* ``X-Forwarded-For`` gets the client address appended; ``X-Forwarded-Proto: https`` and
  ``X-Forwarded-Host`` replace whatever the client sent. The Host header is kept.
* ``Expect: 100-continue`` is answered by the proxy and not forwarded.
* Error responses are short, plain text, closing, and never reveal internal details.
* Requests are checked before anything is forwarded (:func:`check_request_head` on the raw
  head bytes, :func:`check_request` on the parsed request, :class:`ChunkSizes` on the raw
  bytes of a chunked body): over-long request line (414), head too large or too many
  headers (431), a body larger than allowed (413), and every form of ambiguous framing h11
  would otherwise tolerate or wait on (an HTTP/0.9 request line, obs-fold line folding,
  both Content-Length and Transfer-Encoding, Transfer-Encoding in HTTP/1.0, a chunk size
  beyond 64 bits) is a 400; h11 itself rejects differing repeated Content-Length, other
  invalid chunk sizes and transfer codings other than chunked (501). README, "Hostile
  input", lists every rule with its RFC section.
* ``Upgrade`` requests (WebSocket) keep their Upgrade and ``Connection: upgrade`` headers;
  after the upstream's 101 the server turns the connection into a byte tunnel.
* Routing (:func:`route`) picks an upstream group by Host (SNI when there is no Host; the
  authority of an absolute-form target replaces Host) and the prefix of the normalised
  path (target.py), which is also the path forwarded; the first matching route wins, the
  top-level upstream is the rest.
* The client's verified TLS identity (mutual TLS) reaches the upstream through
  clientauth.identity_headers (``X-Client-Cert-*``); whatever the client sent under those
  names, or as ``X-Forwarded-Client-Cert``, is always dropped first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import h11

from proxy.config import DEFAULT_UPSTREAM, HTTPConfig, Route
from proxy.http.target import Target
from proxy.tls.clientauth import ClientIdentity, identity_headers, is_identity_header

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
_REPLACED_BY_PROXY = frozenset({b"x-forwarded-proto", b"x-forwarded-host", b"expect", b"forwarded"})
# Methods a proxy may resend when a reused upstream connection died without answering.
IDEMPOTENT_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})

REASONS = {
    400: b"Bad Request",
    404: b"Not Found",
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    421: b"Misdirected Request",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}


@dataclass(frozen=True)
class ClientInfo:
    """Who is on the other end of the TLS connection, as the forwarding rules need it."""

    address: str
    server_name: str | None = None
    identity: ClientIdentity | None = None  # the verified client certificate (mTLS)
    client_auth: bool = False  # the listener asks for client certificates (mTLS)
    forwarded: bool = False  # also send RFC 7239 Forwarded (http.forwarded)

    # What every request of the connection adds the same way, built and checked once per
    # connection rather than once per request.
    @cached_property
    def address_value(self) -> bytes:
        return self.address.encode("ascii")

    @cached_property
    def identity_fields(self) -> tuple[tuple[bytes, bytes], ...]:
        """The ``X-Client-Cert-*`` headers (clientauth.identity_headers) when the listener
        asks for client certificates, else none."""
        if not (self.client_auth or self.identity is not None):
            return ()
        return tuple(_checked(list(identity_headers(self.identity))))


# A header as h11 parsed it: (name as sent, lowercase name, value), all bytes.
_Field = tuple[bytes, bytes, bytes]
# RFC 9112, 3: method SP request-target SP HTTP-version, looser than h11's own check (which
# still runs on the whole head): a line without a version is an HTTP/0.9 request, which
# would otherwise sit waiting for a head's end that never comes.
_REQUEST_LINE = re.compile(rb"[^\s]+ [^\s]+ HTTP/[0-9]\.[0-9]\r?")
# RFC 9110, 5.5: what the proxy adds must be a valid field value (it skips h11's checks).
_FIELD_VALUE = re.compile(rb"(?:[\x21-\x7e\x80-\xff]+(?:[ \t]+[\x21-\x7e\x80-\xff]+)*)?")


def _fields(headers: Any) -> list[_Field]:
    # h11's parser gives bytearrays (unhashable); one conversion here serves every rule.
    fields = []
    for raw_name, value in headers.raw_items():
        name = bytes(raw_name)
        fields.append((name, name.lower(), bytes(value)))
    return fields


class ReceivedHead:
    """A parsed request or response head, read once for every rule that needs it.

    The header rules used to walk an h11 header list once per question (framing, Host,
    Upgrade, Connection tokens) and then had h11 validate the rebuilt list again; the
    benchmark's keep-alive scenario spent a tenth of its time there."""

    __slots__ = ("connection_tokens", "content_length", "fields", "host", "names")

    def __init__(self, headers: Any) -> None:
        self.fields = _fields(headers)
        self.names = {lower for _, lower, _ in self.fields}
        tokens: set[bytes] = set()
        self.content_length: int | None = None
        self.host: bytes | None = None
        for _, lower, value in self.fields:
            if lower == b"connection":
                tokens.update(token.strip().lower() for token in value.split(b",") if token.strip())
            elif lower == b"content-length" and value.isdigit():  # h11 checked it
                self.content_length = int(value)
            elif lower == b"host" and self.host is None:
                self.host = value
        self.connection_tokens = tokens

    @property
    def upgrade(self) -> bool:
        """A protocol switch (WebSocket): ``Upgrade`` named in ``Connection``."""
        return b"upgrade" in self.names and b"upgrade" in self.connection_tokens

    @property
    def has_body(self) -> bool:
        return b"content-length" in self.names or b"transfer-encoding" in self.names

    def end_to_end(self) -> list[_Field]:
        """The fields without hop-by-hop headers, nor any header the Connection header
        names, except Content-Length and Host: ``Connection: Content-Length`` must not turn
        a body the proxy read by its length into one the next hop cannot delimit, nor
        ``Connection: Host`` make the upstream see another host than the one the request
        was routed by."""
        drop = HOP_BY_HOP
        if self.connection_tokens:
            drop = drop | (self.connection_tokens - {b"content-length", b"host"})
        return [field for field in self.fields if field[1] not in drop]

    def values(self, lower_name: bytes) -> list[bytes]:
        return [value for _, lower, value in self.fields if lower == lower_name]

    def upgrade_fields(self) -> list[tuple[bytes, bytes]]:
        upgrade = [(name, value) for name, lower, value in self.fields if lower == b"upgrade"]
        return [*upgrade, (b"Connection", b"upgrade")] if upgrade else []


def is_upgrade(request: h11.Request, head: ReceivedHead | None = None) -> bool:
    """A protocol switch request (WebSocket): ``Upgrade`` named in ``Connection``."""
    return (head or ReceivedHead(request.headers)).upgrade


def _forwarded_node(address: str) -> bytes:
    # RFC 7239, section 6: IPv6 addresses are bracketed and quoted.
    return f'"[{address}]"'.encode() if ":" in address else address.encode("ascii")


def _checked(added: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    for name, value in added:
        if _FIELD_VALUE.fullmatch(value) is None:
            raise h11.LocalProtocolError(f"illegal value for {name.decode()}: {value!r}")
    return added


def upstream_request(
    request: h11.Request,
    client: ClientInfo,
    upstream_host: str = "localhost",
    head: ReceivedHead | None = None,
    target: Target | None = None,
) -> h11.Request:
    """The request to send upstream for ``request`` received from ``client``. An HTTP/1.0
    request without Host gets the SNI name, else ``upstream_host`` (HTTP/1.1 needs one).
    With ``target`` (target.py), the request goes out in origin-form with the normalised
    path, and the authority of an absolute-form target replaces Host (RFC 9112, 3.2.2).

    The client's own headers were validated by h11 as they were parsed, so the event is
    built without validating them again; what the proxy adds is checked here."""
    head = head or ReceivedHead(request.headers)
    authority = target.authority if target is not None else None
    headers = [
        (name, value)
        for name, lower, value in head.end_to_end()
        if lower not in _REPLACED_BY_PROXY
        and lower != b"x-forwarded-for"
        and not is_identity_header(name)  # X-Client-Cert-*: only the proxy's own
        and (authority is None or lower != b"host")
    ]
    host = head.host if authority is None else authority
    if host is None:
        headers[:0] = _checked([(b"Host", (client.server_name or upstream_host).encode("idna"))])
    elif authority is not None:
        headers[:0] = _checked([(b"Host", authority)])
    forwarded_for = client.address_value
    if b"x-forwarded-for" in head.names:
        forwarded_for = b", ".join([*head.values(b"x-forwarded-for"), forwarded_for])
    added = [(b"X-Forwarded-For", forwarded_for), (b"X-Forwarded-Proto", b"https")]
    if host is not None:
        added.append((b"X-Forwarded-Host", host))
    if client.forwarded:
        element = b"for=" + _forwarded_node(client.address) + b";proto=https"
        if host is not None and b'"' not in host and b"\\" not in host:
            element += b';host="' + host + b'"'
        added.append((b"Forwarded", b", ".join([*head.values(b"forwarded"), element])))
    headers.extend(_checked(added))
    headers.extend(client.identity_fields)
    if head.upgrade:
        headers.extend(head.upgrade_fields())
    if b"content-length" not in head.names and b"transfer-encoding" in head.names:
        # h11 accepted the client's framing, so this was chunked: keep streaming it so.
        headers.append((b"Transfer-Encoding", b"chunked"))
    return h11.Request(
        method=request.method,
        target=request.target if target is None else target.origin_form(),
        headers=headers,
        http_version=b"1.1",
        _parsed=True,
    )


def client_response(
    response: h11.Response, closing: bool = False, head: ReceivedHead | None = None
) -> h11.Response:
    """The response to send the client for ``response`` received from upstream;
    ``closing`` adds ``Connection: close`` (the proxy is draining or must close). The
    upstream's headers were validated by h11 as they were parsed."""
    head = head or ReceivedHead(response.headers)
    fields = head.end_to_end()
    if b"transfer-encoding" in head.names:
        # h11 read the body as chunked (RFC 9112, 6.3: Transfer-Encoding wins); a
        # Content-Length beside it is meaningless and must not frame the body we send on.
        headers = [(name, value) for name, lower, value in fields if lower != b"content-length"]
    else:
        headers = [(name, value) for name, _, value in fields]
    if closing:
        headers.append((b"Connection", b"close"))
    return h11.Response(
        status_code=response.status_code,
        headers=headers,
        reason=bytes(response.reason),
        http_version=b"1.1",
        _parsed=True,
    )


def switching_response(response: h11.InformationalResponse) -> h11.InformationalResponse:
    """The upstream's 101 for the client: end-to-end headers plus the Upgrade it agreed to."""
    head = ReceivedHead(response.headers)
    headers = [(name, value) for name, _, value in head.end_to_end()] + head.upgrade_fields()
    return h11.InformationalResponse(status_code=101, headers=headers, reason=response.reason)


def check_request_head(buffer: bytes, limits: HTTPConfig) -> int | None:
    """Check the raw bytes of a request head not yet parsed (h11's ``trailing_data`` while
    it waits for a request); return the status to reject it with, or None (fine so far).

    This catches what h11 accepts but a proxy must not: obs-fold continuation lines
    (RFC 9112, section 5.2: a proxy must reject or unfold them; unfolded, a header could
    mean one thing to us and another to the upstream), and it enforces the request line,
    head size and header count limits with their own statuses (414, 431)."""
    start = 0
    while buffer.startswith(b"\r\n", start) or buffer.startswith(b"\n", start):
        start += 2 if buffer[start] == 13 else 1  # RFC 9112, 2.2: empty lines before are ok
    line_end = buffer.find(b"\n", start)
    if line_end < 0:
        return 414 if len(buffer) - start > limits.max_request_line else None
    if line_end - start > limits.max_request_line:
        return 414
    if _REQUEST_LINE.fullmatch(buffer, start, line_end) is None:
        return 400  # an HTTP/0.9 line (no version) or no request line at all: answer now
    end = buffer.find(b"\n\r\n", line_end)
    end_lf = buffer.find(b"\n\n", line_end)
    ends = [found for found in (end, end_lf) if found >= 0]
    if not ends:
        if len(buffer) - start > limits.max_header_bytes:
            return 431
        head = buffer[line_end + 1 :]
        complete = False
    else:
        head_end = min(ends)
        if head_end + 1 - start > limits.max_header_bytes:
            return 431
        head = buffer[line_end + 1 : head_end + 1]
        complete = True
    lines = head.split(b"\n")
    if not complete:
        lines = lines[:-1]  # the last one may still be arriving
    count = 0
    for line in lines:
        if not line or line == b"\r":
            continue
        if line[0] in (0x20, 0x09):
            return 400  # obs-fold
        count += 1
    if count > limits.max_headers:
        return 431
    return None


def check_request(
    request: h11.Request, limits: HTTPConfig, head: ReceivedHead | None = None
) -> int | None:
    """Check a parsed request before forwarding; return the status to reject it with."""
    if request.method == b"CONNECT":
        return 501  # a reverse proxy does not open tunnels to arbitrary hosts
    head = head or ReceivedHead(request.headers)
    if b"transfer-encoding" in head.names:
        if b"content-length" in head.names:
            return 400  # CL.TE / TE.CL smuggling: RFC 9112, 6.3 allows rejecting, and we do
        if request.http_version < b"1.1":
            return 400  # RFC 9112, 6.1: Transfer-Encoding in HTTP/1.0 is faulty framing
    length = head.content_length
    if limits.max_body_bytes and length is not None and length > limits.max_body_bytes:
        return 413
    return None


# RFC 9112, 7.1: a chunk size beyond 64 bits cannot be right (and overflows elsewhere).
MAX_CHUNK_SIZE_DIGITS = 16
# A chunk-size line (size and extensions) longer than this is not a request, it is a probe.
MAX_CHUNK_LINE = 4096


class ChunkSizes:
    """Watches the raw bytes of a chunked request body beside h11, for chunk sizes that
    cannot be right: more than 16 hex digits, a declared total beyond the body limit
    (``max_body`` bytes; 0: none), a chunk line without its CR, or one too long. h11 frames
    the body and checks the rest of its grammar; without this, it would wait for the
    data of a chunk of 2**64 bytes until a timeout, with the request head already upstream.

    :meth:`feed` takes the bytes that follow the request head, in order, and returns the
    status to refuse the request with, or None. It stops looking at the last chunk, so the
    bytes of a pipelined request after the body do not matter to it."""

    __slots__ = ("_crlf_left", "_declared", "_done", "_line", "_max_body", "_remaining")

    def __init__(self, max_body: int = 0) -> None:
        self._max_body = max_body
        self._line = bytearray()
        self._remaining = 0  # data bytes left in the current chunk
        self._crlf_left = 0  # bytes of the CRLF after a chunk's data
        self._declared = 0
        self._done = False

    def feed(self, data: bytes | bytearray) -> int | None:
        index, end = 0, len(data)
        while index < end and not self._done:
            if self._remaining:
                taken = min(self._remaining, end - index)
                self._remaining -= taken
                index += taken
                if not self._remaining:
                    self._crlf_left = 2
                continue
            if self._crlf_left:
                taken = min(self._crlf_left, end - index)
                self._crlf_left -= taken
                index += taken
                continue
            line_end = data.find(b"\n", index)
            self._line += data[index : end if line_end < 0 else line_end]
            if len(self._line) > MAX_CHUNK_LINE:
                return 400
            digits = len(self._line) - len(self._line.lstrip(b"0123456789abcdefABCDEF"))
            if digits > MAX_CHUNK_SIZE_DIGITS:
                return 400
            if line_end < 0:
                return None
            index = line_end + 1
            if not digits or not self._line.endswith(b"\r"):
                return 400  # no size, or a bare LF: h11 would wait for a CRLF forever
            size = int(self._line[:digits], 16)
            self._line.clear()
            self._declared += size
            if self._max_body and self._declared > self._max_body:
                return 413
            if size:
                self._remaining = size
            else:
                self._done = True  # the last chunk: trailers are h11's
        return None


def _host_name(host: bytes) -> str:
    text = host.decode("ascii", "replace").strip().lower()
    if text.startswith("["):
        return text[: text.find("]") + 1] if "]" in text else text
    return text.rpartition(":")[0] if ":" in text else text


def _host_matches(pattern: str, host: str) -> bool:
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    return host == pattern.rstrip(".") or host.rstrip(".") == pattern


def _prefix_matches(prefix: str, path: str) -> bool:
    if prefix == "/" or prefix.endswith("/"):
        return path.startswith(prefix)
    return path == prefix or path.startswith((prefix + "/", prefix + "?"))


def choose_upstream(
    routes: tuple[Route, ...],
    request: h11.Request,
    server_name: str | None,
    head: ReceivedHead | None = None,
    default: str = DEFAULT_UPSTREAM,
    target: Target | None = None,
) -> str:
    """The name of the upstream group for ``request``: see :func:`route`. The host is the
    authority of an absolute-form target, else the Host header; the path is ``target``'s
    normalised one (target.py), else the raw target."""
    if not routes:
        return default
    host = target.authority if target is not None else None
    if host is None:
        host = (head or ReceivedHead(request.headers)).host
    path = target.path if target is not None else request.target.decode("ascii", "replace")
    return route(routes, host, server_name, path, default)


def route(
    routes: tuple[Route, ...],
    host: bytes | None,
    server_name: str | None,
    path: str,
    default: str = DEFAULT_UPSTREAM,
) -> str:
    """The name of the upstream group for a request to ``host`` (the Host header or
    authority; the SNI name when there is none) and ``path`` (normalised, target.py): the
    first route whose hosts and path prefix match, else ``default`` (the top-level upstream,
    or the one the connection's server name is configured with). HTTP/2 routes by the same
    function, with ``:authority`` and ``:path``."""
    if not routes:
        return default
    name = _host_name(host) if host is not None else (server_name or "").lower()
    for candidate in routes:
        if candidate.hosts and not any(_host_matches(pattern, name) for pattern in candidate.hosts):
            continue
        if _prefix_matches(candidate.path_prefix, path):
            return candidate.upstream
    return default


def error_response(status: int) -> tuple[h11.Response, bytes]:
    """A short, closing error response that says nothing about the proxy's insides."""
    reason = REASONS.get(status, b"Error")
    body = b"%d %s\n" % (status, reason)
    response = h11.Response(
        status_code=status,
        reason=reason,
        headers=[
            (b"content-type", b"text/plain; charset=utf-8"),
            (b"content-length", str(len(body)).encode("ascii")),
            (b"connection", b"close"),
            (b"cache-control", b"no-store"),
        ],
    )
    return response, body


def error_status_for(error: h11.RemoteProtocolError) -> int:
    """The status h11 suggests for a malformed request: 400, 414, 431 ..."""
    hint = getattr(error, "error_status_hint", 400)
    return hint if hint in REASONS else 400
