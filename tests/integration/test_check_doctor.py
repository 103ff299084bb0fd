"""`hsm-proxy check` (a row per check, like nginx -t) and `hsm-proxy doctor`, on a real token."""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme

from tests.support import (
    HSM,
    TOKEN_PIN,
    RecordingUpstream,
    free_port,
    run_cli,
    write_config,
)


def _check(config: Path) -> tuple[int, dict[str, tuple[str, str]], str]:
    result = run_cli("check", "--config", str(config))
    rows = {}
    for line in result.stdout.splitlines():
        status, name, detail = line.split(maxsplit=2)
        rows[name] = (status, detail)
    return result.returncode, rows, result.stdout + result.stderr


def test_check_passes_on_a_good_config(
    tmp_path: Path, hsm: HSM, ca: trustme.CA, upstream: RecordingUpstream
) -> None:
    code, rows, output = _check(write_config(tmp_path, hsm, ca, upstream.url, "ec256"))
    assert code == 0, output
    assert list(rows) == [
        "config",
        "openssl",
        "certificate",
        "pin",
        "token",
        "mechanisms",
        "key",
        "custody",
        "match",
        "tls",
        "upstream",
    ]
    assert all(status == "ok" for status, _ in rows.values())
    assert rows["key"][1].endswith("label='web-ec256' id=01 type=P-256")
    assert "never_extractable=True" in rows["custody"][1]
    assert f"{upstream.url} accepts connections" in rows["upstream"][1]
    assert "check is successful" in output
    assert TOKEN_PIN not in output


def test_check_reports_every_independent_failure_in_one_run(
    tmp_path: Path, hsm: HSM, ca: trustme.CA
) -> None:
    wrong_pin = tmp_path / "wrong-pin"
    wrong_pin.write_text("wrong-pin-7777\n")
    dead = f"http://127.0.0.1:{free_port()}"
    config = write_config(tmp_path, hsm, ca, dead, "ec256", pin_file=wrong_pin)
    code, rows, output = _check(config)
    assert code == 1
    assert rows["certificate"][0] == "ok"
    assert rows["token"] == ("FAIL", "login to token 'proxy' failed: the PIN is incorrect")
    assert rows["key"] == ("skip", "no token session")
    assert rows["match"][0] == "skip"
    assert rows["upstream"] == ("FAIL", f"cannot connect to {dead}: Connection refused")
    assert "check failed (token, upstream)" in output
    assert "wrong-pin-7777" not in output


@pytest.mark.parametrize(
    ("breakage", "row", "message"),
    [
        ("toml", "config", "invalid TOML"),
        ("pin_missing", "pin", "does not exist"),
        ("no_key", "key", "no private key in token 'proxy' matches pkcs11:token=proxy;object=nope"),
        ("twin", "key", "2 private keys in token 'proxy' match"),
        ("mismatch", "match", "is not the token key's label='web-ec256'"),
        ("not_pem", "certificate", "chain.pem"),
    ],
)
def test_check_names_each_broken_input(
    breakage: str,
    row: str,
    message: str,
    tmp_path: Path,
    hsm: HSM,
    ca: trustme.CA,
    upstream: RecordingUpstream,
) -> None:
    options: dict[str, object] = {}
    if breakage == "pin_missing":
        options["pin_file"] = tmp_path / "no-such-pin"
    if breakage == "no_key":
        options["key_uri"] = "pkcs11:token=proxy;object=nope;type=private"
    if breakage == "twin":
        options["key_uri"] = "pkcs11:token=proxy;object=twin"
    if breakage == "mismatch":
        options["certificate_for"] = "other"
    config = write_config(tmp_path, hsm, ca, upstream.url, "ec256", **options)  # type: ignore[arg-type]
    if breakage == "toml":
        config.write_text(config.read_text() + "\nthis is not toml\n")
    if breakage == "not_pem":
        certificate = tmp_path / "chain.pem"
        certificate.write_text("not a certificate\n")
        config.write_text(
            config.read_text().replace(str(tmp_path / "chain-ec256.pem"), str(certificate))
        )
    code, rows, output = _check(config)
    assert code == 1
    assert rows[row][0] == "FAIL"
    assert message in rows[row][1]
    assert [name for name, (status, _) in rows.items() if status == "FAIL"] == [row]
    assert TOKEN_PIN not in output


