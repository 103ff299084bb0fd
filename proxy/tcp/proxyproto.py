"""PROXY protocol version 2 headers: who the client is, told to a TCP upstream first.

Theory of operation. With ``proxy_protocol = "v2"`` the TCP passthrough handler writes one
header (HAProxy's proxy-protocol.txt, section 2.2) on each upstream connection before any
byte of the client's; :func:`encode_v2` makes it from the client connection's addresses
and what its TLS handshake settled. Pure bytes, no I/O.

The header is the 12-byte signature, ``0x21`` (version 2, command PROXY), the family
(``0x11`` TCP over IPv4, ``0x21`` TCP over IPv6), the length of the rest, the source (the
client) and destination (the address the client connected to) addresses and ports in
network byte order, then TLVs (type, 16-bit length, value):

* ``PP2_TYPE_ALPN`` (0x01): the protocol ALPN selected, when one was;
* ``PP2_TYPE_AUTHORITY`` (0x02): the SNI name, when the client sent one;
* ``PP2_TYPE_SSL`` (0x20): a client byte (``PP2_CLIENT_SSL``, and with a verified client
  certificate ``PP2_CLIENT_CERT_SESS``, plus ``PP2_CLIENT_CERT_CONN`` unless the session
  was resumed, in which case the certificate was shown on an earlier connection), a
  32-bit verify field (0: a client certificate was presented and verified; 1: none was),
  and sub-TLVs ``PP2_SUBTYPE_SSL_VERSION`` (0x21, "TLSv1.3"), ``PP2_SUBTYPE_SSL_CIPHER``
  (0x23, OpenSSL's name) and, with a verified certificate that has one, its first common
  name as ``PP2_SUBTYPE_SSL_CN`` (0x22);
* with a verified client certificate, the rest of its identity in TLVs of the range the
  specification keeps for applications (0xE0 to 0xEF), the same facts the HTTP side sends
  as ``X-Client-Cert-*`` headers: the subject (0xE0) and issuer (0xE1) as RFC 4514
  strings, each URI SAN (0xE2, SPIFFE IDs among them) and each DNS SAN (0xE3) in a TLV of
  its own, the SHA-256 of the SubjectPublicKeyInfo (0xE4) and of the certificate (0xE5)
  as 32 raw bytes.

The readiness probe's connections, which relay nothing, carry :data:`LOCAL_HEADER`
(command LOCAL, family UNSPEC, no addresses), as the specification has health checks do.

Everything here was verified before the header is made: the proxy never forwards a
client's claim about itself, only what the handshake proved.
"""

from __future__ import annotations

import ipaddress
import struct

from proxy.tls.clientauth import ClientIdentity
from proxy.tls.stream import TLSInfo

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
VERSION_2_PROXY = 0x21
TCP_OVER_IPV4 = 0x11
TCP_OVER_IPV6 = 0x21

PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CN = 0x22
PP2_SUBTYPE_SSL_CIPHER = 0x23
PP2_CLIENT_SSL = 0x01
PP2_CLIENT_CERT_CONN = 0x02
PP2_CLIENT_CERT_SESS = 0x04

# hsm-proxy's own TLVs (the application range, PP2_TYPE_MIN_CUSTOM to PP2_TYPE_MAX_CUSTOM).
PP2_TYPE_CLIENT_SUBJECT = 0xE0
PP2_TYPE_CLIENT_ISSUER = 0xE1
PP2_TYPE_CLIENT_URI = 0xE2
PP2_TYPE_CLIENT_DNS = 0xE3
PP2_TYPE_CLIENT_SPKI_SHA256 = 0xE4
PP2_TYPE_CLIENT_CERT_SHA256 = 0xE5

_MAX_LENGTH = 0xFFFF
VERSION_2_LOCAL = 0x20
# The whole header of a connection the proxy makes for itself (a health check): command
# LOCAL, family UNSPEC, no addresses; the receiver uses the connection's own endpoints.
LOCAL_HEADER = SIGNATURE + bytes([VERSION_2_LOCAL, 0x00, 0x00, 0x00])


