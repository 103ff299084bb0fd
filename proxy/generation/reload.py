"""Generations and reloads: everything derived from secrets, built, validated and swapped whole.

Theory of operation (DESIGN.md, decision 5). A :class:`Generation` holds the logged-in
token, the token keys, the certificate chains (one default, more chosen by SNI), the
session-ticket keys and the SSL contexts made from them. :func:`build_generation` builds
one completely and checks it before anything serves it: every chain parses, is in order
and currently valid; the PIN logs in (in a child process when this process is logged in
already, see token.py); each key URI names exactly one key; each token key is its
certificate's key (equal public keys and a test signature that verifies); each ticket key
has its exact size. A failure raises a :class:`ProxyError` that names the secret and the
check, and releases what was acquired.

The server takes a generation with :meth:`GenerationHolder.acquire` when a connection
starts and gives it back when its handshake is over (only the handshake signs), so a
connection keeps the generation it started with. :meth:`GenerationHolder.swap` replaces
the one reference; the old generation's token sessions are closed as soon as its last
handshake ends. New sessions are opened before old ones close, so the process never drops
its token login and a PIN rotation fails no request.

The :class:`Reloader` runs in the server's nursery. Triggers: SIGHUP, a change of any
secret it watches (files by ``stat``, looked at on inotify events through watchfiles and
every ``watch_interval`` in any case; AWS secrets by their ``AWSCURRENT`` version every
``aws_poll_interval``), and :meth:`Reloader.reload` for the
admin endpoint and ``hsm-proxy reload``. A reload re-reads the config file (``run``), builds
in a worker thread, swaps on success; on failure it keeps the old generation, logs one
line (which secret, which check) and counts it in :attr:`Reloader.failures`. Every
successful build warns about certificates that expire within ``expiry_warning_days``.
"""

from __future__ import annotations

import datetime
import os
import signal
import threading
from collections.abc import Callable, Hashable, Iterator
from contextlib import aclosing, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, cast

import trio

from proxy.config import ProxyConfig, SiteConfig
from proxy.errors import ConfigError, KeyCustodyError, LoginError, ProxyError, SecretError
from proxy.net.workers import inherited_ticket_key
from proxy.ops.logs import log
from proxy.pkcs11.token import SignatureObserver, Token, TokenKey
from proxy.secrets.store import SecretRef, SecretStore, default_store, read_pin
from proxy.tls.certificates import Chain, check_key_matches, parse_chain, validate_chain
from proxy.tls.clientauth import ClientAuthPolicy, load_ca_bundle
from proxy.tls.core import (
    TicketKey,
    TLSPolicy,
    attach_sni_routes,
    build_server_context,
    install_ticket_keys,
    parse_ticket_key,
)
from proxy.tls.keybridge import verify_shared_libcrypto
from proxy.tls.ocsp import check_ocsp_response

if TYPE_CHECKING:  # only tls.py and keybridge.py touch OpenSSL; this is a type name
    from OpenSSL import SSL


@dataclass(frozen=True)
class Site:
    """One served certificate with its token key and SSL context."""

    names: tuple[str, ...]
    key: TokenKey
    chain: Chain
    ssl_context: SSL.Context


@dataclass(frozen=True)
class Generation:
    number: int
    config: ProxyConfig
    token: Token
    key: TokenKey  # the default certificate's key
    chain: Chain  # the default certificate chain
    ssl_context: SSL.Context  # the default context; SNI moves connections to sites'
    sites: tuple[Site, ...] = ()
    ticket_keys: tuple[TicketKey, ...] = field(default=(), repr=False)

    def chains(self) -> list[Chain]:
        return [self.chain, *(site.chain for site in self.sites)]

    def close(self) -> None:
        self.token.close()


