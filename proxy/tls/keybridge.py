"""The key bridge: an OpenSSL private key whose every operation is a token signature.

Theory of operation (DESIGN.md, decision 2). OpenSSL 3 treats an ``EVP_PKEY`` whose
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
handshake). They never raise into C: a failure is remembered per thread, the callback
returns OpenSSL's error value, the handshake fails, and the TLS layer reports why with
:func:`pop_signing_error`.

Everything is called on the same ``libcrypto.so.3``/``libssl.so.3`` that pyOpenSSL uses;
:func:`verify_shared_libcrypto` proves it at start-up by comparing the addresses of static
objects that both see. Only this module and ``tls.py`` touch OpenSSL.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Sequence
from typing import Any, Protocol

import cffi

from proxy.errors import SystemOpenSSLError, TLSError
from proxy.pkcs11.keys import KeyInfo, Mechanism, PSSParams

_ffi = cffi.FFI()
_ffi.cdef(
    """
typedef struct ec_key_method_st EC_KEY_METHOD; typedef struct ec_key_st EC_KEY;
typedef struct rsa_meth_st RSA_METHOD; typedef struct rsa_st RSA;
typedef struct bignum_st BIGNUM; typedef struct ECDSA_SIG_st ECDSA_SIG;
typedef struct evp_pkey_st EVP_PKEY; typedef struct x509_st X509;
typedef struct ssl_ctx_st SSL_CTX; typedef struct ssl_method_st SSL_METHOD;

const char *OpenSSL_version(int type);
unsigned long ERR_get_error(void);
void ERR_clear_error(void);
void ERR_error_string_n(unsigned long e, char *buf, size_t len);

const EC_KEY_METHOD *EC_KEY_OpenSSL(void);
EC_KEY_METHOD *EC_KEY_METHOD_new(const EC_KEY_METHOD *meth);
void EC_KEY_METHOD_get_sign(const EC_KEY_METHOD *, void **, void **, void **);
void EC_KEY_METHOD_set_sign(EC_KEY_METHOD *, void *, void *, void *);
void EC_KEY_METHOD_get_init(const EC_KEY_METHOD *, void **, void **, void **, void **,
                            void **, void **);
void EC_KEY_METHOD_set_init(EC_KEY_METHOD *, void *, void *, void *, void *, void *, void *);
int EC_KEY_set_method(EC_KEY *key, const EC_KEY_METHOD *meth);
ECDSA_SIG *ECDSA_SIG_new(void);
void ECDSA_SIG_free(ECDSA_SIG *sig);
int ECDSA_SIG_set0(ECDSA_SIG *sig, BIGNUM *r, BIGNUM *s);
BIGNUM *BN_bin2bn(const unsigned char *s, int len, BIGNUM *ret);
void BN_free(BIGNUM *a);

const RSA_METHOD *RSA_PKCS1_OpenSSL(void);
RSA_METHOD *RSA_meth_dup(const RSA_METHOD *meth);
int RSA_meth_set_priv_enc(RSA_METHOD *, int (*)(int, const unsigned char *, unsigned char *,
                          RSA *, int));
void *RSA_meth_get_finish(const RSA_METHOD *meth);
int RSA_meth_set_finish(RSA_METHOD *rsa, int (*finish)(RSA *rsa));
int RSA_set_method(RSA *rsa, const RSA_METHOD *meth);
int RSA_size(const RSA *rsa);

EVP_PKEY *EVP_PKEY_new(void);
void EVP_PKEY_free(EVP_PKEY *pkey);
int EVP_PKEY_assign(EVP_PKEY *pkey, int type, void *key);
int EVP_PKEY_get_base_id(const EVP_PKEY *pkey);
EC_KEY *EVP_PKEY_get1_EC_KEY(EVP_PKEY *pkey);
RSA *EVP_PKEY_get1_RSA(EVP_PKEY *pkey);
void EC_KEY_free(EC_KEY *key);
void RSA_free(RSA *rsa);

X509 *d2i_X509(X509 **a, const unsigned char **in, long len);

