"""Bad input at start-up: each gets one clear error line and a non-zero exit, no secret."""

from __future__ import annotations

from pathlib import Path

import pytest
import trustme

from tests.support import HSM, TOKEN_PIN, RecordingUpstream, run_cli, write_config


def _run(config: Path) -> tuple[int, str]:
    result = run_cli("run", "--config", str(config), timeout=60)
    return result.returncode, result.stdout + result.stderr


def test_wrong_pin_is_refused(
    tmp_path: Path, hsm: HSM, ca: trustme.CA, upstream: RecordingUpstream
) -> None:
    wrong = tmp_path / "wrong-pin"
    wrong.write_text("not-the-pin-5555\n")
    code, output = _run(write_config(tmp_path, hsm, ca, upstream.url, "ec256", pin_file=wrong))
    assert code == 1
    assert "login to token 'proxy' failed: the PIN is incorrect" in output
    assert "not-the-pin-5555" not in output
    assert TOKEN_PIN not in output


def test_missing_key_lists_what_the_token_has(
    tmp_path: Path, hsm: HSM, ca: trustme.CA, upstream: RecordingUpstream
) -> None:
    config = write_config(
        tmp_path,
        hsm,
        ca,
        upstream.url,
        "ec256",
        key_uri="pkcs11:token=proxy;object=nope;type=private",
    )
    code, output = _run(config)
    assert code == 1
    assert (
        "no private key in token 'proxy' matches pkcs11:token=proxy;object=nope;type=private"
        in output
    )
    assert "label='web-ec256' id=01" in output


def test_ambiguous_key_uri_lists_every_match(
    tmp_path: Path, hsm: HSM, ca: trustme.CA, upstream: RecordingUpstream
) -> None:
    config = write_config(
        tmp_path, hsm, ca, upstream.url, "ec256", key_uri="pkcs11:token=proxy;object=twin"
    )
    code, output = _run(config)
    assert code == 1
    assert "2 private keys in token 'proxy' match" in output
    assert "label='twin' id=10" in output
    assert "label='twin' id=11" in output


def test_certificate_for_another_key_is_refused_with_both_fingerprints(
    tmp_path: Path, hsm: HSM, ca: trustme.CA, upstream: RecordingUpstream
) -> None:
    from proxy.tls.certificates import spki_fingerprint

    config = write_config(tmp_path, hsm, ca, upstream.url, "ec256", certificate_for="other")
    code, output = _run(config)
    assert code == 1
    assert "is not the token key's label='web-ec256'" in output
    assert spki_fingerprint(hsm.public_keys["other"]) in output
    assert spki_fingerprint(hsm.public_keys["ec256"]) in output


def test_pin_with_inner_line_break_is_refused_without_showing_it(
    tmp_path: Path, hsm: HSM, ca: trustme.CA, upstream: RecordingUpstream
) -> None:
    odd = tmp_path / "odd-pin"
    odd.write_text(TOKEN_PIN + "\nsecond-line\n")
    code, output = _run(write_config(tmp_path, hsm, ca, upstream.url, "ec256", pin_file=odd))
    assert code == 1
    assert "contains a control character (code 10)" in output
    assert TOKEN_PIN not in output
    assert "second-line" not in output


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            "colour = 1\n",
            "tls.colour: unknown key (known here: certificate, ",
        ),
        (
            'handshake_timeout = "fast"\n',
            "tls.handshake_timeout: expected an integer or a number, got str",
        ),
    ],
)
def test_config_errors_name_the_key(
    tmp_path: Path, hsm: HSM, ca: trustme.CA, upstream: RecordingUpstream, extra: str, message: str
) -> None:
    code, output = _run(write_config(tmp_path, hsm, ca, upstream.url, "ec256", extra_tls=extra))
    assert code == 1
    assert message in output


def test_check_prints_a_table_and_succeeds(
    tmp_path: Path, hsm: HSM, ca: trustme.CA, upstream: RecordingUpstream
) -> None:
    result = run_cli(
        "check", "--config", str(write_config(tmp_path, hsm, ca, upstream.url, "ec384"))
    )
    assert result.returncode == 0, result.stderr
    assert (
        "ok    key          pkcs11:token=proxy;object=web-ec384;id=%02;type=private"
        in result.stdout
    )
    assert "never_extractable=True" in result.stdout
