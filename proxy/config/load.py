"""Reading a config file: TOML to a checked :class:`ProxyConfig`, secrets as references.

Theory of operation. :func:`load_config` parses the file with ``tomllib`` and
:func:`parse_config` walks it with the strict reader (reader.py). Relative paths are taken
relative to the config file. Every secret-bearing key takes the reference form
``scheme:locator`` (secrets/reference.py); the older per-source keys build the same
references, and a secret given twice is an error naming both keys.
"""

from __future__ import annotations

import ipaddress
import tomllib
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

from proxy.config.forwarding import parse_address, parse_forwarding, parse_http2, parse_upstream
from proxy.config.model import (
    DEFAULT_UPSTREAM,
    TLS_POLICIES,
    Address,
    AdminConfig,
    ProxyConfig,
    ReloadConfig,
    SecurityConfig,
    SiteConfig,
    TLSConfig,
    TokenConfig,
)
from proxy.config.reader import Table, list_of, positive, resolve_path, string_list
from proxy.errors import ConfigError
from proxy.pkcs11.uri import KeyURI, parse_key_uri
from proxy.secrets.aws import AWSSecretSource, AWSSettings
from proxy.secrets.env import EnvSource
from proxy.secrets.file import FileSource
from proxy.secrets.reference import (
    PRIVATE_SECRETS,
    SecretRef,
    known_schemes,
    parse_reference,
    source_of,
)
from proxy.secrets.source import SecretSource
from proxy.tls.clientauth import MODES, ClientAuthPolicy, parse_spki_pin


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


# How a reference looks, for messages.
_FORMS = f"SCHEME:LOCATION, with one of the schemes {known_schemes()}"


def _secret(
    table: Table,
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
            key=table.key_name(key),
            plain_path=plain_path,
            allow_insecure_permissions=allow_insecure,
        )
    source = source_of(legacy[name], text, base, f"{table.key_name(name)}:")
    return SecretRef(source, what=what, allow_insecure_permissions=allow_insecure)


def _parse_client_auth(
    table: Table, base: Path, where: str = "tls.client_auth"
) -> ClientAuthPolicy:
    mode = table.take("mode", str, "require")
    if mode not in MODES:
        raise ConfigError(
            f"{where}.mode: {mode!r} is not one of {', '.join(MODES)} "
            f"(leave out the [{where}] table to turn client certificates off)"
        )
    ca = _secret(
        table,
        where,
        "ca",
        {"ca_aws_secret": AWSSecretSource.from_locator},
        base,
        "client CA bundle",
    )
    if ca is None:
        raise ConfigError(
            f"{where}: set ca (a PEM file of the CAs that issue client certificates, "
            f"or a reference to it: {_FORMS}) or ca_aws_secret (an AWS Secrets Manager "
            "secret id holding it)"
        )
    allow_cn = string_list(table, "allow_cn")
    allow_dns = string_list(table, "allow_dns")
    allow_uri = string_list(table, "allow_uri")
    pins = [
        parse_spki_pin(text, f"{where}.allow_spki_sha256[{position}]")
        for position, text in enumerate(string_list(table, "allow_spki_sha256"), start=1)
    ]
    allow_any = table.take("allow_any", bool, False)
    table.finish()
    try:
        return ClientAuthPolicy(
            mode=mode,  # type: ignore[arg-type]
            ca=ca,
            allow_cn=frozenset(allow_cn),
            allow_dns=frozenset(name.lower() for name in allow_dns),
            allow_uri=frozenset(allow_uri),
            allow_spki_sha256=frozenset(pins),
            allow_any=allow_any,
        )
    except ConfigError as exc:  # its messages name the listener's table
        raise ConfigError(str(exc).replace("tls.client_auth:", f"{where}:", 1)) from None


def _parse_security(table: Table) -> SecurityConfig:
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
    rate = table.take("handshake_rate_per_client", (int, float), 0.0)
    if not 0 <= rate <= 1_000_000:
        raise ConfigError(
            f"security.handshake_rate_per_client: must be from 0 (no limit) to 1000000 "
            f"handshakes a second, got {rate}"
        )
    burst = table.take("handshake_burst_per_client", int, 20)
    if not 1 <= burst <= 1_000_000:
        raise ConfigError(
            f"security.handshake_burst_per_client: must be from 1 to 1000000, got {burst}"
        )
    table.finish()
    return SecurityConfig(allow_insecure, user, total, per_client, float(rate), burst)


