"""The named steps that build and validate a generation: one table, rules first.

Theory of operation (the style of h11's ``_state.py``: the rules stated here, the data
as tables below, the code that walks them in build.py).

1. :data:`STEPS` lists every step in the order a build takes it. A step makes one part of
   a generation, or checks one thing, on a :class:`Workbench` that holds what the steps
   before it made; build.py runs the list and assembles the :class:`Generation`.
2. A step runs once per item its ``each`` finds in the config: once; once per served
   certificate ("site": 0 is the default certificate of ``[tls]``, n is ``[[tls.sni]]``
   number n, so the rows are ``key``, ``sni[1] key``, ...); once per configured
   session-ticket key; once per site that has its own client-auth policy or OCSP staple;
   or not at all when the config does not ask for it (no client auth, no OCSP staple, no
   SNI). A step that does not run has no row.
3. ``needs`` names the steps whose results a step uses (``{site}`` is the step's own site,
   ``{token}`` the site whose token it uses: its own with a ``[tls.sni.token]``, else the
   ``[token]`` of site 0).
   A reload or ``run`` stops at the first failure, so everything needed is there; ``hsm-proxy
   check`` runs every step and skips one whose needed step did not succeed, with that
   step's :data:`MISSING` phrase as the reason. A need that has no row (its step does not
   apply) is met.
4. A step returns the detail of its row, or a :class:`Caution` for a warning row, and raises
   a :class:`ProxyError` to fail. An error names the secret and the check it concerns; where
   the error itself does not, :data:`BLAME` says which: a build that stops raises
   ``"<secret>: <check> failed: <error>"``, while check's row, already named by its step,
   shows the error alone.
5. Key custody (``token.key_custody = "warn" | "refuse"``) is decided by
   :func:`judge_custody` alone; the custody step, ``run``'s start-up warning and check's row
   all act on its verdict.

Tokens: ``[token]`` is site 0's; a ``[[tls.sni]]`` entry with a ``[tls.sni.token]`` table
has its own ``{site}pin``, ``{site}token`` and ``{site}mechanisms`` steps, and its key,
custody and signatures use that token (its own login, pool and recovery); the other
entries' keys must be in ``[token]``'s token. A PIN is on the workbench only between its
``pin`` and ``token`` steps; the token step takes it off and logs in (in a child process
when this process is logged in already, so a reload proves a new PIN: pkcs11/token.py).
Steps run in a worker thread (a reload) or in the command line; nothing here runs an event
loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, cast

from proxy.config import ProxyConfig, TokenConfig
from proxy.errors import ConfigError, KeyCustodyError, LoginError, ProxyError, SecretError
from proxy.generation.model import Generation, ProcessModel
from proxy.pkcs11.keys import SignatureObserver
from proxy.pkcs11.token import Token, TokenKey
from proxy.pkcs11.uri import KeyURI
from proxy.secrets.store import SecretRef, SecretStore, read_pin
from proxy.tls.certificates import Chain, check_key_matches, parse_chain, validate_chain
from proxy.tls.clientauth import ClientAuthPolicy, load_ca_bundle
from proxy.tls.context import TLSPolicy, build_server_context, key_exchange_groups
from proxy.tls.keys import verify_shared_libcrypto
from proxy.tls.ocsp import check_ocsp_response
from proxy.tls.tickets import TicketKey, install_ticket_keys, parse_ticket_key

if TYPE_CHECKING:  # only tls/ touches OpenSSL; this is a type name
    from OpenSSL import SSL

# A row's status, as `hsm-proxy check` prints it.
OK, WARN, FAIL, SKIP = "ok", "warn", "FAIL", "skip"


@dataclass(frozen=True)
class Caution:
    """What a step returns instead of its detail when its row is a warning."""

    detail: str


@dataclass
class Workbench:
    """The inputs of one build and what its steps have made so far (by site: 0 the
    default certificate, n the n-th ``[[tls.sni]]``)."""

    config: ProxyConfig
    store: SecretStore
    observer: SignatureObserver
    process: ProcessModel
    previous: Generation | None = None
    chains: dict[int, Chain] = field(default_factory=dict)
    tickets: list[TicketKey] = field(default_factory=list, repr=False)
    # Each distinct client-auth policy with its CA bundle read (by the config's policy).
    client_auth: dict[ClientAuthPolicy, ClientAuthPolicy] = field(default_factory=dict)
    ocsp: dict[int, bytes] = field(default_factory=dict)
    pins: dict[int, str] = field(default_factory=dict, repr=False)
    tokens: dict[int, Token] = field(default_factory=dict)  # by the site that configures it
    keys: dict[int, TokenKey] = field(default_factory=dict)
    names: dict[int, tuple[str, ...]] = field(default_factory=dict)
    contexts: dict[int, SSL.Context] = field(default_factory=dict)

    def logged_in(self, site: int = 0) -> Token:
        """The token that site ``site``'s key is in."""
        token = self.tokens.get(token_site(self.config, site))
        if token is None:  # pragma: no cover - "needs" runs the token step first
            raise RuntimeError("a step that needs the token ran without it")
        return token

    def ticket_keys(self) -> list[TicketKey]:
        """The configured keys (the first encrypts), else the workers' shared one; plus the
        previous generation's encrypting key, so tickets issued just before a rotation
        still resume."""
        keys = list(self.tickets)
        shared = self.process.shared_ticket_key
        if not self.config.tls.session_ticket_keys and shared is not None:
            keys.append(shared)
        if self.previous is not None and self.previous.ticket_keys and keys:
            old = self.previous.ticket_keys[0]
            if all(key.name != old.name for key in keys):
                keys.append(old)
        return keys

    def close(self) -> None:
        self.pins.clear()
        for token in self.tokens.values():
            token.close()


