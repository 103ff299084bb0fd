"""Provisioning dev tokens: initialise a token, generate a key pair, change the user PIN.

Theory of operation. Dev mode (commands/devstate.py), the tests and the benchmark make
real SoftHSM2 tokens with these; serving traffic never writes to a token. python-pkcs11
has no C_InitToken, and softhsm2-util would need the PINs on its command line, so
:func:`initialize_token` makes that one call through ctypes, on the already initialised
module. A generated private key is sensitive, can only sign, and, unless asked otherwise,
is never extractable.
"""

from __future__ import annotations

import ctypes

import pkcs11.exceptions as p11err
from pkcs11 import Attribute, KeyType, TokenFlag
from pkcs11.util.ec import encode_named_curve_parameters

from proxy.errors import TokenError
from proxy.pkcs11.keys import EC_CURVES, RSA_BITS
from proxy.pkcs11.login import login_failure
from proxy.pkcs11.module import load_module


def initialize_token(module_path: str, label: str, so_pin: str, user_pin: str) -> None:
    """Initialise the first free slot of ``module_path`` as token ``label`` with both PINs.

    python-pkcs11 has no C_InitToken, and softhsm2-util would need the PINs on its command
    line, so the one call is made through ctypes on the same, already initialised module.
    """
    encoded_label = label.encode("utf-8")
    if len(encoded_label) > 32:
        raise TokenError(f"token label {label!r} is longer than PKCS#11's 32 bytes")
    module = load_module(module_path)
    free = [
        slot
        for slot in module.get_slots(token_present=True)
        if not slot.get_token().flags & TokenFlag.TOKEN_INITIALIZED
    ]
    if not free:
        raise TokenError(f"{module_path} has no free slot to initialise a token in")
    library = ctypes.CDLL(module_path)
    library.C_InitToken.argtypes = [
        ctypes.c_ulong,
        ctypes.c_char_p,
        ctypes.c_ulong,
        ctypes.c_char_p,
    ]
    library.C_InitToken.restype = ctypes.c_ulong
    so_pin_bytes = so_pin.encode("utf-8")
    padded_label = encoded_label + b" " * (32 - len(encoded_label))  # PKCS#11 blank-pads labels
    result = library.C_InitToken(free[0].slot_id, so_pin_bytes, len(so_pin_bytes), padded_label)
    if result != 0:
        raise TokenError(f"C_InitToken for {label!r} failed with CKR 0x{result:08x}")
    token = module.get_token(token_label=label)
    with token.open(rw=True, so_pin=so_pin) as session:
        session.init_pin(user_pin)


def generate_key(
    module_path: str,
    token_label: str,
    pin: str,
    label: str,
    key_id: bytes,
    kind: str,
    *,
    extractable: bool = False,
) -> None:
    """Generate a key pair in the token: ``kind`` is ``P-256``, ``P-384`` or ``RSA-<bits>``.

    The private key is sensitive, can only sign, and, unless asked otherwise, is never
    extractable.
    """
    token = load_module(module_path).get_token(token_label=token_label)
    private_template = {
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: extractable,
        Attribute.SIGN: True,
        Attribute.SIGN_RECOVER: False,
        Attribute.PRIVATE: True,
    }
    curves = {name: oid for oid, name in EC_CURVES.items()}
    try:
        with token.open(rw=True, user_pin=pin) as session:
            if kind in curves:
                private_template[Attribute.DERIVE] = False  # a TLS key only ever signs
                params = session.create_domain_parameters(
                    KeyType.EC,
                    {Attribute.EC_PARAMS: encode_named_curve_parameters(curves[kind])},
                    local=True,
                )
                params.generate_keypair(
                    store=True, label=label, id=key_id, private_template=private_template
                )
            elif kind.startswith("RSA-") and kind[4:].isdigit() and int(kind[4:]) in RSA_BITS:
                private_template[Attribute.DECRYPT] = False
                private_template[Attribute.UNWRAP] = False
                session.generate_keypair(
                    KeyType.RSA,
                    int(kind[4:]),
                    store=True,
                    label=label,
                    id=key_id,
                    private_template=private_template,
                )
            else:
                raise TokenError(
                    f"unsupported key kind {kind!r}; use P-256, P-384 or RSA-2048..4096"
                )
    except p11err.PKCS11Error as exc:
        raise TokenError(f"generating {kind} key {label!r} failed: {type(exc).__name__}") from None


def change_pin(module_path: str, token_label: str, old_pin: str, new_pin: str) -> None:
    """Change the user PIN of a token (C_SetPIN), as an operator rotating it would."""
    token = load_module(module_path).get_token(token_label=token_label)
    try:
        with token.open(rw=True, user_pin=old_pin) as session:
            session.set_pin(old_pin, new_pin)
    except p11err.PKCS11Error as exc:
        raise login_failure(exc, token_label) from None
