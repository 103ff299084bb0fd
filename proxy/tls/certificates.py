"""Certificate chains: loading, checking, matching them to token keys, and the dev CA.

Theory of operation. A served chain is read from PEM, leaf first. Before anything serves
it, :func:`validate_chain` checks that each certificate is issued by the next one (names
and signatures), that all are inside their validity window now, and
:func:`check_key_matches` proves that the token key is the leaf's key twice over: the
public keys are equal (when the token shows its public key) and a fresh test signature made
inside the token verifies against the certificate. Failures name both SPKI fingerprints.

The development CA used by ``hsm-proxy dev`` and by the tests lives here too: it issues a
certificate for a public key that sits in the token; the CA's own key exists only in memory.

This module uses cryptography's X.509 API only; it never touches an OpenSSL handle.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy.errors import CertificateError, KeyMismatchError, SigningError
from proxy.pkcs11.keys import SHA256_DIGEST_INFO, Mechanism
from proxy.tls.keys import KeySigner


@dataclass(frozen=True)
class Chain:
    """A parsed certificate chain, leaf first."""

    certificates: tuple[x509.Certificate, ...]
    source: str

    @property
    def leaf(self) -> x509.Certificate:
        return self.certificates[0]

    def der(self) -> list[bytes]:
        return [cert.public_bytes(serialization.Encoding.DER) for cert in self.certificates]

    def not_after(self) -> datetime.datetime:
        return not_valid_after(self.leaf)


def spki_fingerprint(spki_der: bytes) -> str:
    """SHA-256 of a SubjectPublicKeyInfo, as colon-separated hex (the form openssl prints)."""
    return ":".join(f"{byte:02X}" for byte in hashlib.sha256(spki_der).digest())


def public_key_der(certificate: x509.Certificate) -> bytes:
    return certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def not_valid_before(certificate: x509.Certificate) -> datetime.datetime:
    """The certificate's notBefore as an aware UTC datetime, on cryptography 38 and 43 alike."""
    # cryptography >= 42 (Debian 13) deprecates the naive properties; 38 (Debian 12) lacks these.
    value = getattr(certificate, "not_valid_before_utc", None)
    if value is None:
        value = certificate.not_valid_before.replace(tzinfo=datetime.UTC)
    return value  # type: ignore[no-any-return]


def not_valid_after(certificate: x509.Certificate) -> datetime.datetime:
    """The certificate's notAfter as an aware UTC datetime."""
    value = getattr(certificate, "not_valid_after_utc", None)
    if value is None:
        value = certificate.not_valid_after.replace(tzinfo=datetime.UTC)
    return value  # type: ignore[no-any-return]


