"""Secrets in files: ``file:/run/secrets/pin`` (or a plain path where the config always took
one).

Theory of operation. A file's version is the ``stat`` of what its path resolves to now:
device, inode, size, modification and change times. Kubernetes updates a mounted secret by
swapping the ``..data`` symlink to a new directory, so the resolved file is a different
inode; Docker and editors rewrite in place or rename over, which changes the times or the
inode. A missing file has a version too (the error number), so its return is a change.
The reloader watches the file's directory with inotify and polls the version in any case.

A private secret (PIN, ticket key) must be a regular file that group and others can neither
read nor write (:func:`proxy.ops.hardening.check_private_file`), unless
``security.allow_insecure_secret_files`` says otherwise. A relative path is taken
relative to the config file's directory, as every path of the config is.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from proxy.errors import ConfigError, SecretError
from proxy.ops.hardening import check_private_file
from proxy.secrets.source import POLL_FILES, ReadContext, Watch


@dataclass(frozen=True)
class FileSource:
    path: Path

    scheme: ClassVar[str] = "file"
    line_break_allowed: ClassVar[bool] = True

    @classmethod
    def from_locator(cls, locator: str, base: Path) -> FileSource:
        """``locator`` is a path; a relative one is taken relative to ``base``."""
        if not locator:
            raise ConfigError(
                "needs a path: /absolute/path, or relative/path (to the config file's directory)"
            )
        if "\0" in locator:
            raise ConfigError("a file path cannot contain a NUL character")
        if locator.startswith("//"):
            raise ConfigError("write file:/absolute/path or file:relative/path, not a file:// URL")
        path = Path(locator)
        return cls(path if path.is_absolute() else base / path)

    @property
    def locator(self) -> str:
        return str(self.path)

    def describe(self, what: str) -> str:
        return f"{what} file {self.path}"

    def version(self, context: ReadContext) -> Hashable:
        try:
            info = self.path.stat()
        except OSError as exc:
            return ("missing", exc.errno)
        return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)

    def read(self, context: ReadContext) -> bytes:
        return read_file(self.path, context.what, context.private)

    def watch(self) -> Watch:
        return Watch(POLL_FILES, self.path.parent)


def read_file(path: Path, what: str, private: bool = False) -> bytes:
    """The bytes of the regular file ``path`` holding ``what``; private to its owner if
    ``private``. Errors name the file and the problem."""
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise SecretError(f"{what} file {path} is not a regular file")
        if private:
            check_private_file(path, info, f"{what} file")
        return path.read_bytes()
    except FileNotFoundError:
        raise SecretError(f"{what} file {path} does not exist") from None
    except PermissionError:
        raise SecretError(f"{what} file {path} is not readable by this user") from None
    except OSError as exc:
        raise SecretError(f"cannot read {what} file {path}: {exc.strerror}") from None


def write_secret_file(path: Path, value: str) -> None:
    """Write a secret readable by its owner only (mode 0600), created that way from the start."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(value + "\n")
    os.chmod(path, 0o600)
