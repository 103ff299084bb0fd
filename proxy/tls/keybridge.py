"""The legacy key-method backend: an OpenSSL private key whose every operation is a token
signature. The one :class:`~proxy.tls.keys.KeyBackend` today (keys.py chooses it).

Theory of operation (docs/ARCHITECTURE.md, decision 2). OpenSSL 3 treats an ``EVP_PKEY`` whose
``EC_KEY`` or ``RSA`` carries a custom method as a "foreign" legacy key, and routes each
private-key operation of a handshake to that method. We build such a key from the
certificate's *public* key, give it a method whose signing slot calls back into Python,
and the callback asks the token to sign:

* EC: ``sign_sig`` receives the digest; the token signs it with CKM_ECDSA and returns
  ``r || s``, each exactly half of the expected length for the curve.
* RSA: ``priv_enc`` receives either a DigestInfo with PKCS#1 v1.5 padding requested
  (padding 1, CKM_RSA_PKCS) or an already PSS-padded block to be raised to the private
  exponent (padding 3, no padding, CKM_RSA_X_509). The result must be exactly the modulus
  size; anything else is refused, never padded or cut.
* RSA-PSS on a token without CKM_RSA_X_509: a replacement EVP_PKEY_METHOD for RSA catches
  the signature one level up, where the digest is still known, and the token signs it with
  CKM_RSA_PKCS_PSS (see ``_rsa_pkey_sign``). :func:`token_limits` narrows versions and
  signature algorithms when the token can do neither.

The callbacks run in whatever thread calls into OpenSSL (a worker thread during a
handshake, or the event loop's while the token is fast: pace.py, to which every signature's
duration and every failure is reported). They never raise into C: a failure is remembered
per thread, the callback returns OpenSSL's error value, the handshake fails, and the TLS
layer reports why with :func:`pop_signing_error`. The callbacks and the methods that
point at them are made once, at import, and kept in module-level names for the life of the
process (OpenSSL keys point at them).

Everything is called through binding.py, on the same ``libcrypto.so.3``/``libssl.so.3``
that pyOpenSSL uses; :func:`verify_shared_libcrypto` proves it at start-up. OpenSSL 4
drops these key methods: keys.py says how a provider-based backend takes this module's
place.

This module is the backend itself: the rest of the project reaches it through keys.py
only (``python -m proxy.tls.keys --verify`` is deploy/setup.sh's check).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from proxy.errors import SystemOpenSSLError, TLSError
from proxy.pkcs11.keys import Mechanism, PSSParams
from proxy.tls import binding
from proxy.tls.binding import (
    SSL_CTRL_CHAIN_CERT,
    SSL_CTRL_SET_MAX_PROTO_VERSION,
    SSL_CTRL_SET_SIGALGS_LIST,
    TLS1_2_VERSION,
    address,
    ffi,
    libcrypto,
    libssl,
    openssl_errors,
    ssl_ctx_of,
)
from proxy.tls.pace import PACE

if TYPE_CHECKING:  # types only: keys.py imports this module to choose it as the backend
    from OpenSSL import SSL

    from proxy.tls.keys import KeySigner, TokenLimits

_EVP_PKEY_RSA = 6
_EVP_PKEY_EC = 408
_RSA_PKCS1_PADDING = 1
_RSA_NO_PADDING = 3
_ECDSA_HALF = {"P-256": 32, "P-384": 48}


# Live bridged keys by the address of their EC_KEY / RSA. Entries leave when OpenSSL frees
# the key (the methods' finish callbacks), so a dropped SSL context releases its token key.
_signers: dict[int, KeySigner] = {}
_signers_lock = threading.Lock()
_log = logging.getLogger("hsm_proxy.tls")
_last_error = threading.local()


def _remember_failure(message: str) -> None:
    _last_error.message = message


def _token_signed(started: float) -> None:
    _last_error.signed = True
    PACE.record(time.perf_counter() - started)  # whether the next one may sign inline


def pop_signed() -> bool:
    """Whether the token signed in this thread since the last call (once)."""
    signed: bool = getattr(_last_error, "signed", False)
    _last_error.signed = False
    return signed


def pop_signing_error() -> str | None:
    """Why the last token signature made in this thread failed, once; ``None`` if none did."""
    message: str | None = getattr(_last_error, "message", None)
    _last_error.message = None
    return message


def _signer_for(key_pointer: Any) -> KeySigner | None:
    with _signers_lock:
        return _signers.get(int(ffi.cast("uintptr_t", key_pointer)))


def _forget(key_pointer: Any) -> None:
    with _signers_lock:
        _signers.pop(int(ffi.cast("uintptr_t", key_pointer)), None)


def _sign_failed(exc: BaseException, *_rest: Any) -> None:
    # cffi's onerror hook: an exception escaped a callback (a bug); never let it reach C.
    _remember_failure(f"internal error in key bridge: {exc!r}")


@ffi.callback(
    "ECDSA_SIG *(const unsigned char *, int, const BIGNUM *, const BIGNUM *, EC_KEY *)",
    onerror=_sign_failed,
)
def _ec_sign_sig(digest: Any, digest_length: int, _kinv: Any, _r: Any, ec_key: Any) -> Any:
    signer = _signer_for(ec_key)
    if signer is None:
        _remember_failure("EC key is not bridged to a token key")
        return ffi.NULL
    started = time.perf_counter()
    try:
        raw = signer.sign(Mechanism.ECDSA, bytes(ffi.buffer(digest, digest_length)))
        _token_signed(started)
    except Exception as exc:
        PACE.record_failure()
        _remember_failure(str(exc))
        return ffi.NULL
    half = _ECDSA_HALF[signer.info.size]
    if len(raw) != 2 * half:
        _remember_failure(
            f"token returned a {len(raw)}-byte ECDSA signature for {signer.info.size}; "
            f"expected exactly {2 * half} bytes (r || s)"
        )
        return ffi.NULL
    r = libcrypto.BN_bin2bn(raw[:half], half, ffi.NULL)
    s = libcrypto.BN_bin2bn(raw[half:], half, ffi.NULL)
    signature = libcrypto.ECDSA_SIG_new()
    if r == ffi.NULL or s == ffi.NULL or signature == ffi.NULL:
        for bignum in (r, s):
            if bignum != ffi.NULL:
                libcrypto.BN_free(bignum)
        if signature != ffi.NULL:
            libcrypto.ECDSA_SIG_free(signature)
        _remember_failure("out of memory building the ECDSA signature")
        return ffi.NULL
    libcrypto.ECDSA_SIG_set0(signature, r, s)
    return signature


@ffi.callback("int(int, const unsigned char *, unsigned char *, RSA *, int)", onerror=_sign_failed)
def _rsa_priv_enc(length: int, source: Any, target: Any, rsa: Any, padding: int) -> int:
    signer = _signer_for(rsa)
    if signer is None:
        _remember_failure("RSA key is not bridged to a token key")
        return -1
    mechanism = {_RSA_PKCS1_PADDING: Mechanism.RSA_PKCS, _RSA_NO_PADDING: Mechanism.RSA_X_509}.get(
        padding
    )
    if mechanism is None:
        _remember_failure(f"OpenSSL asked for RSA padding mode {padding}, which is not bridged")
        return -1
    started = time.perf_counter()
    try:
        raw = signer.sign(mechanism, bytes(ffi.buffer(source, length)))
        _token_signed(started)
    except Exception as exc:
        PACE.record_failure()
        _remember_failure(str(exc))
        return -1
    expected = libcrypto.RSA_size(rsa)
    if len(raw) != expected:
        _remember_failure(
            f"token returned a {len(raw)}-byte RSA signature; expected exactly {expected} bytes"
        )
        return -1
    ffi.memmove(target, raw, expected)
    return expected


# RSA-PSS through CKM_RSA_PKCS_PSS. The RSA_METHOD above only ever sees an already
# PSS-encoded block (padding 3), from which the token cannot recover the digest that
# CKM_RSA_PKCS_PSS wants. One level up, OpenSSL 3.0 and 3.5 still route every operation on
# a "foreign" legacy key (one with a custom RSA_METHOD, as ours) through the legacy
# EVP_PKEY_METHOD of its type, which an application may replace (EVP_PKEY_meth_add0). Ours
# is a copy of OpenSSL's RSA method whose sign, for a bridged key with PSS padding whose
# token lacks CKM_RSA_X_509, reads the digest, hash and salt length and has the token
# sign with CKM_RSA_PKCS_PSS; every other case goes to OpenSSL's own sign.
_RSA_PKCS1_PSS_PADDING = 6
_RSA_PSS_SALTLEN_DIGEST = -1
_RSA_PSS_SALTLEN_MAX = (-2, -3)  # AUTO and MAX both sign with the largest salt
_EVP_PKEY_FLAG_AUTOARGLEN = 2
_PSS_HASH_BY_NID = {672: ("SHA256", 32), 673: ("SHA384", 48), 674: ("SHA512", 64)}


def _pss_through_token(signer: KeySigner) -> bool:
    return (
        Mechanism.RSA_X_509 not in signer.mechanisms and Mechanism.RSA_PKCS_PSS in signer.mechanisms
    )


def _pss_parameters(context: Any, digest_length: int, rsa: Any) -> PSSParams:
    md = ffi.new("const EVP_MD **")
    mgf1 = ffi.new("const EVP_MD **")
    salt = ffi.new("int *")
    if (
        libcrypto.EVP_PKEY_CTX_get_signature_md(context, md) <= 0
        or libcrypto.EVP_PKEY_CTX_get_rsa_mgf1_md(context, mgf1) <= 0
        or libcrypto.EVP_PKEY_CTX_get_rsa_pss_saltlen(context, salt) <= 0
        or md[0] == ffi.NULL
    ):
        raise TLSError(f"cannot read the RSA-PSS parameters: {openssl_errors()}")
    nid = libcrypto.EVP_MD_get_type(md[0])
    if nid not in _PSS_HASH_BY_NID:
        raise TLSError(f"RSA-PSS with digest NID {nid} is not bridged (SHA-256/384/512 are)")
    if mgf1[0] != ffi.NULL and libcrypto.EVP_MD_get_type(mgf1[0]) != nid:
        raise TLSError("RSA-PSS with an MGF1 hash other than the message hash is not bridged")
    name, size = _PSS_HASH_BY_NID[nid]
    if digest_length != size:
        raise TLSError(f"RSA-PSS got a {digest_length}-byte digest for {name}")
    if salt[0] == _RSA_PSS_SALTLEN_DIGEST:
        salt_length = size
    elif salt[0] in _RSA_PSS_SALTLEN_MAX:
        salt_length = (libcrypto.RSA_bits(rsa) - 1 + 7) // 8 - size - 2
    elif salt[0] >= 0:
        salt_length = salt[0]
    else:
        raise TLSError(f"RSA-PSS salt length mode {salt[0]} is not bridged")
    return PSSParams(hash=name, salt_length=salt_length)


def _original_rsa_sign() -> Any:
    sign_init = ffi.new("void **")
    sign = ffi.new("void **")
    libcrypto.EVP_PKEY_meth_get_sign(libcrypto.EVP_PKEY_meth_find(_EVP_PKEY_RSA), sign_init, sign)
    return sign_init[0], ffi.cast(
        "int(*)(EVP_PKEY_CTX *, unsigned char *, size_t *, const unsigned char *, size_t)",
        sign[0],
    )


_RSA_SIGN_INIT, _RSA_SIGN = _original_rsa_sign()


def _pss_sign_failed(exc: BaseException, *_rest: Any) -> None:
    _remember_failure(f"internal error in key bridge (RSA-PSS): {exc!r}")


@ffi.callback(
    "int(EVP_PKEY_CTX *, unsigned char *, size_t *, const unsigned char *, size_t)",
    onerror=_pss_sign_failed,
)
def _rsa_pkey_sign(
    context: Any, signature: Any, signature_length: Any, digest: Any, digest_length: int
) -> int:
    pkey = libcrypto.EVP_PKEY_CTX_get0_pkey(context)
    rsa = libcrypto.EVP_PKEY_get0_RSA(pkey) if pkey != ffi.NULL else ffi.NULL
    signer = _signer_for(rsa) if rsa != ffi.NULL else None
    padding = ffi.new("int *")
    if (
        signer is None
        or not _pss_through_token(signer)
        or libcrypto.EVP_PKEY_CTX_get_rsa_padding(context, padding) <= 0
        or padding[0] != _RSA_PKCS1_PSS_PADDING
    ):
        result: int = _RSA_SIGN(context, signature, signature_length, digest, digest_length)
        return result
    expected = libcrypto.RSA_size(rsa)
    if signature == ffi.NULL:
        signature_length[0] = expected
        return 1
    if signature_length[0] < expected:
        _remember_failure(f"OpenSSL gave a {signature_length[0]}-byte buffer for an RSA signature")
        return -1
    started = time.perf_counter()
    try:
        parameters = _pss_parameters(context, digest_length, rsa)
        raw = signer.sign(
            Mechanism.RSA_PKCS_PSS, bytes(ffi.buffer(digest, digest_length)), parameters
        )
        _token_signed(started)
    except Exception as exc:
        PACE.record_failure()
        _remember_failure(str(exc))
        return -1
    if len(raw) != expected:
        _remember_failure(
            f"token returned a {len(raw)}-byte RSA-PSS signature; expected exactly {expected}"
        )
        return -1
    ffi.memmove(signature, raw, expected)
    signature_length[0] = expected
    return 1


def _install_rsa_pkey_method() -> Any:
    method = libcrypto.EVP_PKEY_meth_new(_EVP_PKEY_RSA, _EVP_PKEY_FLAG_AUTOARGLEN)
    if method == ffi.NULL:
        raise SystemOpenSSLError("EVP_PKEY_meth_new failed: the RSA-PSS bridge is unavailable")
    libcrypto.EVP_PKEY_meth_copy(method, libcrypto.EVP_PKEY_meth_find(_EVP_PKEY_RSA))
    libcrypto.EVP_PKEY_meth_set_sign(method, _RSA_SIGN_INIT, _rsa_pkey_sign)
    if libcrypto.EVP_PKEY_meth_add0(method) != 1:
        raise SystemOpenSSLError(f"EVP_PKEY_meth_add0 failed: {openssl_errors()}")
    return method


def _ec_method() -> Any:
    method = libcrypto.EC_KEY_METHOD_new(libcrypto.EC_KEY_OpenSSL())
    sign_slots = [ffi.new("void **") for _ in range(3)]
    libcrypto.EC_KEY_METHOD_get_sign(method, *sign_slots)
    libcrypto.EC_KEY_METHOD_set_sign(
        method, sign_slots[0][0], sign_slots[1][0], ffi.cast("void *", _ec_sign_sig)
    )
    init_slots = [ffi.new("void **") for _ in range(6)]
    libcrypto.EC_KEY_METHOD_get_init(method, *init_slots)
    default_finish = init_slots[1][0]

    @ffi.callback("void(EC_KEY *)")
    def finish(ec_key: Any) -> None:
        _forget(ec_key)
        if default_finish != ffi.NULL:
            ffi.cast("void(*)(EC_KEY *)", default_finish)(ec_key)

    values = [slot[0] for slot in init_slots]
    values[1] = ffi.cast("void *", finish)
    libcrypto.EC_KEY_METHOD_set_init(method, *values)
    return method, finish


def _rsa_method() -> Any:
    method = libcrypto.RSA_meth_dup(libcrypto.RSA_PKCS1_OpenSSL())
    libcrypto.RSA_meth_set_priv_enc(method, _rsa_priv_enc)
    default_finish = libcrypto.RSA_meth_get_finish(method)

    @ffi.callback("int(RSA *)")
    def finish(rsa: Any) -> int:
        _forget(rsa)
        if default_finish != ffi.NULL:
            result: int = ffi.cast("int(*)(RSA *)", default_finish)(rsa)
            return result
        return 1

    libcrypto.RSA_meth_set_finish(method, finish)
    return method, finish


# One method of each kind for the life of the process: OpenSSL keys point at them.
_EC_METHOD, _EC_FINISH = _ec_method()
_RSA_METHOD, _RSA_FINISH = _rsa_method()


_RSA_PKEY_METHOD = _install_rsa_pkey_method()


def token_limits(signer: KeySigner) -> TokenLimits:
    """What the token's mechanisms allow this key in TLS: (TLS 1.3 possible, the signature
    algorithms to offer or None for OpenSSL's defaults, one line saying what was limited)."""
    mechanisms = signer.mechanisms
    if signer.info.key_type == "EC":
        if Mechanism.ECDSA not in mechanisms:
            raise TLSError(f"token offers no CKM_ECDSA for the EC key {signer.info.describe()}")
        return True, None, None
    pkcs1 = Mechanism.RSA_PKCS in mechanisms
    raw = Mechanism.RSA_X_509 in mechanisms
    pss = raw or Mechanism.RSA_PKCS_PSS in mechanisms
    if not pkcs1 and not pss:
        raise TLSError(
            f"token offers none of CKM_RSA_PKCS, CKM_RSA_X_509, CKM_RSA_PKCS_PSS for the RSA "
            f"key {signer.info.describe()}"
        )
    if not pss:
        return (
            False,
            "rsa_pkcs1_sha256:rsa_pkcs1_sha384:rsa_pkcs1_sha512",
            "the token offers neither CKM_RSA_X_509 nor CKM_RSA_PKCS_PSS, so RSA-PSS is "
            "impossible: TLS 1.3 is off and TLS 1.2 signs with PKCS#1 v1.5 only",
        )
    if not pkcs1:
        return (
            True,
            "rsa_pss_rsae_sha256:rsa_pss_rsae_sha384:rsa_pss_rsae_sha512",
            "the token offers no CKM_RSA_PKCS: only RSA-PSS signature algorithms are offered "
            "(TLS 1.2 clients without RSA-PSS cannot connect)",
        )
    if not raw:
        return True, None, "RSA-PSS signs through CKM_RSA_PKCS_PSS (no CKM_RSA_X_509 on token)"
    return True, None, None


