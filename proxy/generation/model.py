"""What a generation is: the values a build makes, and what the process hands every build.

Theory of operation (docs/ARCHITECTURE.md, decision 5). A :class:`Generation` is everything derived
from secrets, complete and checked before anything serves it: the logged-in token, the
default certificate's key, chain and SSL context, one :class:`Site` per ``[[tls.sni]]``
certificate (chosen by SNI from the default context; its key in ``[token]``'s token or in
a token of its own), and the session-ticket keys
installed in every context. It is immutable; a reload builds a new one and swaps it whole
(holder.py), and :meth:`Generation.close` closes its token sessions once nothing uses it.

A :class:`ProcessModel` is what the process around the generations decided, given to
every build by the command line rather than read from below: the session-ticket key a
``--workers`` supervisor shares with its workers (net/workers.py).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from proxy.config import ProxyConfig, SiteConfig, UpstreamGroup
from proxy.pkcs11.token import Token, TokenKey
from proxy.tls.certificates import Chain
from proxy.tls.context import SNIRouter
from proxy.tls.tickets import TicketKey

if TYPE_CHECKING:  # only tls/ touches OpenSSL; this is a type name
    from OpenSSL import SSL


@dataclass(frozen=True)
class ProcessModel:
    """What the process tells every build of its generations."""

    # The supervisor's session-ticket key: used when the config names none, so that the
    # workers of one supervisor resume each other's sessions. None outside a worker.
    shared_ticket_key: TicketKey | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Site:
    """One served certificate with its token key and SSL context, built from ``settings``
    (its ``[[tls.sni]]`` entry)."""

    names: tuple[str, ...]
    key: TokenKey
    chain: Chain
    ssl_context: SSL.Context
    settings: SiteConfig


@dataclass(frozen=True)
class Generation:
    number: int
    config: ProxyConfig
    token: Token
    key: TokenKey  # the default certificate's key
    chain: Chain  # the default certificate chain
    ssl_context: SSL.Context  # the default context; SNI moves connections to sites'
    sites: tuple[Site, ...] = ()
    ticket_keys: tuple[TicketKey, ...] = field(default=(), repr=False)
    # Every logged-in token: ``token`` ([token]) first, then those of [[tls.sni]] entries
    # with a [tls.sni.token] of their own; each recovers on its own.
    tokens: tuple[Token, ...] = ()

    def upstream_serving(self, context: SSL.Context | None) -> UpstreamGroup:
        """The upstream group of the connections whose handshake ``context`` served: its
        site's (``[[tls.sni]] upstream``), or the default certificate's."""
        for site in self.sites:
            if site.ssl_context is context:
                return self.config.site_upstream(site.settings)
        return self.config.site_upstream(None)

    def context_for_name(self, name: str) -> SSL.Context:
        """The context a handshake naming ``name`` (SNI) is served by: a site's, or the
        default one. An HTTP/2 connection may be reused for another name its certificate
        covers (RFC 9113, 9.1.1); a request for a name another context serves is
        misdirected."""
        router = self.ssl_context.get_app_data()
        if isinstance(router, SNIRouter):
            chosen = router.pick(name)
            if chosen is not None:
                return chosen
        return self.ssl_context

    def chains(self) -> list[Chain]:
        return [self.chain, *(site.chain for site in self.sites)]

    def token_keys(self) -> list[TokenKey]:
        return [self.key, *(site.key for site in self.sites)]

    def all_tokens(self) -> tuple[Token, ...]:
        return self.tokens or (self.token,)

    def close(self) -> None:
        for token in self.all_tokens():
            token.close()


def expiry_warnings(generation: Generation, days: int, now: datetime.datetime) -> list[str]:
    """One line per certificate of ``generation`` that expires within ``days``."""
    lines = []
    for chain in generation.chains():
        left = chain.not_after() - now
        if left <= datetime.timedelta(days=days):
            lines.append(
                f"certificate {chain.source} ({chain.leaf.subject.rfc4514_string()}) expires "
                f"on {chain.not_after():%Y-%m-%d %H:%M}Z, in {left.days} days "
                f"(warning threshold: {days} days)"
            )
    return lines