def tlv(kind: int, value: bytes) -> bytes:
    """One type-length-value entry; a value longer than 65535 bytes is a ``ValueError``."""
    if len(value) > _MAX_LENGTH:
        raise ValueError(f"a PROXY protocol TLV of type {kind:#04x} cannot hold {len(value)} bytes")
    return struct.pack("!BH", kind, len(value)) + value


def _addresses(source: tuple[str, int], destination: tuple[str, int]) -> tuple[int, bytes]:
    """The family byte and the address block; an IPv4 address beside an IPv6 one is
    written IPv4-mapped (::ffff:a.b.c.d)."""
    src = ipaddress.ip_address(source[0])
    dst = ipaddress.ip_address(destination[0])
    if src.version != dst.version:
        src, dst = (
            ipaddress.IPv6Address(f"::ffff:{address}") if address.version == 4 else address
            for address in (src, dst)
        )
    family = TCP_OVER_IPV4 if src.version == 4 else TCP_OVER_IPV6
    return family, src.packed + dst.packed + struct.pack("!HH", source[1], destination[1])


def _identity_tlvs(identity: ClientIdentity) -> list[bytes]:
    entries = [
        tlv(PP2_TYPE_CLIENT_SUBJECT, identity.subject.encode()),
        tlv(PP2_TYPE_CLIENT_ISSUER, identity.issuer.encode()),
    ]
    entries += [tlv(PP2_TYPE_CLIENT_URI, uri.encode()) for uri in identity.uris]
    entries += [tlv(PP2_TYPE_CLIENT_DNS, name.encode()) for name in identity.dns_names]
    entries.append(tlv(PP2_TYPE_CLIENT_SPKI_SHA256, identity.spki_sha256))
    if identity.fingerprint_sha256:
        entries.append(tlv(PP2_TYPE_CLIENT_CERT_SHA256, bytes.fromhex(identity.fingerprint_sha256)))
    return entries


def tls_tlvs(info: TLSInfo) -> list[bytes]:
    """The TLVs that describe a TLS connection (see the module docstring)."""
    entries = []
    if info.alpn:
        entries.append(tlv(PP2_TYPE_ALPN, info.alpn.encode("ascii")))
    if info.server_name:
        entries.append(tlv(PP2_TYPE_AUTHORITY, info.server_name.encode()))
    identity = info.client_identity
    client = PP2_CLIENT_SSL
    if identity is not None:
        client |= (
            PP2_CLIENT_CERT_SESS if info.resumed else PP2_CLIENT_CERT_SESS | PP2_CLIENT_CERT_CONN
        )
    ssl = [
        struct.pack("!BI", client, 0 if identity is not None else 1),
        tlv(PP2_SUBTYPE_SSL_VERSION, info.version.encode("ascii")),
    ]
    if identity is not None and identity.common_names:
        ssl.append(tlv(PP2_SUBTYPE_SSL_CN, identity.common_names[0].encode()))
    if info.cipher:
        ssl.append(tlv(PP2_SUBTYPE_SSL_CIPHER, info.cipher.encode("ascii")))
    entries.append(tlv(PP2_TYPE_SSL, b"".join(ssl)))
    if identity is not None:
        entries += _identity_tlvs(identity)
    return entries


def encode_v2(
    source: tuple[str, int], destination: tuple[str, int], info: TLSInfo | None = None
) -> bytes:
    """A PROXY v2 header for a TCP connection from ``source`` to ``destination`` (numeric
    host, port), with the TLS TLVs of ``info`` when given. Raises ``ValueError`` when the
    header would exceed the 65535 bytes its length field can say."""
    family, addresses = _addresses(source, destination)
    body = addresses + b"".join(tls_tlvs(info) if info is not None else [])
    if len(body) > _MAX_LENGTH:
        raise ValueError(f"a PROXY protocol v2 header cannot hold {len(body)} bytes")
    return SIGNATURE + struct.pack("!BBH", VERSION_2_PROXY, family, len(body)) + body
