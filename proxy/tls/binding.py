"""The project's one binding of the system libssl.so.3 / libcrypto.so.3, beside pyOpenSSL's.

Theory of operation. pyOpenSSL (Debian's, on the shared system OpenSSL: ARCHITECTURE.md, decision
1) drives contexts and connections, but it has no API for a few things the proxy needs: a
token-backed private key (keybridge.py), session-ticket keys (tickets.py), the key-exchange
group list and the negotiated group, whether a session resumed, and the pending-byte counts
that keep the stream's pump cheap. Those calls go through this module: one cffi ``FFI`` in
ABI mode, one ``cdef`` with every declaration the project uses, each library opened once.
Nothing else in the project builds an ``FFI`` or opens an OpenSSL library.

The same library is reached through two cffi worlds: pyOpenSSL's (its ``SSL_CTX``, ``SSL``
and ``BIO`` pointers) and ours. A pointer crosses from theirs to ours only here, by address
(:func:`ssl_ctx_of`, :func:`ssl_of`, :func:`pending_handles`); a pointer so made does not
keep pyOpenSSL's object alive, so the caller holds the ``Context`` or ``Connection``
while it uses it. :func:`verify_shared_libcrypto` proves, at start-up, that both worlds
are the same library (a PyPI wheel with a private OpenSSL would make every such pointer
meaningless).

pyOpenSSL 23 (Debian 12) binds ``BIO_ctrl_pending`` and ``SSL_pending``; pyOpenSSL 25
(Debian 13) no longer does. :data:`bio_pending` and :data:`ssl_pending` are whichever
library function exists, and :func:`pending_handles` gives the stream the pointers that
function takes, converted once per connection, so the per-record path makes one plain
cffi call on either version.

Callbacks (``ffi.callback``) made from :data:`ffi` live as long as the Python object that
holds them: the modules that make them keep them in module-level names, because OpenSSL
keeps calling them for the life of the process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import cffi
from OpenSSL._util import ffi as _pyopenssl_ffi
from OpenSSL._util import lib as _typed_pyopenssl_lib

from proxy.errors import SystemOpenSSLError

if TYPE_CHECKING:
    from OpenSSL import SSL

ffi = cffi.FFI()
ffi.cdef(
    """
typedef struct ssl_st SSL; typedef struct ssl_ctx_st SSL_CTX;
typedef struct ssl_method_st SSL_METHOD; typedef struct bio_st BIO;
typedef struct x509_st X509; typedef struct evp_pkey_st EVP_PKEY;
typedef struct ec_key_method_st EC_KEY_METHOD; typedef struct ec_key_st EC_KEY;
typedef struct rsa_meth_st RSA_METHOD; typedef struct rsa_st RSA;
typedef struct bignum_st BIGNUM; typedef struct ECDSA_SIG_st ECDSA_SIG;
typedef struct evp_pkey_method_st EVP_PKEY_METHOD; typedef struct evp_pkey_ctx_st EVP_PKEY_CTX;
typedef struct evp_md_st EVP_MD; typedef struct evp_cipher_st EVP_CIPHER;
typedef struct evp_cipher_ctx_st EVP_CIPHER_CTX; typedef struct evp_mac_ctx_st EVP_MAC_CTX;
typedef struct {
    const char *key; unsigned int data_type; void *data; size_t data_size; size_t return_size;
} OSSL_PARAM;

/* libssl: contexts, connections, BIOs */
const SSL_METHOD *TLS_method(void);
long SSL_CTX_ctrl(SSL_CTX *ctx, int cmd, long larg, void *parg);
long SSL_ctrl(SSL *ssl, int cmd, long larg, void *parg);
int SSL_CTX_use_certificate(SSL_CTX *ctx, X509 *x);
int SSL_CTX_use_PrivateKey(SSL_CTX *ctx, EVP_PKEY *pkey);
int SSL_CTX_check_private_key(const SSL_CTX *ctx);
int SSL_CTX_set_tlsext_ticket_key_evp_cb(SSL_CTX *ctx, int (*cb)(SSL *, unsigned char *,
    unsigned char *, EVP_CIPHER_CTX *, EVP_MAC_CTX *, int));
SSL_CTX *SSL_get_SSL_CTX(const SSL *ssl);
int SSL_version(const SSL *ssl);
int SSL_session_reused(const SSL *s);
const char *SSL_group_to_name(SSL *ssl, int id);
int SSL_pending(const SSL *ssl);
size_t BIO_ctrl_pending(BIO *b);
int SSL_set_fd(SSL *s, int fd);
int SSL_read(SSL *ssl, void *buf, int num);
int SSL_write(SSL *ssl, const void *buf, int num);
int SSL_get_error(const SSL *ssl, int ret);
int SSL_shutdown(SSL *s);

