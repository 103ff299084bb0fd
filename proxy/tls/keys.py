"""The key-backend seam: what the TLS package needs of a private key that lives in the token.

Theory of operation. A served context needs a private key that OpenSSL can use and that
never leaves the token (docs/ARCHITECTURE.md, decision 2). How that key is made is a backend's
business; the rest of the package (context.py, stream.py) asks only for what
:class:`KeyBackend` lists:

* ``install_certificate_and_key``: give a context the certificate chain and the
  token-backed key, and narrow what the context offers to what the token's mechanisms can
  sign (``token_limits``: TLS 1.3 only with RSA-PSS, for example);
* ``pop_signed`` and ``pop_signing_error``: after a handshake step, whether the token
  signed in this thread, and why a token signature failed (the handshake's error message);
* ``verify_shared_libcrypto``: the start-up proof that the backend and pyOpenSSL work on the
  same system OpenSSL (docs/ARCHITECTURE.md, decision 1).

:data:`BACKEND` is chosen here and only here; its operations are also bound to plain
module names (``pop_signed`` and the rest), so the handshake path calls a backend function
with no lookup beyond a module global, exactly as if it imported the backend itself.
:class:`KeySigner` is what a backend needs of a token key (proxy.pkcs11's ``TokenKey``).

Today's backend is keybridge.py: OpenSSL's legacy key methods (``EC_KEY_METHOD``,
``RSA_METHOD``, an RSA ``EVP_PKEY_METHOD``) whose signing slots call back into Python.
OpenSSL 3 deprecates them and OpenSSL 4 drops them. A provider-based backend takes its
place as another module with the same five functions, chosen below (by OpenSSL version, or
by configuration), with its declarations added to binding.py; nothing else changes:

* with pkcs11-provider, ``install_certificate_and_key`` loads the provider into the
  library context pyOpenSSL uses (``OSSL_PROVIDER_load``), opens the key by its RFC 7512
  URI (``OSSL_STORE_open``, as nginx does) and installs it with ``SSL_CTX_use_PrivateKey``.
  The provider then runs its own PKCS#11 session, so the PIN, the session pool, retries and
  the signature count are no longer python-pkcs11's: ``pop_signed`` has to learn of a
  signature another way (a session-level hook, or "every full handshake signed"), and
  ``pop_signing_error`` reads OpenSSL's error queue instead of a Python exception;
* with a small provider of the project's own whose signature operation calls back into
  Python (as the key methods do), python-pkcs11 stays the one PKCS#11 client and the
  behaviour of this backend carries over unchanged.

Either way ``verify_shared_libcrypto`` also checks that the provider is loaded where
pyOpenSSL's contexts will look for it. ``python -m proxy.tls.keys --verify`` runs the chosen
backend's check (deploy/setup.sh calls it).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from proxy.errors import SystemOpenSSLError
from proxy.pkcs11.keys import KeyInfo, Mechanism, PSSParams

if TYPE_CHECKING:
    from OpenSSL import SSL

# What the token's mechanisms allow a key in TLS: TLS 1.3 possible, the signature algorithms
# to offer (None: OpenSSL's defaults), one line saying what was limited (None: nothing).
TokenLimits = tuple[bool, str | None, str | None]


class KeySigner(Protocol):
    """What a backend needs of a token key: its description and a way to sign."""

    @property
    def info(self) -> KeyInfo: ...

    @property
    def mechanisms(self) -> frozenset[Mechanism]: ...

    def sign(self, mechanism: Mechanism, data: bytes, pss: PSSParams | None = None) -> bytes: ...


class KeyBackend(Protocol):
    """How a token key reaches OpenSSL (a module may implement it: keybridge.py does)."""

    def install_certificate_and_key(
        self, ssl_context: SSL.Context, chain_der: Sequence[bytes], signer: KeySigner
    ) -> None:
        """Serve ``chain_der`` (DER, leaf first) on ``ssl_context`` with ``signer``'s key,
        within :meth:`token_limits`; raises TLSError."""

    def pop_signed(self) -> bool:
        """Whether the token signed in this thread since the last call (once)."""

    def pop_signing_error(self) -> str | None:
        """Why the last token signature in this thread failed, once; None if none did."""

    def token_limits(self, signer: KeySigner) -> TokenLimits:
        """What ``signer``'s mechanisms allow in TLS; raises TLSError when nothing is."""

    def verify_shared_libcrypto(self) -> str:
        """The OpenSSL version, once the backend is proven to work with pyOpenSSL's
        library; raises SystemOpenSSLError with the fix otherwise."""


def _choose() -> KeyBackend:
    from proxy.tls import keybridge

    return keybridge


BACKEND: KeyBackend = _choose()

install_certificate_and_key = BACKEND.install_certificate_and_key
pop_signed = BACKEND.pop_signed
pop_signing_error = BACKEND.pop_signing_error
token_limits = BACKEND.token_limits
verify_shared_libcrypto = BACKEND.verify_shared_libcrypto


if __name__ == "__main__":  # deploy/setup.sh: python -m proxy.tls.keys --verify
    try:
        print(verify_shared_libcrypto())
    except SystemOpenSSLError as error:
        print(f"hsm-proxy: {error}", file=sys.stderr)
        raise SystemExit(1) from None
