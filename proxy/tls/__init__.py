"""The TLS layer: everything that touches OpenSSL; see docs/ARCHITECTURE.md.

binding.py is the one cffi binding of libssl/libcrypto (beside pyOpenSSL); context.py builds
server contexts (policy, groups, ALPN, SNI, OCSP); verify.py verifies client certificates
(clientauth.py holds the rules); stream.py is the trio stream over memory BIOs; tickets.py
installs session-ticket keys; keys.py is the seam to the key backend (keybridge.py, OpenSSL
key methods calling back into the token); certificates.py and ocsp.py check what is served;
csr.py makes certificate signing requests for token keys (x509names.py parses their names).
"""
