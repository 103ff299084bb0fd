"""HTTP forwarding rules, sans-IO, on h11 events.

Theory of operation (DESIGN.md, decision 4). The proxy holds an ``h11.Connection(SERVER)``
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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import h11

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
_REPLACED_BY_PROXY = frozenset({b"x-forwarded-proto", b"x-forwarded-host", b"expect"})

REASONS = {
    400: b"Bad Request",
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}

Headers = list[tuple[bytes, bytes]]


@dataclass(frozen=True)
class ClientInfo:
    """Who is on the other end of the TLS connection, as the forwarding rules need it."""

    address: str
    server_name: str | None = None


def _connection_tokens(headers: Headers) -> set[bytes]:
    named: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            named.update(token.strip().lower() for token in value.split(b",") if token.strip())
    return named


def end_to_end_headers(headers: Headers) -> Headers:
    """``headers`` without hop-by-hop headers, nor any header the Connection header names."""
    drop = HOP_BY_HOP | _connection_tokens(headers)
    return [(name, value) for name, value in headers if name.lower() not in drop]


def _as_sent(headers: Any) -> Headers:
    """Header names as the peer wrote them (h11's ``raw_items``): backends see the client's
    spelling, and a response keeps the upstream's."""
    return [(bytes(name), bytes(value)) for name, value in headers.raw_items()]


def upstream_request(request: h11.Request, client: ClientInfo) -> h11.Request:
    """The request to send upstream for ``request`` received from ``client``."""
    received = _as_sent(request.headers)
    headers = [
        (name, value)
        for name, value in end_to_end_headers(received)
        if name.lower() not in _REPLACED_BY_PROXY and name.lower() != b"x-forwarded-for"
    ]
    previous_for = [value for name, value in received if name.lower() == b"x-forwarded-for"]
    forwarded_for = b", ".join([*previous_for, client.address.encode("ascii")])
    host = next((value for name, value in received if name.lower() == b"host"), None)
    headers.append((b"X-Forwarded-For", forwarded_for))
    headers.append((b"X-Forwarded-Proto", b"https"))
    if host is not None:
        headers.append((b"X-Forwarded-Host", host))
    if not any(name.lower() == b"content-length" for name, _ in headers) and any(
        name.lower() == b"transfer-encoding" for name, _ in received
    ):
        # h11 accepted the client's framing, so this was chunked: keep streaming it so.
        headers.append((b"Transfer-Encoding", b"chunked"))
    return h11.Request(
        method=request.method, target=request.target, headers=headers, http_version="1.1"
    )


def client_response(response: h11.Response) -> h11.Response:
    """The response to send the client for ``response`` received from upstream."""
    headers = end_to_end_headers(_as_sent(response.headers))
    return h11.Response(status_code=response.status_code, headers=headers, reason=response.reason)


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