def _apply_token_limits(context: Any, signer: KeySigner) -> None:
    tls13, sigalgs, note = token_limits(signer)
    if (
        not tls13
        and libssl.SSL_CTX_ctrl(context, SSL_CTRL_SET_MAX_PROTO_VERSION, TLS1_2_VERSION, ffi.NULL)
        != 1
    ):
        raise TLSError(f"cannot limit the context to TLS 1.2: {openssl_errors()}")
    if sigalgs is not None:
        text = ffi.new("char[]", sigalgs.encode("ascii"))
        if libssl.SSL_CTX_ctrl(context, SSL_CTRL_SET_SIGALGS_LIST, 0, text) != 1:
            raise TLSError(f"cannot set signature algorithms {sigalgs}: {openssl_errors()}")
    if note is not None:
        _log.info(
            f"key {signer.info.describe()}: {note}",
            extra={"fields": {"event": "token_key_limits"}},
        )


def _load_x509(der: bytes) -> Any:
    data = ffi.new("unsigned char[]", der)
    cursor = ffi.new("const unsigned char **", data)
    x509 = libcrypto.d2i_X509(ffi.NULL, cursor, len(der))
    if x509 == ffi.NULL:
        raise TLSError(f"OpenSSL cannot parse a certificate: {openssl_errors()}")
    return ffi.gc(x509, libcrypto.X509_free)


