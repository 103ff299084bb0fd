"""The TLS layer: everything that touches OpenSSL (contexts, the stream, the key bridge,
certificates, client auth, OCSP, session tickets); see docs/ARCHITECTURE.md."""
