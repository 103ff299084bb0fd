"""PKCS#10 certificate signing requests for a token key, signed inside the token.

Theory of operation. :func:`build_request` assembles the CertificationRequestInfo of RFC
2986 (version 1, the subject, the key's SubjectPublicKeyInfo as the token reports it, and
an extensionRequest with the subjectAltName when there are SANs), hashes its DER, and asks
the token for one signature through :class:`~proxy.tls.keys.KeySigner` (proxy.pkcs11's
``TokenKey``), with the mechanisms a handshake uses:

* EC: CKM_ECDSA on the SHA-256 (P-256) or SHA-384 (P-384) digest; the token's ``r || s``
  must be exactly twice the curve's size and becomes the DER ECDSA-Sig-Value;
* RSA, PKCS#1 v1.5 (the default, which every CA takes): CKM_RSA_PKCS on the SHA-256
  DigestInfo, sha256WithRSAEncryption;
* RSA-PSS (``rsa_pss``): CKM_RSA_PKCS_PSS on the SHA-256 digest, MGF1 with SHA-256 and a
  32-byte salt, as RFC 4055 parameters.

A signature of the wrong length is an error, never padded or cut. The finished request is
then verified with cryptography against the public key it carries, so what leaves here is
a request any CA will accept as self-consistent.

Why not OpenSSL's X509_REQ_sign over the key bridge's EVP_PKEY: that would add a dozen
libcrypto declarations to binding.py, tie the request to the legacy key methods that
OpenSSL 4 drops (keys.py), and OpenSSL has no RFC 4514 parser. Here the X.509 structure is
asn1crypto's and cryptography's work (no OpenSSL handle is touched), and the only private
key operation is one ordinary token signature, made, audited and counted the way every
handshake signature is.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from asn1crypto import algos, csr, keys
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from proxy.errors import SigningError, TokenError
from proxy.pkcs11.keys import SHA256_DIGEST_INFO, Mechanism, PSSParams
from proxy.tls.keys import KeySigner

_EC_HASH = {"P-256": ("sha256", 32), "P-384": ("sha384", 48)}


def build_request(
    subject: x509.Name,
    sans: Sequence[x509.GeneralName],
    signer: KeySigner,
    *,
    rsa_pss: bool = False,
) -> bytes:
    """The DER of a PKCS#10 request for ``signer``'s key, signed by the token."""
    info = signer.info
    if info.public_key_der is None:
        raise TokenError(
            f"the token shows no public key for key {info.describe()}; a certificate request "
            "carries the public key (generate the pair with `hsm-proxy key generate`, which "
            "keeps the public key object)"
        )
    if rsa_pss and info.key_type != "RSA":
        raise SigningError(f"--rsa-pss is for RSA keys; key {info.label!r} is {info.size}")
    attributes = []
    if sans:
        extension = x509.SubjectAlternativeName(list(sans)).public_bytes()
        attributes.append(
            {
                "type": "extension_request",
                "values": [
                    [
                        {
                            "extn_id": "subject_alt_name",
                            "critical": False,
                            "extn_value": asn1_x509.GeneralNames.load(extension),
                        }
                    ]
                ],
            }
        )
    # cryptography's encoding of the key, so that the request carries the canonical form
    # (the NULL parameters of rsaEncryption included) whatever the token reported.
    public_key_der = _canonical(info.public_key_der)
    request_info = csr.CertificationRequestInfo(
        {
            "version": "v1",
            "subject": asn1_x509.Name.load(subject.public_bytes()),
            "subject_pk_info": keys.PublicKeyInfo.load(public_key_der),
            "attributes": attributes,
        }
    )
    to_sign = request_info.dump()
    algorithm, signature = _sign(signer, to_sign, rsa_pss)
    request: bytes = csr.CertificationRequest(
        {
            "certification_request_info": request_info,
            "signature_algorithm": algorithm,
            "signature": signature,
        }
    ).dump()
    _verify(request, public_key_der, info.describe())
    return request


def _canonical(public_key_der: bytes) -> bytes:
    return serialization.load_der_public_key(public_key_der).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _sign(
    signer: KeySigner, data: bytes, rsa_pss: bool
) -> tuple[algos.SignedDigestAlgorithm, bytes]:
    info = signer.info
    offered = signer.mechanisms
    if info.key_type == "EC":
        hash_name, half = _EC_HASH[info.size]
        _require(Mechanism.ECDSA, offered, info.describe())
        raw = signer.sign(Mechanism.ECDSA, hashlib.new(hash_name, data).digest())
        if len(raw) != 2 * half:
            raise SigningError(
                f"the token's ECDSA signature is {len(raw)} bytes; {info.size} needs exactly "
                f"{2 * half}"
            )
        signature = algos.DSASignature.from_p1363(raw).dump()
        return algos.SignedDigestAlgorithm({"algorithm": f"{hash_name}_ecdsa"}), signature
    modulus_bytes = (int(info.size.removeprefix("RSA-")) + 7) // 8
    digest = hashlib.sha256(data).digest()
    if rsa_pss:
        _require(Mechanism.RSA_PKCS_PSS, offered, info.describe())
        signature = signer.sign(Mechanism.RSA_PKCS_PSS, digest, PSSParams("SHA256", 32))
        algorithm = algos.SignedDigestAlgorithm(
            {
                "algorithm": "rsassa_pss",
                "parameters": algos.RSASSAPSSParams(
                    {
                        "hash_algorithm": {"algorithm": "sha256"},
                        "mask_gen_algorithm": {
                            "algorithm": "mgf1",
                            "parameters": {"algorithm": "sha256"},
                        },
                        "salt_length": 32,
                        "trailer_field": "trailer_field_bc",
                    }
                ),
            }
        )
    else:
        _require(Mechanism.RSA_PKCS, offered, info.describe())
        signature = signer.sign(Mechanism.RSA_PKCS, SHA256_DIGEST_INFO + digest)
        algorithm = algos.SignedDigestAlgorithm({"algorithm": "sha256_rsa"})
    if len(signature) != modulus_bytes:
        raise SigningError(
            f"the token's RSA signature is {len(signature)} bytes; {info.size} needs exactly "
            f"{modulus_bytes}"
        )
    return algorithm, signature


def _require(mechanism: Mechanism, offered: frozenset[Mechanism], key: str) -> None:
    if mechanism not in offered:
        raise SigningError(
            f"the token does not offer CKM_{mechanism.value}, which signing a request with "
            f"key {key} needs"
        )


def _verify(request_der: bytes, public_key_der: bytes, key: str) -> None:
    request = x509.load_der_x509_csr(request_der)
    carried = request.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if carried != public_key_der or not request.is_signature_valid:
        raise SigningError(
            f"the token's signature over the request does not verify against the public key "
            f"of key {key}"
        )


def request_pem(request_der: bytes) -> str:
    """The request as PEM (``-----BEGIN CERTIFICATE REQUEST-----``), what CAs take."""
    request = x509.load_der_x509_csr(request_der)
    return request.public_bytes(serialization.Encoding.PEM).decode("ascii")
