"""The secret store: reads secrets and their versions through their sources.

Theory of operation. The configuration holds *references* to secrets (:class:`SecretRef`,
reference.py), never values. :class:`SecretStore` resolves a reference to its bytes at the
moment a generation is built, and tells cheaply whether a secret changed since
(:meth:`SecretStore.version`), so that the reloader (generation/reload.py) rebuilds only
when something moved. It does so by asking the reference's source (source.py: one module
per source, file.py, env.py, aws.py), telling it what the secret is for and whether a file
holding it must be private, and lending it the clients made once per process (the AWS
Secrets Manager client, remade when ``[aws]`` changes).

Secret values never reach a log line, an exception, or a command line. Forms are checked
exactly (PIN: one trailing line break allowed where the source allows it, a file; no other
control character, not empty, UTF-8), never trimmed or padded beyond that, and every PIN
read is registered for scrubbing (:func:`proxy.ops.hardening.remember_secret`).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

from proxy.errors import SecretError
from proxy.ops.hardening import remember_secret
from proxy.secrets.aws import AWSSettings, SecretsManagerClient
from proxy.secrets.file import write_secret_file
from proxy.secrets.reference import PRIVATE_SECRETS, PinSource, SecretRef, parse_reference
from proxy.secrets.source import ReadContext

__all__ = [
    "PRIVATE_SECRETS",
    "AWSSettings",
    "PinSource",
    "SecretRef",
    "SecretStore",
    "default_store",
    "parse_reference",
    "read_pin",
    "write_secret_file",
]


class SecretStore:
    """Reads secrets and their versions; one per process, shared by the reloader."""

    def __init__(self, aws: AWSSettings | None = None) -> None:
        self._secrets_manager = SecretsManagerClient(aws)

    def configure_aws(self, aws: AWSSettings) -> None:
        self._secrets_manager.configure(aws)

    def secrets_manager(self) -> Any:
        """The AWS Secrets Manager client (what an ``aws-sm:`` source asks for)."""
        return self._secrets_manager.get()

    def _context(self, ref: SecretRef) -> ReadContext:
        return ReadContext(what=ref.what, private=ref.private, clients=self)

    # -- the two questions the reloader asks -----------------------------------------------

    def version(self, ref: SecretRef) -> Hashable:
        """A cheap marker that changes when the secret does (no secret value in it)."""
        return ref.source.version(self._context(ref))

    def read(self, ref: SecretRef) -> bytes:
        """The secret's bytes, as stored (no decoding, trimming or padding)."""
        return ref.source.read(self._context(ref))


_default_store = SecretStore()


def default_store() -> SecretStore:
    return _default_store


def read_pin(source: SecretRef, store: SecretStore | None = None) -> str:
    """The PIN that ``source`` refers to, checked; errors say what is wrong, not the PIN."""
    raw = (store or _default_store).read(source)
    if source.source.line_break_allowed:
        if raw.endswith(b"\r\n"):
            raw = raw[:-2]
        elif raw.endswith(b"\n"):
            raw = raw[:-1]
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
    remember_secret(pin)
    return pin
