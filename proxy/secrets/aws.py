"""Secrets in AWS Secrets Manager: ``aws-sm:prod/hsm-proxy/pin`` (a secret name or ARN),
or one field of a JSON secret: ``aws-sm:prod/hsm#pin``.

Theory of operation. A secret's version is the VersionId staged ``AWSCURRENT``, from
``DescribeSecret`` (which carries no secret value); the reloader polls it every
``reload.aws_poll_interval``. The value is fetched with ``GetSecretValue`` for that very
version, only when a generation is built: ``SecretBinary`` as is, ``SecretString`` as
UTF-8. With ``#FIELD`` the ``SecretString`` must be a JSON object (what the AWS console's
key/value editor stores) whose member ``FIELD`` is a string, and that string (as UTF-8) is
the secret; a missing field, a non-string value, a binary or non-JSON secret, or a field
named twice is an error that names the secret and the field, never a value. The version is
the whole secret's, so any change to the secret rebuilds. Credentials and region come
from boto3's normal chain (environment, profile, instance or task role); ``[aws]`` in the
config may set the region and an endpoint URL (:class:`AWSSettings`). boto3 is imported
on first use only, so a proxy without AWS secrets does not need it. Errors name the secret
and the failed call (and AWS's error code), never a value.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from proxy.errors import ConfigError, SecretError
from proxy.secrets.source import POLL_AWS, ReadContext, Watch

# Secret names: letters, digits and /_+=.@- (AWS's own rule); an ARN adds ':'.
_SECRET_ID = re.compile(r"[A-Za-z0-9/_+=.@:-]{1,2048}")
# A field name: anything printable but '#', as the console's key/value editor allows.
_FIELD = re.compile(r"[^\x00-\x1f\x7f#]{1,1024}")
_NO_BOTO3 = (
    "an AWS Secrets Manager secret is configured but boto3 is not installed; install "
    "hsm-proxy with the 'aws' extra (pip install 'hsm-proxy[aws]')"
)


@dataclass(frozen=True)
class AWSSettings:
    """Where Secrets Manager is: ``None`` fields fall back to boto3's own chain."""

    region: str | None = None
    endpoint_url: str | None = None


class SecretsManagerClient:
    """The one Secrets Manager client of a store, made on first use, remade when the
    settings change (a reload may change ``[aws]``)."""

    def __init__(self, settings: AWSSettings | None = None) -> None:
        self._settings = settings or AWSSettings()
        self._client: Any = None
        self._lock = threading.Lock()

    def configure(self, settings: AWSSettings) -> None:
        with self._lock:
            if settings != self._settings:
                self._settings = settings
                self._client = None

    def get(self) -> Any:
        with self._lock:
            if self._client is None:
                try:
                    import boto3
                except ImportError:
                    raise SecretError(_NO_BOTO3) from None
                self._client = boto3.session.Session().client(
                    "secretsmanager",
                    region_name=self._settings.region,
                    endpoint_url=self._settings.endpoint_url,
                )
            return self._client


