"""Server contexts: TLS policy, key-exchange groups, ALPN, SNI routing, OCSP stapling.

Theory of operation. :func:`build_server_context` makes one ``SSL.Context`` per served
chain: a TLS policy (``intermediate``: TLS 1.2 with ECDHE and AEAD ciphers only, and TLS
1.3; ``modern``: TLS 1.3 only), no compression, no renegotiation, server cipher preference,
the ALPN protocols of the handler behind it, and a private key that is the token key,
installed by the key backend (keys.py). Key-exchange groups are X25519MLKEM768
(post-quantum hybrid) first wherever the system OpenSSL offers it (3.5 and later), then
X25519, P-256, P-384: :func:`key_exchange_groups` is probed once against the running
libssl, so OpenSSL 3.0 simply lacks the hybrid.

Mutual TLS is verify.py's (:func:`~proxy.tls.verify.install_client_auth`); a context built
here with ``client_auth`` gets it.

OCSP stapling: when the generation supplies a DER OCSP response (ocsp.py checked it), the
context staples it to every handshake whose client asks; nothing goes to the network.

Several certificates (SNI): each served chain has its own context with its own token key.
:func:`attach_sni_routes` hangs a :class:`SNIRouter` on the default context (its app data);
the server-name callback, which OpenSSL runs while it reads the ClientHello, moves the
connection to the context whose names match (exact first, then a ``*.`` wildcard for one
label) with ``set_context``, copies that context's client verification onto the connection
(OpenSSL does not), and tells the connection's stream the name; an unknown or missing name
stays on the default.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from OpenSSL import SSL

from proxy.errors import TLSError
from proxy.tls.binding import SSL_CTRL_SET_GROUPS_LIST, ffi, libcrypto, libssl, ssl_ctx_of
from proxy.tls.certificates import Chain
from proxy.tls.clientauth import ClientAuthPolicy
from proxy.tls.keys import KeySigner, install_certificate_and_key
from proxy.tls.verify import HandshakeObserver, apply_client_auth, install_client_auth

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


def _set_groups(context: SSL.Context, groups: tuple[str, ...]) -> bool:
    names = ffi.new("char[]", ":".join(groups).encode("ascii"))
    result = libssl.SSL_CTX_ctrl(ssl_ctx_of(context), SSL_CTRL_SET_GROUPS_LIST, 0, names)
    libcrypto.ERR_clear_error()
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
    if isinstance(stream, HandshakeObserver):
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
    install_certificate_and_key(context, chain.der(), key)
    return context
