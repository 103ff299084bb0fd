"""Request targets: the four forms of RFC 9112 section 3.2, and the one normalised path the
proxy routes by and forwards.

Theory of operation. Pure functions on bytes and strings, with no h11 and no sockets, so the
HTTP/1.1 handler and an HTTP/2 one (whose ``:path`` and ``:authority`` are the same two
things) share one notion of "which path is this".

* **Forms** (RFC 9112, 3.2). origin-form (``/x?q``) is the usual one; absolute-form
  (``http://other.example/x``) gives the request its authority, which replaces Host
  (3.2.2) and is what the request is routed by, and is forwarded as origin-form; the
  asterisk-form ``*`` is for OPTIONS only; anything else (authority-form outside CONNECT,
  an HTTP/0.9 style target, a fragment, userinfo in the authority) is a 400.
* **Normalisation** (RFC 3986, 6.2.2). Percent-encodings get upper-case hex, and those of
  unreserved characters are decoded; runs of ``/`` become one; dot segments are removed
  (5.2.4). Routes match this path, and it is what the upstream receives, so the backend
  never sees a path other than the one the proxy chose its route by (``/public/../admin``
  is routed, and forwarded, as ``/admin``). The query is forwarded as it came.
* **Ambiguous forms**: an encoded ``/`` (``%2F``) or ``.`` (``%2E``) inside a segment means
  one thing to one server and another to the next (``/a%2F..%2Fadmin``). They are refused
  with 400 unless ``http.allow_ambiguous_paths`` is set; then ``%2E`` decodes (it is
  unreserved) before dot segments are removed, and ``%2F`` stays encoded, part of its
  segment. A malformed percent-encoding (``%zz``, ``%4``) is always a 400.
"""

from __future__ import annotations

import re
from typing import NamedTuple

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset(b"0123456789ABCDEFabcdef")
# RFC 3986, 3.2.2 and 3.2.3: reg-name or IP-literal, then an optional port. Userinfo is not
# allowed in an http(s) URI's authority (RFC 9110, 4.2.4).
_AUTHORITY = re.compile(
    rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]+)(?::[0-9]*)?", re.ASCII
)
_SCHEMES = (b"http://", b"https://")


class TargetError(ValueError):
    """The request target cannot be served; ``status`` is the answer (400)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class Target(NamedTuple):
    """A request target, understood: the normalised path, the raw query (with its ``?``,
    or empty), and the authority of an absolute-form target (None otherwise). A tuple:
    one is made per request."""

    path: str
    query: str = ""
    authority: bytes | None = None

    def origin_form(self) -> bytes:
        """What the upstream receives as the request target."""
        return (self.path + self.query).encode("ascii")


def parse_target(target: bytes, method: bytes, allow_ambiguous: bool = False) -> Target:
    """The target of a request with ``method``, checked and normalised (see above)."""
    if (
        target[:1] == b"/"
        and b"/." not in target
        and b"//" not in target
        and (target.isascii() and b"%" not in target and b"#" not in target)
    ):
        # The common case, already normal: a path without dots, escapes or empty segments.
        plain_path, mark, plain_query = target.decode("ascii").partition("?")
        return Target(plain_path, mark + plain_query)
    authority: bytes | None = None
    if target[:1] != b"/":
        if target == b"*":
            if method != b"OPTIONS":
                raise TargetError("the asterisk-form target is for OPTIONS only")
            return Target("*")
        lowered = target[:8].lower()
        scheme = next((prefix for prefix in _SCHEMES if lowered.startswith(prefix)), None)
        if scheme is None:
            raise TargetError(f"request target {target[:64]!r} is not a path or an http(s) URL")
        rest = target[len(scheme) :]
        slash = len(rest)
        for stop in (b"/", b"?"):
            found = rest.find(stop)
            if 0 <= found < slash:
                slash = found
        authority, target = rest[:slash], rest[slash:]
        if not authority or _AUTHORITY.fullmatch(authority) is None:
            raise TargetError(f"the authority {authority[:64]!r} of the target is not host[:port]")
        if not target.startswith(b"/"):
            target = b"/" + target  # http://host or http://host?q: the path is "/"
    if b"#" in target:
        raise TargetError("a request target has no fragment (RFC 9112, 3.2)")
    if not target.isascii():
        raise TargetError("a request target is ASCII (RFC 3986: anything else is %-encoded)")
    raw_path, question, query = target.partition(b"?")
    path = normalise_path(raw_path.decode("ascii"), allow_ambiguous)
    return Target(path, ("?" + query.decode("ascii")) if question else "", authority)


def normalise_path(path: str, allow_ambiguous: bool = False) -> str:
    """``path`` (an absolute path, no query) normalised as the module docstring says."""
    if "%" not in path and "//" not in path and "/." not in path:
        return path  # the common case: nothing to do
    if "%" in path:
        path = _normalise_percent(path, allow_ambiguous)
    segments: list[str] = []
    parts = path.split("/")
    for index, segment in enumerate(parts[1:], start=1):
        last = index == len(parts) - 1
        if segment == "..":
            if segments:
                segments.pop()
            if last:
                segments.append("")
        elif segment == ".":
            if last:
                segments.append("")
        elif segment or last:
            segments.append(segment)
    return "/" + "/".join(segments)


def _normalise_percent(path: str, allow_ambiguous: bool) -> str:
    raw = path.encode("ascii")
    out = bytearray()
    index = 0
    while index < len(raw):
        byte = raw[index]
        if byte != 0x25:  # "%"
            out.append(byte)
            index += 1
            continue
        digits = raw[index + 1 : index + 3]
        if len(digits) != 2 or not all(digit in _HEX for digit in digits):
            raise TargetError(f"malformed percent-encoding in the path: {raw[index : index + 3]!r}")
        value = int(digits, 16)
        if value in (0x2F, 0x2E) and not allow_ambiguous:
            raise TargetError(
                f"an encoded {chr(value)!r} in the path is ambiguous "
                "(refused unless http.allow_ambiguous_paths is set)"
            )
        if value in _UNRESERVED:
            out.append(value)
        else:
            out += b"%" + digits.upper()
        index += 3
    return out.decode("ascii")
