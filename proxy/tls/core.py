"""TLS: server contexts on the system OpenSSL, and a trio stream over pyOpenSSL memory BIOs.

Theory of operation. :func:`build_server_context` makes one ``SSL.Context`` per served
chain: a TLS policy (``intermediate``: TLS 1.2 with ECDHE and AEAD ciphers only, and TLS
1.3; ``modern``: TLS 1.3 only), no compression, no renegotiation, server cipher preference,
ALPN ``http/1.1``, and a private key that is the token key bridged by keybridge.py.
Key-exchange groups are X25519MLKEM768 (post-quantum hybrid) first wherever the system
OpenSSL offers it (3.5 and later), then X25519, P-256, P-384: :data:`KEY_EXCHANGE_GROUPS`
is probed once against the running libssl, so OpenSSL 3.0 simply lacks the hybrid.

Mutual TLS (:func:`install_client_auth`): the context verifies client chains against a CA
bundle and calls :class:`ClientAuthPolicy` (clientauth.py) for the leaf, so a client outside
the allow-lists fails the handshake itself. The session ID context carries the policy's
fingerprint, so a session never resumes under a different client-auth policy (the classic
SNI/resumption bypass); the identity is checked again after a resumed handshake. A context
for another server name switched in by the SNI callback must have its verification copied
onto the connection (:meth:`TLSStream.switch_context` does it): OpenSSL does not copy it.

OCSP stapling: when the generation supplies a DER OCSP response (ocsp.py checked it), the
context staples it to every handshake whose client asks; nothing goes to the network.

:class:`TLSStream` wraps ``SSL.Connection(context, None)``: OpenSSL reads from and writes
to memory BIOs, and this class moves bytes between those BIOs and the transport stream, in
the manner of trio's own ``_ssl.py``:

* every pyOpenSSL call is synchronous; "want read" is the only reason to wait, and it
  turns into exactly one ``receive_some`` on the transport (``_feed_incoming``);
* whatever OpenSSL produced is sent by ``_flush`` under one lock, in the order it was
  produced, so a task sending data and a task receiving (which may answer a key update)
  never interleave records;
* a task that finds another already receiving waits for it, then retries its own call
  instead of reading again (the ``_incoming_count`` check), as trio does.

Handshake steps run in a worker thread (``trio.to_thread.run_sync``) bounded by a
``CapacityLimiter`` sized to the token's session pool: a step may call back into the token
to sign (DESIGN.md, decision 3), and a slow token must not freeze the event loop. Once the
token has signed for a handshake, its remaining steps leave the limiter to the handshakes
still waiting. When ``max_waiting`` handshakes already wait for the limiter, a new one is
refused at once (a bounded queue instead of a pile-up until the handshake timeout). Once our
Finished message is out nothing in the handshake can sign any more, so the remaining steps
(the client's Finished, session tickets) run inline and save a thread round trip.

The pumping avoids work on the per-request path: the output BIO is asked how much it holds
(``BIO_ctrl_pending``) instead of being read until OpenSSL says "want read", a receive with
nothing buffered goes straight to the transport instead of first letting ``recv`` fail, and
a free lock is taken without a trip through the scheduler (the transport call that follows
is the checkpoint). A large ``send_all`` encrypts 64 KiB at a time and sends the ciphertext
in batches of up to 256 KiB, holding the send lock throughout so no other record can slip
between its records.

Several certificates (SNI): each served chain has its own context with its own token key.
:func:`attach_sni_routes` hangs a :class:`SNIRouter` on the default context (its app data);
the server-name callback, which OpenSSL runs while it reads the ClientHello, moves the
connection to the context whose names match (exact first, then a ``*.`` wildcard for one
label) with ``set_context``; an unknown or missing name stays on the default.

Session tickets: pyOpenSSL has no API for ticket keys, so :func:`install_ticket_keys`
calls ``SSL_CTX_set_tlsext_ticket_key_evp_cb`` on the same libssl through cffi. The first
key encrypts new tickets; every key decrypts, so a rotation keeps the previous key for
tickets already issued, and proxies sharing the keys resume each other's sessions (a
resumed handshake makes no token signature). A key is exactly 80 bytes, as ``openssl rand
80`` makes it (and as nginx reads it): a 16-byte name, a 32-byte HMAC-SHA256 key, a
32-byte AES-256-CBC key; any other size is an error, never padded or cut.

Errors: a failed handshake raises :class:`TLSError` with OpenSSL's reason or the token's
(from keybridge). After the handshake, a broken peer raises ``trio.BrokenResourceError``
like any trio stream, and an end of stream, with or without close_notify, reads as ``b""``:
HTTP framing (h11) detects truncated messages on its own.
"""

from __future__ import annotations

import enum
import functools
import threading
import warnings
import weakref
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, Literal

