"""The PKCS#11 layer: the only package that imports ``pkcs11`` (docs/ARCHITECTURE.md).

One concern per module, in dependency order:

* ``uri``: RFC 7512 key URIs, parsed strictly (no module involved);
* ``keys``: signing mechanisms, KeyInfo and its custody, signature events, describing a key;
* ``module``: loading a module once, thread-safe (CKF_OS_LOCKING_OK); selecting a token;
* ``login``: one login per token and process, refused logins, the PIN-probe child process;
* ``token``: Token (session pool, signing, recovery) and TokenKey;
* ``testsign``: a test signature and its verification (readiness, doctor);
* ``inventory``: slots, mechanisms and keys, as ``hsm-proxy doctor`` lists them;
* ``keygen``: serving key pairs with their custody attributes (``hsm-proxy key generate``);
* ``provision``: initialising tokens, generating keys, changing PINs (dev mode, tests).

Import from the module that owns a name; this file imports nothing.
"""