def _bridged_private_key(leaf: Any, signer: KeySigner) -> Any:
    public = libcrypto.X509_get_pubkey(leaf)
    if public == ffi.NULL:
        raise TLSError(f"cannot read the certificate's public key: {openssl_errors()}")
    try:
        kind = libcrypto.EVP_PKEY_get_base_id(public)
        expected = {"EC": _EVP_PKEY_EC, "RSA": _EVP_PKEY_RSA}[signer.info.key_type]
        if kind != expected:
            raise TLSError(
                f"the certificate holds a key of OpenSSL type {kind}, but the token key "
                f"{signer.info.describe()} is {signer.info.key_type}"
            )
        bridged = libcrypto.EVP_PKEY_new()
        if kind == _EVP_PKEY_EC:
            inner = libcrypto.EVP_PKEY_get1_EC_KEY(public)
            ok = inner != ffi.NULL and libcrypto.EC_KEY_set_method(inner, _EC_METHOD) == 1
            free_inner = libcrypto.EC_KEY_free
        else:
            inner = libcrypto.EVP_PKEY_get1_RSA(public)
            ok = inner != ffi.NULL and libcrypto.RSA_set_method(inner, _RSA_METHOD) == 1
            free_inner = libcrypto.RSA_free
        if not ok or bridged == ffi.NULL:
            raise TLSError(f"cannot attach the token method to the key: {openssl_errors()}")
        with _signers_lock:
            _signers[address(inner)] = signer
        if libcrypto.EVP_PKEY_assign(bridged, kind, inner) != 1:
            free_inner(inner)
            libcrypto.EVP_PKEY_free(bridged)
            raise TLSError(f"cannot build the bridged key: {openssl_errors()}")
        return bridged
    finally:
        libcrypto.EVP_PKEY_free(public)


