"""Client certificates (mutual TLS): who a verified client is, whether it may come in, and
what the upstream is told about it.

Theory of operation. OpenSSL verifies the client's chain against the configured CA bundle
(verify.py installs the bundle and calls back here). This module works on the verified leaf as
a ``cryptography`` certificate and knows nothing of sockets or OpenSSL:

* :func:`load_ca_bundle` parses and checks a PEM bundle of client CAs (bytes from any
  secret source; every generation reads it again, and the reloader watches it).
* :meth:`ClientIdentity.from_certificate` extracts what authorization and the upstream use:
  subject CN, DNS SANs, URI SANs (SPIFFE IDs), the SHA-256 of the SubjectPublicKeyInfo.
* :meth:`ClientAuthPolicy.admits` checks the allow-lists. A client is admitted when any
  entry of any list matches (as ghostunnel's ``--allow-*`` flags do); with no list at all,
  nobody is admitted unless ``allow_any`` says so explicitly.
* :func:`identity_headers` is what the upstream receives. Every client-sent header whose
  name starts with ``X-Client-Cert-`` (and Envoy's ``X-Forwarded-Client-Cert``) is removed
  from the request first (http/rules.py), so a client can never forge an identity.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import quote

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from proxy.errors import CertificateError, ConfigError, SecretError
from proxy.secrets.store import SecretRef
from proxy.tls.certificates import parse_chain

ClientAuthMode = Literal["require", "optional"]
MODES: tuple[ClientAuthMode, ...] = ("require", "optional")

IDENTITY_HEADER_PREFIX = b"x-client-cert-"
# Headers a client may never send upstream: ours, and the de facto standard of Envoy that
# an upstream might trust.
FORGEABLE_HEADERS = frozenset({b"x-forwarded-client-cert"})

HeaderList = tuple[tuple[bytes, bytes], ...]


def is_identity_header(name: bytes) -> bool:
    """True for a header only the proxy may set (compared case-insensitively)."""
    lowered = name.lower()
    return lowered.startswith(IDENTITY_HEADER_PREFIX) or lowered in FORGEABLE_HEADERS


def parse_spki_pin(text: str, where: str) -> bytes:
    """A SHA-256 SPKI pin written as base64 of the 32-byte digest (44 characters)."""
    try:
        digest = base64.b64decode(text.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        digest = b""
    if len(digest) != 32 or len(text) != 44:
        raise ConfigError(
            f"{where}: {text!r} is not a SHA-256 SPKI pin: expected base64 of 32 bytes (44 "
            "characters), as printed by: openssl x509 -in CERT -pubkey -noout | openssl pkey "
            "-pubin -outform der | openssl dgst -sha256 -binary | base64"
        )
    return digest


@dataclass(frozen=True)
class ClientIdentity:
    """What a verified client certificate says about its holder."""

    subject: str
    issuer: str
    common_names: tuple[str, ...]
    dns_names: tuple[str, ...]
    uris: tuple[str, ...]
    spki_sha256: bytes
    fingerprint_sha256: str = ""  # of the whole certificate (DER), lowercase hex

    @classmethod
    def from_certificate(cls, certificate: x509.Certificate) -> ClientIdentity:
        common_names = tuple(
            str(attribute.value)
            for attribute in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        )
        try:
            san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            dns_names = tuple(san.get_values_for_type(x509.DNSName))
            uris = tuple(san.get_values_for_type(x509.UniformResourceIdentifier))
        except x509.ExtensionNotFound:
            dns_names, uris = (), ()
        spki = certificate.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return cls(
            subject=certificate.subject.rfc4514_string(),
            issuer=certificate.issuer.rfc4514_string(),
            common_names=common_names,
            dns_names=dns_names,
            uris=uris,
            spki_sha256=hashlib.sha256(spki).digest(),
            fingerprint_sha256=certificate.fingerprint(hashes.SHA256()).hex(),
        )

    def describe(self) -> str:
        parts = [self.subject or "empty subject"]
        if self.dns_names:
            parts.append("DNS:" + ",".join(self.dns_names))
        if self.uris:
            parts.append("URI:" + ",".join(self.uris))
        parts.append("SPKI sha256/" + base64.b64encode(self.spki_sha256).decode("ascii"))
        return " ".join(parts)


@dataclass(frozen=True)
class ClientAuthPolicy:
    """Mutual TLS for one listener (or one server name): who may connect."""

    mode: ClientAuthMode
    ca: SecretRef
    allow_cn: frozenset[str] = frozenset()
    allow_dns: frozenset[str] = frozenset()
    allow_uri: frozenset[str] = frozenset()
    allow_spki_sha256: frozenset[bytes] = frozenset()
    allow_any: bool = False
    # The CA bundle's certificates, filled in when a generation is built (never compared).
    ca_certificates: tuple[x509.Certificate, ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        lists = (self.allow_cn, self.allow_dns, self.allow_uri, self.allow_spki_sha256)
        if self.allow_any and any(lists):
            raise ConfigError(
                "tls.client_auth: allow_any = true admits every client of the CA; it cannot "
                "be combined with allow_cn/allow_dns/allow_uri/allow_spki_sha256"
            )
        if not self.allow_any and not any(lists):
            raise ConfigError(
                "tls.client_auth: no client would be admitted: list the identities to allow "
                "(allow_cn, allow_dns, allow_uri, allow_spki_sha256), or set allow_any = true "
                "to admit every certificate the client CA issued"
            )

    def admits(self, identity: ClientIdentity) -> bool:
        if self.allow_any:
            return True
        return (
            any(name in self.allow_cn for name in identity.common_names)
            or any(name.lower() in self.allow_dns for name in identity.dns_names)
            or any(uri in self.allow_uri for uri in identity.uris)
            or identity.spki_sha256 in self.allow_spki_sha256
        )

    def fingerprint(self) -> bytes:
        """A digest of everything that decides admission: it goes into the TLS session ID
        context, so a session made under one policy never resumes under another."""
        digest = hashlib.sha256()
        for part in (
            self.mode,
            *sorted(self.allow_cn),
            "|",
            *sorted(self.allow_dns),
            "|",
            *sorted(self.allow_uri),
            "|",
            str(self.allow_any),
        ):
            digest.update(part.encode("utf-8") + b"\0")
        for pin in sorted(self.allow_spki_sha256):
            digest.update(pin)
        for certificate in self.ca_certificates:
            digest.update(certificate.fingerprint(hashes.SHA256()))
        return digest.digest()


def load_ca_bundle(pem: bytes, where: str) -> tuple[x509.Certificate, ...]:
    """The CA certificates of a PEM bundle (``where`` names it); each must be a CA."""
    try:
        certificates = parse_chain(pem, where).certificates
    except CertificateError as exc:
        raise SecretError(str(exc)) from None
    for position, certificate in enumerate(certificates, start=1):
        try:
            constraints = certificate.extensions.get_extension_for_class(
                x509.BasicConstraints
            ).value
        except x509.ExtensionNotFound:
            constraints = None
        if constraints is None or not constraints.ca:
            raise SecretError(
                f"{where}: certificate {position} "
                f"({certificate.subject.rfc4514_string()}) is not a CA certificate"
            )
    return certificates


# Printable ASCII except the list separator and the escape character itself stays as is.
_SAFE = "".join(chr(code) for code in range(0x20, 0x7F) if chr(code) not in ",%")


def _header_value(values: tuple[str, ...] | str) -> bytes:
    if isinstance(values, str):  # one value (a distinguished name): commas are its own
        return quote(values, safe=_SAFE + ",").encode("ascii")
    return ",".join(quote(item, safe=_SAFE) for item in values).encode("ascii")


def identity_headers(identity: ClientIdentity | None) -> HeaderList:
    """The headers that tell the upstream who the client is (client auth is configured).

    ``X-Client-Cert-Verified`` is ``success`` for an admitted certificate and ``none`` when
    an ``optional`` listener saw no certificate. Values are ASCII: a character outside
    printable ASCII or a percent sign is percent-encoded (RFC 3986); the list headers (CN,
    DNS, URI) separate entries with commas and percent-encode a comma inside an entry."""
    if identity is None:
        return ((b"X-Client-Cert-Verified", b"none"),)
    headers = [
        (b"X-Client-Cert-Verified", b"success"),
        (b"X-Client-Cert-Subject", _header_value(identity.subject)),
        (b"X-Client-Cert-Issuer", _header_value(identity.issuer)),
    ]
    if identity.common_names:
        headers.append((b"X-Client-Cert-CN", _header_value(identity.common_names)))
    if identity.dns_names:
        headers.append((b"X-Client-Cert-DNS", _header_value(identity.dns_names)))
    if identity.uris:
        headers.append((b"X-Client-Cert-URI", _header_value(identity.uris)))
    headers.append((b"X-Client-Cert-SPKI-SHA256", base64.b64encode(identity.spki_sha256)))
    if identity.fingerprint_sha256:
        headers.append((b"X-Client-Cert-Fingerprint", identity.fingerprint_sha256.encode()))
    return tuple(headers)
