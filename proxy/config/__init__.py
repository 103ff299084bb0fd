"""Configuration: frozen dataclasses built from a TOML file (``run``) or from flags (``dev``).

Theory of operation. The package's face: every other module imports from here.
model.py holds the frozen dataclasses, reader.py the strict reader, load.py the walk of
the file, forwarding.py the ``[http]``/``[tcp]``/``[upstreams]``/``[[routes]]`` parts.
:func:`load_config` reads TOML with ``tomllib`` and walks it with a
strict reader: an unknown key, a missing key or a value of the wrong type is a
:class:`ConfigError` that names the key (``tls.certificate: ...``). Relative paths are
taken relative to the config file. The result holds references to secrets, never secret
values: every secret-bearing key takes the one reference form ``scheme:locator``
(``file:/run/secrets/pin``, ``env:HSM_PIN``, ``aws-sm:prod/pin``; a plain path where the
key always took a path), parsed by :func:`proxy.secrets.reference.parse_reference`; the
older per-source keys (``pin_file``, ``pin_env``, ``*_aws_secret`` ...) build the same
references, and giving a secret twice is an error naming both keys. The secret store
(proxy/secrets/) resolves references when a generation is built.

Example (the README documents every key)::

    listen = "0.0.0.0:8443"
    upstream = "http://127.0.0.1:8080"

    [token]
    module = "/usr/lib/softhsm/libsofthsm2.so"
    pin = "file:/run/secrets/hsm-pin"        # or "env:HSM_PROXY_PIN", "aws-sm:prod/pin"
    sessions = 4
    queue_limit = 256                         # handshakes that may wait for a session
    key_custody = "warn"                      # or "refuse" an extractable/non-sensitive key

    [tls]
    certificate = "/etc/hsm-proxy/chain.pem"  # leaf first, then intermediates
    key = "pkcs11:token=proxy;object=web-key;type=private"
    handshake_timeout = 10.0
    policy = "intermediate"                   # or "modern" (TLS 1.3 only)
    ocsp_response = "/run/ocsp/web.der"       # optional: DER OCSP response to staple

    [tls.client_auth]                         # optional: mutual TLS
    mode = "require"                          # or "optional"
    ca = "/etc/hsm-proxy/client-ca.pem"
    allow_uri = ["spiffe://example.org/ns/prod/sa/billing"]

    [security]
    user = "hsm-proxy"                        # drop root to this user after binding

    [http]                                    # limits and timeouts; every key optional
    max_body_bytes = 0
    alpn = ["h2", "http/1.1"]                 # ["http/1.1"] turns HTTP/2 off

    [http2]                                   # HTTP/2 limits; every key optional
    max_concurrent_streams = 128

    [upstreams.api]                           # more upstreams, round-robin over servers
    servers = ["http://10.0.0.11:9000", "http://10.0.0.12:9000"]

    [[routes]]                                # first match wins; else the top-level upstream
    hosts = ["api.example.com"]
    path_prefix = "/v1"
    upstream = "api"

    [[tls.sni]]                               # a server name with its own upstream group
    certificate = "/etc/hsm-proxy/redis.pem"
    key = "pkcs11:token=proxy;object=redis-key;type=private"
    upstream = "redis"

    [upstreams.redis]                         # TCP passthrough: the decrypted bytes, relayed
    servers = ["tcp://10.0.0.21:6379"]
    proxy_protocol = "v2"                     # overrides [tcp]; so may alpn

    [tcp]                                     # TCP passthrough timeouts and defaults
    idle_timeout = 3600.0
    alpn = []
"""

from proxy.config.forwarding import parse_address, parse_upstream
from proxy.config.load import admin_config, load_config, parse_config
from proxy.config.model import (
    DEFAULT_UPSTREAM,
    HTTP_ALPN,
    PROXY_PROTOCOL_MODES,
    TLS_POLICIES,
    Address,
    AdminConfig,
    HTTP2Config,
    HTTPConfig,
    ProxyConfig,
    ReloadConfig,
    Route,
    SecurityConfig,
    SiteConfig,
    TCPConfig,
    TLSConfig,
    TokenConfig,
    UpstreamConfig,
    UpstreamGroup,
)

__all__ = [
    "DEFAULT_UPSTREAM",
    "HTTP_ALPN",
    "PROXY_PROTOCOL_MODES",
    "TLS_POLICIES",
    "Address",
    "AdminConfig",
    "HTTP2Config",
    "HTTPConfig",
    "ProxyConfig",
    "ReloadConfig",
    "Route",
    "SecurityConfig",
    "SiteConfig",
    "TCPConfig",
    "TLSConfig",
    "TokenConfig",
    "UpstreamConfig",
    "UpstreamGroup",
    "admin_config",
    "load_config",
    "parse_address",
    "parse_config",
    "parse_upstream",
]