import cffi
import trio
from cryptography import x509
from OpenSSL import SSL, crypto
from OpenSSL._util import ffi as _pyopenssl_ffi
from OpenSSL._util import lib as _typed_lib

from proxy.errors import SecretError, TLSError
from proxy.tls.certificates import Chain
from proxy.tls.clientauth import ClientAuthPolicy, ClientIdentity
from proxy.tls.keybridge import (
    KeySigner,
    install_certificate_and_key,
    pop_signed,
    pop_signing_error,
    session_reused,
)

_lib: Any = _typed_lib  # typed Optional in pyOpenSSL 25; always loaded here

# TLS 1.2 suites: ECDHE key exchange and AEAD encryption only (TLS 1.3 suites are all AEAD).
TLS12_CIPHERS = b":".join(
    [
        b"ECDHE-ECDSA-AES128-GCM-SHA256",
        b"ECDHE-RSA-AES128-GCM-SHA256",
        b"ECDHE-ECDSA-AES256-GCM-SHA384",
        b"ECDHE-RSA-AES256-GCM-SHA384",
        b"ECDHE-ECDSA-CHACHA20-POLY1305",
        b"ECDHE-RSA-CHACHA20-POLY1305",
    ]
)
ALPN_HTTP11 = b"http/1.1"

TLSPolicy = Literal["intermediate", "modern"]
TLS_POLICIES: tuple[TLSPolicy, ...] = ("intermediate", "modern")
# Preferred first. X25519MLKEM768 is kept only where the system OpenSSL offers it.
PREFERRED_GROUPS = ("X25519MLKEM768", "X25519", "P-256", "P-384")
POST_QUANTUM_GROUP = "X25519MLKEM768"

_ffi = cffi.FFI()
_ffi.cdef(
    """
long SSL_CTX_ctrl(void *ctx, int cmd, long larg, void *parg);
long SSL_ctrl(void *ssl, int cmd, long larg, void *parg);
const char *SSL_group_to_name(void *ssl, int id);
size_t BIO_ctrl_pending(void *b);
int SSL_pending(const void *ssl);
"""
)
_libssl: Any = _ffi.dlopen("libssl.so.3")
_pyopenssl_lib: Any = _lib  # typed Optional in pyOpenSSL 25; always loaded


def _same_pointer(pointer: Any) -> Any:
    """A pointer of pyOpenSSL's cffi as a pointer of ours (same address, same libssl)."""
    return _ffi.cast("void *", int(_pyopenssl_ffi.cast("uintptr_t", pointer)))


# pyOpenSSL 23 (Debian 12) binds these; pyOpenSSL 25 (Debian 13) no longer does, so they
# come from the same libssl.so.3 through our own cffi there.
if hasattr(_pyopenssl_lib, "BIO_ctrl_pending") and hasattr(_pyopenssl_lib, "SSL_pending"):
    _bio_pending: Callable[[Any], int] = _pyopenssl_lib.BIO_ctrl_pending
    _ssl_pending: Callable[[Any], int] = _pyopenssl_lib.SSL_pending
else:

    def _bio_pending(bio: Any) -> int:
        return int(_libssl.BIO_ctrl_pending(_same_pointer(bio)))

    def _ssl_pending(ssl: Any) -> int:
        return int(_libssl.SSL_pending(_same_pointer(ssl)))


_SSL_CTRL_SET_GROUPS_LIST = 92
_SSL_CTRL_GET_NEGOTIATED_GROUP = 134
_RECEIVE_SIZE = 65536
# Plaintext goes into OpenSSL at most 64 KiB at a time, so the output memory BIO (which keeps
# its largest size for the life of the connection) stays small; the ciphertext of up to
# _SEND_BATCH bytes then goes to the transport in one call: fewer sends and scheduler trips
# for large bodies.
_SEND_CHUNK = 65536
_SEND_BATCH = 262144


async def _acquire(lock: trio.Lock) -> None:
    """Take a free lock without a trip through the scheduler (``Lock.acquire`` makes one even
    when the lock is free); the transport call that follows is the checkpoint."""
    try:
        lock.acquire_nowait()
    except trio.WouldBlock:
        await lock.acquire()


def _alpn_chooser(
    protocols: tuple[bytes, ...], required: bool
) -> Callable[[SSL.Connection, list[bytes]], Any]:
    """ALPN in the server's order of preference: the first of ``protocols`` the client
    offers. A client that offers none of them goes on without ALPN (RFC 7301 allows it),
    or, when ALPN is ``required``, fails the handshake with a no_application_protocol
    alert. (A client that sends no ALPN extension at all is never asked.)"""

    def choose(_connection: SSL.Connection, offered: list[bytes]) -> Any:
        for protocol in protocols:
            if protocol in offered:
                return protocol
        if required:
            # pyOpenSSL turns an exception here into a fatal alert and raises it again
            # from do_handshake; an SSL.Error carries the reason to the log line.
            wanted = ", ".join(protocol.decode("ascii", "replace") for protocol in protocols)
            theirs = ", ".join(protocol.decode("ascii", "replace") for protocol in offered)
            reason = (
                f"no application protocol in common (client offered {theirs}; we speak {wanted})"
            )
            raise SSL.Error([("", "", reason)])
        return SSL.NO_OVERLAPPING_PROTOCOLS

    return choose


