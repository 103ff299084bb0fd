"""The reloader: triggers, then build, validate and swap; the old generation stays on failure.

Theory of operation (docs/ARCHITECTURE.md, decision 5). The :class:`Reloader` runs in the server's
nursery. Triggers: SIGHUP, a change of any secret it watches (files by ``stat``, looked at
on inotify events through watchfiles and every ``watch_interval`` in any case; AWS secrets
by their ``AWSCURRENT`` version every ``aws_poll_interval``), and :meth:`Reloader.reload`
for the admin endpoint and ``hsm-proxy reload``. A reload re-reads the config file
(``run``), builds a generation in a worker thread with the same steps as start-up and
``hsm-proxy check`` (build.py, stopping at the first failure), and swaps it into the
:class:`GenerationHolder` on success; on failure it keeps the old generation, logs one line
(which secret, which check) and counts it in :attr:`Reloader.failures`. Every successful
build warns about certificates that expire within ``expiry_warning_days``.

What the process decided (the workers' shared ticket key, a :class:`ProcessModel`) is given
to the reloader by the command line and passed to every build.
"""

from __future__ import annotations

import datetime
import os
import signal
import threading
from collections.abc import Callable, Hashable
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path

import trio

from proxy.config import ProxyConfig
from proxy.errors import ProxyError
from proxy.generation.build import build_generation
from proxy.generation.holder import GenerationHolder
from proxy.generation.model import Generation, ProcessModel, expiry_warnings
from proxy.ops.logs import log
from proxy.pkcs11.keys import SignatureObserver
from proxy.secrets.store import SecretRef, SecretStore, default_store


def _is_directory(path: Path) -> bool:
    """False for a directory this process may not look into (after dropping root, say):
    the poll then reports the secret unreadable instead of the watcher crashing."""
    try:
        return path.is_dir() and os.access(path, os.R_OK | os.X_OK)
    except OSError:
        return False


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
        process: ProcessModel | None = None,
    ) -> None:
        self.holder = holder
        self._on_result = on_result
        self._process = process or ProcessModel()
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
                    self._process,
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
            refs = [ref for ref in config.secrets() if ref.watch().poll == kind]
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
        directories = {ref.watch().directory for ref in config.secrets()}
        return sorted(
            str(directory)
            for directory in directories
            if directory is not None and _is_directory(directory)
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

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """SIGHUP and the watchers, for the life of the server (start it in its nursery:
        it is started once SIGHUP is caught, so that a SIGHUP never finds the process
        with the default action, which ends it)."""
        self._remember_versions(self.holder.current.config)
        self.warn_about_expiry(self.holder.current)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._file_events)
            nursery.start_soon(self._watch, "file", lambda config: config.reload.watch_interval)
            nursery.start_soon(self._watch, "aws", lambda config: config.reload.aws_poll_interval)
            with trio.open_signal_receiver(signal.SIGHUP) as signals:
                task_status.started()
                async for _ in signals:
                    await self.reload("SIGHUP")
