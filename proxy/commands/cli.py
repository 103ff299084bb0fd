"""The ``hsm-proxy`` command line: argument parsing and wiring only, no logic of its own.

Commands:
  dev     serve https://localhost:8443 from a SoftHSM2 dev token made in a state directory
  run     serve from a TOML config file (production)
  check   build and validate everything a config names, print a table, serve nothing
  doctor  list the tokens and keys a PKCS#11 module shows
  reload  ask a running proxy to rebuild from its secrets (SIGHUP to its pid)
  key     key generate: make a serving key pair inside a token (commands/keys.py)
  csr     write a certificate signing request for a token key, signed in the token

Every :class:`ProxyError` becomes one line on stderr and exit status 1; usage errors exit 2.
PINs are never accepted on the command line: they come from a file or a variable.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import trio

from proxy import __version__
from proxy.commands import keys as key_commands
from proxy.config import (
    ProxyConfig,
    TLSConfig,
    TokenConfig,
    admin_config,
    load_config,
    parse_address,
    parse_upstream,
)
from proxy.errors import ConfigError, ProxyError, TokenError
from proxy.ops.hardening import drop_privileges, install_excepthooks
from proxy.ops.logs import audit_signature, connection_context, log, setup_logging
from proxy.pkcs11.keys import SignatureEvent

if TYPE_CHECKING:
    from proxy.generation.model import Generation, ProcessModel
    from proxy.generation.reload import Reloader, ReloadResult


class _ArgumentParser(argparse.ArgumentParser):
    """argparse, minus the echo of values in its errors: a PIN typed where it has no place
    (``--pin=SECRET``, ``--pin-value SECRET``) must not come back on stderr."""

    def error(self, message: str) -> NoReturn:
        super().error(_without_values(message))


def _without_values(message: str) -> str:
    prefix, found, arguments = message.partition("unrecognized arguments: ")
    if found:
        words = arguments.split()
        options = [word.split("=", 1)[0] for word in words if word.startswith("-")]
        hidden = sum(1 for word in words if not word.startswith("-") or "=" in word)
        shown = " ".join(options)
        if hidden:
            shown += f"{' and ' if options else ''}{hidden} value(s), not shown"
        return prefix + found + shown
    if message.startswith("ambiguous option: "):
        option, _, rest = message[len("ambiguous option: ") :].partition(" could match ")
        return f"ambiguous option: {option.split('=', 1)[0]} could match {rest}"
    return message


def _parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(
        prog="hsm-proxy",
        description="TLS-terminating reverse proxy whose private keys never leave a PKCS#11 token.",
    )
    parser.add_argument("--version", action="version", version=f"hsm-proxy {__version__}")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument(
        "--log-format",
        default="auto",
        choices=["auto", "json", "text"],
        help="auto: text on a terminal, JSON lines otherwise",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    dev = commands.add_parser("dev", help="serve https://localhost:8443 from a SoftHSM2 dev token")
    dev.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="where the dev token, CA and certificate live "
        "(default: $XDG_STATE_HOME/hsm-proxy/dev)",
    )
    dev.add_argument(
        "--listen", default="localhost:8443", help="HOST:PORT (default localhost:8443)"
    )
    dev.add_argument(
        "--module",
        default=None,
        help="PKCS#11 module to load instead of SoftHSM2, for example one that forwards to "
        "the dev token and adds delays or faults (tests/faulthsm)",
    )
    dev.add_argument(
        "--upstream",
        default=None,
        help="http://HOST:PORT to forward HTTP to, or tcp://HOST:PORT to relay the decrypted "
        "bytes to (TCP passthrough; default: a built-in demo HTTP upstream)",
    )
    dev.add_argument(
        "--admin",
        default=None,
        metavar="HOST:PORT",
        help="serve /healthz, /readyz and /metrics on this loopback address (default: off)",
    )
    dev.add_argument(
        "--admin-allow-public",
        action="store_true",
        help="allow --admin on a non-loopback address (the admin endpoint has no auth)",
    )

    run = commands.add_parser("run", help="serve as a TOML config file says")
    run.add_argument("--config", type=Path, required=True)
    run.add_argument(
        "--pid-file", type=Path, default=None, help="write the process id here (for reload)"
    )
    run.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes sharing the listen address (SO_REUSEPORT), each with its own "
        "token sessions; a worker that dies is replaced (default 1: serve in this process)",
    )

    reload = commands.add_parser(
        "reload", help="make a running proxy reload its config and secrets (sends SIGHUP)"
    )
    target = reload.add_mutually_exclusive_group(required=True)
    target.add_argument("--pid-file", type=Path, help="the file given to run --pid-file")
    target.add_argument("--pid", type=int, help="the proxy's process id (does not wait)")
    reload.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="with --pid-file: seconds to wait for the outcome (default 60); exit status 1 "
        "if the reload failed",
    )

    check = commands.add_parser("check", help="validate a config, its token, key and certificate")
    check.add_argument("--config", type=Path, required=True)

    doctor = commands.add_parser(
        "doctor", help="list the tokens, mechanisms and keys of a PKCS#11 module"
    )
    doctor.add_argument("--module", required=True, help="path of the PKCS#11 module (.so)")
    doctor_pin = doctor.add_mutually_exclusive_group()
    doctor_pin.add_argument(
        "--pin-file", type=Path, help="file holding the user PIN (to list and test keys)"
    )
    doctor_pin.add_argument(
        "--pin-env", metavar="VARIABLE", help="environment variable holding the user PIN"
    )
    doctor.add_argument(
        "--token", default=None, help="label of the token to log in to (when there are several)"
    )
    doctor.add_argument(
        "--signatures",
        type=int,
        default=3,
        metavar="N",
        help="test signatures to time per key (default 3, 0 for none)",
    )
    key_commands.add_parsers(commands)
    return parser


def _serve(
    config: ProxyConfig,
    banner: Callable[[list[str]], list[str]] | None = None,
    reread: Callable[[], ProxyConfig] | None = None,
    pid_file: Path | None = None,
) -> int:
    from proxy.generation.build import build_generation
    from proxy.generation.holder import GenerationHolder
    from proxy.generation.reload import Reloader, ReloadResult
    from proxy.generation.steps import judge_custody, token_config
    from proxy.net.server import serve
    from proxy.ops.admin import Operations
    from proxy.ops.allocator import tune_allocator

    log.debug(tune_allocator())
    operations = Operations(config.admin)

    def observe(event: SignatureEvent) -> None:
        audit_signature(event)
        operations.observe_signature(event)

    process = _process_model()
    # The start-up test signature's audit line says what it was for.
    startup = connection_context.set({"purpose": "startup_check"})
    try:
        generation = build_generation(config, observe, process=process)
    finally:
        connection_context.reset(startup)
    log.info(
        f"token {generation.token.label!r}: key {generation.key.info.describe()} "
        f"({'never extractable' if generation.key.info.never_extractable else 'EXTRACTABLE'}), "
        f"{generation.token.pool_size} sessions"
    )
    for token in generation.all_tokens()[1:]:
        log.info(f"token {token.label!r} ({token.module_path}): {token.pool_size} sessions")
    for site, key in enumerate(generation.token_keys()):
        warning = judge_custody(key, token_config(config, site).key_custody).warning
        if warning is not None:
            log.warning(warning, extra={"fields": {"event": "key_custody"}})
    holder = GenerationHolder(generation)
    status_file = _status_file(pid_file) if pid_file is not None else None

    def report(reloader: Reloader, result: ReloadResult) -> None:
        operations.metrics.reload_finished(result.ok)
        if status_file is not None:
            _write_status(status_file, reloader, result)

    reloader = Reloader(
        holder, reread or (lambda: config), observe, on_result=report, process=process
    )

    async def run_reloader(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # Test signatures of the generations a reload builds are audited as such.
        connection_context.set({"purpose": "reload"})
        await reloader.run(task_status)

    def ready(addresses: list[str]) -> None:
        if pid_file is not None and status_file is not None:
            _write_status(status_file, reloader, ReloadResult(True, generation.number, "started"))
            pid_file.write_text(f"{os.getpid()}\n")
        # The listeners are bound: privileged ports are no reason to stay root any longer.
        warning = drop_privileges(config.security.user)
        if warning:
            log.warning(warning)
        elif config.security.user is not None:
            prove_token_after_drop(generation, config.security.user)
        for address in addresses:
            log.info(f"serving https://{address} -> {config.upstream}")
        for line in banner(addresses) if banner else []:
            print(line, file=sys.stderr, flush=True)

    try:
        trio.run(
            partial(
                serve,
                holder,
                config.listen,
                ready,
                tasks=[run_reloader],
                operations=operations,
            )
        )
    finally:
        holder.close()
        for path in (pid_file, status_file):
            if path is not None:
                with suppress(OSError):
                    path.unlink()
    return 0


def _process_model() -> ProcessModel:
    """What this process is among workers: a worker gets the supervisor's ticket key."""
    from proxy.generation.model import ProcessModel
    from proxy.net.workers import inherited_ticket_key
    from proxy.tls.tickets import parse_ticket_key

    shared = inherited_ticket_key()
    if shared is None:
        return ProcessModel()
    return ProcessModel(parse_ticket_key(shared, "the workers' shared session-ticket key"))


