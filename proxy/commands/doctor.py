"""``hsm-proxy doctor``: what a PKCS#11 module shows, and whether its keys can serve TLS.

Theory of operation. Without a PIN, :func:`doctor_report` lists the slots with a token
(label, serial, manufacturer, model) and their mechanisms, marking the ones the proxy
uses. With a PIN (from a file or a variable, never the command line) it logs in to one
token (the only one, or the one ``--token`` names: a PIN is never tried on several tokens,
where wrong attempts could lock them) and lists every private key: label, ID, type and
size, custody attributes, the URI to put in the config, and duplicate labels or IDs (a
URI naming a duplicated label alone is ambiguous). Each usable key then makes a few test
signatures, timed and verified against its public key when the token exposes one.

The report is plain text lines; the command line prints them.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter

from proxy.errors import ProxyError, TokenError
from proxy.pkcs11.inventory import (
    PROXY_MECHANISMS,
    KeyListing,
    SlotReport,
    describe_slots,
    list_private_keys,
)
from proxy.pkcs11.testsign import sign_test_digest, verifies
from proxy.pkcs11.token import Token, TokenKey
from proxy.pkcs11.uri import KeyURI
from proxy.secrets.store import PinSource, read_pin


def doctor_report(
    module_path: str,
    pin: PinSource | None,
    token_label: str | None,
    signatures: int,
) -> tuple[list[str], bool]:
    """The report's lines, and whether everything looked healthy."""
    slots = describe_slots(module_path)
    lines = [f"module {module_path}: {len(slots)} slot(s) with a token"]
    healthy = True
    for slot in slots:
        lines += _slot_lines(slot)
    initialised = [slot for slot in slots if slot.token_label is not None]
    if not initialised:
        return [*lines, "no initialised token"], False
    if pin is None:
        lines.append("keys: give --pin-file or --pin-env (and --token) to log in and list them")
        return lines, healthy
    chosen = [slot for slot in initialised if token_label in (None, slot.token_label)]
    if len(chosen) != 1:
        labels = ", ".join(repr(slot.token_label) for slot in initialised)
        if token_label is None:
            raise TokenError(
                f"{len(chosen)} tokens present ({labels}); name the one to log in to with "
                "--token (a PIN is never tried on several tokens)"
            )
        raise TokenError(
            f"{len(chosen) or 'no'} token(s) labelled {token_label!r}; tokens present: {labels}"
        )
    slot = chosen[0]
    with Token(module_path, slot.uri(), read_pin(pin), pool_size=1) as token:
        keys = list_private_keys(token)
        key_lines, keys_healthy = _key_lines(token, slot, keys, signatures)
    return [*lines, *key_lines], healthy and keys_healthy


def _slot_lines(slot: SlotReport) -> list[str]:
    if slot.token_label is None:
        return [f"slot {slot.slot_id}: {slot.description}: token not initialised"]
    used = [name for name in PROXY_MECHANISMS if name in slot.mechanisms]
    missing = [name for name in PROXY_MECHANISMS if name not in slot.mechanisms]
    return [
        f"slot {slot.slot_id}: token {slot.token_label!r} serial {slot.serial!r} "
        f"manufacturer {slot.manufacturer!r} model {slot.model!r}"
        f"{'' if slot.login_required else ' (no login required)'}",
        f"  mechanisms used by hsm-proxy: {', '.join(used) or 'none'}"
        + (f" (missing: {', '.join(missing)})" if missing else ""),
        f"  all {len(slot.mechanisms)} mechanisms: {', '.join(slot.mechanisms)}",
    ]


def _key_lines(
    token: Token, slot: SlotReport, keys: list[KeyListing], signatures: int
) -> tuple[list[str], bool]:
    lines = [f"token {token.label!r}: logged in, {len(keys)} private key(s)"]
    healthy = True
    labels = Counter(key.label for key in keys)
    ids = Counter(key.id for key in keys)
    pairs = Counter((key.label, key.id) for key in keys)
    for key in keys:
        uri = KeyURI(token=token.label, object=key.label or None, id=key.id or None)
        lines.append(f"- label={key.label!r} id={key.id.hex() or '(empty)'}")
        if key.info is None:
            lines.append(f"    unusable: {key.problem}")
            healthy = False
            continue
        info = key.info
        lines.append(f"    type {info.size}; uri {uri}")
        lines.append(
            f"    custody: sensitive={info.sensitive} extractable={info.extractable} "
            f"always_sensitive={info.always_sensitive} never_extractable={info.never_extractable}"
        )
        if info.extractable is not False or info.sensitive is not True:
            lines.append("    WARNING: this key can leave the token")
            healthy = False
        if labels[key.label] > 1:
            lines.append(
                f"    DUPLICATE label: {labels[key.label]} keys are labelled {key.label!r}; "
                "name this one with its id= too"
            )
        if ids[key.id] > 1:
            lines.append(
                f"    DUPLICATE id: {ids[key.id]} keys have id {key.id.hex() or '(empty)'}"
            )
        if pairs[(key.label, key.id)] > 1:
            lines.append("    not signing: another key has the same label and id")
            healthy = False
            continue
        if signatures > 0:
            line, ok = _timed_signatures(TokenKey(token, uri, info), signatures)
            lines.append(f"    {line}")
            healthy = healthy and ok
    return lines, healthy


def _timed_signatures(key: TokenKey, count: int) -> tuple[str, bool]:
    timings = []
    verified = 0
    mechanism = "?"
    for _ in range(count):
        started = time.perf_counter()
        try:
            test = sign_test_digest(key, b"hsm-proxy doctor")
        except ProxyError as exc:
            return f"test signature FAILED: {exc}", False
        timings.append((time.perf_counter() - started) * 1000)
        mechanism = test.mechanism.value
        if key.info.public_key_der is not None:
            if not verifies(key.info.public_key_der, test):
                return "test signature does NOT verify against the token's public key", False
            verified += 1
    check = (
        "verified against the public key"
        if verified == count
        else "no public key object to verify against"
    )
    return (
        f"{count} test signature(s) ({mechanism}): min {min(timings):.2f} ms, "
        f"median {statistics.median(timings):.2f} ms, max {max(timings):.2f} ms; {check}",
        True,
    )
