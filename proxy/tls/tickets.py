"""Session-ticket keys: parsed exactly, and installed on a context through libssl.

Theory of operation. pyOpenSSL has no API for ticket keys, so :func:`install_ticket_keys`
calls ``SSL_CTX_set_tlsext_ticket_key_evp_cb`` through binding.py, on the same libssl. The
first key encrypts new tickets; every key decrypts, so a rotation keeps the previous key for
tickets already issued, and proxies sharing the keys resume each other's sessions (a
resumed handshake makes no token signature). A key is exactly 80 bytes, as ``openssl rand
80`` makes it (and as nginx reads it): a 16-byte name, a 32-byte HMAC-SHA256 key, a
32-byte AES-256-CBC key; any other size is an error, never padded or cut.

The callback is one C function for every context (kept for the life of the process in
``_ticket_callback``); it finds the keys of the connection's context by the ``SSL_CTX``
address, in a table an installed context leaves when it is collected.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from proxy.errors import SecretError, TLSError
from proxy.tls.binding import TLS1_3_VERSION, address, ffi, libcrypto, libssl, ssl_ctx_of

if TYPE_CHECKING:
    from OpenSSL import SSL

TICKET_KEY_SIZE = 80
_NAME, _HMAC, _AES = 16, 32, 32

_OSSL_PARAM_UTF8_STRING = 4
_OSSL_PARAM_OCTET_STRING = 5
_OSSL_PARAM_UNMODIFIED = 2**64 - 1 if ffi.sizeof("size_t") == 8 else 2**32 - 1
_IV_SIZE = 16
_PARAM_DIGEST = ffi.new("char[]", b"digest")
_PARAM_KEY = ffi.new("char[]", b"key")
_SHA256 = ffi.new("char[]", b"SHA256")


@dataclass(frozen=True)
class TicketKey:
    """One session-ticket key: a public name and two secret halves. ``repr`` shows the name."""

    name: bytes
    hmac_key: bytes = field(repr=False)
    aes_key: bytes = field(repr=False)


def parse_ticket_key(raw: bytes, where: str) -> TicketKey:
    """An 80-byte ticket key, exactly; the message says the size found, never the bytes."""
    if len(raw) != TICKET_KEY_SIZE:
        raise SecretError(
            f"{where} is {len(raw)} bytes; a session-ticket key is exactly {TICKET_KEY_SIZE} "
            "bytes (16-byte name, 32-byte HMAC-SHA256 key, 32-byte AES-256 key), as "
            "`openssl rand 80 > ticket.key` makes it; it is never padded or truncated"
        )
    return TicketKey(raw[:_NAME], raw[_NAME : _NAME + _HMAC], raw[_NAME + _HMAC :])


@dataclass(frozen=True)
class _TicketKeySet:
    encrypt: TicketKey
    by_name: dict[bytes, TicketKey]


_ticket_sets: dict[int, _TicketKeySet] = {}
_ticket_lock = threading.Lock()


def _set_mac_key(mac_context: Any, key: TicketKey) -> bool:
    hmac_key = ffi.new("unsigned char[]", key.hmac_key)
    params = ffi.new("OSSL_PARAM[3]")
    params[0].key = _PARAM_DIGEST
    params[0].data_type = _OSSL_PARAM_UTF8_STRING
    params[0].data = _SHA256
    params[0].data_size = 6
    params[0].return_size = _OSSL_PARAM_UNMODIFIED
    params[1].key = _PARAM_KEY
    params[1].data_type = _OSSL_PARAM_OCTET_STRING
    params[1].data = hmac_key
    params[1].data_size = len(key.hmac_key)
    params[1].return_size = _OSSL_PARAM_UNMODIFIED
    return bool(libcrypto.EVP_MAC_CTX_set_params(mac_context, params) == 1)


def _ticket_failed(_exc: BaseException, *_rest: Any) -> None:
    return None  # the callback returns -1 (cffi's error value): the handshake fails cleanly


@ffi.callback(
    "int(SSL *, unsigned char *, unsigned char *, EVP_CIPHER_CTX *, EVP_MAC_CTX *, int)",
    onerror=_ticket_failed,
    error=-1,
)
def _ticket_callback(
    ssl: Any, key_name: Any, iv: Any, cipher_context: Any, mac_context: Any, encrypt: int
) -> int:
    context_address = int(ffi.cast("uintptr_t", libssl.SSL_get_SSL_CTX(ssl)))
    with _ticket_lock:
        keys = _ticket_sets.get(context_address)
    if keys is None:
        return 0  # encrypting: issue no ticket; decrypting: a full handshake
    if encrypt:
        key = keys.encrypt
        if libcrypto.RAND_bytes(iv, _IV_SIZE) != 1:
            return -1
        ffi.memmove(key_name, key.name, _NAME)
        aes = ffi.new("unsigned char[]", key.aes_key)
        if libcrypto.EVP_EncryptInit_ex(
            cipher_context, libcrypto.EVP_aes_256_cbc(), ffi.NULL, aes, iv
        ) != 1 or not _set_mac_key(mac_context, key):
            return -1
        return 1
    found = keys.by_name.get(bytes(ffi.buffer(key_name, _NAME)))
    if found is None:
        return 0  # unknown key: a full handshake, and a new ticket
    aes = ffi.new("unsigned char[]", found.aes_key)
    if libcrypto.EVP_DecryptInit_ex(
        cipher_context, libcrypto.EVP_aes_256_cbc(), ffi.NULL, aes, iv
    ) != 1 or not _set_mac_key(mac_context, found):
        return -1
    # 2: resume, and issue a new ticket. Always in TLS 1.3, as OpenSSL does with its own
    # keys (and nginx with its callback): clients use a TLS 1.3 ticket once (RFC 8446,
    # C.4), so a resumption without a new one leaves them a full handshake next time.
    if found.name != keys.encrypt.name or libssl.SSL_version(ssl) == TLS1_3_VERSION:
        return 2
    return 1


def _forget_ticket_keys(context_address: int, keys: _TicketKeySet) -> None:
    with _ticket_lock:
        if _ticket_sets.get(context_address) is keys:  # not a newer context at a reused address
            del _ticket_sets[context_address]


def install_ticket_keys(context: SSL.Context, keys: Sequence[TicketKey]) -> None:
    """Encrypt tickets of ``context`` with ``keys[0]``; accept tickets under any of ``keys``."""
    if not keys:
        raise TLSError("install_ticket_keys needs at least one key")
    names = [key.name for key in keys]
    if len(set(names)) != len(names):
        raise SecretError("two session-ticket keys share the same 16-byte name")
    pointer = ssl_ctx_of(context)
    context_address = address(pointer)
    key_set = _TicketKeySet(keys[0], {key.name: key for key in keys})
    with _ticket_lock:
        _ticket_sets[context_address] = key_set
    weakref.finalize(context, _forget_ticket_keys, context_address, key_set)
    if libssl.SSL_CTX_set_tlsext_ticket_key_evp_cb(pointer, _ticket_callback) != 1:
        _forget_ticket_keys(context_address, key_set)
        raise TLSError("OpenSSL refused the session-ticket key callback")
