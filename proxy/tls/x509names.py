"""X.509 names from the command line: an RFC 4514 subject and subjectAltName entries, strictly.

Theory of operation. ``hsm-proxy csr`` takes the subject as an RFC 4514 string
(``CN=web.example.com,O=Example``) and each SAN as ``DNS:name``, ``IP:address`` or
``URI:uri``. :func:`parse_subject` and :func:`parse_sans` turn them into cryptography's
x509 types, purely; every mistake is a ConfigError that says what is wrong and where,
because a lenient parser is how a certificate ends up with a name nobody asked for:

* attribute types are RFC 4514's short names (CN, O, OU, C, ST, L, STREET, DC, UID; in any
  case, as RFC 4512 says) or a dotted OID; anything else is unknown, not guessed at;
* separators are ``,`` between RDNs and ``+`` inside a multi-valued RDN, with no space
  around them (RFC 4514 writes none; a space that belongs to a value is escaped ``\\ ``);
* ``"``, ``;``, ``<``, ``>``, ``\\``, ``,`` and ``+`` in a value are escaped with ``\\``,
  a ``\\XX`` escape is one byte and the bytes must form UTF-8; the ``#`` (BER hex) form is
  refused, and so are an empty value and values longer than X.509's upper bounds (CN, O
  and OU 64 characters, C exactly two letters);
* RFC 4514 writes the most specific RDN first, so ``CN=web,O=Example`` is the sequence
  O, CN in the DER: what ``openssl req -subj /O=Example/CN=web`` makes.

SANs: a DNS name is ASCII letter-digit-hyphen labels of 1 to 63 characters (an
internationalised name is given as its ``xn--`` A-label), at most 253 characters, no
trailing dot, and ``*`` only as the whole leftmost label of a name with two labels more;
an IP is one IPv4 or IPv6 address (no prefix, no zone); a URI is absolute (``scheme:...``),
ASCII, without spaces. Types are written exactly ``DNS:``, ``IP:`` and ``URI:``; a
duplicate entry is refused.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence

from cryptography import x509
from cryptography.x509.oid import NameOID, ObjectIdentifier

from proxy.errors import ConfigError

ATTRIBUTE_TYPES = {
    "CN": NameOID.COMMON_NAME,
    "O": NameOID.ORGANIZATION_NAME,
    "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "C": NameOID.COUNTRY_NAME,
    "ST": NameOID.STATE_OR_PROVINCE_NAME,
    "L": NameOID.LOCALITY_NAME,
    "STREET": NameOID.STREET_ADDRESS,
    "DC": NameOID.DOMAIN_COMPONENT,
    "UID": NameOID.USER_ID,
}
# RFC 5280's upper bounds (ub-common-name and friends), in characters.
_UPPER_BOUNDS = {
    NameOID.COMMON_NAME: 64,
    NameOID.ORGANIZATION_NAME: 64,
    NameOID.ORGANIZATIONAL_UNIT_NAME: 64,
    NameOID.STATE_OR_PROVINCE_NAME: 128,
    NameOID.LOCALITY_NAME: 128,
}
_DESCR = re.compile(r"[A-Za-z][A-Za-z0-9-]*")
_NUMERIC_OID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+")
_HEX_PAIR = re.compile(r"[0-9A-Fa-f]{2}")
_ESCAPABLE = frozenset('"+,;<>\\ #=')
_MUST_ESCAPE = frozenset('";<>')


def parse_subject(text: str) -> x509.Name:
    """The x509.Name an RFC 4514 string denotes; ConfigError naming the problem if none."""
    if not text:
        raise ConfigError(
            '--subject is empty; give at least a common name, e.g. "CN=web.example.com"'
        )
    rdns: list[list[x509.NameAttribute]] = []
    current: list[x509.NameAttribute] = []
    position = 0
    while True:
        attribute, position = _attribute(text, position)
        current.append(attribute)
        if position == len(text):
            rdns.append(current)
            break
        separator = text[position]
        position += 1
        if separator == ",":
            rdns.append(current)
            current = []
        if position == len(text):
            raise ConfigError(f"--subject {text!r} ends with {separator!r}")
    return x509.Name([x509.RelativeDistinguishedName(rdn) for rdn in reversed(rdns)])


def _attribute(text: str, start: int) -> tuple[x509.NameAttribute, int]:
    """One ``type=value`` from ``start``: the attribute and where the text after it starts."""
    equals = text.find("=", start)
    stop = len(text)
    for separator in ",+":
        found = text.find(separator, start)
        if found != -1:
            stop = min(stop, found)
    if equals == -1 or equals > stop:
        chunk = text[start:stop]
        raise ConfigError(
            f"--subject {text!r}: {chunk!r} at character {start + 1} is not TYPE=value"
            if chunk
            else f"--subject {text!r}: empty attribute at character {start + 1} (two "
            "separators in a row?)"
        )
    oid = _attribute_type(text, text[start:equals], start)
    raw, end = _value(text, equals + 1)
    name = text[start:equals]
    if not raw:
        raise ConfigError(f"--subject {text!r}: {name}= has an empty value")
    try:
        value = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(
            f"--subject {text!r}: the \\XX escapes of {name}= do not form UTF-8"
        ) from None
    if oid == NameOID.COUNTRY_NAME and not re.fullmatch(r"[A-Za-z]{2}", value):
        raise ConfigError(
            f"--subject {text!r}: C={value!r} must be a two-letter country code (ISO 3166)"
        )
    bound = _UPPER_BOUNDS.get(oid)
    if bound is not None and len(value) > bound:
        raise ConfigError(
            f"--subject {text!r}: {name}= is {len(value)} characters; X.509 allows at most "
            f"{bound}" + (" (long DNS names go in --san DNS:...)" if bound == 64 else "")
        )
    try:
        return x509.NameAttribute(oid, value), end
    except ValueError as exc:
        raise ConfigError(f"--subject {text!r}: {name}={value!r}: {exc}") from None


def _attribute_type(text: str, name: str, start: int) -> ObjectIdentifier:
    if _DESCR.fullmatch(name):
        oid = ATTRIBUTE_TYPES.get(name.upper())
        if oid is not None:
            return oid
    elif _NUMERIC_OID.fullmatch(name):
        return ObjectIdentifier(name)
    shown = f"{name!r}" if name.strip() == name else f"{name!r} (no spaces around '=', ',' or '+')"
    raise ConfigError(
        f"--subject {text!r}: unknown attribute type {shown} at character {start + 1}; use "
        f"{', '.join(ATTRIBUTE_TYPES)} or a dotted OID such as 2.5.4.5"
    )


def _value(text: str, start: int) -> tuple[bytes, int]:
    """The value's bytes from ``start`` (escapes resolved) and where it ends."""
    if text.startswith("#", start):
        raise ConfigError(
            f"--subject {text!r}: the #hex (BER) form at character {start + 1} is not "
            "supported; write the value as text (escape a leading '#' as '\\#')"
        )
    if text.startswith(" ", start):
        raise ConfigError(
            f"--subject {text!r}: space at character {start + 1}, after '='; write no space "
            "around separators (a leading space of a value is escaped '\\ ')"
        )
    out = bytearray()
    position = start
    trailing_space = False
    while position < len(text):
        char = text[position]
        if char in ",+":
            break
        if char == "\\":
            escaped = text[position + 1 : position + 2]
            if _HEX_PAIR.fullmatch(text[position + 1 : position + 3]):
                out.append(int(text[position + 1 : position + 3], 16))
                position += 3
            elif escaped and escaped in _ESCAPABLE:
                out.extend(escaped.encode())
                position += 2
            else:
                raise ConfigError(
                    f"--subject {text!r}: bad escape at character {position + 1}: '\\' must "
                    'be followed by one of " + , ; < > \\ space # = or two hex digits'
                )
            trailing_space = False
            continue
        if char in _MUST_ESCAPE or char == "\x00":
            hint = " (RDNs are separated by ',')" if char == ";" else ""
            raise ConfigError(
                f"--subject {text!r}: {char!r} at character {position + 1} must be escaped "
                f"as '\\{char}'{hint}"
            )
        trailing_space = char == " "
        out.extend(char.encode("utf-8"))
        position += 1
    if trailing_space:
        raise ConfigError(
            f"--subject {text!r}: space before character {position + 1}; write no space "
            "around separators (a trailing space of a value is escaped '\\ ')"
        )
    return bytes(out), position