def test_check_warns_about_a_key_that_can_leave_the_token_or_fails_by_policy(
    tmp_path: Path, hsm: HSM, ca: trustme.CA, upstream: RecordingUpstream, exportable_key: str
) -> None:
    code, rows, _ = _check(write_config(tmp_path, hsm, ca, upstream.url, exportable_key))
    assert code == 0  # token.key_custody = "warn", the default
    status, detail = rows["custody"]
    assert status == "warn"
    assert "extractable=True" in detail
    assert "the key is extractable, so its value could leave the token" in detail
    config = write_config(
        tmp_path, hsm, ca, upstream.url, exportable_key, extra_token='key_custody = "refuse"'
    )
    code, rows, output = _check(config)
    assert code == 1
    assert rows["custody"][0] == "FAIL"
    assert "is extractable: its value could leave the token" in rows["custody"][1]
    assert "error: custody: " in output
    assert rows["match"][0] == "ok"  # the other checks still ran


def test_doctor_without_pin_lists_tokens_and_mechanisms(hsm: HSM) -> None:
    result = run_cli("doctor", "--module", hsm.module)
    assert result.returncode == 0, result.stderr
    assert "token 'proxy' serial" in result.stdout
    assert "mechanisms used by hsm-proxy: ECDSA, RSA_PKCS, RSA_X_509, RSA_PKCS_PSS" in result.stdout
    assert "give --pin-file or --pin-env" in result.stdout


def test_doctor_lists_keys_flags_duplicates_and_times_signatures(
    hsm: HSM, exportable_key: str
) -> None:
    result = run_cli(
        "doctor", "--module", hsm.module, "--pin-file", str(hsm.pin_file), "--signatures", "2"
    )
    output = result.stdout
    assert result.returncode == 1  # the exportable key is unhealthy
    blocks = {}
    for block in output.split("\n- ")[1:]:
        head, *rest = block.splitlines()
        blocks[head] = "\n".join(rest)
    ec256 = blocks["label='web-ec256' id=01"]
    assert "type P-256; uri pkcs11:token=proxy;object=web-ec256;id=%01;type=private" in ec256
    assert "sensitive=True extractable=False always_sensitive=True never_extractable=True" in ec256
    assert "2 test signature(s) (ECDSA): min" in ec256
    assert "verified against the public key" in ec256
    rsa = blocks["label='web-rsa2048' id=03"]
    assert "type RSA-2048" in rsa
    assert "(RSA_PKCS)" in rsa
    assert "verified against the public key" in rsa
    for twin in ("label='twin' id=10", "label='twin' id=11"):
        assert "DUPLICATE label: 2 keys are labelled 'twin'" in blocks[twin]
    assert "WARNING: this key can leave the token" in blocks["label='loose-ec256' id=20"]
    assert TOKEN_PIN not in output + result.stderr


def test_doctor_takes_the_pin_from_a_variable_never_from_argv(hsm: HSM) -> None:
    result = run_cli(
        "doctor", "--module", hsm.module, "--pin-env", "DOCTOR_PIN", env={"DOCTOR_PIN": "bad-4444"}
    )
    assert result.returncode == 1
    assert "login to token 'proxy' failed: the PIN is incorrect" in result.stderr
    assert "bad-4444" not in result.stdout + result.stderr
    refused = run_cli("doctor", "--module", hsm.module, "--pin", TOKEN_PIN)
    assert refused.returncode == 2
    assert TOKEN_PIN not in refused.stdout + refused.stderr
