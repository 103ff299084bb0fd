"""Configuration: frozen dataclasses built from a TOML file (``run``) or from flags (``dev``).

Theory of operation. :func:`load_config` reads TOML with ``tomllib`` and walks it with a
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

from __future__ import annotations

import ipaddress
import tomllib
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from proxy.errors import ConfigError
from proxy.pkcs11.uri import KeyURI, parse_key_uri
from proxy.secrets.aws import AWSSecretSource, AWSSettings
from proxy.secrets.env import EnvSource
from proxy.secrets.file import FileSource
from proxy.secrets.reference import (
    PRIVATE_SECRETS,
    PinSource,
    SecretRef,
    known_schemes,
    parse_reference,
    source_of,
)
from proxy.secrets.source import SecretSource
from proxy.tls.clientauth import MODES, ClientAuthPolicy, parse_spki_pin


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

    def secrets(self) -> list[SecretRef]:
        """Every secret this configuration refers to (what the reloader watches)."""
        refs = [self.token.pin, self.tls.certificate_ref()]
        refs += [site.certificate for site in self.tls.sni]
        refs += list(self.tls.session_ticket_keys)
        if self.tls.client_auth is not None:
            refs.append(self.tls.client_auth.ca)
        if self.tls.ocsp_response is not None:
            refs.append(self.tls.ocsp_response)
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
        upstreams are served as http/1.1 and never refuse; a TCP upstream offers the
        protocols it speaks (``alpn``) and requires one of them when it names any."""
        group = self.site_upstream(site)
        if not group.tcp:
            return (b"http/1.1",), False
        return tuple(name.encode("ascii") for name in group.alpn), bool(group.alpn)


def parse_address(text: str, where: str) -> Address:
    """``HOST:PORT`` or ``[IPv6]:PORT``; port 0 asks the system for a free one."""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise ConfigError(f"{where}: {text!r} is not [IPV6]:PORT")
        port_text = rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"{where}: {host!r} is not an IPv6 address") from None
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon or not host:
            raise ConfigError(f"{where}: {text!r} is not HOST:PORT (for example 127.0.0.1:8443)")
        if ":" in host:
            raise ConfigError(f"{where}: write an IPv6 address in brackets, as [{host}]:PORT")
    if not port_text.isascii() or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{where}: port {port_text!r} is not a number from 0 to 65535")
    return Address(host, int(port_text))