def _parse_token(table: Table, where: str, base: Path, security: SecurityConfig) -> TokenConfig:
    """``[token]``, or a ``[[tls.sni]]`` entry's own ``[tls.sni.token]`` (same keys)."""
    module = table.take("module", str)
    pin = _secret(
        table,
        where,
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
            f"{where}: set pin, where the PIN is ({_FORMS}), or one of the older keys "
            "pin_file (a file holding the PIN), pin_env (the name of an environment "
            "variable holding it) or pin_aws_secret (an AWS Secrets Manager secret id); a "
            "PIN value never goes in the config"
        )
    sessions = table.take("sessions", int, 4)
    if not 1 <= sessions <= 256:
        raise ConfigError(f"{where}.sessions: must be from 1 to 256, got {sessions}")
    queue_limit = table.take("queue_limit", int, 256)
    if not 0 <= queue_limit <= 100_000:
        raise ConfigError(f"{where}.queue_limit: must be from 0 to 100000, got {queue_limit}")
    key_custody = table.take("key_custody", str, "warn")
    if key_custody not in ("warn", "refuse"):
        raise ConfigError(f'{where}.key_custody: must be "warn" or "refuse", got {key_custody!r}')
    table.finish()
    return TokenConfig(
        module=str(resolve_path(module, base)),
        pin=pin,
        sessions=sessions,
        queue_limit=queue_limit,
        key_custody=key_custody,
    )


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
    root = Table(data, "")
    listen = parse_address(root.take("listen", str, "127.0.0.1:8443"), "listen")
    upstream = parse_upstream(root.take("upstream", str), "upstream")
    security = _parse_security(Table(root.take("security", dict, {}), "security."))

    token = _parse_token(root.table("token"), "token", base, security)

    tls_table = root.table("tls")
    certificate = _certificate(tls_table, "tls", base)
    key = _key_uri(tls_table, "tls")
    timeout = positive(
        tls_table.take("handshake_timeout", (int, float), 10.0), "tls.handshake_timeout"
    )
    sni_tables = list_of(tls_table, "sni", dict, "tables")
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
            list_of(tls_table, "session_ticket_keys", str, "secret references"), start=1
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
            list_of(tls_table, "session_ticket_keys_aws_secrets", str, "secret ids"), start=1
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
        else _parse_client_auth(Table(client_auth_table, "tls.client_auth."), base)
    )
    tls_table.finish()
    sni = tuple(
        _site(Table(item, f"tls.sni[{number}]."), base, f"tls.sni[{number}]", client_auth, security)
        for number, item in enumerate(sni_tables, start=1)
    )

    reload = ReloadConfig()
    if "reload" in data:
        reload_table = root.table("reload")
        reload = ReloadConfig(
            watch_interval=positive(
                reload_table.take("watch_interval", (int, float), 2.0), "reload.watch_interval"
            ),
            aws_poll_interval=positive(
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
    http, tcp, upstreams, routes = parse_forwarding(root, upstream, sni)
    check_client_auth_boundaries(client_auth, sni, bool(routes))
    http2 = parse_http2(root.optional_table("http2"))
    admin = None
    if "admin" in data:
        admin_table = root.table("admin")
        admin = admin_config(
            parse_address(admin_table.take("listen", str), "admin.listen"),
            admin_table.take("allow_public", bool, False),
            positive(
                admin_table.take("probe_interval", (int, float), 10.0), "admin.probe_interval"
            ),
            "admin.listen",
        )
        admin_table.finish()
    root.finish()
    return ProxyConfig(
        listen=listen,
        upstream=upstream,
        token=token,
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
        http2=http2,
    )


def _certificate(table: Table, where: str, base: Path) -> SecretRef:
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


def _key_uri(table: Table, where: str) -> KeyURI:
    try:
        return parse_key_uri(table.take("key", str))
    except ConfigError as exc:
        raise ConfigError(f"{where}.key: {exc}") from None


def _site(
    table: Table,
    base: Path,
    where: str,
    listener_auth: ClientAuthPolicy | None,
    security: SecurityConfig,
) -> SiteConfig:
    certificate = _certificate(table, where, base)
    key = _key_uri(table, where)
    own_token = table.take("token", dict, None)
    token = (
        None
        if own_token is None
        else _parse_token(Table(own_token, f"{where}.token."), f"{where}.token", base, security)
    )
    names = tuple(list_of(table, "names", str, "server names"))
    upstream = table.take("upstream", str, DEFAULT_UPSTREAM)  # checked in parse_forwarding
    ocsp_response = _secret(
        table,
        where,
        "ocsp_response",
        {"ocsp_response_aws_secret": AWSSecretSource.from_locator},
        base,
        "OCSP response",
    )
    # Absent: the listener's [tls.client_auth]; a table: this name's own; false: none.
    own = table.take("client_auth", (dict, bool), None)
    if own is True:
        raise ConfigError(
            f"{where}.client_auth: true is not a setting: leave the key out to use "
            "[tls.client_auth], give a [tls.sni.client_auth] table of this name's own, "
            "or write false to serve this name without client certificates"
        )
    client_auth = listener_auth
    if isinstance(own, dict):
        client_auth = _parse_client_auth(
            Table(own, f"{where}.client_auth."), base, f"{where}.client_auth"
        )
    elif own is False:
        client_auth = None
    table.finish()
    return SiteConfig(
        certificate=certificate,
        key=key,
        names=names,
        upstream=upstream,
        ocsp_response=ocsp_response,
        client_auth=client_auth,
        token=token,
    )


def check_client_auth_boundaries(
    listener: ClientAuthPolicy | None, sites: tuple[SiteConfig, ...], routed: bool
) -> None:
    """Server names with different client-certificate rules must not share an upstream.

    The rules are chosen by the TLS server name, the backend by the HTTP Host header: a
    client could present the SNI name of a lenient site and the Host of a strict one. So
    when the rules differ, each upstream group is reached by sites of one rule only, and
    [[routes]] (which choose by Host) are refused."""
    rules: dict[str, tuple[ClientAuthPolicy | None, str]] = {
        DEFAULT_UPSTREAM: (listener, "the default certificate ([tls])")
    }
    differ = any(site.client_auth != listener for site in sites)
    if not differ:
        return
    if routed:
        raise ConfigError(
            "[[routes]] choose upstreams by the Host header, but [[tls.sni]] entries have "
            "client-certificate rules (client_auth) of their own, chosen by the TLS server "
            "name: a client could send one name's Host on another name's connection. Give "
            "each such name its own upstream (tls.sni[N].upstream) instead of routes"
        )
    for number, site in enumerate(sites, start=1):
        here = f"tls.sni[{number}]"
        if site.upstream in rules and rules[site.upstream][0] != site.client_auth:
            raise ConfigError(
                f"{here}.upstream: {site.upstream!r} also serves {rules[site.upstream][1]}, "
                "whose client-certificate rules (client_auth) differ from this name's; a "
                "client could reach this upstream through the other name's rules. Give "
                "names with different client_auth different upstreams"
            )
        rules.setdefault(site.upstream, (site.client_auth, here))