StepFunction = Callable[[Workbench, int], str | Caution]


@dataclass(frozen=True)
class Step:
    name: str  # the row's name; {site} becomes "" or "sni[n] ", {n} the item's number
    each: Callable[[ProxyConfig], Sequence[int]]  # the items it runs for (none: no row)
    needs: tuple[str, ...]  # names of the steps whose results it uses
    run: StepFunction

    def row_name(self, item: int) -> str:
        return self.name.format(site=site_prefix(item), n=item)

    def needed(self, item: int, config: ProxyConfig) -> list[str]:
        """The row names of the needs (``{token}``: only in steps whose items are sites)."""
        return [
            need.format(
                site=site_prefix(item),
                n=item,
                token=site_prefix(token_site(config, item)) if "{token}" in need else "",
            )
            for need in self.needs
        ]


@dataclass(frozen=True)
class Blame:
    """The secret a failure of a step is about, and the check's name, for a stopped build."""

    secret: Callable[[ProxyConfig, int], SecretRef]
    check: str
    kinds: tuple[type[ProxyError], ...] = (ProxyError,)


def site_prefix(site: int) -> str:
    return f"sni[{site}] " if site else ""


def token_site(config: ProxyConfig, site: int) -> int:
    """The site whose token config site ``site``'s key uses: itself when its
    ``[[tls.sni]]`` entry has a ``[tls.sni.token]``, else 0 (``[token]``)."""
    return site if site and config.tls.sni[site - 1].token is not None else 0


def token_config(config: ProxyConfig, site: int) -> TokenConfig:
    """The token settings site ``site``'s key uses."""
    own = config.tls.sni[site - 1].token if site else None
    return own if own is not None else config.token


# -- custody: the one place it is decided ---------------------------------------------------


@dataclass(frozen=True)
class Custody:
    """The verdict on one key's custody."""

    status: str  # OK, WARN or FAIL
    detail: str  # check's row: the key's attributes and what they mean (FAIL: the refusal)
    warning: str | None  # run's start-up warning, when the key's value could leave the token


def judge_custody(key: TokenKey, policy: str) -> Custody:
    """A key that can leave the token (``CKA_EXTRACTABLE`` true or ``CKA_SENSITIVE`` false)
    breaks the promise "used, never held": a warning, or a failure when ``policy`` (the
    config's ``token.key_custody``) is ``"refuse"``. A key imported or once extractable
    (``CKA_NEVER_EXTRACTABLE`` or ``CKA_ALWAYS_SENSITIVE`` false) may have a copy outside
    the token: a warning of check's only."""
    info = key.info
    attributes = (
        f"sensitive={info.sensitive} extractable={info.extractable} "
        f"always_sensitive={info.always_sensitive} never_extractable={info.never_extractable}"
    )
    problems = " and ".join(info.custody_problems())
    if problems and policy == "refuse":
        refusal = (
            f"key {info.describe()} is {problems}: its value could leave the token, and "
            'token.key_custody = "refuse" (generate a sensitive, non-extractable key, or set '
            'key_custody = "warn")'
        )
        return Custody(FAIL, refusal, None)
    if problems:
        return Custody(
            WARN,
            f"{attributes}: the key is {problems}, so its value could leave the token "
            '(token.key_custody = "refuse" refuses such keys)',
            f"key {info.describe()} is {problems}: its value could leave the token "
            '(set token.key_custody = "refuse" to refuse such keys)',
        )
    if info.never_extractable is not True or info.always_sensitive is not True:
        return Custody(
            WARN,
            f"{attributes}: the key was imported or was once extractable, so a copy may "
            "exist outside the token",
            None,
        )
    return Custody(OK, attributes, None)