def _server_name_seen(connection: SSL.Connection) -> None:
    stream = connection.get_app_data()
    name = connection.get_servername()
    if not name:
        return
    text = name.decode("idna")
    router = connection.get_context().get_app_data()
    if isinstance(router, SNIRouter):
        chosen = router.pick(text)
        if chosen is not None:
            connection.set_context(chosen)
            apply_client_auth(connection, chosen)  # OpenSSL does not carry it over
    if isinstance(stream, TLSStream):
        stream.on_server_name(text)


@dataclass(frozen=True)
class SNIRouter:
    """Server names to contexts: exact names, then ``*.suffix`` wildcards (one label)."""

    exact: dict[str, SSL.Context] = field(default_factory=dict)
    wildcard: dict[str, SSL.Context] = field(default_factory=dict)

    def pick(self, name: str) -> SSL.Context | None:
        name = name.lower().rstrip(".")
        if name in self.exact:
            return self.exact[name]
        _, dot, parent = name.partition(".")
        return self.wildcard.get(parent) if dot else None


def attach_sni_routes(
    default: SSL.Context, routes: Sequence[tuple[Sequence[str], SSL.Context]]
) -> SNIRouter:
    """Route the names of each extra context to it; names the default serves stay there."""
    router = SNIRouter()
    for names, context in routes:
        for name in names:
            name = name.lower().rstrip(".")
            if name.startswith("*."):
                router.wildcard[name[2:]] = context
            else:
                router.exact[name] = context
    default.set_app_data(router)
    return router


def _context_pointer(context: SSL.Context) -> Any:
    return _ffi.cast("void *", int(_pyopenssl_ffi.cast("uintptr_t", context._context)))


def _set_groups(context: SSL.Context, groups: tuple[str, ...]) -> bool:
    names = _ffi.new("char[]", ":".join(groups).encode("ascii"))
    result = _libssl.SSL_CTX_ctrl(_context_pointer(context), _SSL_CTRL_SET_GROUPS_LIST, 0, names)
    _pyopenssl_lib.ERR_clear_error()
    return bool(result == 1)


@functools.cache
def key_exchange_groups() -> tuple[str, ...]:
    """The groups the proxy offers, most preferred first, as far as this libssl has them."""
    probe = SSL.Context(SSL.TLS_SERVER_METHOD)
    available = tuple(group for group in PREFERRED_GROUPS if _set_groups(probe, (group,)))
    if not available or not _set_groups(probe, available):  # pragma: no cover - OpenSSL 3
        raise TLSError("the system OpenSSL offers none of X25519, P-256, P-384")
    return available


def post_quantum_available() -> bool:
    """Whether the system OpenSSL offers the hybrid X25519MLKEM768 key exchange."""
    return POST_QUANTUM_GROUP in key_exchange_groups()


def apply_policy(context: SSL.Context, policy: TLSPolicy) -> None:
    """Versions, suites, groups and options of a named TLS policy (Mozilla's presets,
    without the DHE suites of "intermediate": key exchange is ECDHE only)."""
    if policy not in TLS_POLICIES:
        raise TLSError(f"unknown TLS policy {policy!r} (known: {', '.join(TLS_POLICIES)})")
    minimum = SSL.TLS1_3_VERSION if policy == "modern" else SSL.TLS1_2_VERSION
    context.set_min_proto_version(minimum)
    context.set_max_proto_version(SSL.TLS1_3_VERSION)
    context.set_options(
        SSL.OP_NO_COMPRESSION
        | SSL.OP_NO_RENEGOTIATION
        | SSL.OP_CIPHER_SERVER_PREFERENCE
        | SSL.OP_IGNORE_UNEXPECTED_EOF
    )
    context.set_cipher_list(TLS12_CIPHERS)
    if not _set_groups(context, key_exchange_groups()):  # pragma: no cover - probed above
        raise TLSError("the system OpenSSL refused the key-exchange group list")