def prove_token_after_drop(generation: Generation, user: str) -> None:
    """The token must still sign for the unprivileged user: fail now, not per handshake."""
    from proxy.tls.certificates import check_key_matches

    try:
        for chain, key in zip(generation.chains(), generation.token_keys(), strict=True):
            check_key_matches(chain, key)
    except ProxyError as exc:
        raise TokenError(
            f"after switching to user {user!r} the token can no longer sign ({exc}); give "
            f"{user!r} access to the token (SoftHSM2: its token directory; CloudHSM: the "
            "client daemon's socket)"
        ) from None


# Listen addresses a browser or curl on this machine reaches as "localhost".
_LOCAL_NAMES = ("localhost", "127.0.0.1", "::1", "0.0.0.0", "::")  # noqa: S104 - names, not a bind


def _status_file(pid_file: Path) -> Path:
    return pid_file.with_name(pid_file.name + ".reload")


def _write_status(path: Path, reloader: Reloader, result: ReloadResult) -> None:
    """What `hsm-proxy reload` waits for: the outcome of the latest reload (no secrets)."""
    status = {
        "attempts": reloader.attempts,
        "ok": result.ok,
        "generation": result.generation,
        "message": result.message,
    }
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(status) + "\n")
    os.replace(temporary, path)


def _run(args: argparse.Namespace) -> int:
    path: Path = args.config
    config = load_config(path)
    if args.workers == 1:
        return _serve(config, None, lambda: load_config(path), args.pid_file)
    from proxy.net.workers import Supervisor, worker_command

    if args.pid_file is not None:
        raise ConfigError(
            "--pid-file is for one process; with --workers, send SIGHUP to the supervisor "
            "(it passes it on to every worker) to reload"
        )
    # The supervisor never loads the PKCS#11 module: each spawned worker does (workers.py).
    command = worker_command(path.resolve(), args.log_level, args.log_format)
    supervisor = Supervisor(
        command,
        args.workers,
        config.listen,
        config.http.shutdown_grace,
        admin=config.admin,
        user=config.security.user,
    )
    return supervisor.run()