typedef struct evp_pkey_method_st EVP_PKEY_METHOD; typedef struct evp_pkey_ctx_st EVP_PKEY_CTX;
typedef struct evp_md_st EVP_MD;
const EVP_PKEY_METHOD *EVP_PKEY_meth_find(int type);
EVP_PKEY_METHOD *EVP_PKEY_meth_new(int id, int flags);
void EVP_PKEY_meth_copy(EVP_PKEY_METHOD *dst, const EVP_PKEY_METHOD *src);
void EVP_PKEY_meth_get_sign(const EVP_PKEY_METHOD *pmeth, void **psign_init, void **psign);
void EVP_PKEY_meth_set_sign(EVP_PKEY_METHOD *pmeth, void *sign_init,
    int (*sign)(EVP_PKEY_CTX *, unsigned char *, size_t *, const unsigned char *, size_t));
int EVP_PKEY_meth_add0(const EVP_PKEY_METHOD *pmeth);
EVP_PKEY *EVP_PKEY_CTX_get0_pkey(EVP_PKEY_CTX *ctx);
int EVP_PKEY_CTX_get_rsa_padding(EVP_PKEY_CTX *ctx, int *pad_mode);
int EVP_PKEY_CTX_get_signature_md(EVP_PKEY_CTX *ctx, const EVP_MD **pmd);
int EVP_PKEY_CTX_get_rsa_pss_saltlen(EVP_PKEY_CTX *ctx, int *saltlen);
int EVP_PKEY_CTX_get_rsa_mgf1_md(EVP_PKEY_CTX *ctx, const EVP_MD **md);
int EVP_MD_get_type(const EVP_MD *md);
const RSA *EVP_PKEY_get0_RSA(const EVP_PKEY *pkey);
int RSA_bits(const RSA *rsa);
void X509_free(X509 *a);
EVP_PKEY *X509_get_pubkey(X509 *x);
"""
)
_ffi.cdef(
    """