@contextmanager
def checking(
    secret: str, check: str, kinds: type[ProxyError] | tuple[type[ProxyError], ...] = ProxyError
) -> Iterator[None]:
    """Re-raise a ProxyError (same type) prefixed with the secret and the check that failed."""
    try:
        yield
    except kinds as exc:
        text = str(exc)
        if text.startswith(f"{secret}: "):
            text = text[len(secret) + 2 :]
        raise type(exc)(f"{secret}: {check} failed: {text}") from None


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


def _dns_names(chain: Chain) -> tuple[str, ...]:
    from cryptography import x509

    try:
        extension = chain.leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return ()
    return tuple(extension.value.get_values_for_type(x509.DNSName))


def build_generation(
    config: ProxyConfig,
    observer: SignatureObserver,
    number: int = 1,
    store: SecretStore | None = None,
    previous: Generation | None = None,
) -> Generation:
    """Build and validate a complete generation from ``config``, or raise saying why not.

    ``previous``: the generation being replaced; its encrypting ticket key is kept for
    decryption, so tickets issued just before a rotation still resume.
    """
    verify_shared_libcrypto()
    store = store or default_store()
    store.configure_aws(config.aws)
    chain = load_chain_secret(store, config.tls.certificate_ref())
    site_chains = [(site, load_chain_secret(store, site.certificate)) for site in config.tls.sni]
    tickets: list[TicketKey] = []
    for ref in config.tls.session_ticket_keys:
        with checking(ref.describe(), "read"):
            raw = store.read(ref)
        with checking(ref.describe(), "size"):
            ticket = parse_ticket_key(raw, ref.describe())
        if ticket not in tickets:  # the same key listed twice (mid-rotation) is harmless
            tickets.append(ticket)
    if not config.tls.session_ticket_keys:
        shared = inherited_ticket_key()
        if shared is not None:
            tickets.append(parse_ticket_key(shared, "the workers' shared session-ticket key"))
    if previous is not None and previous.ticket_keys and tickets:
        old = previous.ticket_keys[0]
        if all(key.name != old.name for key in tickets):
            tickets.append(old)
    client_auth = _client_auth(store, config.tls.client_auth)
    ocsp = None
    if config.tls.ocsp_response is not None:
        ref = config.tls.ocsp_response
        with checking(ref.describe(), "read"):
            der = store.read(ref)
        ocsp = check_ocsp_response(der, chain, ref.describe())
    with checking(config.token.pin.describe(), "read"):
        pin = read_pin(config.token.pin, store)
    pin_store = store
    with checking(config.token.pin.describe(), "login", (LoginError, SecretError)):
        token = Token(
            config.token.module,
            config.tls.key,
            pin,
            pool_size=config.token.sessions,
            observer=observer,
            # Recovery logs in again with the PIN read afresh from its source (never kept).
            pin_provider=lambda: read_pin(config.token.pin, pin_store),
        )
    del pin
    try:
        key = token.find_private_key(config.tls.key)
        check_custody(config, key)
        with checking(config.tls.certificate_ref().describe(), "certificate matches token key"):
            check_key_matches(chain, key)
        # Every context of the listener gets its TLS policy and client-auth rules, so no
        # server name can be reached around them; the OCSP staple is the default chain's.
        policy = cast(TLSPolicy, config.tls.policy)  # config.py checked the name
        alpn, alpn_required = config.alpn_offer()  # the protocols of the default upstream
        context = build_server_context(
            chain,
            key,
            policy=policy,
            client_auth=client_auth,
            ocsp_response=ocsp,
            alpn=alpn,
            alpn_required=alpn_required,
        )
        sites = tuple(
            build_site(token, site, site_chain, policy, client_auth, config.alpn_offer(site))
            for site, site_chain in site_chains
        )
        for site in sites:
            check_custody(config, site.key)
        _route_names(context, chain, sites)
        if tickets:
            for each in [context, *(site.ssl_context for site in sites)]:
                install_ticket_keys(each, tickets)
    except BaseException:
        token.close()
        raise
    return Generation(number, config, token, key, chain, context, sites, tuple(tickets))