# -- helpers the steps share ----------------------------------------------------------------


@contextmanager
def checking(
    secret: str, check: str, kinds: type[ProxyError] | tuple[type[ProxyError], ...] = ProxyError
) -> Iterator[None]:
    """Re-raise a ProxyError (same type) prefixed with the secret and the check that failed."""
    try:
        yield
    except kinds as exc:
        raise blamed(exc, secret, check) from None


def blamed(exc: ProxyError, secret: str, check: str) -> ProxyError:
    """``exc`` as "<secret>: <check> failed: <message>" (the secret said once)."""
    text = str(exc)
    if text.startswith(f"{secret}: "):
        text = text[len(secret) + 2 :]
    return type(exc)(f"{secret}: {check} failed: {text}")


def load_chain_secret(store: SecretStore, ref: SecretRef) -> Chain:
    where = ref.describe()
    with checking(where, "read"):
        pem = store.read(ref)
    source = str(ref.file) if ref.file is not None else where
    with checking(where, "parse"):
        chain = parse_chain(pem, source)
    with checking(where, "chain order and validity dates"):
        validate_chain(chain)
    return chain


def _certificate_ref(config: ProxyConfig, site: int) -> SecretRef:
    return config.tls.sni[site - 1].certificate if site else config.tls.certificate_ref()


def _key_uri(config: ProxyConfig, site: int) -> KeyURI:
    return config.tls.sni[site - 1].key if site else config.tls.key


def _client_auth_of(config: ProxyConfig, site: int) -> ClientAuthPolicy | None:
    return config.tls.sni[site - 1].client_auth if site else config.tls.client_auth


def _ocsp_ref(config: ProxyConfig, site: int) -> SecretRef | None:
    return config.tls.sni[site - 1].ocsp_response if site else config.tls.ocsp_response


def _dns_names(chain: Chain) -> tuple[str, ...]:
    from cryptography import x509

    try:
        extension = chain.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return ()
    return tuple(extension.value.get_values_for_type(x509.DNSName))


# -- the steps ------------------------------------------------------------------------------


def _openssl(_bench: Workbench, _item: int) -> str:
    verify_shared_libcrypto()
    return "pyOpenSSL and the key bridge share the system libcrypto"


def _certificate(bench: Workbench, site: int) -> str:
    chain = load_chain_secret(bench.store, _certificate_ref(bench.config, site))
    bench.chains[site] = chain
    return (
        f"{chain.leaf.subject.rfc4514_string()}, {len(chain.certificates)} in chain, "
        f"valid until {chain.not_after():%Y-%m-%d %H:%M} UTC"
    )


def _ticket_key(bench: Workbench, number: int) -> str:
    ref = bench.config.tls.session_ticket_keys[number - 1]
    with checking(ref.describe(), "read"):
        raw = bench.store.read(ref)
    with checking(ref.describe(), "size"):
        ticket = parse_ticket_key(raw, ref.describe())
    if ticket not in bench.tickets:  # the same key listed twice (mid-rotation) is harmless
        bench.tickets.append(ticket)
    return f"{ref.describe()}: a valid session-ticket key"


