"""Client certificates on the wire: the verify callback, each context's client-auth policy,
and the identity a finished handshake admitted.

Theory of operation. :func:`install_client_auth` makes a context verify client chains
against the policy's CA bundle and calls :class:`~proxy.tls.clientauth.ClientAuthPolicy`
for the leaf, so a client outside the allow-lists fails the handshake itself. The session ID
context carries the policy's fingerprint, so a session never resumes under a different
client-auth policy (the classic SNI/resumption bypass); :func:`admitted_client` checks the
identity again after a resumed handshake, which skips verification. A context for another
server name switched in by the SNI callback must have its verification copied onto the
connection (:func:`apply_client_auth`, called by context.py's server-name callback and by
``TLSStream.switch_context``): OpenSSL does not copy it.

The callbacks report to the connection's app data, a :class:`HandshakeObserver` (the
TLSStream of stream.py is the one kind): the verify callback leaves the reason it refused a
client there, for the handshake's error message. clientauth.py holds the rules themselves
(identities, allow-lists, headers) and knows nothing of OpenSSL.
"""

from __future__ import annotations

import functools
import warnings
import weakref
from collections.abc import Callable

from cryptography import x509
from OpenSSL import SSL, crypto

from proxy.errors import TLSError
from proxy.tls.binding import verify_error_string
from proxy.tls.clientauth import ClientAuthPolicy, ClientIdentity


class HandshakeObserver:
    """What a connection's app data is: the callbacks OpenSSL runs during the handshake
    report to it. A plain base class here, so the callbacks (this module and context.py)
    need not import stream.py, whose ``TLSStream`` is the one subclass."""

    # Called during the handshake (in its worker thread) with the client's SNI name.
    on_server_name: Callable[[str], None]
    # Why the client certificate was refused (set by the verify callback).
    client_rejection: str | None = None


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
            reason = verify_error_string(error_number)
            subject = certificate.to_cryptography().subject.rfc4514_string()
            if isinstance(stream, HandshakeObserver):
                stream.client_rejection = f"client certificate {subject!r}: {reason}"
            return False
        if depth != 0:
            return True
        identity = ClientIdentity.from_certificate(certificate.to_cryptography())
        admitted = policy.admits(identity)
    except Exception:  # a malformed certificate: refuse, never crash the handshake thread
        if isinstance(stream, HandshakeObserver):
            stream.client_rejection = "client certificate could not be parsed"
        return False
    if not admitted and isinstance(stream, HandshakeObserver):
        stream.client_rejection = (
            f"client certificate {identity.describe()} is not in the allow-lists"
        )
    return admitted


def _verification(policy: ClientAuthPolicy) -> tuple[int, Callable[..., bool]]:
    """The verify mode and callback that carry out ``policy``."""
    mode = SSL.VERIFY_PEER
    if policy.mode == "require":
        mode |= SSL.VERIFY_FAIL_IF_NO_PEER_CERT
    return mode, functools.partial(_verify_client, policy)


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
    context.set_verify(*_verification(policy))
    context.set_verify_depth(8)
    context.set_session_id(b"hsm-proxy-mtls-" + policy.fingerprint()[:16])
    _client_auth_policies[context] = policy


def apply_client_auth(connection: SSL.Connection, context: SSL.Context) -> None:
    """Copy ``context``'s client verification onto ``connection``: call it after an SNI
    callback switched the connection to ``context`` (per server name mutual TLS)."""
    policy = client_auth_of(context)
    if policy is not None:
        connection.set_verify(*_verification(policy))
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


def admitted_client(
    connection: SSL.Connection,
) -> tuple[ClientAuthPolicy | None, ClientIdentity | None]:
    """After the handshake: the client-auth policy of the context that served it, and the
    client it admitted (None without a certificate). A resumed session skipped
    verification, so the allow-lists are checked again here; raises TLSError."""
    policy = client_auth_of(connection.get_context())
    if policy is None:
        return None, None
    certificate = _peer_certificate(connection)
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
