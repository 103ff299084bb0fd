"""Mutual TLS test material: client certificates with exactly the identities asked for,
client contexts that present them, the ``[tls.client_auth]`` table, and "was it refused"."""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.support import client_context, https_request


@dataclass
class ClientCert:
    certificate: x509.Certificate
    cert_path: Path
    key_path: Path

    @property
    def spki_pin(self) -> str:
        spki = self.certificate.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return base64.b64encode(hashlib.sha256(spki).digest()).decode()


def issue_client_cert(
    directory: Path,
    ca: trustme.CA,
    name: str,
    *,
    common_name: str | None = None,
    dns: tuple[str, ...] = (),
    uris: tuple[str, ...] = (),
    expired: bool = False,
    usage: x509.ObjectIdentifier = x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH,
) -> ClientCert:
    """A client certificate signed by ``ca``, with exactly the identities asked for."""
    issuer = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    issuer_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    start, end = (
        (now - datetime.timedelta(days=30), now - datetime.timedelta(days=1))
        if expired
        else (now - datetime.timedelta(hours=1), now + datetime.timedelta(days=1))
    )
    subject = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, common_name)] if common_name else []
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    names: list[x509.GeneralName] = [x509.DNSName(value) for value in dns]
    names += [x509.UniformResourceIdentifier(value) for value in uris]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    certificate = builder.sign(issuer_key, hashes.SHA256())  # type: ignore[arg-type]
    cert_path = directory / f"client-{name}.pem"
    key_path = directory / f"client-{name}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ClientCert(certificate, cert_path, key_path)


def with_client_cert(ca: trustme.CA, cert: ClientCert | None) -> ssl.SSLContext:
    context = client_context(ca)
    if cert is not None:
        context.load_cert_chain(cert.cert_path, cert.key_path)
    return context


def client_auth_table(ca_path: Path, mode: str = "require", **lists: list[str]) -> str:
    lines = ["", "[tls.client_auth]", f'mode = "{mode}"', f'ca = "{ca_path}"']
    lines += [f"{key} = {json.dumps(values)}" for key, values in lists.items()]
    return "\n".join(lines) + "\n"


def refused(port: int, context: ssl.SSLContext, server_name: str = "localhost") -> str | None:
    """The TLS alert the proxy refused the handshake with, as OpenSSL names it (for example
    ``TLSV13_ALERT_CERTIFICATE_REQUIRED``; TLS 1.3 clients learn it on first read), or None
    when the request went through. Any other error (a reset, a timeout, a failure of the
    client's own) is not a refusal: it fails the test."""
    try:
        https_request(port, context, path="/must-not-arrive", server_name=server_name)
    except ssl.SSLError as error:
        reason = str(error.reason)
        if "_ALERT_" not in reason:
            raise AssertionError(f"not a TLS alert from the proxy: {error!r}") from error
        return reason
    return None
