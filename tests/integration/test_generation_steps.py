"""The generation pipeline without a server: one step table, run two ways (stop at the first
failure for run and reloads, every step with a row each for check), on a real token."""

from __future__ import annotations

import re
import secrets
from pathlib import Path
from typing import Any

import pytest
import trustme

from proxy.config import ProxyConfig, load_config
from proxy.errors import CertificateError, ConfigError, KeyCustodyError, LoginError
from proxy.generation import steps
from proxy.generation.build import Row, build_generation, check_generation
from proxy.generation.model import Generation, ProcessModel
from proxy.generation.steps import MISSING, STEPS, judge_custody
from proxy.pkcs11.keys import SignatureEvent
from proxy.pkcs11.token import Token
from proxy.tls.tickets import parse_ticket_key
from tests.support import HSM, issue_chain, write_config


def _ignore(_event: SignatureEvent) -> None:
    return None


def _config(
    tmp_path: Path, hsm: HSM, ca: trustme.CA, key: str = "ec256", **options: object
) -> ProxyConfig:
    return load_config(write_config(tmp_path, hsm, ca, "http://127.0.0.1:9", key, **options))  # type: ignore[arg-type]


def _rows(rows: list[Row]) -> dict[str, tuple[str, str]]:
    return {row.name: (row.status, row.detail) for row in rows}


def _wrong_pin(tmp_path: Path) -> Path:
    wrong = tmp_path / "wrong-pin"
    wrong.write_text("wrong-pin-5151\n")
    return wrong


def _break_certificate(config: ProxyConfig) -> Path:
    chain = config.tls.certificate_ref().file
    assert chain is not None
    chain.write_text("not a certificate\n")
    return chain


# -- the table ------------------------------------------------------------------------------


def test_every_need_names_an_earlier_step_that_says_what_its_failure_leaves_missing() -> None:
    names = [step.name for step in STEPS]
    assert len(set(names)) == len(names)
    for index, step in enumerate(STEPS):
        for need in step.needs:
            # "{site}key" or the default site's "key": the need is that step's row;
            # "{token}token" is the row of whichever site's token a site uses.
            need = need.replace("{token}", "{site}")
            template = need if need in names else "{site}" + need
            assert template in names[:index], (step.name, need)
            assert template in MISSING, need


# -- stop at the first failure (run, reload) vs every step (check) --------------------------


def test_a_build_stops_at_the_first_failure_check_reports_every_independent_one(
    tmp_path: Path, hsm: HSM, ca: trustme.CA
) -> None:
    config = _config(tmp_path, hsm, ca, pin_file=_wrong_pin(tmp_path))
    chain = _break_certificate(config)
    signatures: list[SignatureEvent] = []
    with pytest.raises(CertificateError, match=f"certificate chain file {chain}: parse failed"):
        build_generation(config, signatures.append)
    rows = _rows(check_generation(config, signatures.append))
    assert rows["certificate"][0] == "FAIL"
    # The PIN step comes after the certificate: check ran it anyway, and the login failed.
    assert rows["pin"][0] == "ok"
    assert rows["token"] == ("FAIL", "login to token 'proxy' failed: the PIN is incorrect")
    assert signatures == []  # nothing reached the token's keys


def test_check_skips_what_needs_a_failed_step_with_what_is_missing(
    tmp_path: Path, hsm: HSM, ca: trustme.CA
) -> None:
    config = _config(tmp_path, hsm, ca, pin_file=_wrong_pin(tmp_path))
    rows = check_generation(config, _ignore)
    assert [(row.status, row.name) for row in rows] == [
        ("ok", "openssl"),
        ("ok", "certificate"),
        ("ok", "pin"),
        ("FAIL", "token"),
        ("skip", "mechanisms"),
        ("skip", "key"),
        ("skip", "custody"),
        ("skip", "match"),
        ("skip", "tls"),
    ]
    details = _rows(rows)
    assert details["key"][1] == "no token session"
    assert details["custody"][1] == "no token key"
    assert details["match"][1] == "no token key"
    assert details["tls"][1] == "no certificate proven to match its token key"