def check_custody(config: ProxyConfig, key: TokenKey) -> None:
    """Refuse a key whose value could leave the token, when token.key_custody says so."""
    problems = key.info.custody_problems()
    if problems and config.token.key_custody == "refuse":
        raise KeyCustodyError(
            f"key {key.info.describe()} is {' and '.join(problems)}: its value could leave "
            'the token, and token.key_custody = "refuse" (generate a sensitive, '
            'non-extractable key, or set key_custody = "warn")'
        )


def _client_auth(store: SecretStore, policy: ClientAuthPolicy | None) -> ClientAuthPolicy | None:
    """The client-auth policy with its CA bundle read now (every generation reads it)."""
    if policy is None:
        return None
    where = policy.ca.describe()
    with checking(where, "read"):
        pem = store.read(policy.ca)
    return replace(policy, ca_certificates=load_ca_bundle(pem, where))


def build_site(
    token: Token,
    site: SiteConfig,
    chain: Chain,
    policy: TLSPolicy = "intermediate",
    client_auth: ClientAuthPolicy | None = None,
    alpn: tuple[tuple[bytes, ...], bool] = ((b"http/1.1",), False),  # ProxyConfig.alpn_offer
) -> Site:
    if site.key.token is not None and site.key.token != token.label:
        raise ConfigError(
            f"{site.key}: every key must live in the token that [tls] key names ({token.label!r})"
        )
    key = token.find_private_key(site.key)
    with checking(site.certificate.describe(), "certificate matches token key"):
        check_key_matches(chain, key)
    names = site.names or _dns_names(chain)
    if not names:
        raise ConfigError(
            f"{site.certificate.describe()}: the certificate has no DNS name; list the "
            "server names it serves in names = [...]"
        )
    context = build_server_context(
        chain, key, policy=policy, client_auth=client_auth, alpn=alpn[0], alpn_required=alpn[1]
    )
    return Site(names, key, chain, context)


def _route_names(default: SSL.Context, chain: Chain, sites: tuple[Site, ...]) -> None:
    if not sites:
        return
    owners: dict[str, str] = {}
    for site in sites:
        for name in site.names:
            lowered = name.lower()
            if lowered in owners:
                raise ConfigError(
                    f"server name {name!r} is claimed by both {owners[lowered]} and "
                    f"{site.chain.source}"
                )
            owners[lowered] = site.chain.source
    attach_sni_routes(default, [(site.names, site.ssl_context) for site in sites])


def _is_directory(path: Path) -> bool:
    """False for a directory this process may not look into (after dropping root, say):
    the poll then reports the secret unreadable instead of the watcher crashing."""
    try:
        return path.is_dir() and os.access(path, os.R_OK | os.X_OK)
    except OSError:
        return False


def expiry_warnings(generation: Generation, days: int, now: datetime.datetime) -> list[str]:
    """One line per certificate of ``generation`` that expires within ``days``."""
    lines = []
    for chain in generation.chains():
        left = chain.not_after() - now
        if left <= datetime.timedelta(days=days):
            lines.append(
                f"certificate {chain.source} ({chain.leaf.subject.rfc4514_string()}) expires "
                f"on {chain.not_after():%Y-%m-%d %H:%M}Z, in {left.days} days "
                f"(warning threshold: {days} days)"
            )
    return lines


