"""hsm-proxy: a TLS-terminating reverse proxy whose private keys never leave a PKCS#11 token."""

__version__ = "0.1.0"
