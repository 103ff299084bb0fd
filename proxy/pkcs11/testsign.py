"""Test signatures: a token key signs a random SHA-256 digest, checked against a public key.

Theory of operation. :func:`sign_test_digest` asks the token for one signature the way a
TLS handshake does (CKM_ECDSA on the digest for EC keys, CKM_RSA_PKCS on a DigestInfo for
RSA keys); it touches no certificate object, so it can run in a worker thread while other
threads use the certificates (cryptography's objects are not safe to share between
threads). :func:`verifies` checks the signature against a public key (DER or object) in
the caller's thread. The readiness probe (net/readiness.py) and ``hsm-proxy doctor`` use both.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

from proxy.pkcs11.keys import SHA256_DIGEST_INFO, Mechanism
from proxy.pkcs11.token import TokenKey


@dataclass(frozen=True)
class SignedDigest:
    mechanism: Mechanism
    digest: bytes
    signature: bytes


def sign_test_digest(key: TokenKey, label: bytes = b"hsm-proxy test") -> SignedDigest:
    """One signature by ``key`` over a fresh random digest; raises the token's ProxyError."""
    digest = hashlib.sha256(label + os.urandom(32)).digest()
    if key.info.key_type == "EC":
        return SignedDigest(Mechanism.ECDSA, digest, key.sign(Mechanism.ECDSA, digest))
    signed = key.sign(Mechanism.RSA_PKCS, SHA256_DIGEST_INFO + digest)
    return SignedDigest(Mechanism.RSA_PKCS, digest, signed)


PublicKey = bytes | ec.EllipticCurvePublicKey | rsa.RSAPublicKey


def verifies(public: PublicKey, test: SignedDigest) -> bool:
    """Whether ``test`` verifies against ``public`` (SubjectPublicKeyInfo DER or a key)."""
    key = serialization.load_der_public_key(public) if isinstance(public, bytes) else public
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            half = len(test.signature) // 2
            der = utils.encode_dss_signature(
                int.from_bytes(test.signature[:half], "big"),
                int.from_bytes(test.signature[half:], "big"),
            )
            key.verify(der, test.digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(
                test.signature, test.digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256())
            )
        else:
            return False
    except (InvalidSignature, ValueError):
        return False
    return True
