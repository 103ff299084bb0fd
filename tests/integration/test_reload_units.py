"""Reload pieces without a server: config keys, ticket key sizes, SNI routing, expiry
warnings, and generations retired only when their last handshake is done (real token)."""

from __future__ import annotations

import datetime
import secrets
from pathlib import Path

import pytest
import trustme
from OpenSSL import SSL

from proxy.config import load_config
from proxy.errors import ConfigError, LoginError, SecretError
from proxy.generation.build import build_generation
from proxy.generation.holder import GenerationHolder
from proxy.generation.model import expiry_warnings
from proxy.pkcs11.keys import Mechanism, SignatureEvent
from proxy.secrets.store import SecretRef, SecretStore
from proxy.tls.context import SNIRouter
from proxy.tls.tickets import parse_ticket_key
from tests.support import HSM, TOKEN_PIN, dev_ca, write_config


def _ignore(_event: SignatureEvent) -> None:
    return None


@pytest.mark.parametrize("size", [0, 48, 79, 81, 96])
def test_ticket_keys_of_any_other_size_than_80_are_refused(size: int) -> None:
    with pytest.raises(SecretError, match=f"is {size} bytes; a session-ticket key is exactly 80"):
        parse_ticket_key(secrets.token_bytes(size), "ticket file t.key")


def test_ticket_key_parts_are_split_exactly_and_never_shown() -> None:
    raw = bytes(range(80))
    key = parse_ticket_key(raw, "t")
    assert (key.name, key.hmac_key, key.aes_key) == (raw[:16], raw[16:48], raw[48:])
    assert raw[16:48].hex() not in repr(key)
    assert "hmac_key" not in repr(key)


def test_sni_router_prefers_exact_names_then_one_label_wildcards() -> None:
    exact, wild = SSL.Context(SSL.TLS_SERVER_METHOD), SSL.Context(SSL.TLS_SERVER_METHOD)
    router = SNIRouter({"api.example.com": exact}, {"example.com": wild})
    assert router.pick("API.example.com.") is exact
    assert router.pick("www.example.com") is wild
    assert router.pick("a.b.example.com") is None
    assert router.pick("example.com") is None


def _config_text(tmp_path: Path, tls: str, extra: str = "") -> Path:
    path = tmp_path / "proxy.toml"
    path.write_text(
        'upstream = "http://127.0.0.1:8080"\n[token]\nmodule = "m.so"\npin_file = "pin"\n'
        f'[tls]\nkey = "pkcs11:token=proxy;object=web"\n{tls}\n{extra}'
    )
    return path


def test_new_config_keys_parse_into_secret_references(tmp_path: Path) -> None:
    config = load_config(
        _config_text(
            tmp_path,
            'certificate_aws_secret = "prod/chain"\n'
            'session_ticket_keys = ["t1.key", "/abs/t2.key"]\n'
            'session_ticket_keys_aws_secrets = ["prod/ticket"]\n'
            '[[tls.sni]]\ncertificate = "api.pem"\nkey = "pkcs11:token=proxy;object=api"\n'
            'names = ["api.example.com"]\n',
            "[reload]\nwatch_interval = 0.5\nexpiry_warning_days = 14\n"
            '[aws]\nregion = "eu-west-1"\n',
        )
    )
    assert config.tls.certificate == SecretRef(aws="prod/chain", what="certificate chain")
    assert config.tls.certificate_ref() is config.tls.certificate
    assert [ref.reference for ref in config.tls.session_ticket_keys] == [
        f"file:{tmp_path / 't1.key'}",
        "file:/abs/t2.key",
        "aws-sm:prod/ticket",
    ]
    assert config.tls.sni[0].certificate.file == tmp_path / "api.pem"
    assert config.tls.sni[0].names == ("api.example.com",)
    assert config.reload.watch_interval == 0.5
    assert config.reload.expiry_warning_days == 14
    assert config.aws.region == "eu-west-1"
    assert len(config.secrets()) == 6


