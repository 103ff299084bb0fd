"""The PKCS#11 layer: key URIs, the token module, login, the session pool, signing; the only
package that imports ``pkcs11`` (docs/ARCHITECTURE.md)."""