def _verify_client(
    policy: ClientAuthPolicy,
    connection: SSL.Connection,
    certificate: crypto.X509,
    error_number: int,
    depth: int,
    ok: int,
) -> bool:
    """OpenSSL's verdict on each certificate of the client chain, then the allow-lists on
    the leaf. Never raises: a failure is recorded on the stream for the error message."""
    stream = connection.get_app_data()
    try:
        if not ok:
            reason = _pyopenssl_ffi.string(
                _pyopenssl_lib.X509_verify_cert_error_string(error_number)
            ).decode("ascii", "replace")
            subject = certificate.to_cryptography().subject.rfc4514_string()
            if isinstance(stream, TLSStream):
                stream.client_rejection = f"client certificate {subject!r}: {reason}"
            return False
        if depth != 0:
            return True
        identity = ClientIdentity.from_certificate(certificate.to_cryptography())
        admitted = policy.admits(identity)
    except Exception:  # a malformed certificate: refuse, never crash the handshake thread
        if isinstance(stream, TLSStream):
            stream.client_rejection = "client certificate could not be parsed"
        return False
    if not admitted and isinstance(stream, TLSStream):
        stream.client_rejection = (
            f"client certificate {identity.describe()} is not in the allow-lists"
        )
    return admitted


# Each context's client-auth policy (a context's app data is its SNI router).
_client_auth_policies: weakref.WeakKeyDictionary[SSL.Context, ClientAuthPolicy] = (
    weakref.WeakKeyDictionary()
)


def client_auth_of(context: SSL.Context) -> ClientAuthPolicy | None:
    """The client-auth policy installed on ``context``, if any."""
    return _client_auth_policies.get(context)


def install_client_auth(context: SSL.Context, policy: ClientAuthPolicy) -> None:
    """Verify client certificates on ``context`` as ``policy`` says, trusting the CAs
    of ``policy.ca_certificates`` (the one place a client CA bundle reaches OpenSSL; a
    reload builds a new context and calls this again)."""
    if not policy.ca_certificates:
        raise TLSError("client auth needs a CA bundle (clientauth.load_ca_bundle)")
    store = context.get_cert_store()
    if store is None:  # pragma: no cover - a server context always has a store
        raise TLSError("the SSL context has no certificate store")
    names = []
    with warnings.catch_warnings():
        # pyOpenSSL 24+ deprecates its X509 type in some places; these calls still take it.
        warnings.simplefilter("ignore", DeprecationWarning)
        for certificate in policy.ca_certificates:
            converted = crypto.X509.from_cryptography(certificate)
            store.add_cert(converted)
            names.append(converted.get_subject())
    context.set_client_ca_list(names)
    mode = SSL.VERIFY_PEER
    if policy.mode == "require":
        mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
    context.set_verify(mode, functools.partial(_verify_client, policy))
    context.set_verify_depth(8)
    context.set_session_id(b"hsm-proxy-mtls-" + policy.fingerprint()[:16])
    _client_auth_policies[context] = policy


def apply_client_auth(connection: SSL.Connection, context: SSL.Context) -> None:
    """Copy ``context``'s client verification onto ``connection``: call it after an SNI
    callback switched the connection to ``context`` (per server name mutual TLS)."""
    policy = client_auth_of(context)
    if policy is not None:
        mode = SSL.VERIFY_PEER
        if policy.mode == "require":
            mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
        connection.set_verify(mode, functools.partial(_verify_client, policy))
    else:
        connection.set_verify(SSL.VERIFY_NONE, None)


def _peer_certificate(connection: SSL.Connection) -> x509.Certificate | None:
    """The client's certificate as a ``cryptography`` object, on pyOpenSSL 23 and 25."""
    try:  # pyOpenSSL 24.3+: no detour through its deprecated X509 type
        certificate: x509.Certificate | None = connection.get_peer_certificate(as_cryptography=True)
    except TypeError:
        legacy = connection.get_peer_certificate()
        certificate = None if legacy is None else legacy.to_cryptography()
    return certificate


def install_ocsp_response(context: SSL.Context, response: bytes) -> None:
    """Staple ``response`` (DER, checked by ocsp.py) when a client asks for status."""

    def staple(_connection: SSL.Connection, _data: object) -> bytes:
        return response

    context.set_ocsp_server_callback(staple)


def build_server_context(
    chain: Chain,
    key: KeySigner,
    policy: TLSPolicy = "intermediate",
    client_auth: ClientAuthPolicy | None = None,
    ocsp_response: bytes | None = None,
    alpn: tuple[bytes, ...] = (ALPN_HTTP11,),
    alpn_required: bool = False,
) -> SSL.Context:
    """A server context that serves ``chain`` with the token key behind ``key`` and offers
    the ``alpn`` protocols (the handler behind this context speaks them); with
    ``alpn_required`` a client that offers ALPN but none of them is refused."""
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    apply_policy(context, policy)
    if alpn:
        context.set_alpn_select_callback(_alpn_chooser(alpn, alpn_required))
    context.set_tlsext_servername_callback(_server_name_seen)
    context.set_session_id(b"hsm-proxy")
    # Free OpenSSL's ~34 KiB of record buffers while a connection is idle (as nginx does):
    # thousands of idle keep-alive connections then cost kilobytes each, not tens of them.
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    if client_auth is not None:
        install_client_auth(context, client_auth)
    if ocsp_response:
        install_ocsp_response(context, ocsp_response)
    pointer = int(_pyopenssl_ffi.cast("uintptr_t", context._context))
    install_certificate_and_key(pointer, chain.der(), key)
    return context