def _client_auth(bench: Workbench, site: int) -> str:
    """A site's client-auth policy with its CA bundle read now (every generation reads it;
    a ``[[tls.sni]]`` entry that inherits the listener's policy shares its row)."""
    policy = _client_auth_of(bench.config, site)
    if policy is None:  # pragma: no cover - "each" runs this step only with client auth
        raise RuntimeError("the client-auth step ran without a client-auth policy")
    where = policy.ca.describe()
    with checking(where, "read"):
        pem = bench.store.read(policy.ca)
    bench.client_auth[policy] = replace(policy, ca_certificates=load_ca_bundle(pem, where))
    lists = {
        "cn": len(policy.allow_cn),
        "dns": len(policy.allow_dns),
        "uri": len(policy.allow_uri),
        "spki": len(policy.allow_spki_sha256),
    }
    allowed = (
        "any certificate of the CA"
        if policy.allow_any
        else ", ".join(f"{count} {kind}" for kind, count in lists.items() if count)
    )
    return f"{policy.mode}, CA {where}, allow {allowed}"


def _ocsp(bench: Workbench, site: int) -> str:
    ref = _ocsp_ref(bench.config, site)
    if ref is None:  # pragma: no cover - "each" runs this step only with a staple
        raise RuntimeError("the OCSP step ran without an ocsp_response")
    with checking(ref.describe(), "read"):
        der = bench.store.read(ref)
    bench.ocsp[site] = check_ocsp_response(der, bench.chains[site], ref.describe())
    return f"{ref.describe()}: good, current, for this certificate"


def _pin(bench: Workbench, site: int) -> str:
    source = token_config(bench.config, site).pin
    with checking(source.describe(), "read"):
        bench.pins[site] = read_pin(source, bench.store)
    return source.describe()


def _token(bench: Workbench, site: int) -> str:
    settings, store = token_config(bench.config, site), bench.store
    pin = bench.pins.pop(site, None)
    if pin is None:  # pragma: no cover - "needs" runs the pin step first
        raise RuntimeError("the token step ran without a PIN")
    token = bench.tokens[site] = Token(
        settings.module,
        _key_uri(bench.config, site),
        pin,
        pool_size=settings.sessions,
        observer=bench.observer,
        # Recovery logs in again with the PIN read afresh from its source (never kept).
        pin_provider=lambda: read_pin(settings.pin, store),
    )
    return f"{token.label!r} in {settings.module}: logged in"


def _mechanisms(bench: Workbench, site: int) -> str:
    return ", ".join(sorted(m.value for m in bench.logged_in(site).mechanisms)) or "none"


def _key(bench: Workbench, site: int) -> str:
    token = bench.logged_in(site)
    uri = _key_uri(bench.config, site)
    if token_site(bench.config, site) == 0 and uri.token is not None and uri.token != token.label:
        raise ConfigError(
            f"{uri}: a key outside the token that [tls] key names ({token.label!r}) needs a "
            "[tls.sni.token] table in its [[tls.sni]] entry (module, pin ...)"
        )
    key = bench.keys[site] = token.find_private_key(uri)
    return f"{uri} -> {key.info.describe()}"


def _custody(bench: Workbench, site: int) -> str | Caution:
    verdict = judge_custody(bench.keys[site], token_config(bench.config, site).key_custody)
    if verdict.status == FAIL:
        raise KeyCustodyError(verdict.detail)
    return Caution(verdict.detail) if verdict.status == WARN else verdict.detail


def _match(bench: Workbench, site: int) -> str:
    check_key_matches(bench.chains[site], bench.keys[site])
    return "certificate key == token key; a test signature verified"


def _names(bench: Workbench, site: int) -> str:
    """The server names an SNI site serves, claimed by no other site."""
    chain = bench.chains[site]
    sni = bench.config.tls.sni[site - 1]
    names = sni.names or _dns_names(chain)
    if not names:
        raise ConfigError(
            f"{sni.certificate.describe()}: the certificate has no DNS name; list the "
            "server names it serves in names = [...]"
        )
    owners = {
        name.lower(): bench.chains[other].source
        for other, claimed in bench.names.items()
        for name in claimed
    }
    for name in names:
        lowered = name.lower()
        if lowered in owners:
            raise ConfigError(
                f"server name {name!r} is claimed by both {owners[lowered]} and {chain.source}"
            )
        owners[lowered] = chain.source
    bench.names[site] = names
    return ", ".join(names)


