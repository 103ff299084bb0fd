"""Operator safety: private secret files, no secret in any output, and dropping root.

Theory of operation. Three guards, each small and independent:

* :func:`check_private_file` refuses a secret file (PIN, ticket keys) that group or others
  may read or write, naming the file, its mode and both ways out (``chmod 600``, or
  ``security.allow_insecure_secret_files = true`` when the operator knows better).
* Scrubbing. Every secret value the proxy reads is registered with :func:`remember_secret`
  (in memory only, as the value itself is). :func:`scrub` replaces registered values in any
  text; :class:`ScrubbingFilter` applies it to every log record (message, structured fields
  and the formatted exception chain), and :func:`install_excepthooks` to any traceback that
  would reach stderr, in the main thread or a worker thread. Header values that carry
  credentials (``Authorization``, ``Cookie`` ...) are replaced by :func:`redact_headers`
  wherever headers are logged.
* :func:`drop_privileges` switches a process started as root to an unprivileged user (its
  group and supplementary groups) after the listeners are bound, and proves that root
  cannot be regained; a single process does it once it serves, a ``--workers``
  supervisor before it starts any worker (net/workers.py), after :func:`hand_over` gave
  the user the directory the workers share.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import stat
import sys
import threading
import traceback
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import Any

from proxy.errors import ConfigError, SecretError

REDACTED = "[redacted]"
# Secrets shorter than this are not scrubbed: replacing "1" everywhere would destroy logs
# and tell an observer the secret's value. PKCS#11 tokens require PINs of 4 or more.
_MIN_SCRUB_LENGTH = 4
SENSITIVE_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key"}
)

_secrets: set[str] = set()
_secrets_lock = threading.Lock()
# Longest first, rebuilt on each change: every log line is scrubbed, secrets rarely change.
_scrub_order: tuple[str, ...] = ()


# -- secret files -------------------------------------------------------------------------


def check_private_file(path: Path, info: os.stat_result, what: str) -> None:
    """Refuse ``path`` when group or others may read or write it."""
    shared = stat.S_IMODE(info.st_mode) & 0o066
    if shared:
        mode = f"{stat.S_IMODE(info.st_mode):04o}"
        raise SecretError(
            f"{what} {path} is readable or writable by other users (mode {mode}): "
            f"run chmod 600 {path}, or set security.allow_insecure_secret_files = true if "
            "that is intended"
        )


# -- scrubbing ----------------------------------------------------------------------------


def remember_secret(value: str) -> None:
    """Register a secret value that must never appear in any output."""
    if len(value) >= _MIN_SCRUB_LENGTH:
        with _secrets_lock:
            # The value, and the forms it takes inside a repr() of a str or of bytes (as an
            # exception message or a traceback may show it), quoted either way.
            escaped = value.encode("unicode_escape").decode("ascii")
            for form in (
                value,
                escaped,
                escaped.replace("'", "\\'"),
                escaped.replace('"', '\\"'),
                repr(value.encode("utf-8"))[2:-1],
            ):
                _secrets.add(form)
            _reorder()


def _reorder() -> None:
    global _scrub_order
    _scrub_order = tuple(sorted(_secrets, key=len, reverse=True))


def forget_secrets() -> None:
    with _secrets_lock:
        _secrets.clear()
        _reorder()


def scrub(text: str) -> str:
    """``text`` with every registered secret replaced by ``[redacted]``."""
    for secret in _scrub_order:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return text


def redact_headers(headers: Iterable[tuple[Any, Any]]) -> list[tuple[str, str]]:
    """Headers as text, with credential-bearing values replaced."""
    redacted = []
    for name, value in headers:
        text_name = name.decode("latin-1") if isinstance(name, bytes) else str(name)
        text_value = value.decode("latin-1") if isinstance(value, bytes) else str(value)
        if text_name.lower() in SENSITIVE_HEADERS:
            text_value = REDACTED
        redacted.append((text_name, text_value))
    return redacted


# Field values that cannot hold a secret: passed through without a look (an access line
# has about a dozen fields, most of them numbers).
_PLAIN_TYPES = frozenset({int, float, bool, type(None)})


def _scrub_value(key: str, value: Any) -> Any:
    kind = type(value)
    if kind in _PLAIN_TYPES:
        return value
    if kind is str and not key.endswith("headers"):
        return scrub(value) if _scrub_order else value
    if key.endswith("headers") and isinstance(value, list | tuple):
        return [list(pair) for pair in redact_headers(value)]
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {name: _scrub_value(str(name), item) for name, item in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub_value("", item) for item in value]
    return value


def format_exception(
    kind: type[BaseException] | None,
    value: BaseException | None,
    trace: TracebackType | None,
) -> str:
    """A traceback with its whole chain (causes and contexts), scrubbed."""
    return scrub("".join(traceback.format_exception(kind, value, trace)))


def scrub_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """A log line's structured fields with secrets and credential headers scrubbed."""
    return {key: _scrub_value(key, value) for key, value in fields.items()}


class ScrubbingFilter(logging.Filter):
    """Scrubs secrets and credential headers from every record passing a handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = scrub(record.getMessage())
        record.args = None
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            record.fields = scrub_fields(fields)
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = format_exception(*record.exc_info).rstrip("\n")
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = scrub(record.exc_text)
        return True


def _excepthook(
    kind: type[BaseException], value: BaseException, trace: TracebackType | None
) -> None:
    sys.stderr.write(format_exception(kind, value, trace))
    sys.stderr.flush()


def _thread_excepthook(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "unknown"
    sys.stderr.write(f"Exception in thread {name}:\n")
    sys.stderr.write(format_exception(args.exc_type, args.exc_value, args.exc_traceback))
    sys.stderr.flush()


def install_excepthooks() -> None:
    """Make every uncaught exception's traceback pass through :func:`scrub`."""
    sys.excepthook = _excepthook
    threading.excepthook = _thread_excepthook


# -- privileges ---------------------------------------------------------------------------


def hand_over(path: Path, user: str) -> None:
    """Make ``path`` (a directory root made for the processes that will run as ``user``)
    belong to ``user`` and its group."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(f"security.user: no user named {user!r} on this system") from None
    os.chown(path, entry.pw_uid, entry.pw_gid)


def drop_privileges(user: str | None) -> str | None:
    """Become ``user`` when running as root; return a warning to log, if any."""
    if os.geteuid() != 0:
        if user is not None and pwd.getpwuid(os.geteuid()).pw_name != user:
            raise ConfigError(
                f"security.user: cannot switch to user {user!r}: the proxy is not running as root"
            )
        return None
    if user is None:
        return "running as root: set security.user to drop root once the listeners are bound"
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(f"security.user: no user named {user!r} on this system") from None
    if entry.pw_uid == 0:
        raise ConfigError(f"security.user: {user!r} is root; name an unprivileged user")
    groups = os.getgrouplist(user, entry.pw_gid)
    os.setgroups(groups)
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:  # pragma: no cover - the kernel said no above on every supported system
        raise ConfigError(f"security.user: switched to {user!r} but root could be regained")
    group = grp.getgrgid(entry.pw_gid).gr_name
    log = logging.getLogger("hsm_proxy")
    log.info(f"dropped root: now user {user!r} (uid {entry.pw_uid}), group {group!r}")
    return None