def _describe_ssl_error(error: SSL.Error) -> str:
    reasons = []
    for entry in error.args[0] if error.args and isinstance(error.args[0], list) else []:
        if isinstance(entry, tuple) and len(entry) == 3:
            reasons.append(str(entry[2]))
    return ", ".join(reasons) or str(error) or type(error).__name__


@dataclass(frozen=True)
class TLSInfo:
    """What the handshake settled, for routing and logs."""

    version: str
    cipher: str
    alpn: str | None
    server_name: str | None
    resumed: bool = False  # an abbreviated handshake: no token signature
    # Key-exchange group ("X25519", "X25519MLKEM768", ...), when OpenSSL tells.
    group: str | None = None
    # Whether the context asked for a client certificate, and the admitted client's identity.
    client_auth: bool = False
    client_identity: ClientIdentity | None = None
    # The context that served the handshake (the default one, or a server name's): what
    # the connection pipeline maps back to a site and its protocol handler.
    context: SSL.Context | None = field(default=None, compare=False, repr=False)


class CloseMode(enum.Enum):
    """How a connection ends; a protocol handler returns one and :meth:`TLSStream.close`
    carries it out."""

    # close_notify, then close the socket: the usual end of a connection.
    CLOSE_NOTIFY = "close_notify"
    # close_notify, a TCP half-close, then a short drain of what the client still sends and
    # only then the close, so that a client that is still sending reads our last answer (an
    # error response, an alert) instead of a reset.
    LINGER = "linger"
    # No close_notify: a response broke off, and even a response framed by the connection's
    # end must read as truncated, never as complete.
    ABORT = "abort"


LINGER_SECONDS = 2.0
# How long closing may take in all: close_notify out, and the linger.
CLOSE_SECONDS = LINGER_SECONDS + 2.0