def _server_context(bench: Workbench, site: int) -> str:
    """Every context of the listener gets the TLS policy; each its own site's client-auth
    rules (the listener's unless its ``[[tls.sni]]`` entry has its own: the config keeps
    names with different rules on different upstreams) and OCSP staple."""
    policy = cast(TLSPolicy, bench.config.tls.policy)  # config.py checked the name
    client_auth = _client_auth_of(bench.config, site)
    # The protocols the site's upstream speaks (http/1.1, or a TCP upstream's own list).
    alpn, alpn_required = bench.config.alpn_offer(bench.config.tls.sni[site - 1] if site else None)
    context = build_server_context(
        bench.chains[site],
        bench.keys[site],
        policy=policy,
        client_auth=None if client_auth is None else bench.client_auth[client_auth],
        ocsp_response=bench.ocsp.get(site),
        alpn=alpn,
        alpn_required=alpn_required,
    )
    tickets = bench.ticket_keys()
    if tickets:
        install_ticket_keys(context, tickets)
    bench.contexts[site] = context
    if site:
        return f"{', '.join(bench.names[site])} -> server context built"
    detail = f"server context built: {policy}, groups {':'.join(key_exchange_groups())}"
    return detail + (f", {len(tickets)} session-ticket key(s)" if tickets else "")


# -- the tables -----------------------------------------------------------------------------


def _once(_config: ProxyConfig) -> range:
    return range(1)


def _token_sites(config: ProxyConfig) -> list[int]:
    """Site 0 ([token]) and every site with a token of its own."""
    return [site for site in _sites(config) if token_site(config, site) == site]


def _sites(config: ProxyConfig) -> range:
    return range(1 + len(config.tls.sni))


def _sni_sites(config: ProxyConfig) -> range:
    return range(1, 1 + len(config.tls.sni))


def _ticket_refs(config: ProxyConfig) -> range:
    return range(1, 1 + len(config.tls.session_ticket_keys))


def _with_client_auth(config: ProxyConfig) -> list[int]:
    """The sites whose client-auth policy is read: the listener's, and each ``[[tls.sni]]``
    entry's own (one that inherits the listener's has no row of its own)."""
    sites = [0] if config.tls.client_auth is not None else []
    return sites + [
        site
        for site in _sni_sites(config)
        if _client_auth_of(config, site) not in (None, config.tls.client_auth)
    ]


def _with_ocsp(config: ProxyConfig) -> list[int]:
    return [site for site in _sites(config) if _ocsp_ref(config, site) is not None]


STEPS: tuple[Step, ...] = (
    Step("openssl", _once, (), _openssl),
    Step("{site}certificate", _sites, (), _certificate),
    Step("ticket key[{n}]", _ticket_refs, (), _ticket_key),
    Step("{site}client auth", _with_client_auth, (), _client_auth),
    Step("{site}ocsp", _with_ocsp, ("{site}certificate",), _ocsp),
    Step("{site}pin", _token_sites, (), _pin),
    Step("{site}token", _token_sites, ("{site}pin",), _token),
    Step("{site}mechanisms", _token_sites, ("{site}token",), _mechanisms),
    Step("{site}key", _sites, ("{token}token",), _key),
    Step("{site}custody", _sites, ("{site}key",), _custody),
    Step("{site}match", _sites, ("{site}certificate", "{site}key"), _match),
    Step("{site}names", _sni_sites, ("{site}certificate",), _names),
    Step("tls", _once, ("openssl", "match", "client auth", "ocsp"), _server_context),
    Step(
        "{site}tls",
        _sni_sites,
        # "client auth": the listener's policy, which a site may inherit.
        ("openssl", "{site}match", "{site}names", "client auth", "{site}client auth", "{site}ocsp"),
        _server_context,
    ),
)

# Why check skips a step that needs the step named here, when that one did not succeed.
MISSING: dict[str, str] = {
    "openssl": "pyOpenSSL does not use the key bridge's libcrypto",
    "{site}certificate": "no valid certificate",
    "{site}client auth": "no valid client CA bundle",
    "{site}ocsp": "no valid OCSP response",
    "{site}pin": "no usable PIN",
    "{site}token": "no token session",
    "{site}key": "no token key",
    "{site}match": "no certificate proven to match its token key",
    "{site}names": "no server names for the site",
}

# The secret and the check a stopped build names for a step whose error does not.
BLAME: dict[str, Blame] = {
    "{site}token": Blame(
        lambda config, site: token_config(config, site).pin, "login", (LoginError, SecretError)
    ),
    "{site}match": Blame(_certificate_ref, "certificate matches token key"),
}
