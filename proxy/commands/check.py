"""``hsm-proxy check``: validate everything a config names, like ``nginx -t``, serving nothing.

Theory of operation. :func:`run_checks` walks the same steps a generation build takes
(reload.py), but one at a time, recording a :class:`Row` per step instead of stopping at
the first error: config, system OpenSSL, certificate chain, PIN, token login, key lookup,
key custody, certificate/key match (a test signature verified against the certificate),
the TLS context, and upstream reachability. A step whose inputs failed is skipped with
the reason, so one run shows every independent problem. The caller prints the table and
exits non-zero when any row failed.

Custody: a key that can leave the token (``CKA_EXTRACTABLE`` true or ``CKA_SENSITIVE``
false) breaks the promise "used, never held" and fails; a key that was imported rather
than generated inside the token (``CKA_NEVER_EXTRACTABLE`` false) is a warning.

The upstream check is a plain blocking TCP connect with the configured connect timeout;
nothing here runs an event loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

from proxy.config import ProxyConfig, load_config
from proxy.errors import ProxyError

# The same loaders a reload uses, so check and reload agree on every message.
from proxy.generation.reload import build_site, check_custody, checking, load_chain_secret
from proxy.net.sockets import try_connect
from proxy.pkcs11.token import SignatureObserver, Token, TokenKey
from proxy.secrets.store import SecretRef, SecretStore, default_store, read_pin
from proxy.tls.certificates import Chain, check_key_matches
from proxy.tls.context import build_server_context
from proxy.tls.keys import verify_shared_libcrypto
from proxy.tls.tickets import TicketKey, parse_ticket_key

OK, WARN, FAIL, SKIP = "ok", "warn", "FAIL", "skip"
T = TypeVar("T")


@dataclass(frozen=True)
class Row:
    status: str  # ok, warn, FAIL, skip
    name: str
    detail: str


class _Run:
    def __init__(self) -> None:
        self.rows: list[Row] = []

    def add(self, status: str, name: str, detail: str) -> None:
        self.rows.append(Row(status, name, detail))

    def step(self, name: str, action: Callable[[], T], describe: Callable[[T], str]) -> T | None:
        """Run one check: an ok row with ``describe(result)``, or a FAIL row with the error."""
        try:
            result = action()
        except ProxyError as exc:
            self.add(FAIL, name, str(exc))
            return None
        self.add(OK, name, describe(result))
        return result

    def skip(self, name: str, why: str) -> None:
        self.add(SKIP, name, why)


def run_checks(config_path: Path, observer: SignatureObserver) -> list[Row]:
    run = _Run()
    config = run.step("config", lambda: load_config(config_path), lambda _c: str(config_path))
    if config is None:
        return run.rows
    bridge = run.step(
        "openssl",
        verify_shared_libcrypto,
        lambda _r: "pyOpenSSL and the key bridge share the system libcrypto",
    )
    store = default_store()
    store.configure_aws(config.aws)
    chain = run.step(
        "certificate",
        lambda: load_chain_secret(store, config.tls.certificate_ref()),
        _describe_chain,
    )
    site_chains = [
        run.step(
            f"sni[{number}]", partial(load_chain_secret, store, site.certificate), _describe_chain
        )
        for number, site in enumerate(config.tls.sni, start=1)
    ]
    for ref in config.tls.session_ticket_keys:
        run.step("ticket key", partial(_read_ticket_key, store, ref), _describe_ticket_key)
    pin_source = config.token.pin
    pin = run.step("pin", partial(_read_pin, pin_source, store), lambda _p: pin_source.describe())
    token: Token | None = None
    if pin is None:
        run.skip("token", "no usable PIN")
    else:
        token = run.step(
            "token",
            lambda: Token(
                config.token.module,
                config.tls.key,
                pin,
                pool_size=1,
                observer=observer,
            ),
            lambda t: f"{t.label!r} in {config.token.module}: logged in",
        )
        if token is not None:
            run.add(
                OK,
                "mechanisms",
                ", ".join(sorted(m.value for m in token.mechanisms)) or "none",
            )
        del pin
    try:
        key = _check_key(run, config, token)
        if chain is None or key is None:
            run.skip("match", "needs a valid certificate and a token key")
            run.skip("tls", "needs a valid certificate and a token key")
        else:
            matched = run.step(
                "match",
                lambda: _matches(chain, key),
                lambda _r: "certificate key == token key; a test signature verified",
            )
            if matched is None:
                run.skip("tls", "the certificate and the key do not match")
            elif bridge is None:
                # The key bridge on a foreign libcrypto would crash, not fail.
                run.skip("tls", "pyOpenSSL does not use the key bridge's libcrypto")
            else:
                run.step(
                    "tls",
                    lambda: build_server_context(chain, key),
                    lambda _c: "server context built (TLS 1.2 and 1.3, ALPN http/1.1)",
                )
        _check_sites(run, config, token, site_chains, bridge is not None)
    finally:
        if token is not None:
            token.close()
    _check_upstream(run, config)
    if config.admin is not None:
        run.add(
            OK,
            "admin",
            f"http://{config.admin.listen}/ "
            f"({'public' if config.admin.allow_public else 'loopback'}), "
            f"probes every {config.admin.probe_interval:g}s",
        )
    return run.rows


def _read_pin(source: SecretRef, store: SecretStore) -> str:
    with checking(source.describe(), "read"):
        return read_pin(source, store)


def _read_ticket_key(store: SecretStore, ref: SecretRef) -> tuple[SecretRef, TicketKey]:
    return ref, parse_ticket_key(store.read(ref), ref.describe())


def _describe_ticket_key(read: tuple[SecretRef, TicketKey]) -> str:
    return f"{read[0].describe()}: a valid session-ticket key"


def _check_sites(
    run: _Run,
    config: ProxyConfig,
    token: Token | None,
    chains: list[Chain | None],
    bridge: bool,
) -> None:
    """Each [[tls.sni]] site: its key in the token, matching its certificate."""
    for number, (site, chain) in enumerate(zip(config.tls.sni, chains, strict=True), start=1):
        name = f"sni[{number}] key"
        if token is None or chain is None or not bridge:
            run.skip(name, "needs the token, the site's certificate and the key bridge")
            continue
        run.step(
            name,
            partial(build_site, token, site, chain),
            lambda built: (
                f"{', '.join(built.names)} -> {built.key.info.describe()}; "
                "a test signature verified"
            ),
        )


def _matches(chain: Chain, key: TokenKey) -> bool:
    check_key_matches(chain, key)
    return True


def _describe_chain(chain: Chain) -> str:
    return (
        f"{chain.leaf.subject.rfc4514_string()}, {len(chain.certificates)} in chain, "
        f"valid until {chain.not_after():%Y-%m-%d %H:%M} UTC"
    )


def _check_key(run: _Run, config: ProxyConfig, token: Token | None) -> TokenKey | None:
    if token is None:
        run.skip("key", "no token session")
        run.skip("custody", "no token key")
        return None
    key = run.step(
        "key",
        lambda: token.find_private_key(config.tls.key),
        lambda k: f"{config.tls.key} -> {k.info.describe()}",
    )
    if key is None:
        run.skip("custody", "no token key")
        return None
    info = key.info
    attributes = (
        f"sensitive={info.sensitive} extractable={info.extractable} "
        f"always_sensitive={info.always_sensitive} never_extractable={info.never_extractable}"
    )
    problems = info.custody_problems()
    if problems and config.token.key_custody == "refuse":
        run.step("custody", partial(check_custody, config, key), lambda _r: attributes)
    elif problems:
        run.add(
            WARN,
            "custody",
            f"{attributes}: the key is {' and '.join(problems)}, so its value could leave the "
            'token (token.key_custody = "refuse" refuses such keys)',
        )
    elif info.never_extractable is not True or info.always_sensitive is not True:
        run.add(
            WARN,
            "custody",
            f"{attributes}: the key was imported or was once extractable, so a copy may "
            "exist outside the token",
        )
    else:
        run.add(OK, "custody", attributes)
    return key


def _check_upstream(run: _Run, config: ProxyConfig) -> None:
    upstream = config.upstream
    try:
        try_connect(upstream.host, upstream.port, upstream.connect_timeout)
    except TimeoutError:
        run.add(
            FAIL,
            "upstream",
            f"connecting to {upstream} timed out after {upstream.connect_timeout:g}s",
        )
    except OSError as exc:
        run.add(FAIL, "upstream", f"cannot connect to {upstream}: {exc.strerror or exc}")
    else:
        run.add(OK, "upstream", f"{upstream} accepts connections")


def format_rows(rows: list[Row]) -> str:
    width = max(len(row.name) for row in rows)
    return "\n".join(f"{row.status:<4}  {row.name:<{width}}  {row.detail}" for row in rows)