class TLSStream(trio.abc.HalfCloseableStream):
    """A server-side TLS stream over any trio stream, driven through memory BIOs."""

    def __init__(
        self,
        transport: trio.abc.Stream,
        context: SSL.Context,
        sign_limiter: trio.CapacityLimiter,
        on_server_name: Callable[[str], None] = lambda _name: None,
        max_waiting: int | None = None,
    ) -> None:
        self.transport = transport
        # Called during the handshake (in its worker thread) with the client's SNI name.
        self.on_server_name = on_server_name
        self._connection = SSL.Connection(context, None)
        self._connection.set_app_data(self)
        self._connection.set_accept_state()
        # pyOpenSSL's handles, for the BIO and pending-data queries it has no API for.
        self._ssl = self._connection._ssl
        self._into_ssl = self._connection._into_ssl
        self._from_ssl = self._connection._from_ssl
        self._sign_limiter = sign_limiter
        # How many handshakes may wait for a token session; beyond it, refuse at once.
        self._max_waiting = max_waiting
        self._send_lock = trio.Lock()
        self._receive_lock = trio.Lock()
        self._incoming_count = 0
        self._handshake_done = False
        self._eof_sent = False
        self._signed = False  # the token has signed for this handshake
        self.info: TLSInfo | None = None
        # Why the client certificate was refused (set by the verify callback).
        self.client_rejection: str | None = None

    def switch_context(self, context: SSL.Context) -> None:
        """Serve this connection from ``context`` instead: call it from ``on_server_name``
        (per server name certificates and mutual TLS). The client-auth settings of
        ``context`` come along, which OpenSSL does not do by itself."""
        self._connection.set_context(context)
        apply_client_auth(self._connection, context)

    # -- moving bytes between the BIOs and the transport --------------------------------

    def _take_outgoing(self) -> bytes:
        # Ask the memory BIO how much it holds and read exactly that: no "want read"
        # exception for the usual case of an empty BIO.
        pending = _bio_pending(self._from_ssl)
        if not pending:
            return b""
        return self._connection.bio_read(pending)  # type: ignore[no-any-return]

    def _must_feed(self) -> bool:
        """True when OpenSSL cannot make progress without more bytes from the peer: its
        input BIO is empty and it holds no decrypted data. (Without read-ahead OpenSSL takes
        one record at a time from the BIO, so it never sits on a whole undecrypted record.)"""
        return not _bio_pending(self._into_ssl) and not _ssl_pending(self._ssl)

    async def _flush(self) -> None:
        if not _bio_pending(self._from_ssl):
            return  # nothing to send: no lock, no checkpoint
        await _acquire(self._send_lock)
        try:
            while data := self._take_outgoing():
                await self.transport.send_all(data)
        finally:
            self._send_lock.release()

    async def _feed_incoming(self, seen: int) -> bool:
        """Give OpenSSL more bytes from the peer; False at the end of the stream."""
        await _acquire(self._receive_lock)
        try:
            if self._incoming_count != seen:
                return True  # another task fed data while we waited: just retry
            data = await self.transport.receive_some(_RECEIVE_SIZE)
            self._incoming_count += 1
            if not data:
                self._connection.bio_shutdown()
                return False
            self._connection.bio_write(data)  # type: ignore[arg-type] # any buffer works
            return True
        finally:
            self._receive_lock.release()

    # -- handshake -----------------------------------------------------------------------

    def _handshake_step(self) -> str | None:
        """One ``do_handshake`` call (in a worker thread while it may sign): None when
        done, "want-read", or the reason it failed."""
        try:
            self._connection.do_handshake()
        except SSL.WantReadError:
            return "want-read"
        except SSL.Error as error:
            return pop_signing_error() or self.client_rejection or _describe_ssl_error(error)
        finally:
            self._signed = pop_signed() or self._signed
        return None

    async def do_handshake(self) -> TLSInfo:
        """Complete the server handshake; the caller bounds it with a timeout."""
        if self.info is not None:
            return self.info
        if (
            self._max_waiting is not None
            and self._sign_limiter.statistics().tasks_waiting >= self._max_waiting
        ):
            raise TLSError(
                f"token busy: {self._max_waiting} handshakes already wait for a session; "
                "refused at once"
            )
        while True:
            seen = self._incoming_count
            if self._connection.get_finished() is None:
                # Steps up to the one that signed run under the token's limiter; once the
                # signature is made, the rest of the handshake (reading the client's flight)
                # no longer waits behind handshakes that queue for the token.
                outcome = await trio.to_thread.run_sync(
                    self._handshake_step, limiter=None if self._signed else self._sign_limiter
                )
            else:
                # Our Finished is out (TLS 1.3, or a resumed 1.2 session): what is left
                # (the client's Finished, session tickets) never signs, so no thread hop.
                outcome = self._handshake_step()
            try:
                await self._flush()  # the server flight, or an alert explaining a failure
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise TLSError("the client went away during the handshake") from exc
            if outcome is None:
                break
            if outcome != "want-read":
                raise TLSError(f"TLS handshake failed: {outcome}")
            try:
                more = await self._feed_incoming(seen)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                raise TLSError("the client went away during the handshake") from exc
            if not more:
                raise TLSError("the client closed the connection during the handshake")
        self._handshake_done = True
        alpn = self._connection.get_alpn_proto_negotiated()
        server_name = self._connection.get_servername()
        policy, identity = self._client_identity()
        self.info = TLSInfo(
            version=self._connection.get_protocol_version_name(),
            cipher=self._connection.get_cipher_name() or "",
            alpn=alpn.decode("ascii") if alpn else None,
            server_name=server_name.decode("idna") if server_name else None,
            resumed=session_reused(int(_pyopenssl_ffi.cast("uintptr_t", self._connection._ssl))),
            group=self._negotiated_group(),
            client_auth=policy is not None,
            client_identity=identity,
            context=self._connection.get_context(),
        )
        return self.info

    def _client_identity(self) -> tuple[ClientAuthPolicy | None, ClientIdentity | None]:
        policy = client_auth_of(self._connection.get_context())
        if policy is None:
            return None, None
        certificate = _peer_certificate(self._connection)
        if certificate is None:
            if policy.mode == "require":  # a resumed session that had no certificate
                raise TLSError("TLS handshake failed: no client certificate")
            return policy, None
        identity = ClientIdentity.from_certificate(certificate)
        # A resumed session skips certificate verification: check the allow-lists again.
        if not policy.admits(identity):
            raise TLSError(
                f"TLS handshake failed: client certificate {identity.describe()} "
                "is not in the allow-lists"
            )
        return policy, identity

    def _negotiated_group(self) -> str | None:
        ssl = _ffi.cast("void *", int(_pyopenssl_ffi.cast("uintptr_t", self._connection._ssl)))
        group_id = _libssl.SSL_ctrl(ssl, _SSL_CTRL_GET_NEGOTIATED_GROUP, 0, _ffi.NULL)
        if group_id <= 0:
            return None
        name = _libssl.SSL_group_to_name(ssl, group_id)
        return _ffi.string(name).decode("ascii") if name != _ffi.NULL else None

    # -- trio.abc.Stream -----------------------------------------------------------------

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if not self._handshake_done:
            await self.do_handshake()
        while True:
            seen = self._incoming_count
            if self._must_feed():
                if not await self._feed_incoming(seen):
                    return b""
                continue
            try:
                data: bytes = self._connection.recv(max_bytes or _RECEIVE_SIZE)
            except SSL.WantReadError:
                data = b""
                wants_more = True
            except SSL.ZeroReturnError:
                await self._flush()
                return b""
            except SSL.Error as error:
                await self._send_alert()
                raise trio.BrokenResourceError(f"TLS error: {_describe_ssl_error(error)}") from None
            else:
                wants_more = False
            await self._flush()
            if not wants_more:
                return data
            if not await self._feed_incoming(seen):
                # End of stream: with OP_IGNORE_UNEXPECTED_EOF, OpenSSL reads it as a clean
                # close, and so do we (h11 notices a truncated message by its framing).
                return b""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if not self._handshake_done:
            await self.do_handshake()
        view = memoryview(data)
        if len(view) <= _SEND_CHUNK:
            failure = self._encrypt(view)
            if failure is not None:
                await self._send_alert()
                raise trio.BrokenResourceError(f"TLS error: {failure}")
            await self._flush()
            return
        # Large data: hold the send lock across the whole write, so that nothing another
        # task produces (an alert, a key update) can slip between our records.
        await _acquire(self._send_lock)
        try:
            batch: list[bytes] = []
            size = 0
            for start in range(0, len(view), _SEND_CHUNK):
                failure = self._encrypt(view[start : start + _SEND_CHUNK])
                batch.append(self._take_outgoing())  # with the alert, after a failure
                size += len(batch[-1])
                if failure is not None:
                    with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                        await self.transport.send_all(b"".join(batch))
                    raise trio.BrokenResourceError(f"TLS error: {failure}")
                if size >= _SEND_BATCH:
                    await self.transport.send_all(b"".join(batch))
                    batch, size = [], 0
            if size:
                await self.transport.send_all(b"".join(batch))
        finally:
            self._send_lock.release()

    def _encrypt(self, plaintext: memoryview) -> str | None:
        """Hand plaintext to OpenSSL; the reason it failed, or None."""
        try:
            self._connection.sendall(plaintext)  # type: ignore[arg-type]
        except SSL.Error as error:
            return _describe_ssl_error(error)
        return None

    async def _send_alert(self) -> None:
        """Best effort: send the alert OpenSSL queued for the error, so the peer learns why."""
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await self._flush()

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        """Send close_notify and keep receiving: the write side is closed (a TLS 1.3 peer
        may go on sending, RFC 8446 section 6.1; a TLS 1.2 peer answers with its own)."""
        if not self._handshake_done:
            await self.do_handshake()
        if self._eof_sent:
            return
        self._eof_sent = True
        with suppress(SSL.Error):
            self._connection.shutdown()
        await self._flush()

    async def aclose(self) -> None:
        await self.close(CloseMode.CLOSE_NOTIFY)

    async def close(self, mode: CloseMode) -> None:
        """End the connection as ``mode`` says, within :data:`CLOSE_SECONDS`; never raises
        for a peer that is gone. The one place a connection is closed."""
        with trio.move_on_after(CLOSE_SECONDS) as scope:
            scope.shield = True
            try:
                if mode is not CloseMode.ABORT and self._handshake_done and not self._eof_sent:
                    self._eof_sent = True
                    with suppress(SSL.Error):
                        self._connection.shutdown()
                    with trio.move_on_after(1):
                        await self._flush()
                if mode is CloseMode.LINGER and isinstance(
                    self.transport, trio.abc.HalfCloseableStream
                ):
                    with trio.move_on_after(LINGER_SECONDS):
                        await self.transport.send_eof()
                        while await self.transport.receive_some(_RECEIVE_SIZE):
                            pass
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await self.transport.aclose()


