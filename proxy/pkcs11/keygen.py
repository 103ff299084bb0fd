"""Key pairs for serving: generated inside the token with the custody attributes, once.

Theory of operation. A TLS key must sign and do nothing else, and never leave the token.
:func:`custody_templates` asks for a private key that is a private token object, sensitive,
never extractable, and can only sign (no decrypt, unwrap, derive or sign-recover), and for a
public key that can only verify. :func:`generate_pair` makes such a pair in an open
read-write session; dev tokens, the tests and the benchmark use it through provision.py.

:func:`create_serving_key` is ``hsm-proxy key generate``. It logs in to exactly one token,
refuses a label or an ID that an object of the token already carries (a key URI naming a
duplicated label is ambiguous, and a duplicated ID breaks the pairing of keys and
certificates that tools rely on), generates the pair, and reads the private key back: a
token that did not honour the attributes it was asked for gets its new pair destroyed and
an error, never a key that could leave it. Without an ID given, the ID is the SHA-1 of the
public key (RFC 5280's subject key identifier, method 1: the value ``openssl x509`` and
most CAs put in the certificate's subjectKeyIdentifier), set once the public key exists.

Inputs are parsed exactly (:func:`parse_key_kind`, :func:`parse_key_id`): a curve name,
an RSA size, a hex ID, nothing rounded, padded or guessed.
"""

from __future__ import annotations

import re
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import pkcs11.exceptions as p11err
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pkcs11 import Attribute, KeyType, MechanismFlag, ObjectClass
from pkcs11.util.ec import encode_named_curve_parameters

from proxy.errors import ConfigError, TokenError, TokenNotFoundError
from proxy.pkcs11.keys import EC_CURVES, KeyInfo, describe_key
from proxy.pkcs11.login import login_failure
from proxy.pkcs11.module import list_tokens, select_token
from proxy.pkcs11.uri import KeyURI

EC_KINDS = ("P-256", "P-384")
RSA_SIZES = (2048, 3072, 4096)
_CURVE_OIDS = {name: oid for oid, name in EC_CURVES.items()}


@dataclass(frozen=True)
class KeyKind:
    """What to generate: ``P-256``, ``P-384`` or ``RSA-<bits>``."""

    key_type: str  # "EC" or "RSA"
    name: str  # "P-256", "P-384", "RSA-2048" ...
    rsa_bits: int = 0

    def __str__(self) -> str:
        return self.name


def ec_kind(curve: str) -> KeyKind:
    if curve not in EC_KINDS:
        raise ConfigError(f"--ec {curve!r}: the curve must be one of {', '.join(EC_KINDS)}")
    return KeyKind("EC", curve)


def rsa_kind(bits: str) -> KeyKind:
    sizes = ", ".join(str(size) for size in RSA_SIZES)
    if not re.fullmatch(r"[0-9]+", bits) or int(bits) not in RSA_SIZES:
        raise ConfigError(f"--rsa {bits!r}: the size must be {sizes} bits (a decimal number)")
    return KeyKind("RSA", f"RSA-{bits}", int(bits))


def parse_key_kind(text: str) -> KeyKind:
    """``P-256``, ``P-384``, ``RSA-2048``, ``RSA-3072`` or ``RSA-4096``, exactly."""
    if text.startswith("RSA-"):
        return rsa_kind(text[4:])
    if text in EC_KINDS:
        return ec_kind(text)
    raise ConfigError(
        f"unsupported key kind {text!r}; use {', '.join(EC_KINDS)} or "
        + ", ".join(f"RSA-{size}" for size in RSA_SIZES)
    )


def parse_key_id(text: str) -> bytes:
    """A key ID given as hex digits (``--id 01a2``): each pair is one byte, nothing padded."""
    if not text:
        raise ConfigError("--id is empty; give the key ID as hex digits, e.g. --id 01")
    if text[:2].lower() == "0x" or ":" in text or "%" in text:
        raise ConfigError(
            f"--id {text!r}: write the ID as plain hex digits, two per byte (e.g. --id 01a2), "
            "without 0x, colons or %"
        )
    if not re.fullmatch(r"[0-9A-Fa-f]+", text):
        raise ConfigError(f"--id {text!r}: only hex digits 0-9 and a-f are allowed")
    if len(text) % 2:
        raise ConfigError(
            f"--id {text!r} has an odd number of hex digits; write every byte as two digits "
            f"(--id 0{text} if you meant a leading zero)"
        )
    return bytes.fromhex(text)


def check_key_label(label: str) -> str:
    if not label:
        raise ConfigError("--label is empty; name the key, e.g. --label web-2026")
    bad = [char for char in label if ord(char) < 0x20 or ord(char) == 0x7F]
    if bad:
        raise ConfigError(f"--label {label!r} contains a control character")
    return label


