"""Secrets in environment variables: ``env:HSM_PIN`` names the variable, never holds a value.

Theory of operation. An environment variable cannot change under a running process: it is
read when a generation is built (at start and on each SIGHUP, which re-reads the config and
the environment), and no poll looks at it (:class:`~proxy.secrets.source.Watch` with no
poll). Its version is an HMAC of the value under a key made at random for this process, so
it changes with the value yet tells nothing about it, even for a short PIN. The value is
taken exactly as set (no line break is dropped): ``export HSM_PIN=1234``.

A name must be a portable one (letters, digits and ``_``, not starting with a digit): a
value written by mistake where the name goes (``env:1234``) or a shell habit
(``env:$HSM_PIN``) is refused, and the message does not repeat it.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from proxy.errors import ConfigError, SecretError
from proxy.secrets.source import ReadContext, Watch

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Versions are compared within this process only; the key never leaves it.
_VERSION_KEY = secrets.token_bytes(32)


@dataclass(frozen=True)
class EnvSource:
    name: str

    scheme: ClassVar[str] = "env"
    line_break_allowed: ClassVar[bool] = False

    @classmethod
    def from_locator(cls, locator: str, base: Path) -> EnvSource:
        """``locator`` is a variable's name (``base`` is not used)."""
        if _NAME.fullmatch(locator) is None:
            hint = " (write the name without $)" if locator.startswith("$") else ""
            raise ConfigError(
                "needs the name of an environment variable (letters, digits and _, not "
                f"starting with a digit), never a value{hint}"
            )
        return cls(locator)

    @property
    def locator(self) -> str:
        return self.name

    def describe(self, what: str) -> str:
        return f"{what} variable ${self.name}"

    def _value(self) -> bytes | None:
        value = os.environ.get(self.name)
        return None if value is None else value.encode("utf-8", "surrogateescape")

    def version(self, context: ReadContext) -> Hashable:
        value = self._value()
        if value is None:
            return ("env", self.name, None)
        return ("env", self.name, hmac.new(_VERSION_KEY, value, hashlib.sha256).hexdigest())

    def read(self, context: ReadContext) -> bytes:
        value = self._value()
        if value is None:
            raise SecretError(f"the {context.what} variable ${self.name} is not set")
        return value

    def watch(self) -> Watch:
        return Watch(None)
