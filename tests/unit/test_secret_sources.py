"""Secret sources and the reference form, no token needed: the parser and its errors, each
source (tmp files, environment variables, a stand-in Secrets Manager client), the store's
dispatch through the protocol, and the config keys that take references."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
from botocore.exceptions import ClientError, NoRegionError

from proxy.config import ProxyConfig, parse_config
from proxy.errors import ConfigError, SecretError
from proxy.secrets.aws import AWSSecretSource, select_field
from proxy.secrets.env import EnvSource
from proxy.secrets.file import FileSource
from proxy.secrets.reference import SCHEMES, SecretRef, parse_reference
from proxy.secrets.source import POLL_AWS, POLL_FILES, ReadContext, SecretSource, Watch
from proxy.secrets.store import PinSource, SecretStore, read_pin

BASE = Path("/etc/hsm-proxy")


def _parse(text: str, what: str = "certificate chain", **options: Any) -> SecretRef:
    return parse_reference(text, what=what, base=BASE, key="tls.certificate", **options)


def _refused(text: str, what: str = "certificate chain", **options: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        _parse(text, what, **options)
    return str(caught.value)


# --- the reference form --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "source"),
    [
        ("file:/run/secrets/chain.pem", FileSource(Path("/run/secrets/chain.pem"))),
        ("file:chain.pem", FileSource(BASE / "chain.pem")),
        ("file:../tls/chain.pem", FileSource(BASE / "../tls/chain.pem")),
        ("/run/secrets/chain.pem", FileSource(Path("/run/secrets/chain.pem"))),
        ("chain.pem", FileSource(BASE / "chain.pem")),
        ("./odd:name.pem", FileSource(BASE / "odd:name.pem")),
        ("env:HSM_CHAIN", EnvSource("HSM_CHAIN")),
        ("env:_x9", EnvSource("_x9")),
        ("aws-sm:prod/hsm-proxy/chain", AWSSecretSource("prod/hsm-proxy/chain")),
        (
            "aws-sm:arn:aws:secretsmanager:eu-west-1:123456789012:secret:prod/chain-AbCdEf",
            AWSSecretSource(
                "arn:aws:secretsmanager:eu-west-1:123456789012:secret:prod/chain-AbCdEf"
            ),
        ),
        ("aws-sm:prod/hsm#chain", AWSSecretSource("prod/hsm", "chain")),
        ("aws-sm:prod/hsm#tls chain.pem", AWSSecretSource("prod/hsm", "tls chain.pem")),
    ],
)
def test_references_name_their_source(text: str, source: SecretSource) -> None:
    ref = _parse(text)
    assert ref.source == source
    assert ref.what == "certificate chain"
    # The canonical form names the same secret again.
    assert _parse(ref.reference) == ref


def test_the_reference_form_is_what_the_historical_keywords_build() -> None:
    assert _parse("file:chain.pem") == SecretRef(file=BASE / "chain.pem", what="certificate chain")
    assert _parse("env:CHAIN") == SecretRef(env="CHAIN", what="certificate chain")
    assert _parse("aws-sm:prod/chain") == SecretRef(aws="prod/chain", what="certificate chain")
    with pytest.raises(TypeError, match="exactly one of source, file, env or aws"):
        SecretRef(file=Path("a"), env="B")
    with pytest.raises(TypeError, match="exactly one of source, file, env or aws"):
        SecretRef()


def test_a_reference_describes_its_secret_and_how_to_watch_it() -> None:
    pin = parse_reference("file:pin", what="PIN", base=BASE)
    assert pin.describe() == str(pin) == f"PIN file {BASE / 'pin'}"
    assert pin.file == BASE / "pin"
    assert pin.private
    assert pin.watch() == Watch(POLL_FILES, BASE)
    variable = parse_reference("env:HSM_PIN", what="PIN", base=BASE)
    assert variable.describe() == "PIN variable $HSM_PIN"
    assert variable.file is None
    assert variable.watch() == Watch(None)
    aws = parse_reference("aws-sm:prod/pin", what="PIN", base=BASE)
    assert aws.describe() == "PIN in AWS Secrets Manager secret 'prod/pin'"
    assert aws.watch() == Watch(POLL_AWS)
    field = parse_reference("aws-sm:prod/hsm#pin", what="PIN", base=BASE)
    assert field.describe() == "PIN in AWS Secrets Manager secret 'prod/hsm', field 'pin'"
    assert field.reference == "aws-sm:prod/hsm#pin"
    assert field != parse_reference("aws-sm:prod/hsm#other", what="PIN", base=BASE)
    assert not _parse("chain.pem").private  # a certificate chain is public
    loose = parse_reference("pin", what="PIN", base=BASE, allow_insecure_permissions=True)
    assert not loose.private
    assert loose == pin  # the permission setting is not part of the secret's identity


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "flie:/etc/chain.pem",
            "tls.certificate: unknown secret scheme 'flie' (known: file:, env:, aws-sm:; a "
            "path without a scheme is a file: write ./NAME for a relative file whose name has "
            "a colon)",
        ),
        ("FILE:/etc/chain.pem", "tls.certificate: unknown secret scheme 'FILE'"),
        ("odd:name.pem", "tls.certificate: unknown secret scheme 'odd'"),
        (
            "",
            "tls.certificate: needs a path: /absolute/path, or relative/path (to the config "
            "file's directory)",
        ),
        ("file:", "tls.certificate: file: needs a path: /absolute/path"),
        (
            "file:///etc/chain.pem",
            "tls.certificate: file: write file:/absolute/path or file:relative/path, not a "
            "file:// URL",
        ),
        ("chain\0.pem", "tls.certificate: a file path cannot contain a NUL character"),
        (
            "env:",
            "tls.certificate: env: needs the name of an environment variable (letters, digits "
            "and _, not starting with a digit), never a value",
        ),
        ("env:9LIVES", "tls.certificate: env: needs the name of an environment variable"),
        ("env:MY-CHAIN", "tls.certificate: env: needs the name of an environment variable"),
        ("env:$CHAIN", "never a value (write the name without $)"),
        (
            "aws-sm:",
            "tls.certificate: aws-sm: needs an AWS Secrets Manager secret name or ARN (letters, "
            "digits and /_+=.@-:, at most 2048)",
        ),
        ("aws-sm:prod chain", "tls.certificate: aws-sm: needs an AWS Secrets Manager secret"),
        ("aws-sm:" + "x" * 2049, "tls.certificate: aws-sm: needs an AWS Secrets Manager secret"),
        ("aws-sm:#chain", "tls.certificate: aws-sm: needs an AWS Secrets Manager secret"),
        (
            "aws-sm:prod/hsm#",
            "tls.certificate: aws-sm: needs a field name after '#' (1 to 1024 characters, no "
            "control character and no second '#')",
        ),
        ("aws-sm:prod/hsm#a#b", "tls.certificate: aws-sm: needs a field name after '#'"),
        ("aws-sm:prod/hsm#a\tb", "tls.certificate: aws-sm: needs a field name after '#'"),
    ],
)
def test_bad_references_are_refused_naming_the_key(text: str, message: str) -> None:
    assert message in _refused(text)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "secret-pin-4821",
            "token.pin: needs a reference to where the PIN is (SCHEME:LOCATION, with one of "
            "the schemes file:, env:, aws-sm:), never the PIN itself",
        ),
        ("/run/secrets/pin-4821", "token.pin: needs a reference to where the PIN is"),
        ("pin:4821", "token.pin: unknown secret scheme (known: file:, env:, aws-sm:)"),
        ("env:4821", "token.pin: env: needs the name of an environment variable"),
        ("aws-sm:pin 4821", "token.pin: aws-sm: needs an AWS Secrets Manager secret name"),
    ],
)
def test_a_pin_reference_needs_a_scheme_and_errors_never_repeat_it(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_reference(text, what="PIN", base=BASE, key="token.pin", plain_path=False)
    assert message in str(caught.value)
    assert "4821" not in str(caught.value)


def test_every_scheme_has_a_source_class_with_that_scheme() -> None:
    for scheme, make in SCHEMES.items():
        locator = {"file": "/x", "env": "X", "aws-sm": "x"}[scheme]
        source = make(locator, BASE)
        assert source.scheme == scheme
        assert source.locator == locator


# --- files ---------------------------------------------------------------------------------


def _store_ref(path: Path, what: str = "PIN", **options: Any) -> SecretRef:
    return SecretRef(file=path, what=what, **options)


def test_file_version_follows_rewrites_renames_and_removal(tmp_path: Path) -> None:
    store = SecretStore()
    ref = _store_ref(tmp_path / "pin")
    missing = store.version(ref)
    assert missing == ("missing", 2)
    (tmp_path / "pin").write_text("1234\n")
    first = store.version(ref)
    assert first != missing
    assert store.version(ref) == first  # nothing moved, nothing changed
    (tmp_path / "pin.new").write_text("5678\n")
    os.replace(tmp_path / "pin.new", tmp_path / "pin")
    second = store.version(ref)
    assert second != first
    with (tmp_path / "pin").open("a") as handle:
        handle.write("9")
    assert store.version(ref) != second
    assert store.read(ref) == b"5678\n9"
    (tmp_path / "pin").unlink()
    assert store.version(ref) == missing


def test_file_version_follows_a_kubernetes_symlink_swap(tmp_path: Path) -> None:
    store = SecretStore()
    (tmp_path / "..v1").mkdir()
    (tmp_path / "..v1" / "pin").write_text("1234\n")
    (tmp_path / "..data").symlink_to("..v1")
    (tmp_path / "pin").symlink_to("..data/pin")
    ref = _store_ref(tmp_path / "pin")
    first = store.version(ref)
    (tmp_path / "..v2").mkdir()
    (tmp_path / "..v2" / "pin").write_text("5678\n")
    (tmp_path / "..data_tmp").symlink_to("..v2")
    os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
    assert store.version(ref) != first
    assert store.read(ref) == b"5678\n"


def test_file_errors_name_the_file_and_the_problem(tmp_path: Path) -> None:
    store = SecretStore()
    with pytest.raises(SecretError, match=f"^PIN file {tmp_path / 'none'} does not exist$"):
        store.read(_store_ref(tmp_path / "none"))
    with pytest.raises(SecretError, match=f"^PIN file {tmp_path} is not a regular file$"):
        store.read(_store_ref(tmp_path))
    blocked = tmp_path / "blocked"
    blocked.write_text("x")
    with pytest.raises(SecretError, match=f"^cannot read PIN file {blocked / 'pin'}: Not a dir"):
        store.read(_store_ref(blocked / "pin"))


def test_private_files_must_be_private_unless_allowed(tmp_path: Path) -> None:
    store = SecretStore()
    pin = tmp_path / "pin"
    pin.write_text("1234\n")
    pin.chmod(0o644)
    with pytest.raises(SecretError) as caught:
        store.read(_store_ref(pin))
    assert str(caught.value) == (
        f"PIN file {pin} is readable or writable by other users (mode 0644): run chmod 600 "
        f"{pin}, or set security.allow_insecure_secret_files = true if that is intended"
    )
    assert store.read(_store_ref(pin, allow_insecure_permissions=True)) == b"1234\n"
    assert store.read(_store_ref(pin, what="certificate chain")) == b"1234\n"  # public
    pin.chmod(0o600)
    assert store.read(_store_ref(pin)) == b"1234\n"


# --- environment variables -----------------------------------------------------------------


def test_environment_variable_is_read_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    store = SecretStore()
    ref = SecretRef(env="TEST_SECRET_SOURCE", what="certificate chain")
    monkeypatch.setenv("TEST_SECRET_SOURCE", "line one\nline two\n")
    assert store.read(ref) == b"line one\nline two\n"
    monkeypatch.delenv("TEST_SECRET_SOURCE")
    with pytest.raises(SecretError) as caught:
        store.read(ref)
    assert str(caught.value) == "the certificate chain variable $TEST_SECRET_SOURCE is not set"


def test_environment_version_changes_with_the_value_and_never_shows_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store = SecretStore()
    ref = SecretRef(env="TEST_SECRET_SOURCE")
    unset = store.version(ref)
    monkeypatch.setenv("TEST_SECRET_SOURCE", "4821")
    first = store.version(ref)
    assert first != unset
    assert store.version(ref) == first
    # Neither the value nor its plain digest (a short PIN's would be easy to reverse).
    assert "4821" not in repr(first)
    assert hashlib.sha256(b"4821").hexdigest() not in repr(first)
    monkeypatch.setenv("TEST_SECRET_SOURCE", "4822")
    assert store.version(ref) != first


def test_pin_line_break_is_dropped_only_where_the_source_allows_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "pin").write_text("4821\n")
    assert read_pin(SecretRef(file=tmp_path / "pin")) == "4821"
    monkeypatch.setenv("TEST_SECRET_SOURCE", "4821\n")
    with pytest.raises(SecretError) as caught:
        read_pin(SecretRef(env="TEST_SECRET_SOURCE"))
    assert str(caught.value) == (
        "PIN variable $TEST_SECRET_SOURCE contains a control character (code 10) at position "
        "5; only one trailing line break is allowed in a PIN file"
    )
    monkeypatch.setenv("TEST_SECRET_SOURCE", "")
    with pytest.raises(SecretError, match=r"^PIN variable \$TEST_SECRET_SOURCE is empty$"):
        read_pin(SecretRef(env="TEST_SECRET_SOURCE"))


# --- AWS Secrets Manager (a stand-in client; tests/test_reload_sources.py runs moto) ---------


class FakeSecretsManager:
    """Answers DescribeSecret and GetSecretValue from a dict, and records the calls."""

    def __init__(self, versions: dict[str, list[str]], values: dict[str, dict[str, Any]]) -> None:
        self.versions = versions
        self.values = values
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.fail: str | None = None

    def describe_secret(self, **arguments: Any) -> dict[str, Any]:
        self.calls.append(("describe_secret", arguments))
        if self.fail is not None:
            raise ClientError({"Error": {"Code": self.fail}}, "DescribeSecret")
        return {"Name": arguments["SecretId"], "VersionIdsToStages": self.versions}

    def get_secret_value(self, **arguments: Any) -> dict[str, Any]:
        self.calls.append(("get_secret_value", arguments))
        return self.values[arguments["VersionId"]]


class FakeClients:
    def __init__(self, client: Any) -> None:
        self.client = client

    def secrets_manager(self) -> Any:
        if isinstance(self.client, Exception):
            raise self.client
        return self.client


def _aws(client: Any, what: str = "PIN") -> tuple[AWSSecretSource, ReadContext]:
    return AWSSecretSource("prod/pin"), ReadContext(what, False, FakeClients(client))


def test_aws_version_is_the_awscurrent_version_and_reads_fetch_exactly_it() -> None:
    client = FakeSecretsManager(
        {"v1": ["AWSPREVIOUS"], "v2": ["AWSCURRENT", "AWSPENDING"]},
        {"v2": {"SecretString": "4821"}, "v1": {"SecretString": "old"}},
    )
    source, context = _aws(client)
    assert source.version(context) == ("aws", "v2")
    assert client.calls == [("describe_secret", {"SecretId": "prod/pin"})]
    assert source.read(context) == b"4821"
    assert client.calls[-1] == ("get_secret_value", {"SecretId": "prod/pin", "VersionId": "v2"})
    client.values["v2"] = {"SecretBinary": b"\x00\x01", "SecretString": None}
    assert source.read(context) == b"\x00\x01"


@pytest.mark.parametrize(
    ("versions", "value", "message"),
    [
        (
            {"v1": ["AWSPREVIOUS"]},
            {},
            "PIN in AWS Secrets Manager secret 'prod/pin' has no version staged AWSCURRENT",
        ),
        (
            {"v1": ["AWSCURRENT"]},
            {"v1": {}},
            "PIN in AWS Secrets Manager secret 'prod/pin' has neither SecretString nor "
            "SecretBinary",
        ),
    ],
)
def test_aws_secrets_without_a_current_value_are_refused(
    versions: dict[str, list[str]], value: dict[str, dict[str, Any]], message: str
) -> None:
    source, context = _aws(FakeSecretsManager(versions, value))
    with pytest.raises(SecretError) as caught:
        source.read(context)
    assert str(caught.value) == message


def test_aws_call_failures_name_the_secret_the_call_and_the_code() -> None:
    client = FakeSecretsManager({}, {})
    client.fail = "AccessDeniedException"
    source, context = _aws(client, "certificate chain")
    with pytest.raises(SecretError) as caught:
        source.version(context)
    assert str(caught.value) == (
        "certificate chain in AWS Secrets Manager secret 'prod/pin': describe_secret failed: "
        "AccessDeniedException"
    )
    source, context = _aws(NoRegionError())
    with pytest.raises(SecretError) as caught:
        source.read(context)
    assert str(caught.value) == (
        "PIN in AWS Secrets Manager secret 'prod/pin': describe_secret failed: You must "
        "specify a region."
    )


WHERE = "PIN in AWS Secrets Manager secret 'prod/hsm', field 'pin'"


def test_a_field_of_a_json_secret_is_its_string_value_as_utf8() -> None:
    assert select_field('{"user": "ops", "pin": "4821-\u00e9"}', "pin", WHERE) == (
        "4821-\u00e9".encode()
    )
    # A duplicate elsewhere (another member, a nested object) does not matter.
    assert select_field('{"a": 1, "a": 2, "pin": "x", "n": {"pin": 1, "pin": 2}}', "pin", WHERE)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"user": "ops", "PIN": "4821"}', "has no field 'pin' (its fields: 'PIN', 'user')"),
        ("{}", "has no field 'pin' (its fields: none)"),
        ('{"pin": 4821}', "the field's value is a number, not a string"),
        ('{"pin": 48.21}', "the field's value is a number, not a string"),
        ('{"pin": null}', "the field's value is null, not a string"),
        ('{"pin": true}', "the field's value is a boolean, not a string"),
        ('{"pin": ["4821"]}', "the field's value is an array, not a string"),
        ('{"pin": {"v": "4821"}}', "the field's value is an object, not a string"),
        ('{"pin": "4821", "pin": "9999"}', "the secret names field 'pin' more than once"),
        ("4821", "the secret's SecretString is JSON but not an object"),
        ('["4821"]', "the secret's SecretString is JSON but not an object"),
        ("pin=4821", "the secret's SecretString is not JSON, so it has no field 'pin'"),
    ],
)
def test_a_field_that_is_missing_or_not_a_string_is_refused_without_its_value(
    text: str, message: str
) -> None:
    with pytest.raises(SecretError) as caught:
        select_field(text, "pin", WHERE)
    assert str(caught.value).startswith(f"{WHERE}: ")
    assert message in str(caught.value)
    assert "4821" not in str(caught.value)


def test_the_store_lends_aws_sources_its_one_client(monkeypatch: pytest.MonkeyPatch) -> None:
    client = FakeSecretsManager({"v7": ["AWSCURRENT"]}, {"v7": {"SecretString": "chain"}})
    store = SecretStore()
    monkeypatch.setattr(store, "secrets_manager", lambda: client)
    ref = SecretRef(aws="prod/pin", what="certificate chain")
    assert store.version(ref) == ("aws", "v7")
    assert store.read(ref) == b"chain"


# --- the store reads through the protocol ----------------------------------------------------


@dataclass(frozen=True)
class VaultLikeSource:
    """A source the store was never told about: the protocol is all it needs."""

    path: str

    scheme: ClassVar[str] = "test-vault"
    line_break_allowed: ClassVar[bool] = False
    contexts: ClassVar[list[ReadContext]] = []

    @property
    def locator(self) -> str:
        return self.path

    def describe(self, what: str) -> str:
        return f"{what} in the test vault at {self.path}"

    def version(self, context: ReadContext) -> Hashable:
        self.contexts.append(context)
        return ("vault", 3)

    def read(self, context: ReadContext) -> bytes:
        self.contexts.append(context)
        return b"4821"

    def watch(self) -> Watch:
        return Watch(POLL_AWS)


def test_the_store_and_read_pin_dispatch_through_the_source() -> None:
    store = SecretStore()
    ref = SecretRef(VaultLikeSource("kv/pin"), what="PIN")
    assert store.version(ref) == ("vault", 3)
    assert read_pin(ref, store) == "4821"
    assert ref.describe() == "PIN in the test vault at kv/pin"
    assert ref.reference == "test-vault:kv/pin"
    context = VaultLikeSource.contexts[-1]
    assert (context.what, context.private, context.clients) == ("PIN", True, store)


# --- config keys -----------------------------------------------------------------------------


def _config(token: dict[str, Any] | None = None, **tls: Any) -> ProxyConfig:
    """A config with ``token`` keys (a PIN variable if None) and ``tls`` keys (a certificate
    file unless they give one)."""
    if "certificate_aws_secret" not in tls:
        tls.setdefault("certificate", "chain.pem")
    data: dict[str, Any] = {
        "upstream": "http://127.0.0.1:8080",
        "token": {"module": "m.so", **(token if token is not None else {"pin": "env:PIN"})},
        "tls": {"key": "pkcs11:token=t;object=k", **tls},
    }
    return parse_config(data, base=BASE, source="test")


def _config_error(token: dict[str, Any] | None = None, **tls: Any) -> str:
    with pytest.raises(ConfigError) as caught:
        _config(token, **tls)
    return str(caught.value)


def test_every_secret_key_takes_the_reference_form() -> None:
    config = _config(
        {"pin": "aws-sm:prod/pin"},
        certificate="file:/etc/chain.pem",
        session_ticket_keys=["file:t1.key", "t2.key", "env:TICKET", "aws-sm:prod/ticket"],
        ocsp_response="env:OCSP",
        client_auth={"ca": "aws-sm:prod/ca", "allow_any": True},
        sni=[{"certificate": "aws-sm:prod/api", "key": "pkcs11:object=api"}],
    )
    assert [ref.reference for ref in config.secrets()] == [
        "aws-sm:prod/pin",
        "file:/etc/chain.pem",
        "aws-sm:prod/api",
        f"file:{BASE / 't1.key'}",
        f"file:{BASE / 't2.key'}",
        "env:TICKET",
        "aws-sm:prod/ticket",
        "aws-sm:prod/ca",
        "env:OCSP",
    ]
    assert [ref.what for ref in config.secrets()] == [
        "PIN",
        "certificate chain",
        "certificate chain",
        *["session-ticket key"] * 4,
        "client CA bundle",
        "OCSP response",
    ]
    assert _config({"pin": "file:pin"}).token.pin.file == BASE / "pin"
    assert _config({"pin": "env:HSM_PIN"}).token.pin == SecretRef(env="HSM_PIN")


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ({"token": {"pin_file": "pin"}}, {"token": {"pin": "file:pin"}}),
        ({"token": {"pin_file": "/run/pin"}}, {"token": {"pin": "file:/run/pin"}}),
        ({"token": {"pin_env": "HSM_PIN"}}, {"token": {"pin": "env:HSM_PIN"}}),
        ({"token": {"pin_aws_secret": "prod/pin"}}, {"token": {"pin": "aws-sm:prod/pin"}}),
        ({"certificate_aws_secret": "prod/chain"}, {"certificate": "aws-sm:prod/chain"}),
        (
            {"session_ticket_keys": ["t.key"], "session_ticket_keys_aws_secrets": ["prod/t"]},
            {"session_ticket_keys": ["file:t.key", "aws-sm:prod/t"]},
        ),
        ({"ocsp_response_aws_secret": "prod/ocsp"}, {"ocsp_response": "aws-sm:prod/ocsp"}),
        ({"ocsp_response": "web.der"}, {"ocsp_response": "file:web.der"}),
        (
            {"client_auth": {"ca_aws_secret": "prod/ca", "allow_any": True}},
            {"client_auth": {"ca": "aws-sm:prod/ca", "allow_any": True}},
        ),
        (
            {"sni": [{"certificate_aws_secret": "prod/api", "key": "pkcs11:object=a"}]},
            {"sni": [{"certificate": "aws-sm:prod/api", "key": "pkcs11:object=a"}]},
        ),
    ],
)
def test_the_older_keys_build_the_same_references(old: dict[str, Any], new: dict[str, Any]) -> None:
    def secrets(keys: dict[str, Any]) -> list[SecretRef]:
        tls = {key: value for key, value in keys.items() if key != "token"}
        return _config(keys.get("token"), **tls).secrets()

    assert secrets(old) == secrets(new)
    assert [ref.reference for ref in secrets(old)] == [ref.reference for ref in secrets(new)]


@pytest.mark.parametrize(
    ("token", "tls", "message"),
    [
        (
            {"pin": "env:PIN", "pin_file": "pin"},
            {},
            "token: set exactly one of pin, pin_file, pin_env or pin_aws_secret: pin and "
            "pin_file both give the PIN",
        ),
        ({"pin": "env:PIN", "pin_env": "PIN"}, {}, "token: set exactly one of pin, pin_file"),
        ({"pin": "env:PIN", "pin_aws_secret": "p"}, {}, "pin and pin_aws_secret both give"),
        ({"pin_env": "PIN", "pin_aws_secret": "p"}, {}, "pin_env and pin_aws_secret both give"),
        (
            None,
            {"certificate": "chain.pem", "certificate_aws_secret": "prod/chain"},
            "tls: set exactly one of certificate or certificate_aws_secret: certificate and "
            "certificate_aws_secret both give the certificate chain",
        ),
        (
            None,
            {"ocsp_response": "o.der", "ocsp_response_aws_secret": "o"},
            "tls: set exactly one of ocsp_response or ocsp_response_aws_secret: ocsp_response "
            "and ocsp_response_aws_secret both give the OCSP response",
        ),
        (
            None,
            {"client_auth": {"ca": "ca.pem", "ca_aws_secret": "c", "allow_any": True}},
            "tls.client_auth: set exactly one of ca or ca_aws_secret: ca and ca_aws_secret "
            "both give the client CA bundle",
        ),
        (
            None,
            {
                "sni": [
                    {
                        "certificate": "a.pem",
                        "certificate_aws_secret": "a",
                        "key": "pkcs11:object=a",
                    }
                ]
            },
            "tls.sni[1]: set exactly one of certificate or certificate_aws_secret: certificate "
            "and certificate_aws_secret both give the certificate chain",
        ),
    ],
)
def test_a_secret_given_two_ways_is_refused_naming_both_keys(
    token: dict[str, Any] | None, tls: dict[str, Any], message: str
) -> None:
    assert message in _config_error(token, **tls)


@pytest.mark.parametrize(
    ("token", "tls", "message"),
    [
        ({"pin": "vault:kv/pin"}, {}, "token.pin: unknown secret scheme (known: file:, env:"),
        ({"pin": "1234-5678"}, {}, "token.pin: needs a reference to where the PIN is"),
        ({"pin_env": "$HSM_PIN"}, {}, "token.pin_env: needs the name of an environment"),
        ({"pin_file": ""}, {}, "token.pin_file: needs a path"),
        ({"pin_aws_secret": ""}, {}, "token.pin_aws_secret: needs an AWS Secrets Manager"),
        (None, {"certificate": "vault:kv/chain"}, "tls.certificate: unknown secret scheme 'vault'"),
        (None, {"certificate_aws_secret": "a b"}, "tls.certificate_aws_secret: needs an AWS"),
        (
            None,
            {"session_ticket_keys": ["t.key", "vault:kv/t"]},
            "tls.session_ticket_keys[2]: unknown secret scheme (known:",
        ),
        (
            None,
            {"session_ticket_keys_aws_secrets": ["ok", ""]},
            "tls.session_ticket_keys_aws_secrets[2]: needs an AWS Secrets Manager",
        ),
        (None, {"ocsp_response": "env:"}, "tls.ocsp_response: env: needs the name"),
        (
            None,
            {"client_auth": {"ca": "https://ca.example/ca.pem", "allow_any": True}},
            "tls.client_auth.ca: unknown secret scheme 'https'",
        ),
        (
            None,
            {"sni": [{"certificate": "file:", "key": "pkcs11:object=a"}]},
            "tls.sni[1].certificate: file: needs a path",
        ),
        (
            None,
            {"session_ticket_keys": [1]},
            "tls.session_ticket_keys: expected a list of secret references, item 1 is int",
        ),
    ],
)
def test_bad_references_in_the_config_name_the_key(
    token: dict[str, Any] | None, tls: dict[str, Any], message: str
) -> None:
    text = _config_error(token, **tls)
    assert message in text
    assert "1234" not in text


def test_a_missing_pin_lists_every_key_that_gives_it() -> None:
    assert _config_error({}) == (
        "token: set pin, where the PIN is (SCHEME:LOCATION, with one of the schemes file:, "
        "env:, aws-sm:), or one of the older keys pin_file (a file holding the PIN), pin_env "
        "(the name of an environment variable holding it) or pin_aws_secret (an AWS Secrets "
        "Manager secret id); a PIN value never goes in the config"
    )


def test_security_setting_reaches_private_file_references() -> None:
    data: dict[str, Any] = {
        "upstream": "http://127.0.0.1:8080",
        "token": {"module": "m.so", "pin": "file:pin"},
        "tls": {
            "key": "pkcs11:object=k",
            "certificate": "chain.pem",
            "session_ticket_keys": ["file:t.key"],
        },
        "security": {"allow_insecure_secret_files": True},
    }
    config = parse_config(data, base=BASE, source="test")
    assert not config.token.pin.private
    assert not config.tls.session_ticket_keys[0].private
    del data["security"]
    config = parse_config(data, base=BASE, source="test")
    assert config.token.pin.private
    assert config.tls.session_ticket_keys[0].private


def test_pin_file_keeps_everything_but_one_final_line_break(tmp_path: Path) -> None:
    pin = tmp_path / "pin"
    for content, expected in [
        (b"1234\n", "1234"),
        (b"1234\r\n", "1234"),
        (b"1234", "1234"),
        (b" 12 34 \n", " 12 34 "),
    ]:
        pin.write_bytes(content)
        assert read_pin(PinSource(file=pin)) == expected


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\n", "is empty"),
        (b"12\n\n", "control character (code 10)"),
        (b"\xff\xfe\n", "not valid UTF-8"),
    ],
)
def test_bad_pin_files_are_refused(tmp_path: Path, content: bytes, message: str) -> None:
    pin = tmp_path / "pin"
    pin.write_bytes(content)
    with pytest.raises(SecretError) as caught:
        read_pin(PinSource(file=pin))
    assert message in str(caught.value)


def test_pin_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_HSM_PIN", "9876")
    assert read_pin(PinSource(env="TEST_HSM_PIN")) == "9876"
    monkeypatch.delenv("TEST_HSM_PIN")
    with pytest.raises(SecretError, match=r"\$TEST_HSM_PIN is not set"):
        read_pin(PinSource(env="TEST_HSM_PIN"))
