"""The secret-source protocol: one interface, one module per source.

Theory of operation. A *source* says where one secret is (a file, an environment variable,
an AWS Secrets Manager secret) and answers the four questions the rest of the proxy asks:

* :meth:`SecretSource.describe`: a phrase for messages ("PIN file /run/pin"); it names the
  place, never the value;
* :meth:`SecretSource.version`: a cheap marker that changes when the secret does, and holds
  no secret value (a file's ``stat``, a keyed digest of a variable, AWS's ``AWSCURRENT``
  version id); the reloader compares markers to decide whether to rebuild;
* :meth:`SecretSource.read`: the secret's bytes as stored, read now;
* :meth:`SecretSource.watch`: how a reloader notices changes (:class:`Watch`): which poll
  looks at its version, and a directory whose file events wake that poll early.

Sources are frozen dataclasses: hashable and comparable, so a reference can key the
reloader's table of versions, and free of values. What a source needs from its caller
comes in a :class:`ReadContext`: what the secret is for (messages), whether a file holding
it must be private, and the long-lived clients (AWS) the store makes once.

Adding a source is one module with one class, and one line in ``reference.SCHEMES``; the
config's reference form (``scheme:locator``) then reaches it from every secret-bearing key.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol

# The polls a reloader runs (Watch.poll); each has its interval in [reload].
POLL_FILES = "file"  # every reload.watch_interval, and on file events in Watch.directory
POLL_AWS = "aws"  # every reload.aws_poll_interval


@dataclass(frozen=True)
class Watch:
    """How a reloader learns that a secret changed.

    ``poll``: which poll looks at the secret's version (:data:`POLL_FILES`,
    :data:`POLL_AWS`), or ``None`` when nothing can change it under a running process (an
    environment variable: read again on SIGHUP only). ``directory``: a directory whose
    inotify events wake the file poll early.
    """

    poll: str | None
    directory: Path | None = None


class Clients(Protocol):
    """Long-lived clients a source may need, made once per process by the store."""

    def secrets_manager(self) -> Any:
        """The AWS Secrets Manager client (boto3), made on first use."""
        ...


@dataclass(frozen=True)
class ReadContext:
    """What a source is told when asked for a version or a value."""

    what: str  # what the secret is for, in messages: "PIN", "certificate chain", ...
    private: bool  # a file holding it must be private to its owner
    clients: Clients


class SecretSource(Protocol):
    """Where one secret is; see the module's theory of operation."""

    # The reference form's scheme ("file", "env", "aws-sm").
    scheme: ClassVar[str]
    # Whether a value kept here may end with one line break that is not part of it (a file
    # written by echo or an editor); the PIN check drops it.
    line_break_allowed: ClassVar[bool]

    @property
    def locator(self) -> str:
        """What follows ``scheme:`` in the reference form (a path, a name, an id)."""
        ...

    def describe(self, what: str) -> str:
        """``what`` and where it is, for messages ("PIN file /run/pin"); never the value."""
        ...

    def version(self, context: ReadContext) -> Hashable:
        """A cheap marker that changes when the secret does; never holds the value."""
        ...

    def read(self, context: ReadContext) -> bytes:
        """The secret's bytes as stored (no decoding, trimming or padding)."""
        ...

    def watch(self) -> Watch:
        """How a reloader notices that the secret changed."""
        ...