@dataclass(frozen=True)
class AWSSecretSource:
    secret_id: str
    field: str | None = None  # one member of a JSON SecretString (``#FIELD``)

    scheme: ClassVar[str] = "aws-sm"
    line_break_allowed: ClassVar[bool] = False

    @classmethod
    def from_locator(cls, locator: str, base: Path) -> AWSSecretSource:
        """``locator`` is a secret name or ARN, optionally ``#FIELD`` (``base`` is not
        used)."""
        secret_id, hash_sign, field = locator.partition("#")
        if _SECRET_ID.fullmatch(secret_id) is None:
            raise ConfigError(
                "needs an AWS Secrets Manager secret name or ARN (letters, digits and "
                "/_+=.@-:, at most 2048), optionally followed by #FIELD"
            )
        if hash_sign and _FIELD.fullmatch(field) is None:
            raise ConfigError(
                "needs a field name after '#' (1 to 1024 characters, no control character "
                "and no second '#'), the key of one member of the secret's JSON object"
            )
        return cls(secret_id, field if hash_sign else None)

    @property
    def locator(self) -> str:
        return self.secret_id if self.field is None else f"{self.secret_id}#{self.field}"

    def describe(self, what: str) -> str:
        where = f"{what} in AWS Secrets Manager secret {self.secret_id!r}"
        return where if self.field is None else f"{where}, field {self.field!r}"

    def _call(self, context: ReadContext, operation: str, **arguments: Any) -> dict[str, Any]:
        try:
            from botocore.exceptions import BotoCoreError, ClientError
        except ImportError:
            raise SecretError(_NO_BOTO3) from None
        where = self.describe(context.what)
        try:
            client = context.clients.secrets_manager()
            result: dict[str, Any] = getattr(client, operation)(**arguments)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "error")
            raise SecretError(f"{where}: {operation} failed: {code}") from None
        except BotoCoreError as exc:
            # botocore's messages name endpoints and missing credentials, never values.
            raise SecretError(f"{where}: {operation} failed: {exc}") from None
        return result

    def version(self, context: ReadContext) -> Hashable:
        return ("aws", self._current_version(context))

    def _current_version(self, context: ReadContext) -> str:
        described = self._call(context, "describe_secret", SecretId=self.secret_id)
        for version, stages in (described.get("VersionIdsToStages") or {}).items():
            if "AWSCURRENT" in stages:
                return str(version)
        raise SecretError(f"{self.describe(context.what)} has no version staged AWSCURRENT")

    def read(self, context: ReadContext) -> bytes:
        version = self._current_version(context)
        answer = self._call(context, "get_secret_value", SecretId=self.secret_id, VersionId=version)
        where = self.describe(context.what)
        if self.field is not None:
            if answer.get("SecretString") is None:
                raise SecretError(
                    f"{where}: the secret has no SecretString (a binary secret has no fields)"
                )
            return select_field(str(answer["SecretString"]), self.field, where)
        if answer.get("SecretBinary") is not None:
            return bytes(answer["SecretBinary"])
        if answer.get("SecretString") is not None:
            return str(answer["SecretString"]).encode("utf-8")
        raise SecretError(f"{where} has neither SecretString nor SecretBinary")

    def watch(self) -> Watch:
        return Watch(POLL_AWS)


_JSON_TYPES = {dict: "an object", list: "an array", bool: "a boolean", type(None): "null"}


def select_field(text: str, field: str, where: str) -> bytes:
    """The string member ``field`` of the JSON object ``text``, as UTF-8; the errors name
    the field and what is wrong, never the secret's text or a member's value."""
    duplicated: list[str] = []

    def members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        # The outermost object is decoded last: what is left here is its duplicates.
        names = [name for name, _ in pairs]
        duplicated[:] = [name for name in set(names) if names.count(name) > 1]
        return dict(pairs)

    try:
        document = json.loads(text, object_pairs_hook=members)
    except ValueError:  # the decoder's message may quote the text: not repeated
        raise SecretError(
            f"{where}: the secret's SecretString is not JSON, so it has no field {field!r}"
        ) from None
    if not isinstance(document, dict):
        raise SecretError(
            f"{where}: the secret's SecretString is JSON but not an object, so it has no "
            f"field {field!r}"
        )
    if field not in document:
        known = ", ".join(repr(name) for name in sorted(document)) or "none"
        raise SecretError(f"{where}: the secret has no field {field!r} (its fields: {known})")
    if field in duplicated:
        raise SecretError(f"{where}: the secret names field {field!r} more than once")
    value = document[field]
    if not isinstance(value, str):
        kind = _JSON_TYPES.get(type(value), "a number")
        raise SecretError(f"{where}: the field's value is {kind}, not a string")
    return value.encode("utf-8")
