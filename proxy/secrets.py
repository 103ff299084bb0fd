"""Secret sources: where the token PIN (and later other secrets) comes from.

Theory of operation. The configuration holds *references* to secrets (a file path, an
environment variable name), never values. This module resolves a reference to its value
at the moment it is needed, checks its form exactly, and never lets the value reach a log
line, an exception or a command line.

PIN form: a file may end with one line break (``echo 1234 > pin`` writes one), which is
not part of the PIN; any other control character, an empty PIN, or bytes that are not
UTF-8 are errors. Nothing is trimmed or padded beyond that one line break.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from proxy.errors import SecretError


@dataclass(frozen=True)
class PinSource:
    """Exactly one of ``file`` or ``env`` names where the PIN is."""

    file: Path | None = None
    env: str | None = None

    def describe(self) -> str:
        return f"PIN file {self.file}" if self.file is not None else f"PIN variable ${self.env}"


def read_pin(source: PinSource) -> str:
    """The PIN that ``source`` refers to, checked; errors say what is wrong, not the PIN."""
    if source.file is not None:
        raw = _read_file(source.file)
        if raw.endswith(b"\r\n"):
            raw = raw[:-2]
        elif raw.endswith(b"\n"):
            raw = raw[:-1]
    elif source.env is not None:
        value = os.environ.get(source.env)
        if value is None:
            raise SecretError(f"the PIN variable ${source.env} is not set")
        raw = value.encode("utf-8", "surrogateescape")
    else:  # pragma: no cover - config validation makes this impossible
        raise SecretError("no PIN source configured")
    where = source.describe()
    try:
        pin = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SecretError(f"{where} is not valid UTF-8") from None
    if not pin:
        raise SecretError(f"{where} is empty")
    for position, char in enumerate(pin, start=1):
        if ord(char) < 0x20 or ord(char) == 0x7F:
            raise SecretError(
                f"{where} contains a control character (code {ord(char)}) at position "
                f"{position}; only one trailing line break is allowed in a PIN file"
            )
    return pin


def _read_file(path: Path) -> bytes:
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise SecretError(f"PIN file {path} is not a regular file")
        return path.read_bytes()
    except FileNotFoundError:
        raise SecretError(f"PIN file {path} does not exist") from None
    except PermissionError:
        raise SecretError(f"PIN file {path} is not readable by this user") from None
    except OSError as exc:
        raise SecretError(f"cannot read PIN file {path}: {exc.strerror}") from None


def write_secret_file(path: Path, value: str) -> None:
    """Write a secret readable by its owner only (mode 0600), created that way from the start."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(value + "\n")
    os.chmod(path, 0o600)