def install_certificate_and_key(
    ssl_context: SSL.Context, chain_der: Sequence[bytes], signer: KeySigner
) -> None:
    """Give ``ssl_context`` the chain and a token-backed private key, within the limits of
    the token's mechanisms (:func:`token_limits`).

    ``chain_der`` is the leaf first, then its intermediates in order. The caller has
    already checked that the leaf's public key is the token key's (certificates.py).
    """
    if not chain_der:
        raise TLSError("an empty certificate chain cannot be served")
    context = ssl_ctx_of(ssl_context)
    libcrypto.ERR_clear_error()
    leaf = _load_x509(chain_der[0])
    if libssl.SSL_CTX_use_certificate(context, leaf) != 1:
        raise TLSError(f"OpenSSL refused the certificate: {openssl_errors()}")
    for der in chain_der[1:]:
        intermediate = _load_x509(der)
        # SSL_CTX_add1_chain_cert: takes its own reference, ours goes with the gc hook.
        if libssl.SSL_CTX_ctrl(context, SSL_CTRL_CHAIN_CERT, 1, intermediate) != 1:
            raise TLSError(f"OpenSSL refused an intermediate certificate: {openssl_errors()}")
    bridged = _bridged_private_key(leaf, signer)
    try:
        if libssl.SSL_CTX_use_PrivateKey(context, bridged) != 1:
            raise TLSError(f"OpenSSL refused the token key: {openssl_errors()}")
    finally:
        libcrypto.EVP_PKEY_free(bridged)  # the SSL_CTX holds its own reference now
    if libssl.SSL_CTX_check_private_key(context) != 1:
        raise TLSError(f"certificate and token key do not match: {openssl_errors()}")
    _apply_token_limits(context, signer)


def verify_shared_libcrypto() -> str:
    """Prove that pyOpenSSL runs on the libssl/libcrypto that holds these key methods (a
    key built on another copy of OpenSSL cannot be attached to pyOpenSSL's contexts).

    Returns the OpenSSL version string; raises :class:`SystemOpenSSLError` with the fix.
    """
    return binding.verify_shared_libcrypto()