@pytest.mark.parametrize(
    ("tls", "extra", "message"),
    [
        ("", "", "tls: set exactly one of certificate"),
        ('certificate = "a.pem"\ncertificate_aws_secret = "x"\n', "", "set exactly one of"),
        ('certificate = "a.pem"\nsession_ticket_keys = "t.key"\n', "", "expected a list"),
        ('certificate = "a.pem"\nsession_ticket_keys = [1]\n', "", "item 1 is int"),
        ('certificate = "a.pem"\n[[tls.sni]]\nkey = "pkcs11:object=x"\n', "", "tls.sni[1]: set"),
        ('certificate = "a.pem"\n', "[reload]\nwatch_interval = 0\n", "reload.watch_interval"),
        ('certificate = "a.pem"\n', '[aws]\nprofile = "x"\n', "aws.profile: unknown key"),
    ],
)
def test_bad_reload_config_names_the_key(
    tmp_path: Path, tls: str, extra: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(_config_text(tmp_path, tls, extra))


def test_two_pin_sources_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "proxy.toml"
    path.write_text(
        'upstream = "http://127.0.0.1:8080"\n[token]\nmodule = "m.so"\npin_file = "pin"\n'
        'pin_aws_secret = "p"\n[tls]\ncertificate = "a.pem"\nkey = "pkcs11:object=web"\n'
    )
    with pytest.raises(ConfigError, match="pin_file and pin_aws_secret both give the PIN"):
        load_config(path)


def test_file_versions_change_on_rename_over_and_on_rewrite(tmp_path: Path) -> None:
    store = SecretStore()
    ref = SecretRef(file=tmp_path / "pin")
    missing = store.version(ref)
    (tmp_path / "pin").write_text("1234\n")
    first = store.version(ref)
    assert first != missing
    (tmp_path / "pin.new").write_text("5678\n")
    (tmp_path / "pin.new").replace(tmp_path / "pin")
    assert store.version(ref) != first
    assert store.read(ref) == b"5678\n"


def test_generations_are_retired_only_after_their_last_handshake(
    tmp_path: Path, hsm: HSM, ca: trustme.CA
) -> None:
    config = load_config(write_config(tmp_path, hsm, ca, "http://127.0.0.1:9", "ec256"))
    first = build_generation(config, _ignore)
    holder = GenerationHolder(first)
    try:
        in_handshake = holder.acquire()
        # Second login in this process: the PIN is proven by a child process.
        second = build_generation(config, _ignore, 2, previous=first)
        holder.swap(second)
        assert holder.current is second
        assert len(in_handshake.key.sign(Mechanism.ECDSA, b"\x01" * 32)) == 64  # still usable
        holder.release(in_handshake)
        with pytest.raises(Exception, match="has been closed"):
            in_handshake.key.sign(Mechanism.ECDSA, b"\x01" * 32)
        assert len(second.key.sign(Mechanism.ECDSA, b"\x02" * 32)) == 64  # login kept
    finally:
        holder.close()


def test_a_wrong_pin_is_refused_while_this_process_is_logged_in(
    tmp_path: Path, hsm: HSM, ca: trustme.CA
) -> None:
    wrong = tmp_path / "wrong-pin"
    wrong.write_text("not-" + TOKEN_PIN + "\n")
    good = load_config(write_config(tmp_path, hsm, ca, "http://127.0.0.1:9", "ec256"))
    bad = load_config(
        write_config(tmp_path, hsm, ca, "http://127.0.0.1:9", "ec256", pin_file=wrong)
    )
    holder = GenerationHolder(build_generation(good, _ignore))
    try:
        with pytest.raises(LoginError) as caught:
            build_generation(bad, _ignore, 2)
        assert str(caught.value) == (
            f"PIN file {wrong}: login failed: login to token 'proxy' failed: the PIN is incorrect"
        )
        assert TOKEN_PIN not in str(caught.value)
        assert len(holder.current.key.sign(Mechanism.ECDSA, b"\x03" * 32)) == 64
    finally:
        holder.close()


def test_expiry_warning_names_the_certificate_and_the_days_left(
    tmp_path: Path, hsm: HSM, ca: trustme.CA
) -> None:
    chain = tmp_path / "chain-ec256.pem"
    config = load_config(write_config(tmp_path, hsm, ca, "http://127.0.0.1:9", "ec256"))
    chain.write_bytes(dev_ca(ca).issue(hsm.public_keys["ec256"], ["localhost"], days=20))
    generation = build_generation(config, _ignore)
    try:
        now = datetime.datetime.now(datetime.UTC)
        assert expiry_warnings(generation, 10, now) == []
        (line,) = expiry_warnings(generation, 30, now)
        assert line.startswith(f"certificate {chain} (CN=localhost) expires on ")
        assert "in 19 days (warning threshold: 30 days)" in line
    finally:
        generation.close()