# --- session-ticket keys (cffi on the same libssl as pyOpenSSL) ---------------------------

TICKET_KEY_SIZE = 80
_NAME, _HMAC, _AES = 16, 32, 32

_ticket_ffi = cffi.FFI()
_ticket_ffi.cdef(
    """
typedef struct ssl_st SSL; typedef struct ssl_ctx_st SSL_CTX;
typedef struct evp_cipher_ctx_st EVP_CIPHER_CTX; typedef struct evp_mac_ctx_st EVP_MAC_CTX;
typedef struct evp_cipher_st EVP_CIPHER;
typedef struct {
    const char *key; unsigned int data_type; void *data; size_t data_size; size_t return_size;
} OSSL_PARAM;
int SSL_CTX_set_tlsext_ticket_key_evp_cb(SSL_CTX *ctx, int (*cb)(SSL *, unsigned char *,
    unsigned char *, EVP_CIPHER_CTX *, EVP_MAC_CTX *, int));
SSL_CTX *SSL_get_SSL_CTX(const SSL *ssl);
int SSL_version(const SSL *ssl);
const EVP_CIPHER *EVP_aes_256_cbc(void);
int EVP_EncryptInit_ex(EVP_CIPHER_CTX *ctx, const EVP_CIPHER *type, void *impl,
                       const unsigned char *key, const unsigned char *iv);
int EVP_DecryptInit_ex(EVP_CIPHER_CTX *ctx, const EVP_CIPHER *type, void *impl,
                       const unsigned char *key, const unsigned char *iv);
int EVP_MAC_CTX_set_params(EVP_MAC_CTX *ctx, const OSSL_PARAM params[]);
int RAND_bytes(unsigned char *buf, int num);
"""
)
_ticket_ssl: Any = _ticket_ffi.dlopen("libssl.so.3")
_ticket_crypto: Any = _ticket_ffi.dlopen("libcrypto.so.3")
_OSSL_PARAM_UTF8_STRING = 4
_OSSL_PARAM_OCTET_STRING = 5
_OSSL_PARAM_UNMODIFIED = 2**64 - 1 if _ticket_ffi.sizeof("size_t") == 8 else 2**32 - 1
_IV_SIZE = 16
_TLS1_3_VERSION = 0x0304
_PARAM_DIGEST = _ticket_ffi.new("char[]", b"digest")
_PARAM_KEY = _ticket_ffi.new("char[]", b"key")
_SHA256 = _ticket_ffi.new("char[]", b"SHA256")


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


