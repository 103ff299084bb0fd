"""Secret references: the one form the config uses for every secret, and what it parses to.

Theory of operation. A reference is ``scheme:locator``: ``file:/run/secrets/pin``,
``env:HSM_PIN``, ``aws-sm:prod/hsm-proxy/pin`` (or an ARN). :func:`parse_reference` turns
one into a :class:`SecretRef`: the source it names (one class per scheme, registered in
:data:`SCHEMES`) and what the secret is for. It is strict: an unknown scheme, an empty or
malformed locator is a :class:`~proxy.errors.ConfigError` that names the config key and
lists the known schemes, and quotes nothing of a private secret's reference (it may be a
PIN typed where its place should be). Where the config always took a path (a certificate,
a CA bundle, ticket keys), text without a scheme still means a file; a relative path is
taken relative to the config file's directory, with or without ``file:``. A relative file
name with a colon before any ``/`` reads as a scheme: write it ``./name``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from proxy.errors import ConfigError
from proxy.secrets.aws import AWSSecretSource
from proxy.secrets.env import EnvSource
from proxy.secrets.file import FileSource
from proxy.secrets.source import SecretSource, Watch

# Each scheme and how its locator becomes a source (relative paths against the base).
SCHEMES: dict[str, Callable[[str, Path], SecretSource]] = {
    FileSource.scheme: FileSource.from_locator,
    EnvSource.scheme: EnvSource.from_locator,
    AWSSecretSource.scheme: AWSSecretSource.from_locator,
}

# What kinds of secret must sit in private files (a certificate chain is public).
PRIVATE_SECRETS = frozenset({"PIN", "session-ticket key"})

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")


@dataclass(frozen=True, init=False)
class SecretRef:
    """A secret's source and what the secret is for (``what``: "PIN", "certificate
    chain", ...). Never a value.

    Made by :func:`parse_reference`, or from a source, or with the historical keywords:
    exactly one of ``file``, ``env`` or ``aws`` (``SecretRef(file=path, what=...)``).
    """

    source: SecretSource
    what: str
    # Secret files (PIN, ticket keys) that group or others may read or write are refused
    # unless security.allow_insecure_secret_files says so; certificates are public.
    allow_insecure_permissions: bool = field(compare=False)

    def __init__(
        self,
        source: SecretSource | None = None,
        *,
        file: Path | None = None,
        env: str | None = None,
        aws: str | None = None,
        what: str = "PIN",
        allow_insecure_permissions: bool = False,
    ) -> None:
        given: list[SecretSource] = [
            each
            for each in (
                source,
                None if file is None else FileSource(Path(file)),
                None if env is None else EnvSource(env),
                None if aws is None else AWSSecretSource(aws),
            )
            if each is not None
        ]
        if len(given) != 1:
            raise TypeError("a SecretRef needs exactly one of source, file, env or aws")
        object.__setattr__(self, "source", given[0])
        object.__setattr__(self, "what", what)
        object.__setattr__(self, "allow_insecure_permissions", allow_insecure_permissions)

    @property
    def private(self) -> bool:
        """Whether a file holding this secret must be private to its owner."""
        return self.what in PRIVATE_SECRETS and not self.allow_insecure_permissions

    @property
    def reference(self) -> str:
        """The reference form, ``scheme:locator`` (never a value)."""
        return f"{self.source.scheme}:{self.source.locator}"

    @property
    def file(self) -> Path | None:
        """The path, when the secret is in a file (for messages that name the file)."""
        return self.source.path if isinstance(self.source, FileSource) else None

    def describe(self) -> str:
        return self.source.describe(self.what)

    def watch(self) -> Watch:
        return self.source.watch()

    def __str__(self) -> str:
        return self.describe()


# The PIN reference kept its historical name; it is a SecretRef like the others.
PinSource = SecretRef


def known_schemes() -> str:
    """The schemes a reference may use, for messages: "file:, env:, aws-sm:"."""
    return ", ".join(f"{scheme}:" for scheme in SCHEMES)


def parse_reference(
    text: str,
    *,
    what: str,
    base: Path,
    key: str = "secret reference",
    plain_path: bool = True,
    allow_insecure_permissions: bool = False,
) -> SecretRef:
    """The :class:`SecretRef` that ``text`` (``scheme:locator``) names, for ``what``.

    ``key`` names the config key in errors; ``base`` is the directory relative file paths
    are taken from; ``plain_path``: text without a scheme is a file path (else an error).
    """
    match = _SCHEME.match(text)
    if match is None:
        if not plain_path:
            raise ConfigError(
                f"{key}: needs a reference to where the {what} is (SCHEME:LOCATION, with "
                f"one of the schemes {known_schemes()}), never the {what} itself"
            )
        scheme, locator, where = FileSource.scheme, text, f"{key}:"
    else:
        scheme, locator = match.group(1), text[match.end() :]
        where = f"{key}: {scheme}:"
    make = SCHEMES.get(scheme)
    if make is None:
        # A private secret's text may be the secret itself, typed in the wrong place.
        named = "" if what in PRIVATE_SECRETS else f" {scheme!r}"
        hint = (
            "; a path without a scheme is a file: write ./NAME for a relative file whose "
            "name has a colon"
            if plain_path
            else ""
        )
        raise ConfigError(f"{key}: unknown secret scheme{named} (known: {known_schemes()}{hint})")
    return SecretRef(
        source_of(make, locator, base, where),
        what=what,
        allow_insecure_permissions=allow_insecure_permissions,
    )


def source_of(
    make: Callable[[str, Path], SecretSource], locator: str, base: Path, where: str
) -> SecretSource:
    """``make(locator, base)``, a ConfigError it raises prefixed with ``where`` (the key)."""
    try:
        return make(locator, base)
    except ConfigError as exc:
        raise ConfigError(f"{where} {exc}") from None