/* libcrypto: errors, versions, certificates */
const char *OpenSSL_version(int type);
unsigned long ERR_get_error(void);
unsigned long ERR_peek_error(void);
void ERR_clear_error(void);
void ERR_error_string_n(unsigned long e, char *buf, size_t len);
const char *X509_verify_cert_error_string(long n);
X509 *d2i_X509(X509 **a, const unsigned char **in, long len);
void X509_free(X509 *a);
EVP_PKEY *X509_get_pubkey(X509 *x);

/* libcrypto: legacy key methods (keybridge.py) */
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
int RSA_bits(const RSA *rsa);
EVP_PKEY *EVP_PKEY_new(void);
void EVP_PKEY_free(EVP_PKEY *pkey);
int EVP_PKEY_assign(EVP_PKEY *pkey, int type, void *key);
int EVP_PKEY_get_base_id(const EVP_PKEY *pkey);
EC_KEY *EVP_PKEY_get1_EC_KEY(EVP_PKEY *pkey);
RSA *EVP_PKEY_get1_RSA(EVP_PKEY *pkey);
const RSA *EVP_PKEY_get0_RSA(const EVP_PKEY *pkey);
void EC_KEY_free(EC_KEY *key);
void RSA_free(RSA *rsa);
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

/* libcrypto: session-ticket encryption (tickets.py) */
const EVP_CIPHER *EVP_aes_256_cbc(void);
int EVP_EncryptInit_ex(EVP_CIPHER_CTX *ctx, const EVP_CIPHER *type, void *impl,
                       const unsigned char *key, const unsigned char *iv);
int EVP_DecryptInit_ex(EVP_CIPHER_CTX *ctx, const EVP_CIPHER *type, void *impl,
                       const unsigned char *key, const unsigned char *iv);