def _context_address(context: SSL.Context) -> int:
    return int(_pyopenssl_ffi.cast("uintptr_t", context._context))


def _set_mac_key(mac_context: Any, key: TicketKey) -> bool:
    hmac_key = _ticket_ffi.new("unsigned char[]", key.hmac_key)
    params = _ticket_ffi.new("OSSL_PARAM[3]")
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
    return bool(_ticket_crypto.EVP_MAC_CTX_set_params(mac_context, params) == 1)


def _ticket_failed(_exc: BaseException, *_rest: Any) -> None:
    return None  # the callback returns -1 (cffi's error value): the handshake fails cleanly


@_ticket_ffi.callback(
    "int(SSL *, unsigned char *, unsigned char *, EVP_CIPHER_CTX *, EVP_MAC_CTX *, int)",
    onerror=_ticket_failed,
    error=-1,
)
def _ticket_callback(
    ssl: Any, key_name: Any, iv: Any, cipher_context: Any, mac_context: Any, encrypt: int
) -> int:
    address = int(_ticket_ffi.cast("uintptr_t", _ticket_ssl.SSL_get_SSL_CTX(ssl)))
    with _ticket_lock:
        keys = _ticket_sets.get(address)
    if keys is None:
        return 0  # encrypting: issue no ticket; decrypting: a full handshake
    if encrypt:
        key = keys.encrypt
        if _ticket_crypto.RAND_bytes(iv, _IV_SIZE) != 1:
            return -1
        _ticket_ffi.memmove(key_name, key.name, _NAME)
        aes = _ticket_ffi.new("unsigned char[]", key.aes_key)
        if _ticket_crypto.EVP_EncryptInit_ex(
            cipher_context, _ticket_crypto.EVP_aes_256_cbc(), _ticket_ffi.NULL, aes, iv
        ) != 1 or not _set_mac_key(mac_context, key):
            return -1
        return 1
    found = keys.by_name.get(bytes(_ticket_ffi.buffer(key_name, _NAME)))
    if found is None:
        return 0  # unknown key: a full handshake, and a new ticket
    aes = _ticket_ffi.new("unsigned char[]", found.aes_key)
    if _ticket_crypto.EVP_DecryptInit_ex(
        cipher_context, _ticket_crypto.EVP_aes_256_cbc(), _ticket_ffi.NULL, aes, iv
    ) != 1 or not _set_mac_key(mac_context, found):
        return -1
    # 2: resume, and issue a new ticket. Always in TLS 1.3, as OpenSSL does with its own
    # keys (and nginx with its callback): clients use a TLS 1.3 ticket once (RFC 8446,
    # C.4), so a resumption without a new one leaves them a full handshake next time.
    if found.name != keys.encrypt.name or _ticket_ssl.SSL_version(ssl) == _TLS1_3_VERSION:
        return 2
    return 1


def _forget_ticket_keys(address: int, keys: _TicketKeySet) -> None:
    with _ticket_lock:
        if _ticket_sets.get(address) is keys:  # not a newer context at a reused address
            del _ticket_sets[address]


def install_ticket_keys(context: SSL.Context, keys: Sequence[TicketKey]) -> None:
    """Encrypt tickets of ``context`` with ``keys[0]``; accept tickets under any of ``keys``."""
    if not keys:
        raise TLSError("install_ticket_keys needs at least one key")
    names = [key.name for key in keys]
    if len(set(names)) != len(names):
        raise SecretError("two session-ticket keys share the same 16-byte name")
    address = _context_address(context)
    key_set = _TicketKeySet(keys[0], {key.name: key for key in keys})
    with _ticket_lock:
        _ticket_sets[address] = key_set
    weakref.finalize(context, _forget_ticket_keys, address, key_set)
    pointer = _ticket_ffi.cast("SSL_CTX *", address)
    if _ticket_ssl.SSL_CTX_set_tlsext_ticket_key_evp_cb(pointer, _ticket_callback) != 1:
        _forget_ticket_keys(address, key_set)
        raise TLSError("OpenSSL refused the session-ticket key callback")
