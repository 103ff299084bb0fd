"""Running the steps: a generation for ``run`` and reloads, a row per step for ``check``.

Theory of operation. :func:`run_steps` walks :data:`steps.STEPS` (each step once per item
its ``each`` finds, in table order) on one :class:`Workbench`, and records a :class:`Row`
per step run. It has two ways to meet a failure:

- stop at the first (:func:`build_generation`, for ``run`` and every reload): the step's
  error is raised, named after its secret and check (``steps.BLAME``), and the token
  sessions opened so far are closed. When every step passed, the parts on the workbench
  are assembled into a :class:`Generation` (the SNI sites routed from the default context).
- run every step (:func:`check_generation`, for ``hsm-proxy check``): a failure becomes a
  FAIL row with the error itself, a step whose needed step did not succeed becomes a skip
  row saying what is missing (``steps.MISSING``), and the token is closed at the end. The
  same steps, so check and a reload agree on what passes and on every message.
"""

from __future__ import annotations

from dataclasses import dataclass

from proxy.config import ProxyConfig
from proxy.errors import ProxyError
from proxy.generation.model import Generation, ProcessModel, Site
from proxy.generation.steps import (
    BLAME,
    FAIL,
    MISSING,
    OK,
    SKIP,
    STEPS,
    WARN,
    Caution,
    Step,
    Workbench,
    blamed,
)
from proxy.pkcs11.keys import SignatureObserver
from proxy.secrets.store import SecretStore, default_store
from proxy.tls.context import attach_sni_routes


@dataclass(frozen=True)
class Row:
    status: str  # OK, WARN, FAIL or SKIP (steps.py)
    name: str
    detail: str


def run_steps(bench: Workbench, stop_at_first: bool) -> list[Row]:
    """Every step on ``bench``, in order: a row each. ``stop_at_first``: raise the first
    failure (blamed), else record it and skip what needs it."""
    rows: dict[str, Row] = {}
    missing: dict[str, str] = {}  # row name -> why a step that needs it is skipped
    for step in STEPS:
        for item in step.each(bench.config):
            name = step.row_name(item)
            unmet = [
                need
                for need in step.needed(item, bench.config)
                if need in rows and rows[need].status not in (OK, WARN)
            ]
            if unmet:
                rows[name] = Row(SKIP, name, missing[unmet[0]])
            else:
                rows[name] = _run_one(bench, step, item, stop_at_first)
            if step.name in MISSING:
                missing[name] = MISSING[step.name]
    return list(rows.values())


def _run_one(bench: Workbench, step: Step, item: int, stop_at_first: bool) -> Row:
    name = step.row_name(item)
    try:
        outcome = step.run(bench, item)
    except ProxyError as exc:
        if not stop_at_first:
            return Row(FAIL, name, str(exc))
        blame = BLAME.get(step.name)
        if blame is None or not isinstance(exc, blame.kinds):
            raise
        raise blamed(exc, blame.secret(bench.config, item).describe(), blame.check) from None
    if isinstance(outcome, Caution):
        return Row(WARN, name, outcome.detail)
    return Row(OK, name, outcome)


def build_generation(
    config: ProxyConfig,
    observer: SignatureObserver,
    number: int = 1,
    store: SecretStore | None = None,
    previous: Generation | None = None,
    process: ProcessModel | None = None,
) -> Generation:
    """Build and validate a complete generation from ``config``, or raise saying why not.

    ``previous``: the generation being replaced; its encrypting ticket key is kept for
    decryption, so tickets issued just before a rotation still resume. ``process``: what
    the process hands every build (the workers' shared ticket key).
    """
    bench = _workbench(config, observer, store, process, previous)
    try:
        run_steps(bench, stop_at_first=True)
        return _assemble(bench, number)
    except BaseException:
        bench.close()
        raise


def check_generation(
    config: ProxyConfig,
    observer: SignatureObserver,
    store: SecretStore | None = None,
    process: ProcessModel | None = None,
) -> list[Row]:
    """Every step of a build of ``config``, a row each; serves nothing, keeps nothing."""
    bench = _workbench(config, observer, store, process, None)
    try:
        return run_steps(bench, stop_at_first=False)
    finally:
        bench.close()


def _workbench(
    config: ProxyConfig,
    observer: SignatureObserver,
    store: SecretStore | None,
    process: ProcessModel | None,
    previous: Generation | None,
) -> Workbench:
    store = store or default_store()
    store.configure_aws(config.aws)
    return Workbench(config, store, observer, process or ProcessModel(), previous)


def _assemble(bench: Workbench, number: int) -> Generation:
    """The generation the steps made (every step passed)."""
    sites = tuple(
        Site(
            bench.names[site],
            bench.keys[site],
            bench.chains[site],
            bench.contexts[site],
            bench.config.tls.sni[site - 1],
        )
        for site in range(1, 1 + len(bench.config.tls.sni))
    )
    default = bench.contexts[0]
    if sites:
        attach_sni_routes(default, [(site.names, site.ssl_context) for site in sites])
    return Generation(
        number,
        bench.config,
        bench.logged_in(),
        bench.keys[0],
        bench.chains[0],
        default,
        sites,
        tuple(bench.ticket_keys()),
        tuple(bench.tokens[site] for site in sorted(bench.tokens)),
    )
