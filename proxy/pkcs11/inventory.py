"""Inventory: what ``hsm-proxy doctor`` lists about a module, its tokens and their keys.

Theory of operation. :func:`describe_slots` reads every slot with a token present: the
token's identity, whether it needs a login, and the names of the mechanisms it offers
(``PROXY_MECHANISMS`` are those the key bridge uses). :func:`list_private_keys` lists every
private key object of a logged-in token with its description, or with the reason the proxy
cannot use it, so that an operator sees what a key URI can name. Nothing here signs or
writes.
"""

from __future__ import annotations

from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import pkcs11.exceptions as p11err
from pkcs11 import Attribute, ObjectClass, TokenFlag

from proxy.errors import TokenError
from proxy.pkcs11.keys import KeyInfo, describe_key
from proxy.pkcs11.module import load_module
from proxy.pkcs11.token import Token
from proxy.pkcs11.uri import KeyURI


@dataclass(frozen=True)
class SlotReport:
    """One slot of a module, its token (if any) and the mechanisms it offers."""

    slot_id: int
    description: str
    token_label: str | None
    serial: str | None
    manufacturer: str | None
    model: str | None
    login_required: bool
    mechanisms: tuple[str, ...]  # names (CKM_ without the prefix), vendor ones in hex

    def uri(self) -> KeyURI:
        """A key URI selection naming this token (label, and serial to be exact)."""
        return KeyURI(token=self.token_label, serial=self.serial or None, slot_id=self.slot_id)


# The mechanisms the key bridge uses (RSA_PKCS_PSS: tokens that pad PSS themselves).
PROXY_MECHANISMS = ("ECDSA", "RSA_PKCS", "RSA_X_509", "RSA_PKCS_PSS")


def _mechanism_name(mechanism: Any) -> str:
    name = getattr(mechanism, "name", None)
    return str(name) if name else f"0x{int(mechanism):08x}"


def describe_slots(module_path: str) -> list[SlotReport]:
    """Every slot with a token present: token identity and mechanism names."""
    module = load_module(module_path)
    reports = []
    try:
        slots = module.get_slots(token_present=True)
    except p11err.PKCS11Error as exc:
        raise TokenError(f"{module_path}: listing slots failed: {type(exc).__name__}") from None
    for slot in slots:
        label = serial = manufacturer = model = None
        login_required = False
        with suppress(p11err.TokenNotRecognised, p11err.TokenNotPresent):
            token = slot.get_token()
            if token.flags & TokenFlag.TOKEN_INITIALIZED:
                label = token.label
                serial = token.serial.decode(errors="replace").strip()
                manufacturer = token.manufacturer_id
                model = token.model
                login_required = bool(token.flags & TokenFlag.LOGIN_REQUIRED)
        try:
            names = sorted(_mechanism_name(mechanism) for mechanism in slot.get_mechanisms())
        except p11err.PKCS11Error:
            names = []
        reports.append(
            SlotReport(
                slot.slot_id,
                str(slot.slot_description).strip(),
                label,
                serial,
                manufacturer,
                model,
                login_required,
                tuple(names),
            )
        )
    return reports


@dataclass(frozen=True)
class KeyListing:
    """A private key object as listed: its description, or why the proxy cannot use it."""

    label: str
    id: bytes
    info: KeyInfo | None
    problem: str | None


def list_private_keys(token: Token) -> list[KeyListing]:
    """Every private key object the logged-in ``token`` shows, in token order."""
    listings = []
    with token._session() as pooled:
        try:
            objects = list(pooled.session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY}))
        except p11err.PKCS11Error as exc:
            raise TokenError(
                f"listing the keys of token {token.label!r} failed: {type(exc).__name__}"
            ) from None
        for obj in objects:
            label = obj.label or ""
            key_id = bytes(obj[Attribute.ID])
            try:
                listings.append(KeyListing(label, key_id, describe_key(pooled.session, obj), None))
            except TokenError as exc:
                listings.append(KeyListing(label, key_id, None, str(exc)))
    return listings