class GenerationHolder:
    """The one reference a reload swaps, and who still uses which generation.

    Called from the trio thread only (connection tasks and the reloader).
    """

    def __init__(self, generation: Generation) -> None:
        self.current = generation
        # The reloader serving this holder, if any: what an admin endpoint calls.
        self.reloader: Reloader | None = None
        self._users: dict[int, int] = {}
        self._retiring: dict[int, Generation] = {}

    def acquire(self) -> Generation:
        """The current generation, held until :meth:`release` (a connection's handshake)."""
        generation = self.current
        self._users[generation.number] = self._users.get(generation.number, 0) + 1
        return generation

    def release(self, generation: Generation) -> None:
        left = self._users.get(generation.number, 1) - 1
        if left > 0:
            self._users[generation.number] = left
            return
        self._users.pop(generation.number, None)
        if self._retiring.pop(generation.number, None) is not None:
            generation.close()

    def swap(self, generation: Generation) -> Generation:
        """Serve ``generation`` from now on; close the old one once nobody holds it."""
        old = self.current
        self.current = generation
        if self._users.get(old.number):
            self._retiring[old.number] = old
        else:
            old.close()
        return old

    def close(self) -> None:
        for generation in self._retiring.values():
            generation.close()
        self._retiring.clear()
        self.current.close()


@dataclass(frozen=True)
class ReloadResult:
    ok: bool
    generation: int
    message: str


