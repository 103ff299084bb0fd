"""An HTTP/2 request head as the HTTP/1.1 request it becomes upstream, sans-IO.

Theory of operation. h2 has already validated the header block as it decoded it (RFC
9113, section 8: lowercase names, no connection-specific field, pseudo-header fields
first and once each, ``te`` only as "trailers", :authority and Host agreeing); a block
that fails is a connection error there. What is left is the mapping (section 8.3.1):

* ``:method`` and ``:path`` become the request line; ``:scheme`` is not forwarded (the
  upstream learns it from X-Forwarded-Proto, as for HTTP/1.1 clients);
* ``:authority`` becomes the Host field, unless the client sent a Host too (h2 checked
  that both are the same); an authority with userinfo is malformed (section 8.3.1);
* cookie fields, which HTTP/2 may split, are joined with "; " into one (section 8.2.3);
* a request without :path (CONNECT) keeps its authority as the target, and the
  forwarding rules answer it with 501 as they do over HTTP/1.1.

:class:`Malformed` is what the handler answers with RST_STREAM(PROTOCOL_ERROR).
"""

from __future__ import annotations

from collections.abc import Iterable

Field = tuple[bytes, bytes]


class Malformed(Exception):
    """A request the RFC calls malformed: reset the stream, forward nothing."""


class RequestHead:
    """The parts of a request head the forwarding needs."""

    __slots__ = ("authority", "expect_continue", "fields", "method", "target")

    def __init__(
        self, method: bytes, target: bytes, authority: bytes | None, fields: list[Field]
    ) -> None:
        self.method = method
        self.target = target
        self.authority = authority
        self.fields = fields
        self.expect_continue = False


def request_head(headers: Iterable[Field]) -> RequestHead:
    """The request line, authority and regular fields of a decoded HEADERS block."""
    method = path = authority = None
    fields: list[Field] = []
    cookies: list[bytes] = []
    has_host = expect_continue = False
    for name, value in headers:
        if name[:1] == b":":
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":authority":
                authority = value
            continue
        if name == b"cookie":
            cookies.append(value)
            continue
        if name == b"host":
            has_host = True
        elif name == b"expect":
            expect_continue = value.lower() == b"100-continue"
        fields.append((name, value))
    if method is None:
        raise Malformed("no :method")
    if authority is not None:
        if b"@" in authority:
            raise Malformed(":authority has userinfo")
        if not has_host:
            fields.insert(0, (b"host", authority))
    if cookies:
        fields.append((b"cookie", b"; ".join(cookies)))
    if path is None:
        if method != b"CONNECT":
            raise Malformed("no :path")
        path = authority or b""
    head = RequestHead(method, path, authority, fields)
    head.expect_continue = expect_continue
    return head