def _reload(args: argparse.Namespace) -> int:
    pid = args.pid
    if args.pid_file is not None:
        try:
            text = args.pid_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read pid file {args.pid_file}: {exc.strerror}") from None
        if not text.isdigit():
            raise ConfigError(f"pid file {args.pid_file} does not hold a process id")
        pid = int(text)
    status_file = _status_file(args.pid_file) if args.pid_file is not None else None
    before = _read_status(status_file)
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise ConfigError(f"no process {pid} (is the proxy running?)") from None
    except PermissionError:
        raise ConfigError(f"not allowed to signal process {pid}") from None
    if status_file is None or before is None:
        print(f"sent SIGHUP to {pid}; the proxy logs 'reloaded' or 'reload failed'")
        return 0
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        status = _read_status(status_file)
        if status is not None and status.get("attempts", 0) > before.get("attempts", 0):
            if status.get("ok"):
                print(f"reloaded: {status.get('message')}")
                return 0
            print(f"hsm-proxy: reload failed: {status.get('message')}", file=sys.stderr)
            return 1
        time.sleep(0.05)
    print(
        f"hsm-proxy: sent SIGHUP to {pid}, but it reported no reload within {args.timeout:g}s",
        file=sys.stderr,
    )
    return 1


def _read_status(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _dev(args: argparse.Namespace) -> int:
    from proxy.commands.demo import start_demo_upstream
    from proxy.commands.devstate import default_state_dir, prepare_dev_state
    from proxy.secrets.store import SecretRef

    state_dir = args.state_dir or default_state_dir()
    listen = parse_address(args.listen, "--listen")
    upstream_url = args.upstream or start_demo_upstream()
    upstream = parse_upstream(upstream_url, "--upstream")
    admin = None
    if args.admin is not None:
        admin = admin_config(
            parse_address(args.admin, "--admin"), args.admin_allow_public, 10.0, "--admin"
        )
    state = prepare_dev_state(state_dir)
    module = state.module
    if args.module:
        from proxy.pkcs11.module import unload_module

        # The other module forwards to SoftHSM2 in this process: let it initialise it anew.
        unload_module(state.module)
        module = str(Path(args.module).resolve())
    config = ProxyConfig(
        listen=listen,
        upstream=upstream,
        token=TokenConfig(module=module, pin=state.pin),
        tls=TLSConfig(
            certificate=SecretRef(file=state.certificate, what="certificate chain"),
            key=state.key_uri,
        ),
        admin=admin,
        source="hsm-proxy dev",
    )

    def banner(addresses: list[str]) -> list[str]:
        port = addresses[0].rsplit(":", 1)[1] if addresses else listen.port
        host = "localhost" if listen.host in _LOCAL_NAMES else listen.host
        return [
            f"hsm-proxy dev: state directory {state.directory}",
            f"  token:    {state.key_uri}",
            f"  module:   {module}",
            f"  SoftHSM2: SOFTHSM2_CONF={state.directory / 'softhsm2.conf'}",
            f"  CA:       {state.ca}",
            f"  upstream: {upstream}{'' if args.upstream else ' (built-in demo)'}",
            f"  try:      curl --cacert {state.ca} https://{host}:{port}/"
            if upstream.scheme == "http"
            else f"  try:      openssl s_client -CAfile {state.ca} -connect {host}:{port}",
            f"  rotate:   replace {state.certificate.name} or pin in the state directory: "
            "both are watched and reloaded",
        ] + ([f"  admin:    curl http://{admin.listen}/metrics"] if admin is not None else [])

    return _serve(config, banner)


def _check(args: argparse.Namespace) -> int:
    from proxy.commands.check import format_rows, run_checks
    from proxy.generation.steps import FAIL

    purpose = connection_context.set({"purpose": "check"})
    try:
        rows = run_checks(args.config, audit_signature)
    finally:
        connection_context.reset(purpose)
    print(format_rows(rows), flush=True)
    failed = [row for row in rows if row.status == FAIL]
    if failed:
        print(
            f"hsm-proxy: {args.config}: check failed ({', '.join(row.name for row in failed)})",
            file=sys.stderr,
        )
        for row in failed:
            print(f"hsm-proxy: error: {row.name}: {row.detail}", file=sys.stderr)
        return 1
    print(f"hsm-proxy: {args.config}: check is successful", file=sys.stderr)
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from proxy.commands.doctor import doctor_report
    from proxy.secrets.store import PinSource

    if args.signatures < 0:
        raise ConfigError(f"--signatures: must be 0 or more, got {args.signatures}")
    pin = None
    if args.pin_file is not None or args.pin_env is not None:
        pin = PinSource(file=args.pin_file, env=args.pin_env)
    lines, healthy = doctor_report(args.module, pin, args.token, args.signatures)
    print("\n".join(lines))
    return 0 if healthy else 1


def main(argv: Sequence[str] | None = None) -> int:
    install_excepthooks()  # any traceback that reaches stderr is scrubbed of secrets
    args = _parser().parse_args(argv)
    json_lines = {"auto": None, "json": True, "text": False}[args.log_format]
    setup_logging(args.log_level, json_lines)
    handlers = {
        "dev": _dev,
        "run": _run,
        "reload": _reload,
        "check": _check,
        "doctor": _doctor,
        "key": key_commands.key_generate,
        "csr": key_commands.csr,
    }
    try:
        return handlers[args.command](args)
    except ProxyError as error:
        print(f"hsm-proxy: error: {error}", file=sys.stderr)
        return 1
    except BaseExceptionGroup as group:
        # trio wraps what fails inside the server's nursery (the start-up checks made once
        # the listeners are bound): one ProxyError is still one clear line.
        matched, rest = group.split(ProxyError)
        if matched is None or rest is not None:
            raise
        first: BaseException = matched
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        print(f"hsm-proxy: error: {first}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