def parse_chain(pem: bytes, source: str) -> Chain:
    """Parse every certificate of a PEM bundle; anything but certificates is an error."""
    if b"PRIVATE KEY-----" in pem:
        raise CertificateError(
            f"{source} contains a private key; the proxy serves token keys only, so a "
            "certificate file must hold certificates alone"
        )
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise CertificateError(f"{source} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
    try:
        certificates = tuple(x509.load_pem_x509_certificates(pem))  # type: ignore[attr-defined]
    except AttributeError:  # cryptography < 39 (Debian 12) has no load_pem_x509_certificates
        certificates = _load_pem_one_by_one(pem, source)
    except ValueError as exc:
        raise CertificateError(f"{source}: cannot parse a certificate: {exc}") from None
    return Chain(certificates, source)


def _load_pem_one_by_one(pem: bytes, source: str) -> tuple[x509.Certificate, ...]:
    marker_end = b"-----END CERTIFICATE-----"
    certificates = []
    for block in pem.split(marker_end)[:-1]:
        start = block.find(b"-----BEGIN CERTIFICATE-----")
        if start < 0:
            raise CertificateError(f"{source}: an END CERTIFICATE marker has no BEGIN")
        try:
            certificates.append(x509.load_pem_x509_certificate(block[start:] + marker_end + b"\n"))
        except ValueError as exc:
            raise CertificateError(
                f"{source}: certificate {len(certificates) + 1} cannot be parsed: {exc}"
            ) from None
    return tuple(certificates)


def load_chain(path: Path) -> Chain:
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise CertificateError(f"cannot read certificate chain {path}: {exc.strerror}") from None
    return parse_chain(pem, str(path))


def validate_chain(chain: Chain, now: datetime.datetime | None = None) -> None:
    """Order, issuer signatures and validity dates of every certificate in ``chain``."""
    now = now or datetime.datetime.now(datetime.UTC)
    for position, certificate in enumerate(chain.certificates, start=1):
        subject = certificate.subject.rfc4514_string()
        if now < not_valid_before(certificate):
            raise CertificateError(
                f"{chain.source}: certificate {position} ({subject}) is not valid before "
                f"{not_valid_before(certificate):%Y-%m-%d %H:%M:%S}Z"
            )
        if now > not_valid_after(certificate):
            raise CertificateError(
                f"{chain.source}: certificate {position} ({subject}) expired on "
                f"{not_valid_after(certificate):%Y-%m-%d %H:%M:%S}Z"
            )
    for position, (child, issuer) in enumerate(
        zip(chain.certificates, chain.certificates[1:], strict=False), start=1
    ):
        if child.issuer != issuer.subject:
            raise CertificateError(
                f"{chain.source}: chain out of order: certificate {position} was issued by "
                f"{child.issuer.rfc4514_string()}, but certificate {position + 1} is "
                f"{issuer.subject.rfc4514_string()}; list the leaf first, then each issuer"
            )
        if not _signed_by(child, issuer):
            raise CertificateError(
                f"{chain.source}: certificate {position}'s signature does not verify with "
                f"certificate {position + 1}'s key"
            )


def _signed_by(child: x509.Certificate, issuer: x509.Certificate) -> bool:
    key = issuer.public_key()
    algorithm = child.signature_hash_algorithm
    if algorithm is None:
        return False
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(child.signature, child.tbs_certificate_bytes, ec.ECDSA(algorithm))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(child.signature, child.tbs_certificate_bytes, padding.PKCS1v15(), algorithm)
        else:
            return False
    except InvalidSignature:
        return False
    return True


def check_key_matches(chain: Chain, key: KeySigner) -> None:
    """Prove the token key is the leaf certificate's key: equal SPKIs and a test signature."""
    cert_spki = public_key_der(chain.leaf)
    token_spki = key.info.public_key_der
    if token_spki is not None and token_spki != cert_spki:
        raise KeyMismatchError(
            f"{chain.source}: the certificate's public key (SHA-256 "
            f"{spki_fingerprint(cert_spki)}) is not the token key's {key.info.describe()} "
            f"(SHA-256 {spki_fingerprint(token_spki)})"
        )
    challenge = hashlib.sha256(b"hsm-proxy key match " + os.urandom(32)).digest()
    public = chain.leaf.public_key()
    try:
        if isinstance(public, ec.EllipticCurvePublicKey) and key.info.key_type == "EC":
            raw = key.sign(Mechanism.ECDSA, challenge)
            half = len(raw) // 2
            signature = utils.encode_dss_signature(
                int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big")
            )
            public.verify(signature, challenge, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
        elif isinstance(public, rsa.RSAPublicKey) and key.info.key_type == "RSA":
            signature = key.sign(Mechanism.RSA_PKCS, SHA256_DIGEST_INFO + challenge)
            public.verify(
                signature, challenge, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256())
            )
        else:
            raise KeyMismatchError(
                f"{chain.source}: the certificate holds a {type(public).__name__} but the token "
                f"key {key.info.describe()} is {key.info.key_type} (certificate SHA-256 "
                f"{spki_fingerprint(cert_spki)})"
            )
    except InvalidSignature:
        raise KeyMismatchError(
            f"{chain.source}: a test signature by the token key {key.info.describe()} does not "
            f"verify against the certificate (SHA-256 {spki_fingerprint(cert_spki)})"
        ) from None
    except SigningError as exc:
        raise KeyMismatchError(
            f"{chain.source}: the token key could not make a test signature: {exc}"
        ) from None


# --- the development CA ------------------------------------------------------------------


@dataclass(frozen=True)
class DevCA:
    """A throw-away CA for dev mode and tests; its key lives only in this object."""

    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(cls, name: str = "hsm-proxy development CA", days: int = 3650) -> DevCA:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(certificate, key)

    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def issue(
        self,
        public_key_spki: bytes,
        names: Sequence[str],
        days: int = 365,
        not_before: datetime.datetime | None = None,
    ) -> bytes:
        """A server certificate for a (token) public key, returned as PEM: leaf only."""
        public = serialization.load_der_public_key(public_key_spki)
        if not isinstance(public, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
            raise CertificateError("the dev CA issues certificates for EC and RSA keys only")
        start = not_before or datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
        alternative: list[x509.GeneralName] = []
        for name in names:
            try:
                alternative.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                alternative.append(x509.DNSName(name))
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self.certificate.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(alternative), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.private_key.public_key()),
                critical=False,
            )
            .sign(self.private_key, hashes.SHA256())
        )
        return certificate.public_bytes(serialization.Encoding.PEM)
