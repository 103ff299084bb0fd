"""PKCS#11 URIs (RFC 7512) naming a private key, parsed strictly.

A key is named the way p11-kit, OpenSSL and nginx name it:
``pkcs11:token=proxy;object=web-key;id=%01;type=private``. Parsing is pure (no PKCS#11
module involved) and unforgiving, because a lenient parser is how the wrong key gets used:

* every attribute is known and appears once; ``type`` may only be ``private``;
* percent-escapes are exactly ``%`` and two hex digits, and text decodes as UTF-8;
* ``id`` is binary: each byte must be written as ``%XX``. ``id=01`` would, by the RFC, mean
  the two ASCII bytes 0x30 0x31, which is never what anyone meant, so it is refused;
* a PIN never belongs in a URI: ``pin-value`` and ``pin-source`` are refused, and so is the
  rest of the query part, whose settings live in the config file instead.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from proxy.errors import KeyURIError

_TEXT_ATTRIBUTES = ("token", "manufacturer", "serial", "model", "object")
_SUPPORTED = (*_TEXT_ATTRIBUTES, "id", "type", "slot-id")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# Characters RFC 7512 allows unescaped in a path attribute value (pchar minus ";").
_PATH_SAFE = _UNRESERVED | frozenset(":[]@!$'()*+,=&")


@dataclass(frozen=True)
class KeyURI:
    """A parsed key reference. ``None`` means "not constrained"."""

    token: str | None = None
    manufacturer: str | None = None
    serial: str | None = None
    model: str | None = None
    object: str | None = None
    id: bytes | None = None
    slot_id: int | None = None

    def __str__(self) -> str:
        return self._text

    @functools.cached_property
    def _text(self) -> str:
        """The URI's text, rendered once (it names the key in every audit line)."""
        parts = []
        for name in ("token", "manufacturer", "serial", "model", "object"):
            value = getattr(self, name)
            if value is not None:
                parts.append(f"{name}={_escape_text(value)}")
        if self.id is not None:
            parts.append("id=" + "".join(f"%{byte:02x}" for byte in self.id))
        if self.slot_id is not None:
            parts.append(f"slot-id={self.slot_id}")
        parts.append("type=private")
        return "pkcs11:" + ";".join(parts)


def parse_key_uri(text: str) -> KeyURI:
    """Parse ``text`` into a :class:`KeyURI`, or raise :class:`KeyURIError` saying why not."""
    if not text.startswith("pkcs11:"):
        raise KeyURIError(f"a key URI must start with 'pkcs11:' (RFC 7512), got {_shown(text)}")
    body = text[len("pkcs11:") :]
    path, has_query, query = body.partition("?")
    if has_query:
        names = {item.partition("=")[0] for item in query.split("&") if item}
        if names & {"pin-value", "pin-source"}:
            raise KeyURIError(
                "a key URI must not carry a PIN (pin-value/pin-source): give the PIN with "
                "[token] pin_file or pin_env instead"
            )
        raise KeyURIError(
            f"query attributes {sorted(names)} are not supported in a key URI; set the module "
            "path with [token] module in the config"
        )
    values: dict[str, str] = {}
    for item in path.split(";"):
        if not item:
            raise KeyURIError("empty attribute in key URI (two ';' in a row or a trailing ';')")
        name, has_equals, raw = item.partition("=")
        if not has_equals:
            raise KeyURIError(f"attribute {name!r} in key URI has no '=value'")
        if name not in _SUPPORTED:
            raise KeyURIError(
                f"unknown attribute {name!r} in key URI; supported: {', '.join(_SUPPORTED)}"
            )
        if name in values:
            raise KeyURIError(f"attribute {name!r} appears twice in key URI")
        values[name] = raw

    kind = values.pop("type", None)
    if kind is not None and kind != "private":
        raise KeyURIError(f"key URI has type={kind!r}; the proxy needs type=private")
    fields: dict[str, object] = {}
    for name in _TEXT_ATTRIBUTES:
        if name in values:
            fields[name] = _decode_text(name, values[name])
    if "id" in values:
        fields["id"] = _decode_id(values["id"])
    if "slot-id" in values:
        raw_slot = values["slot-id"]
        if not raw_slot.isascii() or not raw_slot.isdigit():
            raise KeyURIError(f"slot-id must be a decimal number, got {_shown(raw_slot)}")
        fields["slot_id"] = int(raw_slot)
    uri = KeyURI(**fields)  # type: ignore[arg-type]
    if uri.object is None and uri.id is None:
        raise KeyURIError("a key URI must name the key by object=LABEL, id=%XX..., or both")
    return uri


def _decode_text(name: str, raw: str) -> str:
    data = _unescape(name, raw)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise KeyURIError(f"attribute {name!r} is not valid UTF-8 after %-decoding") from exc


def _decode_id(raw: str) -> bytes:
    if not raw:
        raise KeyURIError("id= is empty; write the key ID as bytes, e.g. id=%01")
    if not re.fullmatch(r"(%[0-9A-Fa-f]{2})+", raw):
        raise KeyURIError(
            f"id={_shown(raw)} must be written byte by byte as %XX (e.g. id=%01 for the byte "
            "0x01): a literal '01' would mean the ASCII bytes 0x30 0x31, not the byte 0x01"
        )
    return bytes(int(match, 16) for match in _ESCAPE.findall(raw))


def _unescape(name: str, raw: str) -> bytes:
    out = bytearray()
    position = 0
    while position < len(raw):
        char = raw[position]
        if char == "%":
            match = _ESCAPE.match(raw, position)
            if match is None:
                raise KeyURIError(
                    f"attribute {name!r} has a bad %-escape at character {position + 1}: "
                    "'%' must be followed by two hex digits"
                )
            out.append(int(match.group(1), 16))
            position += 3
            continue
        if char not in _PATH_SAFE:
            raise KeyURIError(
                f"attribute {name!r} has the character {char!r}, which must be %-escaped"
            )
        out.extend(char.encode("ascii"))
        position += 1
    return bytes(out)


def _escape_text(value: str) -> str:
    return "".join(
        chr(byte) if chr(byte) in _UNRESERVED else f"%{byte:02X}" for byte in value.encode()
    )


def _shown(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")
