"""Keys as the proxy sees them: signing mechanisms, what it knows of a key, signature events.

Theory of operation. A private key object is described once, when it is found
(:func:`describe_key`): label and ID, type and size (P-256, P-384, RSA-2048 to 4096; any
other key is refused), its public key as SubjectPublicKeyInfo DER when the token shows it,
and the custody attributes (sensitive, extractable) that say whether it could leave the
token. :class:`KeyInfo` holds that, never key material. :class:`Mechanism` and
:class:`PSSParams` are the vocabulary the key bridge signs in; ``P11_MECHANISM`` and
``PSS_HASHES`` translate it into python-pkcs11's. Each signature the token makes is
reported as a :class:`SignatureEvent` to a :data:`SignatureObserver` (audit log, metrics).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pkcs11
import pkcs11.exceptions as p11err
from asn1crypto.keys import ECDomainParameters, PublicKeyInfo, RSAPublicKey
from pkcs11 import Attribute, KeyType, ObjectClass
from pkcs11.util.ec import encode_ec_public_key

from proxy.errors import TokenError


class Mechanism(enum.Enum):
    """The signing mechanisms a TLS handshake needs from a token."""

    ECDSA = "ECDSA"  # the digest goes in, r || s comes out
    RSA_PKCS = "RSA_PKCS"  # PKCS#1 v1.5: DigestInfo in, the token pads
    RSA_X_509 = "RSA_X_509"  # raw RSA: OpenSSL already applied the (PSS) padding
    RSA_PKCS_PSS = "RSA_PKCS_PSS"  # the digest goes in, the token applies PSS padding


P11_MECHANISM = {
    Mechanism.ECDSA: pkcs11.Mechanism.ECDSA,
    Mechanism.RSA_PKCS: pkcs11.Mechanism.RSA_PKCS,
    Mechanism.RSA_X_509: pkcs11.Mechanism.RSA_X_509,
    Mechanism.RSA_PKCS_PSS: pkcs11.Mechanism.RSA_PKCS_PSS,
}

# DER prefix of a SHA-256 DigestInfo (RFC 8017): what CKM_RSA_PKCS signs for TLS.
SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")

# Named curves the key bridge supports, by OID.
EC_CURVES = {"1.2.840.10045.3.1.7": "P-256", "1.3.132.0.34": "P-384"}
RSA_BITS = range(2048, 4097)


@dataclass(frozen=True)
class KeyInfo:
    """What the proxy knows about a private key in the token. Never key material."""

    label: str
    id: bytes
    key_type: str  # "EC" or "RSA"
    size: str  # "P-256", "P-384" or "RSA-2048" ...
    public_key_der: bytes | None  # SubjectPublicKeyInfo DER, when the token exposes it
    sensitive: bool | None
    extractable: bool | None
    always_sensitive: bool | None
    never_extractable: bool | None

    def describe(self) -> str:
        return f"label={self.label!r} id={self.id.hex() or '(empty)'} type={self.size}"

    def custody_problems(self) -> list[str]:
        """Why the key could leave the token, if it could (empty when it cannot)."""
        problems = []
        if self.extractable is not False:
            problems.append("extractable" if self.extractable else "extractability unknown")
        if self.sensitive is not True:
            problems.append("not sensitive" if self.sensitive is False else "sensitivity unknown")
        return problems


@dataclass(frozen=True)
class SignatureEvent:
    """One signature made by the token, as reported to the observer (audit, metrics)."""

    key_uri: str
    mechanism: Mechanism
    ok: bool
    seconds: float
    error: str | None = None


SignatureObserver = Callable[[SignatureEvent], None]


@dataclass(frozen=True)
class PSSParams:
    """What CKM_RSA_PKCS_PSS needs besides the digest: its hash and the salt length."""

    hash: str  # "SHA256", "SHA384" or "SHA512"; MGF1 uses the same hash
    salt_length: int


PSS_HASHES = {
    "SHA256": (pkcs11.Mechanism.SHA256, pkcs11.MGF.SHA256, 32),
    "SHA384": (pkcs11.Mechanism.SHA384, pkcs11.MGF.SHA384, 48),
    "SHA512": (pkcs11.Mechanism.SHA512, pkcs11.MGF.SHA512, 64),
}


def _bool_attribute(obj: Any, attribute: Attribute) -> bool | None:
    try:
        return bool(obj[attribute])
    except p11err.PKCS11Error:
        return None


def describe_key(session: Any, key: Any) -> KeyInfo:
    label = key.label
    key_id = bytes(key[Attribute.ID])
    key_type = key.key_type
    public_der: bytes | None
    if key_type == KeyType.EC:
        params = bytes(key[Attribute.EC_PARAMS])
        curve_oid = ECDomainParameters.load(params).chosen.dotted
        if curve_oid not in EC_CURVES:
            raise TokenError(
                f"key label={label!r} is on curve {curve_oid}; supported curves: P-256, P-384"
            )
        size = EC_CURVES[curve_oid]
        public_der = _find_ec_public_key(session, label, key_id)
        kind = "EC"
    elif key_type == KeyType.RSA:
        modulus = int.from_bytes(bytes(key[Attribute.MODULUS]), "big")
        exponent = int.from_bytes(bytes(key[Attribute.PUBLIC_EXPONENT]), "big")
        bits = modulus.bit_length()
        if bits not in RSA_BITS:
            raise TokenError(f"RSA key label={label!r} has {bits} bits; supported: 2048 to 4096")
        size = f"RSA-{bits}"
        public_der = PublicKeyInfo(
            {
                "algorithm": {"algorithm": "rsa"},
                "public_key": RSAPublicKey({"modulus": modulus, "public_exponent": exponent}),
            }
        ).dump()
        kind = "RSA"
    else:
        raise TokenError(f"key label={label!r} is of type {key_type!r}; supported: EC and RSA")
    return KeyInfo(
        label=label,
        id=key_id,
        key_type=kind,
        size=size,
        public_key_der=public_der,
        sensitive=_bool_attribute(key, Attribute.SENSITIVE),
        extractable=_bool_attribute(key, Attribute.EXTRACTABLE),
        always_sensitive=_bool_attribute(key, Attribute.ALWAYS_SENSITIVE),
        never_extractable=_bool_attribute(key, Attribute.NEVER_EXTRACTABLE),
    )


def _find_ec_public_key(session: Any, label: str, key_id: bytes) -> bytes | None:
    """The SPKI of the EC public key object paired with a private key, if the token has one.

    EC private key objects carry no public point, so the pair is found by CKA_ID (or by
    label when the ID is empty). Tokens that keep no public key object rely on the test
    signature that validation makes against the certificate instead.
    """
    template: dict[Attribute, Any] = {Attribute.CLASS: ObjectClass.PUBLIC_KEY}
    if key_id:
        template[Attribute.ID] = key_id
    else:
        template[Attribute.LABEL] = label
    candidates = list(session.get_objects(template))
    if len(candidates) != 1:
        return None
    return encode_ec_public_key(candidates[0])
