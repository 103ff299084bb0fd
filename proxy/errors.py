"""The one exception tree of hsm-proxy.

Every module raises only these, so the command line can turn any failure into one clear
line and an exit code, and tests can assert on the kind of failure rather than on text.
Messages name what was wrong and where (a file, a config key, a URI) but never carry a
secret: no PIN, no key material, no secret value ever goes into an exception.
"""

from __future__ import annotations


class ProxyError(Exception):
    """Base of every error hsm-proxy raises on purpose."""


class ConfigError(ProxyError):
    """The configuration (file, flags or environment) is invalid."""


class SecretError(ProxyError):
    """A secret (PIN, certificate chain) could not be read or has the wrong form."""


class SystemOpenSSLError(ProxyError):
    """pyOpenSSL does not run on the shared system OpenSSL the key bridge uses."""


class TokenError(ProxyError):
    """Anything that went wrong talking to the PKCS#11 module or token."""


class ModuleLoadError(TokenError):
    """The PKCS#11 module could not be loaded or initialised."""


class TokenNotFoundError(TokenError):
    """No token (or more than one) matches the selection."""


class LoginError(TokenError):
    """Logging in to the token failed (wrong PIN, locked PIN, ...)."""


class KeyNotFoundError(TokenError):
    """No private key matches the key URI."""


class AmbiguousKeyError(TokenError):
    """More than one private key matches the key URI."""


class SigningError(TokenError):
    """The token failed to produce a signature."""


class KeyCustodyError(TokenError):
    """The key could leave the token (extractable, or not sensitive) and policy refuses it."""


class KeyURIError(ConfigError):
    """A PKCS#11 URI (RFC 7512) is malformed or not usable as a key reference."""


class CertificateError(ProxyError):
    """A certificate chain is unreadable, out of order, or not currently valid."""


class KeyMismatchError(CertificateError):
    """The certificate's public key is not the token key's public key."""


class TLSError(ProxyError):
    """A TLS connection failed (handshake refused, protocol error, timeout)."""


class UpstreamError(ProxyError):
    """The upstream backend could not be reached or broke the exchange."""