# The attributes that make a key pair a serving key: what the private key must be, read
# back after generation, and what the public key may do.
PRIVATE_CUSTODY = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.SIGN: True,
    Attribute.SIGN_RECOVER: False,
    Attribute.DECRYPT: False,
    Attribute.UNWRAP: False,
    Attribute.DERIVE: False,
}
PUBLIC_USAGE = {
    Attribute.TOKEN: True,
    Attribute.VERIFY: True,
    Attribute.VERIFY_RECOVER: False,
    Attribute.ENCRYPT: False,
    Attribute.WRAP: False,
}
# What the token sets by itself for a key generated as sensitive and never extractable.
_PRIVATE_ORIGIN = {Attribute.ALWAYS_SENSITIVE: True, Attribute.NEVER_EXTRACTABLE: True}


def custody_templates(extractable: bool = False) -> tuple[dict[Any, Any], dict[Any, Any]]:
    """(public, private) templates of a serving key pair."""
    private = dict(PRIVATE_CUSTODY)
    private[Attribute.EXTRACTABLE] = extractable
    return dict(PUBLIC_USAGE), private


def generate_pair(
    session: Any, kind: KeyKind, label: str, key_id: bytes, *, extractable: bool = False
) -> tuple[Any, Any]:
    """Generate ``kind`` in an open read-write, logged-in session: (public, private) objects.

    ``key_id`` empty means no CKA_ID. A token that does not know the recover attributes
    (CloudHSM's Client SDK 5 library has no sign-recover at all) refuses a template that
    names them with CKR_ATTRIBUTE_TYPE_INVALID: the pair is then asked for without them.
    PKCS#11 errors are the caller's to name.
    """
    public_template, private_template = custody_templates(extractable)
    try:
        return _generate(session, kind, label, key_id, public_template, private_template)
    except p11err.AttributeTypeInvalid:
        for template in (public_template, private_template):
            for attribute in _RECOVER:
                template.pop(attribute, None)
        return _generate(session, kind, label, key_id, public_template, private_template)


_RECOVER = (Attribute.SIGN_RECOVER, Attribute.VERIFY_RECOVER)


def _generate(
    session: Any,
    kind: KeyKind,
    label: str,
    key_id: bytes,
    public_template: dict[Any, Any],
    private_template: dict[Any, Any],
) -> tuple[Any, Any]:
    options: dict[str, Any] = {
        "store": True,
        "label": label,
        "id": key_id or None,
        "capabilities": MechanismFlag.SIGN | MechanismFlag.VERIFY,
        "public_template": public_template,
        "private_template": private_template,
    }
    if kind.key_type == "EC":
        params = session.create_domain_parameters(
            KeyType.EC,
            {Attribute.EC_PARAMS: encode_named_curve_parameters(_CURVE_OIDS[kind.name])},
            local=True,
        )
        return params.generate_keypair(**options)  # type: ignore[no-any-return]
    return session.generate_keypair(  # type: ignore[no-any-return]
        KeyType.RSA, kind.rsa_bits, **options
    )


@dataclass(frozen=True)
class GeneratedKey:
    """A key pair made by :func:`create_serving_key`: its URI and what the token reports."""

    uri: KeyURI
    info: KeyInfo
    id_derived: bool  # the ID is the public key's SHA-1 (no --id was given)


def create_serving_key(
    module_path: str, token_label: str, pin: str, label: str, key_id: bytes | None, kind: KeyKind
) -> GeneratedKey:
    """``hsm-proxy key generate``: a new serving key pair in token ``token_label``."""
    check_key_label(label)
    token = _select(module_path, token_label)
    try:
        session = token.open(rw=True, user_pin=pin)
    except p11err.PKCS11Error as exc:
        raise login_failure(exc, token.label) from None
    try:
        _refuse_in_use(session, token.label, label, key_id)
        try:
            public, private = generate_pair(session, kind, label, key_id or b"")
        except p11err.PKCS11Error as exc:
            raise TokenError(
                f"token {token.label!r} could not generate a {kind} key pair: {type(exc).__name__}"
            ) from None
        try:
            final_id = key_id if key_id is not None else _set_derived_id(session, public, private)
            _check_custody(private, public)
            info = describe_key(session, private)
        except BaseException:
            for obj in (private, public):
                with suppress(p11err.PKCS11Error):
                    obj.destroy()
            raise
    finally:
        with suppress(p11err.PKCS11Error):
            session.close()
    return GeneratedKey(KeyURI(token=token.label, object=label, id=final_id), info, key_id is None)


