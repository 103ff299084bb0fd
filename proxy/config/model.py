"""The configuration as frozen dataclasses: what every other module reads.

Theory of operation. These are plain values, built once by load.py (from TOML) or by the
command line (``dev``), compared and hashed (a pool is shared by every configuration that
names the same upstream group). They hold references to secrets, never values.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property

from proxy.pkcs11.uri import KeyURI
from proxy.secrets.aws import AWSSettings
from proxy.secrets.reference import (
    PinSource,
    SecretRef,
)
from proxy.tls.clientauth import ClientAuthPolicy


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class UpstreamConfig:
    host: str
    port: int
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    scheme: str = "http"  # "http": HTTP/1.1 forwarding; "tcp": TCP passthrough (a tunnel)

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == 80 and self.scheme == "http" else f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.authority}"


@dataclass(frozen=True)
class TokenConfig:
    module: str
    pin: PinSource
    sessions: int = 4
    queue_limit: int = 256  # handshakes waiting for a session beyond this are refused
    key_custody: str = "warn"  # "warn" or "refuse" an extractable or non-sensitive key


TLS_POLICIES = ("intermediate", "modern")


@dataclass(frozen=True)
class SiteConfig:
    """One more certificate, chosen by SNI, with its own token key (``[[tls.sni]]``)."""

    certificate: SecretRef
    key: KeyURI
    names: tuple[str, ...] = ()  # empty: the certificate's DNS names
    upstream: str = "default"  # the upstream group serving this name's connections
    ocsp_response: SecretRef | None = None  # the staple for this certificate
    # Client certificates for this name: the listener's [tls.client_auth] unless the entry
    # has its own table, or None (its ``client_auth = false``, or none at all).
    client_auth: ClientAuthPolicy | None = None
    # A token of its own (``[tls.sni.token]``: module, PIN, sessions ...; the key URI
    # selects the token in that module), or None: the key is in [token]'s token.
    token: TokenConfig | None = None


@dataclass(frozen=True)
class TLSConfig:
    certificate: SecretRef  # the default certificate chain
    key: KeyURI
    handshake_timeout: float = 10.0
    sni: tuple[SiteConfig, ...] = ()
    session_ticket_keys: tuple[SecretRef, ...] = ()
    policy: str = "intermediate"
    client_auth: ClientAuthPolicy | None = None
    ocsp_response: SecretRef | None = None

    def certificate_ref(self) -> SecretRef:
        return self.certificate


@dataclass(frozen=True)
class ReloadConfig:
    watch_interval: float = 2.0  # seconds between looks at file secrets
    aws_poll_interval: float = 60.0  # seconds between DescribeSecret calls per secret
    expiry_warning_days: int = 30


@dataclass(frozen=True)
class AdminConfig:
    """The admin listener (/healthz, /readyz, /metrics); off unless configured."""

    listen: Address
    allow_public: bool = False
    probe_interval: float = 10.0


@dataclass(frozen=True)
class SecurityConfig:
    """Operator-safety settings: every default is the safe choice."""

    # Refuse secret files (PIN, ticket keys) that group or others may read or write.
    allow_insecure_secret_files: bool = False
    # Started as root: switch to this user (and its groups) once the listeners are bound.
    user: str | None = None
    # Handshakes in progress, in total and per client address (a flood cannot queue
    # unbounded work for the token).
    max_handshakes: int = 1024
    max_handshakes_per_client: int = 64
    # Handshakes a second per client address, on average (0: no limit), in bursts of up to
    # handshake_burst_per_client: a token bucket per address.
    handshake_rate_per_client: float = 0.0
    handshake_burst_per_client: int = 20


@dataclass(frozen=True)
class ProxyConfig:
    listen: Address
    upstream: UpstreamConfig
    token: TokenConfig
    tls: TLSConfig
    admin: AdminConfig | None = None
    source: str = field(default="<flags>", compare=False)
    reload: ReloadConfig = field(default_factory=ReloadConfig)
    aws: AWSSettings = field(default_factory=AWSSettings)
    http: HTTPConfig = field(default_factory=lambda: HTTPConfig())
    upstreams: tuple[UpstreamGroup, ...] = ()
    routes: tuple[Route, ...] = ()
    security: SecurityConfig = field(default_factory=SecurityConfig)
    tcp: TCPConfig = field(default_factory=lambda: TCPConfig())
    http2: HTTP2Config = field(default_factory=lambda: HTTP2Config())

    def secrets(self) -> list[SecretRef]:
        """Every secret this configuration refers to (what the reloader watches)."""
        refs = [self.token.pin, self.tls.certificate_ref()]
        refs += [site.token.pin for site in self.tls.sni if site.token is not None]
        refs += [site.certificate for site in self.tls.sni]
        refs += list(self.tls.session_ticket_keys)
        for policy in (self.tls.client_auth, *(site.client_auth for site in self.tls.sni)):
            if policy is not None and policy.ca not in refs:
                refs.append(policy.ca)
        for staple in (self.tls.ocsp_response, *(site.ocsp_response for site in self.tls.sni)):
            if staple is not None:
                refs.append(staple)
        return refs

    def upstream_groups(self) -> tuple[UpstreamGroup, ...]:
        """Every upstream group: the top-level ``upstream`` (named ``default``) first."""
        return tuple(self._groups.values())

    @cached_property
    def _groups(self) -> dict[str, UpstreamGroup]:
        default = UpstreamGroup(DEFAULT_UPSTREAM, (self.upstream,))
        if default.tcp:
            default = replace(default, alpn=self.tcp.alpn, proxy_protocol=self.tcp.proxy_protocol)
        return {group.name: group for group in (default, *self.upstreams)}

    def site_upstream(self, site: SiteConfig | None) -> UpstreamGroup:
        """The upstream group that serves the connections of ``site`` (a ``[[tls.sni]]``
        entry), or of the default certificate when ``site`` is None."""
        return self._groups[DEFAULT_UPSTREAM if site is None else site.upstream]

    def alpn_offer(self, site: SiteConfig | None = None) -> tuple[tuple[bytes, ...], bool]:
        """The ALPN protocols the SSL context of ``site`` (None: the default certificate's)
        offers, and whether a client offering ALPN but none of them is refused: HTTP
        upstreams are served as ``http.alpn`` says (h2 then http/1.1 by default) and never
        refuse; a TCP upstream offers the protocols it speaks (``alpn``) and requires one
        of them when it names any."""
        group = self.site_upstream(site)
        if not group.tcp:
            return tuple(name.encode("ascii") for name in self.http.alpn), False
        return tuple(name.encode("ascii") for name in group.alpn), bool(group.alpn)


@dataclass(frozen=True)
class HTTPConfig:
    """Limits and timeouts of the HTTP side (README, "HTTP forwarding")."""

    max_request_line: int = 8192  # bytes; longer: 414
    max_header_bytes: int = 32768  # bytes of the whole head; more: 431
    max_headers: int = 100  # header fields; more: 431
    max_body_bytes: int = 0  # request body; more: 413; 0 means no limit
    header_timeout: float = 30.0  # seconds to receive a whole request head; then 408
    body_timeout: float = 60.0  # seconds a request body stalls (408), or the client stops reading
    idle_timeout: float = 75.0  # seconds a kept-alive client connection may stay idle
    connect_timeout: float = 5.0  # upstream connect; then the next address, or 502/504
    read_timeout: float = 60.0  # seconds the upstream neither sends nor takes bytes; then 504
    max_connections: int = 1024  # client connections; more wait in the listen backlog
    # "queue": connections beyond max_connections wait in the backlog; "refuse": closed at once
    max_connections_mode: str = "queue"
    shutdown_grace: float = 30.0  # seconds in-flight requests get after SIGTERM
    forwarded: bool = False  # also send an RFC 7239 Forwarded header
    # seconds an upgraded connection (WebSocket) may carry no byte either way; then closed
    tunnel_idle_timeout: float = 3600.0
    # An encoded "/" or "." in a path (%2F, %2E) is refused (400) unless this is set.
    allow_ambiguous_paths: bool = False
    pool_size: int = 32  # idle keep-alive connections kept per upstream
    pool_idle_timeout: float = 30.0  # seconds an idle upstream connection is kept
    down_time: float = 10.0  # seconds an upstream address is skipped after it failed
    # What ALPN offers HTTP clients, in order of preference; without "h2", no HTTP/2.
    alpn: tuple[str, ...] = ("h2", "http/1.1")


HTTP_ALPN = ("h2", "http/1.1")


@dataclass(frozen=True)
class HTTP2Config:
    """HTTP/2 to clients (README, "HTTP/2"): per-connection limits and flood caps. The
    limits of ``[http]`` (header sizes, body size, timeouts) apply to every stream."""

    max_concurrent_streams: int = 128  # streams open at once per connection (SETTINGS)
    initial_window_size: int = 65535  # bytes a stream's request body may have in flight
    connection_window_size: int = 1 << 20  # bytes of request bodies in flight per connection
    # Per connection and flood_window seconds: more resets received (CVE-2023-44487, rapid
    # reset) or more PING and SETTINGS frames end the connection with ENHANCE_YOUR_CALM.
    max_resets: int = 100
    max_control_frames: int = 200
    flood_window: float = 10.0


PROXY_PROTOCOL_MODES = ("off", "v2")


@dataclass(frozen=True)
class TCPConfig:
    """TCP passthrough (README, "TCP passthrough"): the defaults of every tcp:// upstream."""

    connect_timeout: float = 5.0  # seconds to connect to an address; then the next one
    idle_timeout: float = 3600.0  # seconds without a byte either way; then the tunnel closes
    max_lifetime: float = 0.0  # seconds a tunnel may stay open in all; 0: no limit
    alpn: tuple[str, ...] = ()  # what the upstream speaks: offered, and required when any
    proxy_protocol: str = "off"  # "v2": a PROXY protocol v2 header before the client's bytes


@dataclass(frozen=True)
class UpstreamGroup:
    """A named upstream: one or more addresses used round-robin, all http:// or all tcp://."""

    name: str
    servers: tuple[UpstreamConfig, ...]
    alpn: tuple[str, ...] = ()  # tcp:// groups: [tcp] alpn unless the group sets its own
    proxy_protocol: str = "off"  # tcp:// groups: [tcp] proxy_protocol unless overridden

    @property
    def tcp(self) -> bool:
        """TCP passthrough (tcp:// servers) rather than HTTP forwarding."""
        return self.servers[0].scheme == "tcp"


@dataclass(frozen=True)
class Route:
    """Requests whose Host (or SNI when there is no Host) matches one of ``hosts`` (all hosts
    when empty; ``*.example.com`` matches subdomains) and whose path starts with
    ``path_prefix`` go to the upstream group ``upstream``. The first matching route wins."""

    upstream: str
    hosts: tuple[str, ...] = ()
    path_prefix: str = "/"


DEFAULT_UPSTREAM = "default"