def parse_upstream(text: str, where: str) -> UpstreamConfig:
    """``http://HOST[:PORT]`` (plaintext HTTP/1.1 to the backend) or ``tcp://HOST:PORT``
    (TCP passthrough: the decrypted bytes, untouched)."""
    parts = urlsplit(text)
    if parts.scheme not in ("http", "tcp"):
        raise ConfigError(
            f"{where}: {text!r} must be an http:// URL (the proxy sends plaintext HTTP/1.1 "
            "to upstreams) or a tcp://HOST:PORT address (TCP passthrough)"
        )
    shape = "http://HOST[:PORT]" if parts.scheme == "http" else "tcp://HOST:PORT"
    if not parts.hostname:
        raise ConfigError(f"{where}: {text!r} has no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ConfigError(f"{where}: {text!r} must be just {shape}, without a path")
    try:
        port = parts.port or (80 if parts.scheme == "http" else None)
    except ValueError:
        raise ConfigError(f"{where}: {text!r} has an invalid port") from None
    if not port:
        raise ConfigError(f"{where}: {text!r} needs a port from 1 to 65535 ({shape})")
    return UpstreamConfig(parts.hostname, port, scheme=parts.scheme)


def admin_config(
    listen: Address, allow_public: bool, probe_interval: float, where: str
) -> AdminConfig:
    """The admin endpoint has no authentication: loopback only unless explicitly allowed."""
    host = listen.host
    loopback = host == "localhost"
    with suppress(ValueError):
        loopback = loopback or ipaddress.ip_address(host).is_loopback
    if not loopback and not allow_public:
        raise ConfigError(
            f"{where}: {listen} is not a loopback address; the admin endpoint (/metrics, "
            "/readyz) has no authentication, so it listens on 127.0.0.1 or ::1 unless "
            "allow_public = true (for example for a Kubernetes probe on the pod IP)"
        )
    return AdminConfig(listen, allow_public, probe_interval)


class _Table:
    """A TOML table read strictly: every key must be consumed, every type checked."""

    def __init__(self, data: dict[str, Any], prefix: str) -> None:
        self._data = dict(data)
        self._prefix = prefix
        self._known: list[str] = []

    def _name(self, key: str) -> str:
        return f"{self._prefix}{key}"

    def take(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        self._known.append(key)
        if key not in self._data:
            if default is ...:
                raise ConfigError(f"{self._name(key)}: required key is missing")
            return default
        value = self._data.pop(key)
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int subclass in Python, but `sessions = true` is not a number.
        if isinstance(value, bool) and bool not in kinds:
            raise ConfigError(f"{self._name(key)}: expected {_kind_name(kinds)}, got a boolean")
        if not isinstance(value, kinds):
            raise ConfigError(
                f"{self._name(key)}: expected {_kind_name(kinds)}, got {type(value).__name__}"
            )
        return value

    def table(self, key: str) -> _Table:
        value = self.take(key, dict)
        return _Table(value, f"{self._name(key)}.")

    def finish(self) -> None:
        for key in self._data:
            raise ConfigError(
                f"{self._name(key)}: unknown key (known here: {', '.join(self._known)})"
            )


def _kind_name(kinds: tuple[type, ...]) -> str:
    names = {
        str: "a string",
        int: "an integer",
        float: "a number",
        dict: "a table",
        bool: "true/false",
        list: "a list",
    }
    return " or ".join(names.get(kind, kind.__name__) for kind in kinds)


def _positive(value: float, where: str) -> float:
    if value <= 0:
        raise ConfigError(f"{where}: must be greater than 0, got {value}")
    return float(value)


def _path(value: str, base: Path) -> Path:
    path = Path(value)
    return path if path.is_absolute() else base / path


def _string_list(table: _Table, key: str) -> list[str]:
    values = table.take(key, list, [])
    for position, value in enumerate(values, start=1):
        if not isinstance(value, str) or not value:
            raise ConfigError(
                f"{table._name(key)}: entry {position} must be a non-empty string, got {value!r}"
            )
    return list(values)


# How a reference looks, for messages.
_FORMS = f"SCHEME:LOCATION, with one of the schemes {known_schemes()}"


def _secret(
    table: _Table,
    where: str,
    key: str,
    legacy: dict[str, Callable[[str, Path], SecretSource]],
    base: Path,
    what: str,
    *,
    plain_path: bool = True,
    insecure: bool = False,
) -> SecretRef | None:
    """The secret that ``key`` (a reference, ``scheme:locator``) or one of the older keys of
    ``legacy`` (each taking one source's locator: a path, a variable name, a secret id)
    gives, or None when none is set; two of them is an error naming both."""
    values = {name: table.take(name, str, None) for name in (key, *legacy)}
    given = [name for name, value in values.items() if value is not None]
    if len(given) > 1:
        names = [key, *legacy]
        raise ConfigError(
            f"{where}: set exactly one of {', '.join(names[:-1])} or {names[-1]}: "
            f"{given[0]} and {given[1]} both give the {what}"
        )
    if not given:
        return None
    name = given[0]
    text = values[name]
    allow_insecure = insecure and what in PRIVATE_SECRETS
    if name == key:
        return parse_reference(
            text,
            what=what,
            base=base,
            key=table._name(key),
            plain_path=plain_path,
            allow_insecure_permissions=allow_insecure,
        )
    source = source_of(legacy[name], text, base, f"{table._name(name)}:")
    return SecretRef(source, what=what, allow_insecure_permissions=allow_insecure)


def _parse_client_auth(table: _Table, base: Path) -> ClientAuthPolicy:
    mode = table.take("mode", str, "require")
    if mode not in MODES:
        raise ConfigError(
            f"tls.client_auth.mode: {mode!r} is not one of {', '.join(MODES)} "
            "(leave out the [tls.client_auth] table to turn client certificates off)"
        )
    ca = _secret(
        table,
        "tls.client_auth",
        "ca",
        {"ca_aws_secret": AWSSecretSource.from_locator},
        base,
        "client CA bundle",
    )
    if ca is None:
        raise ConfigError(
            "tls.client_auth: set ca (a PEM file of the CAs that issue client certificates, "
            f"or a reference to it: {_FORMS}) or ca_aws_secret (an AWS Secrets Manager "
            "secret id holding it)"
        )
    allow_cn = _string_list(table, "allow_cn")
    allow_dns = _string_list(table, "allow_dns")
    allow_uri = _string_list(table, "allow_uri")
    pins = [
        parse_spki_pin(text, f"tls.client_auth.allow_spki_sha256[{position}]")
        for position, text in enumerate(_string_list(table, "allow_spki_sha256"), start=1)
    ]
    allow_any = table.take("allow_any", bool, False)
    table.finish()
    return ClientAuthPolicy(
        mode=mode,  # type: ignore[arg-type]
        ca=ca,
        allow_cn=frozenset(allow_cn),
        allow_dns=frozenset(name.lower() for name in allow_dns),
        allow_uri=frozenset(allow_uri),
        allow_spki_sha256=frozenset(pins),
        allow_any=allow_any,
    )


def _parse_security(table: _Table) -> SecurityConfig:
    allow_insecure = table.take("allow_insecure_secret_files", bool, False)
    user = table.take("user", str, None)
    if user is not None and not user:
        raise ConfigError("security.user: must name a user (or leave the key out)")
    total = table.take("max_handshakes", int, 1024)
    per_client = table.take("max_handshakes_per_client", int, 64)
    if not 1 <= total <= 100_000:
        raise ConfigError(f"security.max_handshakes: must be from 1 to 100000, got {total}")
    if not 1 <= per_client <= total:
        raise ConfigError(
            f"security.max_handshakes_per_client: must be from 1 to max_handshakes "
            f"({total}), got {per_client}"
        )
    table.finish()
    return SecurityConfig(allow_insecure, user, total, per_client)


def load_config(path: Path) -> ProxyConfig:
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = tomllib.loads(text.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    try:
        return parse_config(data, base=path.parent.resolve(), source=str(path))
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def parse_config(data: dict[str, Any], base: Path, source: str) -> ProxyConfig:
    root = _Table(data, "")
    listen = parse_address(root.take("listen", str, "127.0.0.1:8443"), "listen")
    upstream = parse_upstream(root.take("upstream", str), "upstream")
    security = _parse_security(_Table(root.take("security", dict, {}), "security."))

    token_table = root.table("token")
    module = token_table.take("module", str)
    pin = _secret(
        token_table,
        "token",
        "pin",
        {
            "pin_file": FileSource.from_locator,
            "pin_env": EnvSource.from_locator,
            "pin_aws_secret": AWSSecretSource.from_locator,
        },
        base,
        "PIN",
        plain_path=False,
        insecure=security.allow_insecure_secret_files,
    )
    if pin is None:
        raise ConfigError(
            f"token: set pin, where the PIN is ({_FORMS}), or one of the older keys "
            "pin_file (a file holding the PIN), pin_env (the name of an environment "
            "variable holding it) or pin_aws_secret (an AWS Secrets Manager secret id); a "
            "PIN value never goes in the config"
        )
    sessions = token_table.take("sessions", int, 4)
    if not 1 <= sessions <= 256:
        raise ConfigError(f"token.sessions: must be from 1 to 256, got {sessions}")
    queue_limit = token_table.take("queue_limit", int, 256)
    if not 0 <= queue_limit <= 100_000:
        raise ConfigError(f"token.queue_limit: must be from 0 to 100000, got {queue_limit}")
    key_custody = token_table.take("key_custody", str, "warn")
    if key_custody not in ("warn", "refuse"):
        raise ConfigError(f'token.key_custody: must be "warn" or "refuse", got {key_custody!r}')
    token_table.finish()

    tls_table = root.table("tls")
    certificate = _certificate(tls_table, "tls", base)
    key = _key_uri(tls_table, "tls")
    timeout = _positive(
        tls_table.take("handshake_timeout", (int, float), 10.0), "tls.handshake_timeout"
    )
    sni = tuple(
        _site(_Table(item, f"tls.sni[{number}]."), base, f"tls.sni[{number}]")
        for number, item in enumerate(_list_of(tls_table, "sni", dict, "tables"), start=1)
    )
    insecure = security.allow_insecure_secret_files
    tickets = [
        parse_reference(
            item,
            what="session-ticket key",
            base=base,
            key=f"tls.session_ticket_keys[{number}]",
            allow_insecure_permissions=insecure,
        )
        for number, item in enumerate(
            _list_of(tls_table, "session_ticket_keys", str, "secret references"), start=1
        )
    ]
    tickets += [
        SecretRef(
            source_of(
                AWSSecretSource.from_locator,
                item,
                base,
                f"tls.session_ticket_keys_aws_secrets[{number}]:",
            ),
            what="session-ticket key",
            allow_insecure_permissions=insecure,
        )
        for number, item in enumerate(
            _list_of(tls_table, "session_ticket_keys_aws_secrets", str, "secret ids"), start=1
        )
    ]
    policy = tls_table.take("policy", str, "intermediate")
    if policy not in TLS_POLICIES:
        raise ConfigError(
            f"tls.policy: {policy!r} is not one of {', '.join(TLS_POLICIES)} "
            "(intermediate: TLS 1.2 and 1.3; modern: TLS 1.3 only)"
        )
    ocsp_response = _secret(
        tls_table,
        "tls",
        "ocsp_response",
        {"ocsp_response_aws_secret": AWSSecretSource.from_locator},
        base,
        "OCSP response",
    )
    client_auth_table = tls_table.take("client_auth", dict, None)
    client_auth = (
        None
        if client_auth_table is None
        else _parse_client_auth(_Table(client_auth_table, "tls.client_auth."), base)
    )
    tls_table.finish()

    reload = ReloadConfig()
    if "reload" in data:
        reload_table = root.table("reload")
        reload = ReloadConfig(
            watch_interval=_positive(
                reload_table.take("watch_interval", (int, float), 2.0), "reload.watch_interval"
            ),
            aws_poll_interval=_positive(
                reload_table.take("aws_poll_interval", (int, float), 60.0),
                "reload.aws_poll_interval",
            ),
            expiry_warning_days=reload_table.take("expiry_warning_days", int, 30),
        )
        if reload.expiry_warning_days < 0:
            raise ConfigError("reload.expiry_warning_days: must be 0 or more")
        reload_table.finish()
    aws = AWSSettings()
    if "aws" in data:
        aws_table = root.table("aws")
        aws = AWSSettings(
            region=aws_table.take("region", str, None),
            endpoint_url=aws_table.take("endpoint_url", str, None),
        )
        aws_table.finish()
    http, tcp, upstreams, routes = _parse_http(root, upstream, sni)
    admin = None
    if "admin" in data:
        admin_table = root.table("admin")
        admin = admin_config(
            parse_address(admin_table.take("listen", str), "admin.listen"),
            admin_table.take("allow_public", bool, False),
            _positive(
                admin_table.take("probe_interval", (int, float), 10.0), "admin.probe_interval"
            ),
            "admin.listen",
        )
        admin_table.finish()
    root.finish()
    return ProxyConfig(
        listen=listen,
        upstream=upstream,
        token=TokenConfig(
            module=str(_path(module, base)),
            pin=pin,
            sessions=sessions,
            queue_limit=queue_limit,
            key_custody=key_custody,
        ),
        tls=TLSConfig(
            certificate=certificate,
            key=key,
            handshake_timeout=timeout,
            sni=sni,
            session_ticket_keys=tuple(tickets),
            policy=policy,
            client_auth=client_auth,
            ocsp_response=ocsp_response,
        ),
        admin=admin,
        source=source,
        reload=reload,
        aws=aws,
        http=http,
        upstreams=upstreams,
        routes=routes,
        security=security,
        tcp=tcp,
    )


def _certificate(table: _Table, where: str, base: Path) -> SecretRef:
    certificate = _secret(
        table,
        where,
        "certificate",
        {"certificate_aws_secret": AWSSecretSource.from_locator},
        base,
        "certificate chain",
    )
    if certificate is None:
        raise ConfigError(
            f"{where}: set exactly one of certificate (a PEM file: the leaf, then its "
            f"intermediates; or a reference to it: {_FORMS}) or certificate_aws_secret (an "
            "AWS Secrets Manager secret id)"
        )
    return certificate


def _key_uri(table: _Table, where: str) -> KeyURI:
    try:
        return parse_key_uri(table.take("key", str))
    except ConfigError as exc:
        raise ConfigError(f"{where}.key: {exc}") from None


def _list_of(table: _Table, key: str, kind: type, what: str) -> list[Any]:
    items = table.take(key, list, [])
    for position, item in enumerate(items, start=1):
        if not isinstance(item, kind):
            raise ConfigError(
                f"{table._name(key)}: expected a list of {what}, item {position} is "
                f"{type(item).__name__}"
            )
    return list(items)


def _site(table: _Table, base: Path, where: str) -> SiteConfig:
    certificate = _certificate(table, where, base)
    key = _key_uri(table, where)
    names = tuple(_list_of(table, "names", str, "server names"))
    upstream = table.take("upstream", str, DEFAULT_UPSTREAM)  # checked in _parse_http
    table.finish()
    return SiteConfig(certificate=certificate, key=key, names=names, upstream=upstream)


# --- Forwarding: HTTP limits and timeouts ([http]), TCP passthrough ([tcp]), upstream groups
# ([upstreams.*]) and routes ([[routes]]); the top-level ``upstream`` is the group named
# ``default``, and each ``[[tls.sni]]`` site may name the group its connections go to. -----


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
    shutdown_grace: float = 30.0  # seconds in-flight requests get after SIGTERM
    forwarded: bool = False  # also send an RFC 7239 Forwarded header
    pool_size: int = 32  # idle keep-alive connections kept per upstream
    pool_idle_timeout: float = 30.0  # seconds an idle upstream connection is kept
    down_time: float = 10.0  # seconds an upstream address is skipped after it failed


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

_HTTP_COUNTS = {
    "max_request_line": (64, 1 << 20),
    "max_header_bytes": (256, 16 << 20),
    "max_headers": (1, 10000),
    "max_body_bytes": (0, 1 << 62),
    "max_connections": (1, 1 << 20),
    "pool_size": (0, 100000),
}
_HTTP_SECONDS = (
    "header_timeout",
    "body_timeout",
    "idle_timeout",
    "connect_timeout",
    "read_timeout",
    "pool_idle_timeout",
    "down_time",
)


def _parse_http(
    root: _Table, upstream: UpstreamConfig, sites: tuple[SiteConfig, ...]
) -> tuple[HTTPConfig, TCPConfig, tuple[UpstreamGroup, ...], tuple[Route, ...]]:
    defaults = HTTPConfig()
    values: dict[str, Any] = {}
    table = root.table("http") if "http" in root._data else _Table({}, "http.")
    for key, (low, high) in _HTTP_COUNTS.items():
        value = table.take(key, int, getattr(defaults, key))
        if not low <= value <= high:
            raise ConfigError(f"http.{key}: must be from {low} to {high}, got {value}")
        values[key] = value
    for key in _HTTP_SECONDS:
        values[key] = _positive(
            table.take(key, (int, float), getattr(defaults, key)), f"http.{key}"
        )
    grace = table.take("shutdown_grace", (int, float), defaults.shutdown_grace)
    if grace < 0:
        raise ConfigError(f"http.shutdown_grace: must be 0 or more, got {grace}")
    values["shutdown_grace"] = float(grace)
    values["forwarded"] = table.take("forwarded", bool, defaults.forwarded)
    table.finish()
    http = HTTPConfig(**values)
    tcp = _parse_tcp(root.table("tcp") if "tcp" in root._data else _Table({}, "tcp."))

    groups: list[UpstreamGroup] = []
    upstreams = root.table("upstreams") if "upstreams" in root._data else _Table({}, "")
    for name in list(upstreams._data):
        if name == DEFAULT_UPSTREAM:
            raise ConfigError(
                f"upstreams.{name}: the name {name!r} is the top-level upstream; choose another"
            )
        groups.append(_parse_group(upstreams.table(name), name, tcp))
    upstreams.finish()

    default = UpstreamGroup(DEFAULT_UPSTREAM, (upstream,))
    by_name = {group.name: group for group in (default, *groups)}
    known = ", ".join(sorted(by_name))
    for number, site in enumerate(sites, start=1):
        if site.upstream not in by_name:
            raise ConfigError(
                f"tls.sni[{number}].upstream: no upstream named {site.upstream!r} (known: {known})"
            )
    routes: list[Route] = []
    for index, entry in enumerate(root.take("routes", list, [])):
        where = f"routes[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a table ([[routes]])")
        route = _Table(entry, f"{where}.")
        target = route.take("upstream", str)
        if target not in by_name:
            raise ConfigError(f"{where}.upstream: no upstream named {target!r} (known: {known})")
        if by_name[target].tcp:
            raise ConfigError(
                f"{where}.upstream: {target!r} is a tcp:// upstream; routes choose among "
                "http:// upstreams (a tcp:// upstream serves whole connections: name it in "
                "[[tls.sni]] upstream, or as the top-level upstream)"
            )
        hosts = route.take("hosts", list, [])
        for host in hosts:
            if not isinstance(host, str) or not host or "/" in host or ":" in host:
                raise ConfigError(f"{where}.hosts: {host!r} is not a host name (without a port)")
        prefix = route.take("path_prefix", str, "/")
        if not prefix.startswith("/"):
            raise ConfigError(f"{where}.path_prefix: {prefix!r} must start with /")
        route.finish()
        routes.append(Route(target, tuple(host.lower() for host in hosts), prefix))
    return http, tcp, tuple(groups), tuple(routes)


def _parse_group(group: _Table, name: str, tcp: TCPConfig) -> UpstreamGroup:
    """``[upstreams.NAME]``: its servers, all of one scheme, and for tcp:// servers the
    ``alpn`` and ``proxy_protocol`` overrides of ``[tcp]``."""
    servers = group.take("servers", list)
    if not servers:
        raise ConfigError(
            f"upstreams.{name}.servers: needs at least one http://HOST:PORT or tcp://HOST:PORT"
        )
    parsed: list[UpstreamConfig] = []
    for index, server in enumerate(servers):
        where = f"upstreams.{name}.servers[{index}]"
        if not isinstance(server, str):
            raise ConfigError(f"{where}: expected a string, got {type(server).__name__}")
        parsed.append(parse_upstream(server, where))
        if parsed[-1].scheme != parsed[0].scheme:
            raise ConfigError(
                f"{where}: {server!r} mixes {parsed[-1].scheme}:// with the "
                f"{parsed[0].scheme}:// servers before it; a group is all http:// or all tcp://"
            )
    is_tcp = parsed[0].scheme == "tcp"
    for key in ("alpn", "proxy_protocol"):
        if key in group._data and not is_tcp:
            raise ConfigError(
                f"upstreams.{name}.{key}: only tcp:// upstreams take {key} (http:// upstreams "
                "are served as HTTP/1.1)"
            )
    alpn = _alpn_list(group, "alpn", tcp.alpn)
    proxy_protocol = _proxy_protocol(group, tcp.proxy_protocol)
    group.finish()
    if not is_tcp:
        return UpstreamGroup(name, tuple(parsed))
    return UpstreamGroup(name, tuple(parsed), alpn, proxy_protocol)


def _parse_tcp(table: _Table) -> TCPConfig:
    defaults = TCPConfig()
    connect_timeout = _positive(
        table.take("connect_timeout", (int, float), defaults.connect_timeout),
        "tcp.connect_timeout",
    )
    idle_timeout = _positive(
        table.take("idle_timeout", (int, float), defaults.idle_timeout), "tcp.idle_timeout"
    )
    max_lifetime = table.take("max_lifetime", (int, float), defaults.max_lifetime)
    if max_lifetime < 0:
        raise ConfigError(f"tcp.max_lifetime: must be 0 (no limit) or more, got {max_lifetime}")
    alpn = _alpn_list(table, "alpn", defaults.alpn)
    proxy_protocol = _proxy_protocol(table, defaults.proxy_protocol)
    table.finish()
    return TCPConfig(connect_timeout, idle_timeout, float(max_lifetime), alpn, proxy_protocol)


def _alpn_list(table: _Table, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
    """ALPN protocol IDs (RFC 7301): 1 to 255 printable ASCII characters each, no spaces,
    no repeats."""
    if key not in table._data:
        table._known.append(key)
        return default
    names = _string_list(table, key)
    for name in names:
        if not name.isascii() or not name.isprintable() or " " in name or len(name) > 255:
            raise ConfigError(
                f"{table._name(key)}: {name!r} is not an ALPN protocol ID (1 to 255 printable "
                'ASCII characters without spaces, such as "h2" or "http/1.1")'
            )
    if len(set(names)) != len(names):
        raise ConfigError(f"{table._name(key)}: a protocol is listed twice in {names}")
    return tuple(names)


def _proxy_protocol(table: _Table, default: str) -> str:
    mode: str = table.take("proxy_protocol", str, default)
    if mode not in PROXY_PROTOCOL_MODES:
        raise ConfigError(
            f'{table._name("proxy_protocol")}: must be "off" or "v2" (a PROXY protocol v2 '
            f"header before the client's bytes), got {mode!r}"
        )
    return mode