def _select(module_path: str, token_label: str) -> Any:
    try:
        return select_token(module_path, KeyURI(token=token_label))
    except TokenNotFoundError:
        present = list_tokens(module_path)
        if any(label == token_label for _, label, _ in present):
            raise  # several tokens share the label: the error says so
        listed = ", ".join(f"{label!r} (slot {slot})" for slot, label, _ in present)
        raise TokenNotFoundError(
            f"no token labelled {token_label!r} in {module_path}; tokens present: "
            f"{listed or 'none'}"
        ) from None


def _objects(session: Any, attribute: Attribute, value: object) -> list[Any]:
    try:
        return list(session.get_objects({attribute: value}))
    except p11err.PKCS11Error as exc:
        raise TokenError(f"searching the token's objects failed: {type(exc).__name__}") from None


def _describe_objects(objects: list[Any]) -> str:
    names = {
        ObjectClass.PRIVATE_KEY: "private key",
        ObjectClass.PUBLIC_KEY: "public key",
        ObjectClass.SECRET_KEY: "secret key",
        ObjectClass.CERTIFICATE: "certificate",
        ObjectClass.DATA: "data object",
    }
    described = []
    for obj in objects:
        kind = names.get(obj.object_class, "object")
        try:
            described.append(
                f"{kind} label={obj[Attribute.LABEL]!r} "
                f"id={bytes(obj[Attribute.ID]).hex() or '(empty)'}"
            )
        except p11err.PKCS11Error:
            described.append(kind)
    return "; ".join(described)


def _refuse_in_use(session: Any, token_label: str, label: str, key_id: bytes | None) -> None:
    same_label = _objects(session, Attribute.LABEL, label)
    if same_label:
        raise TokenError(
            f"token {token_label!r} already has {len(same_label)} object(s) labelled {label!r} "
            f"({_describe_objects(same_label)}); choose another --label (a label names one key)"
        )
    if key_id is not None:
        same_id = _objects(session, Attribute.ID, key_id)
        if same_id:
            raise TokenError(
                f"token {token_label!r} already has {len(same_id)} object(s) with id "
                f"{key_id.hex()} ({_describe_objects(same_id)}); choose another --id, or leave "
                "it out to derive one from the new public key"
            )


def _set_derived_id(session: Any, public: Any, private: Any) -> bytes:
    """CKA_ID = SHA-1 of the public key (subject key identifier, method 1) on both halves."""
    spki = _public_key_der(session, public, private)
    public_key = serialization.load_der_public_key(spki)
    key_id = x509.SubjectKeyIdentifier.from_public_key(public_key).digest  # type: ignore[arg-type]
    if _objects(session, Attribute.ID, key_id):
        raise TokenError(f"the derived key id {key_id.hex()} is in use already; give --id")
    try:
        private[Attribute.ID] = key_id
        public[Attribute.ID] = key_id
    except p11err.PKCS11Error as exc:
        raise TokenError(
            f"the token refused to set the new key's id ({type(exc).__name__}); give one "
            "with --id HEX"
        ) from None
    return key_id


def _public_key_der(session: Any, public: Any, private: Any) -> bytes:
    info = describe_key(session, private)
    if info.public_key_der is None:
        raise TokenError("the token shows no public key for the new key pair")
    return info.public_key_der


def _check_custody(private: Any, public: Any) -> None:
    """Read back what the token made; raise when it is not what a serving key must be.

    The custody attributes must read back as asked; a usage attribute a token does not
    report (some have no CKA_SIGN_RECOVER, say) is taken as not granted.
    """
    wrong = []
    expected = (
        [(private, "private", attribute, value) for attribute, value in PRIVATE_CUSTODY.items()]
        + [(private, "private", attribute, value) for attribute, value in _PRIVATE_ORIGIN.items()]
        + [(public, "public", attribute, value) for attribute, value in PUBLIC_USAGE.items()]
    )
    for obj, half, attribute, value in expected:
        try:
            actual = bool(obj[attribute])
        except p11err.PKCS11Error:
            if attribute in _MUST_READ:
                wrong.append(f"{half} CKA_{attribute.name} unreadable")
            continue
        if actual != value:
            wrong.append(f"{half} CKA_{attribute.name}={actual}")
    if wrong:
        raise TokenError(
            "the token did not make the key pair as asked (" + ", ".join(wrong) + "); the pair "
            "was destroyed"
        )


_MUST_READ = frozenset(
    {
        Attribute.SENSITIVE,
        Attribute.EXTRACTABLE,
        Attribute.NEVER_EXTRACTABLE,
        Attribute.ALWAYS_SENSITIVE,
        Attribute.SIGN,
        Attribute.VERIFY,
        Attribute.PRIVATE,
        Attribute.TOKEN,
    }
)