def test_a_broken_certificate_skips_only_what_uses_it(
    tmp_path: Path, hsm: HSM, ca: trustme.CA
) -> None:
    config = _config(tmp_path, hsm, ca)
    _break_certificate(config)
    rows = _rows(check_generation(config, _ignore))
    assert rows["certificate"][0] == "FAIL"
    assert [rows[name][0] for name in ("token", "key", "custody")] == ["ok", "ok", "ok"]
    assert rows["match"] == ("skip", "no valid certificate")
    assert rows["tls"] == ("skip", "no certificate proven to match its token key")


def test_a_stopped_build_names_the_secret_and_the_step_a_row_shows_the_error(
    tmp_path: Path, hsm: HSM, ca: trustme.CA
) -> None:
    wrong = _wrong_pin(tmp_path)
    config = _config(tmp_path, hsm, ca, pin_file=wrong)
    error = "login to token 'proxy' failed: the PIN is incorrect"
    with pytest.raises(LoginError) as caught:
        build_generation(config, _ignore)
    assert str(caught.value) == f"PIN file {wrong}: login failed: {error}"
    assert _rows(check_generation(config, _ignore))["token"] == ("FAIL", error)
    other = _config(tmp_path, hsm, ca, certificate_for="other")
    with pytest.raises(CertificateError) as mismatch:
        build_generation(other, _ignore)
    message = str(mismatch.value)
    assert message.startswith(
        f"certificate chain file {tmp_path / 'chain-ec256.pem'}: "
        "certificate matches token key failed: "
    )
    status, detail = _rows(check_generation(other, _ignore))["match"]
    assert status == "FAIL"
    assert message.endswith(detail)
    assert not detail.startswith("certificate chain file")


def test_a_stopped_build_runs_nothing_after_the_failure_and_closes_its_token(
    tmp_path: Path, hsm: HSM, ca: trustme.CA, monkeypatch: pytest.MonkeyPatch
) -> None:
    opened: list[Token] = []
    closed: set[int] = set()

    class Recorded(Token):
        def __init__(self, *args: Any, **options: Any) -> None:
            super().__init__(*args, **options)
            opened.append(self)

        def close(self) -> None:
            closed.add(id(self))
            super().close()

    monkeypatch.setattr(steps, "Token", Recorded)
    config = _config(tmp_path, hsm, ca)
    _break_certificate(config)
    with pytest.raises(CertificateError):
        build_generation(config, _ignore)
    assert opened == []  # the PIN and token steps come after the certificate's
    check_generation(config, _ignore)
    assert len(opened) == 1  # check went on past the failure ...
    assert closed == {id(opened[0])}  # ... and closed the token at the end
    mismatched = _config(tmp_path, hsm, ca, certificate_for="other")
    with pytest.raises(CertificateError):
        build_generation(mismatched, _ignore)  # fails after the login
    assert len(opened) == 2
    assert closed == {id(token) for token in opened}


def test_check_rows_are_the_steps_of_a_good_build(tmp_path: Path, hsm: HSM, ca: trustme.CA) -> None:
    config = _config(tmp_path, hsm, ca)
    rows = check_generation(config, _ignore)
    assert {row.status for row in rows} == {"ok"}
    assert [row.name for row in rows] == [
        "openssl",
        "certificate",
        "pin",
        "token",
        "mechanisms",
        "key",
        "custody",
        "match",
        "tls",
    ]
    generation = build_generation(config, _ignore)
    generation.close()


# -- per-site steps (SNI) -------------------------------------------------------------------


def _sni(tmp_path: Path, hsm: HSM, ca: trustme.CA, *sites: tuple[str, str]) -> str:
    """[[tls.sni]] tables: (key, server name) each, with a certificate issued for it."""
    tables = []
    for key, name in sites:
        chain = tmp_path / f"site-{key}-{name}.pem"
        chain.write_bytes(issue_chain(ca, hsm.public_keys[key], (name,)))
        tables.append(f'\n[[tls.sni]]\ncertificate = "{chain}"\nkey = "{hsm.uri(key)}"\n')
    return "".join(tables)