class Reloader:
    """Triggers, build, validate, swap; keeps the old generation when a build fails."""

    def __init__(
        self,
        holder: GenerationHolder,
        load_config: Callable[[], ProxyConfig],
        observer: SignatureObserver,
        store: SecretStore | None = None,
        on_result: Callable[[Reloader, ReloadResult], None] | None = None,
    ) -> None:
        self.holder = holder
        holder.reloader = self
        self._on_result = on_result
        self._load_config = load_config
        self._observer = observer
        self.store = store or default_store()
        self.attempts = 0
        self.successes = 0
        self.failures = 0
        self.last_error: str | None = None
        self._lock = trio.Lock()
        self._seen: dict[SecretRef, Hashable] = {}
        self._versions_lock = threading.Lock()
        self._file_wake = trio.Event()

    # -- the one way to reload --------------------------------------------------------------

    async def reload(self, reason: str) -> ReloadResult:
        """Build a new generation and swap it in, or keep the current one; never raises."""
        result = await self._reload(reason)
        if self._on_result is not None:
            self._on_result(self, result)
        return result

    async def _reload(self, reason: str) -> ReloadResult:
        async with self._lock:
            self.attempts += 1
            current = self.holder.current
            # What is seen now counts as seen, even if this attempt fails: a bad secret or
            # config is reported once, not at every poll until someone fixes it.
            await trio.to_thread.run_sync(self._remember_versions, current.config)
            try:
                config = self._load_config()
                if config.listen != current.config.listen:
                    log.warning(
                        f"listen changed from {current.config.listen} to {config.listen}: "
                        "that takes a restart; keeping the current listeners"
                    )
                await trio.to_thread.run_sync(self._remember_versions, config)
                new = await trio.to_thread.run_sync(
                    build_generation,
                    config,
                    self._observer,
                    current.number + 1,
                    self.store,
                    current,
                )
            except Exception as exc:
                # A reload must never take the proxy down: whatever went wrong (a ProxyError
                # naming the secret and the check, or a bug), the old generation keeps serving.
                if not isinstance(exc, ProxyError):
                    log.exception("unexpected error while building a generation")
                self.failures += 1
                self.last_error = str(exc)
                log.error(
                    f"reload failed, still serving generation {current.number}: {exc}",
                    extra={
                        "fields": {
                            "event": "reload_failed",
                            "reason": reason,
                            "generation": current.number,
                            "error_kind": type(exc).__name__,
                        }
                    },
                )
                return ReloadResult(False, current.number, str(exc))
            self.holder.swap(new)
            self.successes += 1
            self.last_error = None
            log.info(
                f"reloaded: serving generation {new.number} ({reason})",
                extra={
                    "fields": {
                        "event": "reloaded",
                        "reason": reason,
                        "generation": new.number,
                        "serial": format(new.chain.leaf.serial_number, "x"),
                        "not_after": f"{new.chain.not_after():%Y-%m-%dT%H:%M:%SZ}",
                    }
                },
            )
            self.warn_about_expiry(new)
            return ReloadResult(True, new.number, f"serving generation {new.number}")

    def warn_about_expiry(self, generation: Generation) -> None:
        days = generation.config.reload.expiry_warning_days
        now = datetime.datetime.now(datetime.UTC)
        for line in expiry_warnings(generation, days, now):
            log.warning(line, extra={"fields": {"event": "certificate_expiring"}})

    # -- change detection -------------------------------------------------------------------

    def _version(self, ref: SecretRef) -> Hashable:
        try:
            return self.store.version(ref)
        except ProxyError as exc:
            return ("error", str(exc))

    def _remember_versions(self, config: ProxyConfig) -> None:
        with self._versions_lock:
            self._seen = {ref: self._version(ref) for ref in config.secrets()}

    def _changed(self, refs: list[SecretRef]) -> list[SecretRef]:
        with self._versions_lock:
            seen = dict(self._seen)
        return [ref for ref in refs if ref in seen and self._version(ref) != seen[ref]]

    async def _watch(self, kind: str, interval: Callable[[ProxyConfig], float]) -> None:
        while True:
            config = self.holder.current.config
            if kind == "file":
                # Woken early by file events (inotify), else a poll every interval.
                with trio.move_on_after(interval(config)):
                    await self._file_wake.wait()
                self._file_wake = trio.Event()
            else:
                await trio.sleep(interval(config))
            refs = [
                ref
                for ref in config.secrets()
                if (ref.aws is not None) == (kind == "aws") and ref.env is None
            ]
            changed = await trio.to_thread.run_sync(self._changed, refs)
            if not changed:
                continue
            if kind == "file":
                # Let a writer finish: rebuild once the files stop changing for a moment.
                while True:
                    before = [self._version(ref) for ref in changed]
                    await trio.sleep(min(0.25, interval(config)))
                    if [self._version(ref) for ref in changed] == before:
                        break
            await self.reload(", ".join(f"{ref.describe()} changed" for ref in changed))

    def _watched_directories(self) -> list[str]:
        config = self.holder.current.config
        return sorted(
            {
                str(ref.file.parent)
                for ref in config.secrets()
                if ref.file is not None and _is_directory(ref.file.parent)
            }
        )

    async def _file_events(self) -> None:
        """Wake the file watcher on inotify events in the secrets' directories (watchfiles).

        A Kubernetes ``..data`` swap, a rename over and a rewrite all show up as events in
        the directory. Without watchfiles, or when inotify fails (out of watches, a file
        system without events), the poll every ``watch_interval`` still finds changes.
        """
        try:
            import watchfiles
        except ImportError:
            log.info("watchfiles is not installed: file secrets are polled")
            return
        while True:
            directories = self._watched_directories()
            if not directories:
                await trio.sleep(self.holder.current.config.reload.watch_interval)
                continue
            try:
                async with aclosing(
                    watchfiles.awatch(
                        *directories,
                        debounce=50,
                        step=20,
                        recursive=False,
                        rust_timeout=1000,
                        yield_on_timeout=True,
                    )
                ) as events:
                    async for changes in events:
                        if changes:
                            self._file_wake.set()
                        if self._watched_directories() != directories:
                            break  # the config changed: watch the new set
            except Exception as exc:
                log.warning(f"file events unavailable ({exc}); file secrets are polled")
                return

    async def run(self) -> None:
        """SIGHUP and the watchers, for the life of the server (start it in its nursery)."""
        self._remember_versions(self.holder.current.config)
        self.warn_about_expiry(self.holder.current)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._file_events)
            nursery.start_soon(self._watch, "file", lambda config: config.reload.watch_interval)
            nursery.start_soon(self._watch, "aws", lambda config: config.reload.aws_poll_interval)
            with trio.open_signal_receiver(signal.SIGHUP) as signals:
                async for _ in signals:
                    await self.reload("SIGHUP")
