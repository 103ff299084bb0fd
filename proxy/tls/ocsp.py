"""OCSP stapling material: a DER OCSP response, read and checked before it is served.

Theory of operation. The proxy never fetches OCSP responses itself (it needs no outbound
network): an operator's job (``openssl ocsp ... -respout``, certbot, a secrets manager)
writes the response to a file or a secret; each generation reads it and checks it with
:func:`check_ocsp_response` (the reloader watches it like a certificate). It is checked
exactly: it parses, its status is ``successful``, it answers for the served leaf
certificate (serial and issuer), the certificate is ``good`` (a revoked certificate is
never served with a staple saying so), and it is current (this_update is past,
next_update, when present, is future). context.py staples the bytes unchanged.
"""

from __future__ import annotations

import datetime

from asn1crypto import keys
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from proxy.errors import SecretError
from proxy.tls.certificates import Chain


def _issuer_matches(response: ocsp.OCSPResponse, chain: Chain) -> bool:
    if len(chain.certificates) < 2:
        return True  # no issuer certificate at hand: the serial check has to do
    issuer = chain.certificates[1]
    algorithm = response.hash_algorithm
    name_hash = hashes.Hash(algorithm)
    name_hash.update(issuer.subject.public_bytes(serialization.Encoding.DER))
    key_hash = hashes.Hash(algorithm)
    key_hash.update(_subject_public_key_bits(issuer))
    return (
        response.issuer_name_hash == name_hash.finalize()
        and response.issuer_key_hash == key_hash.finalize()
    )


def _subject_public_key_bits(certificate: x509.Certificate) -> bytes:
    """The subjectPublicKey BIT STRING's bits (what an OCSP issuer key hash covers)."""
    spki = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    bits: bytes = keys.PublicKeyInfo.load(spki)["public_key"].contents
    return bits[1:]  # the first content byte counts unused bits


def check_ocsp_response(der: bytes, chain: Chain, where: str) -> bytes:
    """``der`` if it is a current, good OCSP response for ``chain``'s leaf; else an error."""
    try:
        response = ocsp.load_der_ocsp_response(der)
    except ValueError:
        raise SecretError(f"{where} is not a DER OCSP response") from None
    if response.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        raise SecretError(
            f"{where} has status {response.response_status.name.lower()}, not successful"
        )
    leaf = chain.leaf
    if response.serial_number != leaf.serial_number or not _issuer_matches(response, chain):
        raise SecretError(
            f"{where} is for another certificate (serial "
            f"{response.serial_number:x}, the served certificate's is {leaf.serial_number:x})"
        )
    if response.certificate_status != ocsp.OCSPCertStatus.GOOD:
        raise SecretError(
            f"{where} says the certificate is {response.certificate_status.name.lower()}"
        )
    now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    if response.this_update > now:
        raise SecretError(f"{where} is not valid yet ({response.this_update}Z)")
    if response.next_update is not None and response.next_update <= now:
        raise SecretError(f"{where} expired at {response.next_update}Z")
    return der