SAN_TYPES = ("DNS", "IP", "URI")
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:[\x21-\x7e]+")


def parse_san(text: str) -> x509.GeneralName:
    """One ``DNS:``, ``IP:`` or ``URI:`` entry as an x509 GeneralName."""
    kind, colon, value = text.partition(":")
    if not colon:
        raise ConfigError(
            f"--san {text!r}: write the type first: DNS:{text}, IP:ADDRESS or URI:URI"
        )
    if kind not in SAN_TYPES:
        raise ConfigError(
            f"--san {text!r}: unsupported type {kind!r}; use DNS:, IP: or URI: (in capitals)"
        )
    if not value:
        raise ConfigError(f"--san {text!r}: the {kind} value is empty")
    if kind == "DNS":
        return x509.DNSName(_dns_name(text, value))
    if kind == "IP":
        return x509.IPAddress(_ip_address(text, value))
    if not _URI.fullmatch(value):
        raise ConfigError(
            f"--san {text!r}: a URI must be absolute (scheme:...), ASCII and without spaces, "
            "e.g. URI:spiffe://example.org/ns/prod/sa/web"
        )
    if value.partition(":")[2].startswith("//") and not value.split("//", 1)[1].split("/")[0]:
        raise ConfigError(f"--san {text!r}: the URI has '//' but no host")
    return x509.UniformResourceIdentifier(value)


def _dns_name(text: str, name: str) -> str:
    if not name.isascii():
        raise ConfigError(
            f"--san {text!r}: a DNS name is ASCII; give an internationalised name as its "
            "A-label (xn--...), as `idn2` prints it"
        )
    if name.endswith("."):
        raise ConfigError(f"--san {text!r}: write the DNS name without the trailing dot")
    if len(name) > 253:
        raise ConfigError(f"--san {text!r}: a DNS name has at most 253 characters")
    labels = name.split(".")
    for index, label in enumerate(labels):
        if label == "*" and index == 0:
            if len(labels) < 3:
                raise ConfigError(
                    f"--san {text!r}: a wildcard needs at least two labels after it (*.example.com)"
                )
            continue
        if not _LABEL.fullmatch(label):
            raise ConfigError(
                f"--san {text!r}: label {label!r} is not a DNS label (letters, digits and "
                "inner hyphens, 1 to 63 characters; '*' only as the whole first label)"
            )
    return name


def _ip_address(text: str, value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        raise ConfigError(
            f"--san {text!r}: {value!r} is not an IPv4 or IPv6 address (one address, no "
            "prefix length)"
        ) from None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        raise ConfigError(f"--san {text!r}: a zone (%{address.scope_id}) has no place in a SAN")
    return address


def parse_sans(entries: Sequence[str]) -> list[x509.GeneralName]:
    """Every ``--san`` in order; a duplicate is refused."""
    names: list[x509.GeneralName] = []
    for entry in entries:
        name = parse_san(entry)
        if name in names:
            raise ConfigError(f"--san {entry!r} is given twice")
        names.append(name)
    return names