int EVP_MAC_CTX_set_params(EVP_MAC_CTX *ctx, const OSSL_PARAM params[]);
int RAND_bytes(unsigned char *buf, int num);
"""
)
libssl: Any = ffi.dlopen("libssl.so.3")
libcrypto: Any = ffi.dlopen("libcrypto.so.3")

# pyOpenSSL's own binding of the (same) library: typed Optional in pyOpenSSL 25, always
# loaded here. Only this module reaches into it.
_pyopenssl_lib: Any = _typed_pyopenssl_lib

# The SSL_CTX_ctrl / SSL_ctrl commands behind OpenSSL's macros (ssl.h).
SSL_CTRL_CHAIN_CERT = 89  # SSL_CTX_add1_chain_cert
SSL_CTRL_SET_GROUPS_LIST = 92  # SSL_CTX_set1_groups_list
SSL_CTRL_SET_SIGALGS_LIST = 98  # SSL_CTX_set1_sigalgs_list
SSL_CTRL_SET_MAX_PROTO_VERSION = 124  # SSL_CTX_set_max_proto_version
SSL_CTRL_GET_NEGOTIATED_GROUP = 134  # SSL_get_negotiated_group
SSL_CTRL_SET_READ_AHEAD = 41  # SSL_set_read_ahead
SSL_CTRL_MODE = 33  # SSL_set_mode
SSL_CTRL_CLEAR_MODE = 78  # SSL_clear_mode
SSL_MODE_ENABLE_PARTIAL_WRITE = 0x1
SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER = 0x2
# SSL_get_error's answers (ssl.h)
SSL_ERROR_SSL = 1
SSL_ERROR_WANT_READ = 2
SSL_ERROR_WANT_WRITE = 3
SSL_ERROR_SYSCALL = 5
SSL_ERROR_ZERO_RETURN = 6
TLS1_2_VERSION = 0x0303
TLS1_3_VERSION = 0x0304


def _pyopenssl_address(pointer: Any) -> int:
    return int(_pyopenssl_ffi.cast("uintptr_t", pointer))


def ssl_ctx_of(context: SSL.Context) -> Any:
    """The ``SSL_CTX *`` of a pyOpenSSL context, as a pointer of :data:`ffi`."""
    return ffi.cast("SSL_CTX *", _pyopenssl_address(context._context))


def ssl_of(connection: SSL.Connection) -> Any:
    """The ``SSL *`` of a pyOpenSSL connection, as a pointer of :data:`ffi`."""
    return ffi.cast("SSL *", _pyopenssl_address(connection._ssl))


def address(pointer: Any) -> int:
    """The address of a pointer of :data:`ffi` (a dictionary key for an OpenSSL object)."""
    return int(ffi.cast("uintptr_t", pointer))


# Pending bytes: see the module docstring. Annotated once, bound per pyOpenSSL version.
bio_pending: Callable[[Any], int]
ssl_pending: Callable[[Any], int]
if hasattr(_pyopenssl_lib, "BIO_ctrl_pending") and hasattr(_pyopenssl_lib, "SSL_pending"):
    bio_pending = _pyopenssl_lib.BIO_ctrl_pending
    ssl_pending = _pyopenssl_lib.SSL_pending

    def pending_handles(connection: SSL.Connection) -> tuple[Any, Any, Any]:
        """The connection's ``SSL``, input ``BIO`` and output ``BIO``, as :data:`ssl_pending`
        and :data:`bio_pending` take them (pyOpenSSL 23: pyOpenSSL's own pointers)."""
        return connection._ssl, connection._into_ssl, connection._from_ssl

else:
    bio_pending = libssl.BIO_ctrl_pending
    ssl_pending = libssl.SSL_pending

    def pending_handles(connection: SSL.Connection) -> tuple[Any, Any, Any]:
        """The connection's ``SSL``, input ``BIO`` and output ``BIO``, as :data:`ssl_pending`
        and :data:`bio_pending` take them (pyOpenSSL 25: converted to :data:`ffi` once)."""
        return (
            ffi.cast("SSL *", _pyopenssl_address(connection._ssl)),
            ffi.cast("BIO *", _pyopenssl_address(connection._into_ssl)),
            ffi.cast("BIO *", _pyopenssl_address(connection._from_ssl)),
        )


def attach_socket(connection: SSL.Connection, fd: int) -> Any:
    """Let OpenSSL read and write the connected, non-blocking socket ``fd`` itself (a socket
    BIO, ``SSL_set_fd``) instead of the memory BIOs pyOpenSSL made for
    ``Connection(context, None)``; returns the connection's ``SSL *`` of :data:`ffi`.

    ``SSL_set_fd`` frees the memory BIOs; pyOpenSSL's handles to them are cleared, so its
    ``bio_read``/``bio_write`` refuse (a ``TypeError``) instead of touching freed memory.
    Records are read ahead (one ``recv`` per burst instead of two per record: header, then
    body) and written whole: ``SSL_write`` returns once all of its data is sent or the socket
    would block, and a retry may pass the same data at a new address."""
    ssl = ssl_of(connection)
    if libssl.SSL_set_fd(ssl, fd) != 1:
        raise OSError(f"SSL_set_fd failed: {openssl_errors()}")
    connection._into_ssl = None  # type: ignore[attr-defined]
    connection._from_ssl = None  # type: ignore[attr-defined]
    libssl.SSL_ctrl(ssl, SSL_CTRL_SET_READ_AHEAD, 1, ffi.NULL)
    libssl.SSL_ctrl(ssl, SSL_CTRL_CLEAR_MODE, SSL_MODE_ENABLE_PARTIAL_WRITE, ffi.NULL)
    libssl.SSL_ctrl(ssl, SSL_CTRL_MODE, SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER, ffi.NULL)
    return ssl


def openssl_errors() -> str:
    """Empty this thread's OpenSSL error queue into one line."""
    messages = []
    while code := libcrypto.ERR_get_error():
        buffer = ffi.new("char[256]")
        libcrypto.ERR_error_string_n(code, buffer, 256)
        messages.append(ffi.string(buffer).decode("ascii", "replace"))
    return "; ".join(messages) or "no OpenSSL error recorded"


def verify_error_string(error_number: int) -> str:
    """OpenSSL's text for a certificate verification error number."""
    text: bytes = ffi.string(libcrypto.X509_verify_cert_error_string(error_number))
    return text.decode("ascii", "replace")


def verify_shared_libcrypto() -> str:
    """Prove that pyOpenSSL runs on the same libssl/libcrypto this binding loaded.

    Returns the OpenSSL version string; raises :class:`SystemOpenSSLError` with the fix.
    """
    import cryptography
    import OpenSSL

    same_crypto = address(libcrypto.OpenSSL_version(0)) == _pyopenssl_address(
        _pyopenssl_lib.OpenSSL_version(0)
    )
    same_ssl = address(libssl.TLS_method()) == _pyopenssl_address(_pyopenssl_lib.TLS_method())
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
    return str(ffi.string(libcrypto.OpenSSL_version(0)).decode())
