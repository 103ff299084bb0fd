"""Provisioning dev tokens: initialise a token, generate a key pair, change the user PIN.

Theory of operation. Dev mode (commands/devstate.py), the tests and the benchmark make
real SoftHSM2 tokens with these; serving traffic never writes to a token. python-pkcs11
has no C_InitToken, and softhsm2-util would need the PINs on its command line, so
:func:`initialize_token` makes that one call through ctypes, on the already initialised
module. Key pairs are made by keygen.py (the private key sensitive, sign only, and, unless
asked otherwise, never extractable); ``hsm-proxy key generate`` is keygen.py's too.
"""

from __future__ import annotations

import ctypes

import pkcs11.exceptions as p11err
from pkcs11 import TokenFlag

from proxy.errors import TokenError
from proxy.pkcs11.keygen import generate_pair, parse_key_kind
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

    The pair has the custody attributes of keygen.py (the private key sensitive, sign
    only) and, unless asked otherwise, is never extractable. Unlike ``hsm-proxy key
    generate`` this does not refuse a label in use: the tests make duplicates on purpose.
    """
    key_kind = parse_key_kind(kind)
    token = load_module(module_path).get_token(token_label=token_label)
    try:
        with token.open(rw=True, user_pin=pin) as session:
            generate_pair(session, key_kind, label, key_id, extractable=extractable)
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