const SSL_METHOD *TLS_method(void);
int SSL_CTX_use_certificate(SSL_CTX *ctx, X509 *x);
int SSL_CTX_use_PrivateKey(SSL_CTX *ctx, EVP_PKEY *pkey);
long SSL_CTX_ctrl(SSL_CTX *ctx, int cmd, long larg, void *parg);
int SSL_CTX_check_private_key(const SSL_CTX *ctx);
"""
)

_libcrypto: Any = _ffi.dlopen("libcrypto.so.3")
_libssl: Any = _ffi.dlopen("libssl.so.3")

_EVP_PKEY_RSA = 6
_EVP_PKEY_EC = 408
_SSL_CTRL_CHAIN_CERT = 89
_SSL_CTRL_SET_SIGALGS_LIST = 98
_SSL_CTRL_SET_MAX_PROTO_VERSION = 124
_RSA_PKCS1_PADDING = 1
_RSA_NO_PADDING = 3
_ECDSA_HALF = {"P-256": 32, "P-384": 48}


class KeySigner(Protocol):
    """What the bridge needs of a token key: its description and a way to sign."""

    @property
    def info(self) -> KeyInfo: ...

    @property
    def mechanisms(self) -> frozenset[Mechanism]: ...

    def sign(self, mechanism: Mechanism, data: bytes, pss: PSSParams | None = None) -> bytes: ...


# Live bridged keys by the address of their EC_KEY / RSA. Entries leave when OpenSSL frees
# the key (the methods' finish callbacks), so a dropped SSL context releases its token key.
_signers: dict[int, KeySigner] = {}
_signers_lock = threading.Lock()
_log = logging.getLogger("hsm_proxy.tls")
_last_error = threading.local()


def _remember_failure(message: str) -> None:
    _last_error.message = message


def _token_signed() -> None:
    _last_error.signed = True


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
        return _signers.get(int(_ffi.cast("uintptr_t", key_pointer)))


def _forget(key_pointer: Any) -> None:
    with _signers_lock:
        _signers.pop(int(_ffi.cast("uintptr_t", key_pointer)), None)


def _sign_failed(exc: BaseException, *_rest: Any) -> None:
    # cffi's onerror hook: an exception escaped a callback (a bug); never let it reach C.
    _remember_failure(f"internal error in key bridge: {exc!r}")


@_ffi.callback(
    "ECDSA_SIG *(const unsigned char *, int, const BIGNUM *, const BIGNUM *, EC_KEY *)",
    onerror=_sign_failed,
)
def _ec_sign_sig(digest: Any, digest_length: int, _kinv: Any, _r: Any, ec_key: Any) -> Any:
    signer = _signer_for(ec_key)
    if signer is None:
        _remember_failure("EC key is not bridged to a token key")
        return _ffi.NULL
    try:
        raw = signer.sign(Mechanism.ECDSA, bytes(_ffi.buffer(digest, digest_length)))
        _token_signed()
    except Exception as exc:
        _remember_failure(str(exc))
        return _ffi.NULL
    half = _ECDSA_HALF[signer.info.size]
    if len(raw) != 2 * half:
        _remember_failure(
            f"token returned a {len(raw)}-byte ECDSA signature for {signer.info.size}; "
            f"expected exactly {2 * half} bytes (r || s)"
        )
        return _ffi.NULL
    r = _libcrypto.BN_bin2bn(raw[:half], half, _ffi.NULL)
    s = _libcrypto.BN_bin2bn(raw[half:], half, _ffi.NULL)
    signature = _libcrypto.ECDSA_SIG_new()
    if r == _ffi.NULL or s == _ffi.NULL or signature == _ffi.NULL:
        for bignum in (r, s):
            if bignum != _ffi.NULL:
                _libcrypto.BN_free(bignum)
        if signature != _ffi.NULL:
            _libcrypto.ECDSA_SIG_free(signature)
        _remember_failure("out of memory building the ECDSA signature")
        return _ffi.NULL
    _libcrypto.ECDSA_SIG_set0(signature, r, s)
    return signature


@_ffi.callback("int(int, const unsigned char *, unsigned char *, RSA *, int)", onerror=_sign_failed)
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
    try:
        raw = signer.sign(mechanism, bytes(_ffi.buffer(source, length)))
        _token_signed()
    except Exception as exc:
        _remember_failure(str(exc))
        return -1
    expected = _libcrypto.RSA_size(rsa)
    if len(raw) != expected:
        _remember_failure(
            f"token returned a {len(raw)}-byte RSA signature; expected exactly {expected} bytes"
        )
        return -1
    _ffi.memmove(target, raw, expected)
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
    md = _ffi.new("const EVP_MD **")
    mgf1 = _ffi.new("const EVP_MD **")
    salt = _ffi.new("int *")
    if (
        _libcrypto.EVP_PKEY_CTX_get_signature_md(context, md) <= 0
        or _libcrypto.EVP_PKEY_CTX_get_rsa_mgf1_md(context, mgf1) <= 0
        or _libcrypto.EVP_PKEY_CTX_get_rsa_pss_saltlen(context, salt) <= 0
        or md[0] == _ffi.NULL
    ):
        raise TLSError(f"cannot read the RSA-PSS parameters: {_openssl_errors()}")
    nid = _libcrypto.EVP_MD_get_type(md[0])
    if nid not in _PSS_HASH_BY_NID:
        raise TLSError(f"RSA-PSS with digest NID {nid} is not bridged (SHA-256/384/512 are)")
    if mgf1[0] != _ffi.NULL and _libcrypto.EVP_MD_get_type(mgf1[0]) != nid:
        raise TLSError("RSA-PSS with an MGF1 hash other than the message hash is not bridged")
    name, size = _PSS_HASH_BY_NID[nid]
    if digest_length != size:
        raise TLSError(f"RSA-PSS got a {digest_length}-byte digest for {name}")
    if salt[0] == _RSA_PSS_SALTLEN_DIGEST:
        salt_length = size
    elif salt[0] in _RSA_PSS_SALTLEN_MAX:
        salt_length = (_libcrypto.RSA_bits(rsa) - 1 + 7) // 8 - size - 2
    elif salt[0] >= 0:
        salt_length = salt[0]
    else:
        raise TLSError(f"RSA-PSS salt length mode {salt[0]} is not bridged")
    return PSSParams(hash=name, salt_length=salt_length)


def _original_rsa_sign() -> Any:
    sign_init = _ffi.new("void **")
    sign = _ffi.new("void **")
    _libcrypto.EVP_PKEY_meth_get_sign(_libcrypto.EVP_PKEY_meth_find(_EVP_PKEY_RSA), sign_init, sign)
    return sign_init[0], _ffi.cast(
        "int(*)(EVP_PKEY_CTX *, unsigned char *, size_t *, const unsigned char *, size_t)",
        sign[0],
    )


_RSA_SIGN_INIT, _RSA_SIGN = _original_rsa_sign()


def _pss_sign_failed(exc: BaseException, *_rest: Any) -> None:
    _remember_failure(f"internal error in key bridge (RSA-PSS): {exc!r}")


@_ffi.callback(
    "int(EVP_PKEY_CTX *, unsigned char *, size_t *, const unsigned char *, size_t)",
    onerror=_pss_sign_failed,
)
def _rsa_pkey_sign(
    context: Any, signature: Any, signature_length: Any, digest: Any, digest_length: int
) -> int:
    pkey = _libcrypto.EVP_PKEY_CTX_get0_pkey(context)
    rsa = _libcrypto.EVP_PKEY_get0_RSA(pkey) if pkey != _ffi.NULL else _ffi.NULL
    signer = _signer_for(rsa) if rsa != _ffi.NULL else None
    padding = _ffi.new("int *")
    if (
        signer is None
        or not _pss_through_token(signer)
        or _libcrypto.EVP_PKEY_CTX_get_rsa_padding(context, padding) <= 0
        or padding[0] != _RSA_PKCS1_PSS_PADDING
    ):
        result: int = _RSA_SIGN(context, signature, signature_length, digest, digest_length)
        return result
    expected = _libcrypto.RSA_size(rsa)
    if signature == _ffi.NULL:
        signature_length[0] = expected
        return 1
    if signature_length[0] < expected:
        _remember_failure(f"OpenSSL gave a {signature_length[0]}-byte buffer for an RSA signature")
        return -1
    try:
        parameters = _pss_parameters(context, digest_length, rsa)
        raw = signer.sign(
            Mechanism.RSA_PKCS_PSS, bytes(_ffi.buffer(digest, digest_length)), parameters
        )
        _token_signed()
    except Exception as exc:
        _remember_failure(str(exc))
        return -1
    if len(raw) != expected:
        _remember_failure(
            f"token returned a {len(raw)}-byte RSA-PSS signature; expected exactly {expected}"
        )
        return -1
    _ffi.memmove(signature, raw, expected)
    signature_length[0] = expected
    return 1


def _install_rsa_pkey_method() -> Any:
    method = _libcrypto.EVP_PKEY_meth_new(_EVP_PKEY_RSA, _EVP_PKEY_FLAG_AUTOARGLEN)
    if method == _ffi.NULL:
        raise SystemOpenSSLError("EVP_PKEY_meth_new failed: the RSA-PSS bridge is unavailable")
    _libcrypto.EVP_PKEY_meth_copy(method, _libcrypto.EVP_PKEY_meth_find(_EVP_PKEY_RSA))
    _libcrypto.EVP_PKEY_meth_set_sign(method, _RSA_SIGN_INIT, _rsa_pkey_sign)
    if _libcrypto.EVP_PKEY_meth_add0(method) != 1:
        raise SystemOpenSSLError(f"EVP_PKEY_meth_add0 failed: {_openssl_errors()}")
    return method


def _ec_method() -> Any:
    method = _libcrypto.EC_KEY_METHOD_new(_libcrypto.EC_KEY_OpenSSL())
    sign_slots = [_ffi.new("void **") for _ in range(3)]
    _libcrypto.EC_KEY_METHOD_get_sign(method, *sign_slots)
    _libcrypto.EC_KEY_METHOD_set_sign(
        method, sign_slots[0][0], sign_slots[1][0], _ffi.cast("void *", _ec_sign_sig)
    )
    init_slots = [_ffi.new("void **") for _ in range(6)]
    _libcrypto.EC_KEY_METHOD_get_init(method, *init_slots)
    default_finish = init_slots[1][0]

    @_ffi.callback("void(EC_KEY *)")
    def finish(ec_key: Any) -> None:
        _forget(ec_key)
        if default_finish != _ffi.NULL:
            _ffi.cast("void(*)(EC_KEY *)", default_finish)(ec_key)

    values = [slot[0] for slot in init_slots]
    values[1] = _ffi.cast("void *", finish)
    _libcrypto.EC_KEY_METHOD_set_init(method, *values)
    return method, finish


def _rsa_method() -> Any:
    method = _libcrypto.RSA_meth_dup(_libcrypto.RSA_PKCS1_OpenSSL())
    _libcrypto.RSA_meth_set_priv_enc(method, _rsa_priv_enc)
    default_finish = _libcrypto.RSA_meth_get_finish(method)

    @_ffi.callback("int(RSA *)")
    def finish(rsa: Any) -> int:
        _forget(rsa)
        if default_finish != _ffi.NULL:
            result: int = _ffi.cast("int(*)(RSA *)", default_finish)(rsa)
            return result
        return 1

    _libcrypto.RSA_meth_set_finish(method, finish)
    return method, finish


# One method of each kind for the life of the process: OpenSSL keys point at them.
_EC_METHOD, _EC_FINISH = _ec_method()
_RSA_METHOD, _RSA_FINISH = _rsa_method()


def _openssl_errors() -> str:
    messages = []
    while code := _libcrypto.ERR_get_error():
        buffer = _ffi.new("char[256]")
        _libcrypto.ERR_error_string_n(code, buffer, 256)
        messages.append(_ffi.string(buffer).decode("ascii", "replace"))
    return "; ".join(messages) or "no OpenSSL error recorded"


_RSA_PKEY_METHOD = _install_rsa_pkey_method()


def token_limits(signer: KeySigner) -> tuple[bool, str | None, str | None]:
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
        and _libssl.SSL_CTX_ctrl(context, _SSL_CTRL_SET_MAX_PROTO_VERSION, 0x0303, _ffi.NULL) != 1
    ):
        raise TLSError(f"cannot limit the context to TLS 1.2: {_openssl_errors()}")
    if sigalgs is not None:
        text = _ffi.new("char[]", sigalgs.encode("ascii"))
        if _libssl.SSL_CTX_ctrl(context, _SSL_CTRL_SET_SIGALGS_LIST, 0, text) != 1:
            raise TLSError(f"cannot set signature algorithms {sigalgs}: {_openssl_errors()}")
    if note is not None:
        _log.info(
            f"key {signer.info.describe()}: {note}",
            extra={"fields": {"event": "token_key_limits"}},
        )


def _load_x509(der: bytes) -> Any:
    data = _ffi.new("unsigned char[]", der)
    cursor = _ffi.new("const unsigned char **", data)
    x509 = _libcrypto.d2i_X509(_ffi.NULL, cursor, len(der))
    if x509 == _ffi.NULL:
        raise TLSError(f"OpenSSL cannot parse a certificate: {_openssl_errors()}")
    return _ffi.gc(x509, _libcrypto.X509_free)


def _bridged_private_key(leaf: Any, signer: KeySigner) -> Any:
    public = _libcrypto.X509_get_pubkey(leaf)
    if public == _ffi.NULL:
        raise TLSError(f"cannot read the certificate's public key: {_openssl_errors()}")
    try:
        kind = _libcrypto.EVP_PKEY_get_base_id(public)
        expected = {"EC": _EVP_PKEY_EC, "RSA": _EVP_PKEY_RSA}[signer.info.key_type]
        if kind != expected:
            raise TLSError(
                f"the certificate holds a key of OpenSSL type {kind}, but the token key "
                f"{signer.info.describe()} is {signer.info.key_type}"
            )
        bridged = _libcrypto.EVP_PKEY_new()
        if kind == _EVP_PKEY_EC:
            inner = _libcrypto.EVP_PKEY_get1_EC_KEY(public)
            ok = inner != _ffi.NULL and _libcrypto.EC_KEY_set_method(inner, _EC_METHOD) == 1
            free_inner = _libcrypto.EC_KEY_free
        else:
            inner = _libcrypto.EVP_PKEY_get1_RSA(public)
            ok = inner != _ffi.NULL and _libcrypto.RSA_set_method(inner, _RSA_METHOD) == 1
            free_inner = _libcrypto.RSA_free
        if not ok or bridged == _ffi.NULL:
            raise TLSError(f"cannot attach the token method to the key: {_openssl_errors()}")
        with _signers_lock:
            _signers[int(_ffi.cast("uintptr_t", inner))] = signer
        if _libcrypto.EVP_PKEY_assign(bridged, kind, inner) != 1:
            free_inner(inner)
            _libcrypto.EVP_PKEY_free(bridged)
            raise TLSError(f"cannot build the bridged key: {_openssl_errors()}")
        return bridged
    finally:
        _libcrypto.EVP_PKEY_free(public)


def install_certificate_and_key(
    context_pointer: int, chain_der: Sequence[bytes], signer: KeySigner
) -> None:
    """Give the SSL_CTX at ``context_pointer`` the chain and a token-backed private key.

    ``chain_der`` is the leaf first, then its intermediates in order. The caller has
    already checked that the leaf's public key is the token key's (certificates.py).
    """
    if not chain_der:
        raise TLSError("an empty certificate chain cannot be served")
    context = _ffi.cast("SSL_CTX *", context_pointer)
    _libcrypto.ERR_clear_error()
    leaf = _load_x509(chain_der[0])
    if _libssl.SSL_CTX_use_certificate(context, leaf) != 1:
        raise TLSError(f"OpenSSL refused the certificate: {_openssl_errors()}")
    for der in chain_der[1:]:
        intermediate = _load_x509(der)
        # SSL_CTX_add1_chain_cert: takes its own reference, ours goes with the gc hook.
        if _libssl.SSL_CTX_ctrl(context, _SSL_CTRL_CHAIN_CERT, 1, intermediate) != 1:
            raise TLSError(f"OpenSSL refused an intermediate certificate: {_openssl_errors()}")
    bridged = _bridged_private_key(leaf, signer)
    try:
        if _libssl.SSL_CTX_use_PrivateKey(context, bridged) != 1:
            raise TLSError(f"OpenSSL refused the token key: {_openssl_errors()}")
    finally:
        _libcrypto.EVP_PKEY_free(bridged)  # the SSL_CTX holds its own reference now
    if _libssl.SSL_CTX_check_private_key(context) != 1:
        raise TLSError(f"certificate and token key do not match: {_openssl_errors()}")
    _apply_token_limits(context, signer)


def verify_shared_libcrypto() -> str:
    """Prove that pyOpenSSL runs on the same libssl/libcrypto this bridge loaded.

    Returns the OpenSSL version string; raises :class:`SystemOpenSSLError` with the fix.
    """
    import cryptography
    import OpenSSL
    from OpenSSL._util import ffi as pyopenssl_ffi
    from OpenSSL._util import lib as _typed_lib

    pyopenssl_lib: Any = _typed_lib  # typed Optional in pyOpenSSL 25; always loaded here

    def address(ffi: Any, pointer: Any) -> int:
        return int(ffi.cast("uintptr_t", pointer))

    same_crypto = address(_ffi, _libcrypto.OpenSSL_version(0)) == address(
        pyopenssl_ffi, pyopenssl_lib.OpenSSL_version(0)
    )
    same_ssl = address(_ffi, _libssl.TLS_method()) == address(
        pyopenssl_ffi, pyopenssl_lib.TLS_method()
    )
    if not (same_crypto and same_ssl):
        raise SystemOpenSSLError(
            "pyOpenSSL is not using the system OpenSSL (libssl.so.3/libcrypto.so.3): "
            f"pyOpenSSL {OpenSSL.__version__} from {OpenSSL.__file__}, cryptography "
            f"{cryptography.__version__} from {cryptography.__file__}. A PyPI wheel with its "
            "own OpenSSL is shadowing Debian's python3-openssl/python3-cryptography, so a "
            "token key cannot be attached. Fix: `pip uninstall pyOpenSSL cryptography` in "
            "this virtualenv (or re-run deploy/setup.sh), so that the venv, made with "
            "--system-site-packages, uses the distribution's packages."
        )
    return str(_ffi.string(_libcrypto.OpenSSL_version(0)).decode())


if __name__ == "__main__":  # deploy/setup.sh: python -m proxy.tls.keybridge --verify
    try:
        print(verify_shared_libcrypto())
    except SystemOpenSSLError as error:
        print(f"hsm-proxy: {error}", file=sys.stderr)
        raise SystemExit(1) from None


# --- connection facts pyOpenSSL does not expose on every supported version ---------------

_ffi.cdef("typedef struct ssl_st SSL; int SSL_session_reused(const SSL *s);")


def session_reused(ssl_pointer: int) -> bool:
    """Whether the handshake of the SSL at ``ssl_pointer`` resumed a session (pyOpenSSL 23
    has no ``Connection.session_reused``)."""
    return bool(_libssl.SSL_session_reused(_ffi.cast("SSL *", ssl_pointer)))
