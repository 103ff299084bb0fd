"""Secret sources: where the PIN, certificate chains and session-ticket keys come from.

Theory of operation. The configuration holds *references* to secrets (:class:`SecretRef`:
a file path, an environment variable name, or an AWS Secrets Manager secret id), never
values. :class:`SecretStore` resolves a reference to its bytes at the moment a generation is
built, and tells cheaply whether a secret changed since (:meth:`SecretStore.version`), so
that the reloader (reload.py) rebuilds only when something moved:

* a file's version is the ``stat`` of what its path resolves to now: device, inode, size,
  modification and change times. Kubernetes updates a mounted secret by swapping the
  ``..data`` symlink to a new directory, so the resolved file is a different inode; Docker
  and editors rewrite in place or rename over, which changes the times or the inode;
* an environment variable cannot change under a running process: it is read at start and
  again on each SIGHUP, and its version never changes by itself;
* an AWS Secrets Manager secret's version is the VersionId staged ``AWSCURRENT``, from
  ``DescribeSecret`` (which carries no secret value); the value itself is fetched with
  ``GetSecretValue`` only when a generation is built. Credentials and region come from
  boto3's normal chain (environment, profile, instance or task role); ``[aws]`` in the
  config may set the region and an endpoint URL.

Secret values never reach a log line, an exception, or a command line. Forms are checked
exactly (PIN: one trailing line break allowed in a file, no other control character, not
empty, UTF-8), never trimmed or padded beyond that.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy.errors import SecretError
from proxy.ops.hardening import check_private_file, remember_secret

# What kinds of secret must sit in private files (a certificate chain is public).
PRIVATE_SECRETS = frozenset({"PIN", "session-ticket key"})


@dataclass(frozen=True)
class SecretRef:
    """Exactly one of ``file``, ``env`` or ``aws`` names where a secret is.

    ``what`` says what the secret is for messages ("PIN", "certificate chain", ...).
    """

    file: Path | None = None
    env: str | None = None
    aws: str | None = None
    what: str = "PIN"
    # Secret files (PIN, ticket keys) that group or others may read or write are refused
    # unless security.allow_insecure_secret_files says so; certificates are public.
    allow_insecure_permissions: bool = field(default=False, compare=False)

    @property
    def private(self) -> bool:
        """Whether a file holding this secret must be private to its owner."""
        return self.what in PRIVATE_SECRETS and not self.allow_insecure_permissions

    def describe(self) -> str:
        if self.file is not None:
            return f"{self.what} file {self.file}"
        if self.env is not None:
            return f"{self.what} variable ${self.env}"
        return f"{self.what} in AWS Secrets Manager secret {self.aws!r}"


# The PIN reference kept its historical name; it is a SecretRef like the others.
PinSource = SecretRef


@dataclass(frozen=True)
class AWSSettings:
    """Where Secrets Manager is: ``None`` fields fall back to boto3's own chain."""

    region: str | None = None
    endpoint_url: str | None = None


class SecretStore:
    """Reads secrets and their versions; one per process, shared by the reloader."""

    def __init__(self, aws: AWSSettings | None = None) -> None:
        self._aws_settings = aws or AWSSettings()
        self._aws_client: Any = None
        self._lock = threading.Lock()

    def configure_aws(self, aws: AWSSettings) -> None:
        with self._lock:
            if aws != self._aws_settings:
                self._aws_settings = aws
                self._aws_client = None

    # -- AWS --------------------------------------------------------------------------------

    def _client(self) -> Any:
        with self._lock:
            if self._aws_client is None:
                try:
                    import boto3
                except ImportError:
                    raise SecretError(
                        "an AWS Secrets Manager secret is configured but boto3 is not "
                        "installed; install hsm-proxy with the 'aws' extra (pip install "
                        "'hsm-proxy[aws]')"
                    ) from None
                self._aws_client = boto3.session.Session().client(
                    "secretsmanager",
                    region_name=self._aws_settings.region,
                    endpoint_url=self._aws_settings.endpoint_url,
                )
            return self._aws_client

    def _aws_call(self, ref: SecretRef, operation: str, **arguments: Any) -> dict[str, Any]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            result: dict[str, Any] = getattr(self._client(), operation)(**arguments)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "error")
            raise SecretError(f"{ref.describe()}: {operation} failed: {code}") from None
        except BotoCoreError as exc:
            # botocore's messages name endpoints and missing credentials, never values.
            raise SecretError(f"{ref.describe()}: {operation} failed: {exc}") from None
        return result

    def _aws_current_version(self, ref: SecretRef) -> str:
        described = self._aws_call(ref, "describe_secret", SecretId=ref.aws)
        for version, stages in (described.get("VersionIdsToStages") or {}).items():
            if "AWSCURRENT" in stages:
                return str(version)
        raise SecretError(f"{ref.describe()} has no version staged AWSCURRENT")

    # -- the two questions the reloader asks -----------------------------------------------

    def version(self, ref: SecretRef) -> Hashable:
        """A cheap marker that changes when the secret does (no secret value in it)."""
        if ref.file is not None:
            try:
                info = ref.file.stat()
            except OSError as exc:
                return ("missing", exc.errno)
            return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)
        if ref.env is not None:
            return ("env", ref.env)
        return ("aws", self._aws_current_version(ref))

    def read(self, ref: SecretRef) -> bytes:
        """The secret's bytes, as stored (no decoding, trimming or padding)."""
        if ref.file is not None:
            return _read_file(ref.file, ref.what, ref.private)
        if ref.env is not None:
            value = os.environ.get(ref.env)
            if value is None:
                raise SecretError(f"the {ref.what} variable ${ref.env} is not set")
            return value.encode("utf-8", "surrogateescape")
        version = self._aws_current_version(ref)
        answer = self._aws_call(ref, "get_secret_value", SecretId=ref.aws, VersionId=version)
        if answer.get("SecretBinary") is not None:
            return bytes(answer["SecretBinary"])
        if answer.get("SecretString") is not None:
            return str(answer["SecretString"]).encode("utf-8")
        raise SecretError(f"{ref.describe()} has neither SecretString nor SecretBinary")


_default_store = SecretStore()


def default_store() -> SecretStore:
    return _default_store


def read_pin(source: SecretRef, store: SecretStore | None = None) -> str:
    """The PIN that ``source`` refers to, checked; errors say what is wrong, not the PIN."""
    raw = (store or _default_store).read(source)
    if source.file is not None:
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


def _read_file(path: Path, what: str, private: bool = False) -> bytes:
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
