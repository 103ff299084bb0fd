"""Generations: everything derived from secrets, built and validated as one immutable unit.

Theory of operation (DESIGN.md, decision 5). A :class:`Generation` holds the logged-in
token, the token key, the certificate chain and the SSL context made from them. It is built
completely and checked before anything serves it: the PIN logs in, the key URI names
exactly one key, the chain parses, is in order and currently valid, and the token key is
the certificate's key (equal public keys and a test signature that verifies). A failure
raises a :class:`ProxyError` that says which secret and which check, and releases what was
acquired. The server reads :attr:`GenerationHolder.current` once per connection, so a
connection keeps the generation it started with.

Reload triggers (SIGHUP, file changes, secrets managers) build on this; see the README.
"""

from __future__ import annotations

from dataclasses import dataclass

from OpenSSL import SSL

from proxy.certificates import Chain, check_key_matches, load_chain, validate_chain
from proxy.config import ProxyConfig
from proxy.keybridge import verify_shared_libcrypto
from proxy.secrets import read_pin
from proxy.tls import build_server_context
from proxy.token import SignatureObserver, Token, TokenKey


@dataclass(frozen=True)
class Generation:
    number: int
    config: ProxyConfig
    token: Token
    key: TokenKey
    chain: Chain
    ssl_context: SSL.Context

    def close(self) -> None:
        self.token.close()


def build_generation(
    config: ProxyConfig, observer: SignatureObserver, number: int = 1
) -> Generation:
    """Build and validate a complete generation from ``config``, or raise saying why not."""
    verify_shared_libcrypto()
    chain = load_chain(config.tls.certificate)
    validate_chain(chain)
    pin = read_pin(config.token.pin)
    token = Token(
        config.token.module,
        config.tls.key,
        pin,
        pool_size=config.token.sessions,
        observer=observer,
    )
    del pin
    try:
        key = token.find_private_key(config.tls.key)
        check_key_matches(chain, key)
        context = build_server_context(chain, key)
    except BaseException:
        token.close()
        raise
    return Generation(number, config, token, key, chain, context)


class GenerationHolder:
    """The one reference a reload swaps; connections read it once, when they start."""

    def __init__(self, generation: Generation) -> None:
        self.current = generation

    def close(self) -> None:
        self.current.close()