def test_each_sni_site_gets_its_own_rows_and_a_routed_site(
    tmp_path: Path, hsm: HSM, ca: trustme.CA
) -> None:
    sites = _sni(tmp_path, hsm, ca, ("ec384", "api.localhost"), ("rsa2048", "www.localhost"))
    config = _config(tmp_path, hsm, ca, extra_tls=sites)
    rows = _rows(check_generation(config, _ignore))
    for site in ("sni[1]", "sni[2]"):
        for step in ("certificate", "key", "custody", "match", "names", "tls"):
            assert rows[f"{site} {step}"][0] == "ok", (site, step, rows[f"{site} {step}"])
    assert rows["sni[2] names"] == ("ok", "www.localhost")
    generation = build_generation(config, _ignore)
    try:
        assert [site.names for site in generation.sites] == [("api.localhost",), ("www.localhost",)]
        assert [site.key.info.size for site in generation.sites] == ["P-384", "RSA-2048"]
    finally:
        generation.close()


def test_a_name_claimed_twice_fails_that_site_only(
    tmp_path: Path, hsm: HSM, ca: trustme.CA
) -> None:
    sites = _sni(tmp_path, hsm, ca, ("ec384", "api.localhost"), ("rsa2048", "api.localhost"))
    config = _config(tmp_path, hsm, ca, extra_tls=sites)
    rows = _rows(check_generation(config, _ignore))
    assert rows["sni[1] tls"][0] == "ok"
    status, detail = rows["sni[2] names"]
    assert status == "FAIL"
    assert re.search(r"server name 'api.localhost' is claimed by both .*site-ec384", detail)
    assert rows["sni[2] tls"] == ("skip", "no server names for the site")
    assert rows["sni[2] match"][0] == "ok"  # independent of the names
    with pytest.raises(ConfigError, match="is claimed by both"):
        build_generation(config, _ignore)


# -- custody: one verdict for run, reload and check -----------------------------------------


def test_custody_verdict_is_the_one_every_command_acts_on(
    tmp_path: Path, hsm: HSM, ca: trustme.CA, exportable_key: str
) -> None:
    good = build_generation(_config(tmp_path, hsm, ca), _ignore)
    try:
        assert judge_custody(good.key, "refuse").status == "ok"
    finally:
        good.close()
    config = _config(tmp_path, hsm, ca, exportable_key)
    generation = build_generation(config, _ignore)  # "warn", the default: it serves
    try:
        warned = judge_custody(generation.key, "warn")
        refused = judge_custody(generation.key, "refuse")
    finally:
        generation.close()
    assert warned.status == "warn"
    assert warned.warning is not None
    assert "is extractable: its value could leave the token" in warned.warning
    assert (refused.status, refused.warning) == ("FAIL", None)
    assert _rows(check_generation(config, _ignore))["custody"] == ("warn", warned.detail)
    strict = _config(tmp_path, hsm, ca, exportable_key, extra_token='key_custody = "refuse"')
    with pytest.raises(KeyCustodyError) as caught:
        build_generation(strict, _ignore)
    assert str(caught.value) == refused.detail
    rows = _rows(check_generation(strict, _ignore))
    assert rows["custody"] == ("FAIL", refused.detail)
    assert rows["match"][0] == "ok"  # custody is no input of the match


# -- the process model: passed in, not read from below ---------------------------------------


def test_the_workers_shared_ticket_key_reaches_the_build_only_when_none_is_configured(
    tmp_path: Path, hsm: HSM, ca: trustme.CA
) -> None:
    shared = parse_ticket_key(secrets.token_bytes(80), "shared")
    worker = ProcessModel(shared_ticket_key=shared)
    config = _config(tmp_path, hsm, ca)
    built: list[Generation] = []
    try:
        built.append(build_generation(config, _ignore))
        assert not built[-1].ticket_keys
        built.append(build_generation(config, _ignore, 2, process=worker))
        assert list(built[-1].ticket_keys) == [shared]
        ticket_file = tmp_path / "ticket.key"
        ticket_file.write_bytes(secrets.token_bytes(80))
        configured = _config(
            tmp_path, hsm, ca, extra_tls=f'session_ticket_keys = ["{ticket_file}"]\n'
        )
        built.append(build_generation(configured, _ignore, 3, previous=built[-1], process=worker))
        own = parse_ticket_key(ticket_file.read_bytes(), "t")
        # The configured key encrypts; the previous generation's still decrypts.
        assert list(built[-1].ticket_keys) == [own, shared]
    finally:
        for generation in built:
            generation.close()
