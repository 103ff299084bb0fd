"""The first steps of a deployment: `hsm-proxy key generate`, `hsm-proxy csr`, and a key
rotation with no dropped connection (proxy/commands/keys.py, pkcs11/keygen.py, tls/csr.py).

Each test gets a SoftHSM2 of its own (its own SOFTHSM2_CONF, set for every process the test
starts) with one empty token, as a user with a fresh token has. Keys are made by the command
line, their attributes read back by OpenSC's pkcs11-tool, requests verified by `openssl req
-verify`, certificates issued for them by `openssl x509 -req` with a trustme CA, and served
by the proxy to real TLS clients.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import ssl
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from proxy.commands.devstate import find_softhsm_module
from proxy.pkcs11.uri import KeyURI, parse_key_uri
from tests.support import REPO, RecordingUpstream, client_context, https_request, run_cli
from tests.support.reload import Load, launch, replace_file, wait_until

_INIT_TOKEN = """
import sys
from pathlib import Path
from proxy.commands.devstate import find_softhsm_module, use_softhsm_config
from proxy.pkcs11.provision import initialize_token
use_softhsm_config(Path(sys.argv[1]))
so_pin, pin = sys.stdin.read().split()
initialize_token(find_softhsm_module(), sys.argv[2], so_pin, pin)
"""


@dataclass
class FreshToken:
    """An initialised SoftHSM2 token with no key, in a SoftHSM2 of its own."""

    directory: Path
    module: str
    label: str
    pin: str
    pin_file: Path

    @property
    def env(self) -> dict[str, str]:
        return {"SOFTHSM2_CONF": str(self.directory / "softhsm2.conf")}

    def cli(
        self, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``hsm-proxy ARGS...`` on this token's SoftHSM2."""
        return run_cli(*args, env={**self.env, **(env or {})})

    def generate(self, label: str, *kind: str) -> KeyURI:
        result = self.cli(
            "key", "generate", "--module", self.module, "--token", self.label,
            "--label", label, *kind, "--pin-file", str(self.pin_file),
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return parse_key_uri(result.stdout.strip())

    def objects(self) -> dict[tuple[str, str], str]:
        """pkcs11-tool's listing: (Private|Public, label) -> that object's lines."""
        listing = ["--token-label", self.label, "--pin", "env:FRESH_TOKEN_PIN", "--list-objects"]
        result = subprocess.run(
            ["pkcs11-tool", "--module", self.module, *listing],
            env={**os.environ, **self.env, "FRESH_TOKEN_PIN": self.pin},
            capture_output=True,
            text=True,
            check=True,
        )
        blocks: dict[tuple[str, str], str] = {}
        if not result.stdout.strip():
            return blocks
        for block in re.split(r"\n(?=\S)", result.stdout.strip()):
            label = re.search(r"^\s+label:\s+(.*)$", block, re.MULTILINE)
            assert label is not None, block
            blocks[(block.split()[0], label.group(1).strip())] = block
        return blocks


def _make_token(directory: Path) -> FreshToken:
    label = "deploy"
    pin = f"pin-{secrets.token_hex(6)}"
    subprocess.run(
        [sys.executable, "-c", _INIT_TOKEN, str(directory / "softhsm"), label],
        input=f"so-{secrets.token_hex(6)}\n{pin}\n",
        text=True,
        check=True,
        cwd=REPO,
    )
    pin_file = directory / "pin"
    pin_file.write_text(pin + "\n")
    return FreshToken(directory / "softhsm", find_softhsm_module(), label, pin, pin_file)


@pytest.fixture
def fresh_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FreshToken:
    """A token of its own for one test; the proxies the test starts use it too."""
    token = _make_token(tmp_path)
    monkeypatch.setenv("SOFTHSM2_CONF", token.env["SOFTHSM2_CONF"])
    return token


@pytest.fixture(scope="module")
def empty_token(tmp_path_factory: pytest.TempPathFactory) -> FreshToken:
    """One token for the tests of refused input: nothing they do may create an object."""
    return _make_token(tmp_path_factory.mktemp("empty-token"))


@pytest.fixture(scope="module")
def token_with_key(tmp_path_factory: pytest.TempPathFactory) -> FreshToken:
    """One token with a P-256 key labelled 'web', for the tests of refused requests."""
    token = _make_token(tmp_path_factory.mktemp("token-with-key"))
    token.generate("web", "--ec", "P-256")
    return token


# -- key generate ------------------------------------------------------------------------


def test_key_generate_makes_a_pair_that_signs_only_and_never_leaves_the_token(
    fresh_token: FreshToken,
) -> None:
    ec_uri = fresh_token.generate("web-ec", "--ec", "P-384", "--id", "0A0b")
    assert ec_uri == KeyURI(token="deploy", object="web-ec", id=b"\x0a\x0b")
    rsa_uri = fresh_token.generate("web-rsa", "--rsa", "2048")
    assert (rsa_uri.token, rsa_uri.object) == ("deploy", "web-rsa")
    objects = fresh_token.objects()
    assert set(objects) == {
        (half, label) for half in ("Private", "Public") for label in ("web-ec", "web-rsa")
    }
    for label, kind, key_id in (("web-ec", "EC", "0a0b"), ("web-rsa", "RSA", None)):
        private, public = objects[("Private", label)], objects[("Public", label)]
        assert private.startswith(f"Private Key Object; {kind}")
        assert _field(private, "Usage") == "sign"
        assert _field(private, "Access") == "sensitive, always sensitive, never extractable, local"
        assert _field(public, "Usage") == "verify"
        assert _field(private, "ID") == _field(public, "ID")
        if key_id is not None:
            assert _field(private, "ID") == key_id
    assert "EC_POINT 384 bits" in objects[("Public", "web-ec")]
    assert "RSA 2048 bits" in objects[("Public", "web-rsa")]
    # Without --id, the ID is the subject key identifier (SHA-1) of the public key.
    request = _request(fresh_token, rsa_uri, "CN=rsa")
    assert rsa_uri.id == x509.SubjectKeyIdentifier.from_public_key(request.public_key()).digest


def _field(block: str, name: str) -> str:
    found = re.search(rf"^\s+{name}:\s+(.*)$", block, re.MULTILINE)
    assert found is not None, f"no {name} in {block}"
    return found.group(1).strip()


def test_key_generate_refuses_a_label_or_an_id_in_use(fresh_token: FreshToken) -> None:
    fresh_token.generate("web", "--ec", "P-256", "--id", "01")
    common = ["key", "generate", "--module", fresh_token.module, "--token", "deploy"]
    pin = ["--pin-file", str(fresh_token.pin_file)]
    again = fresh_token.cli(*common, "--label", "web", "--ec", "P-256", *pin)
    _one_clear_error(again, "token 'deploy' already has 2 object(s) labelled 'web'", fresh_token)
    assert "choose another --label" in again.stderr
    same_id = fresh_token.cli(*common, "--label", "web-2", "--rsa", "2048", "--id", "01", *pin)
    _one_clear_error(same_id, "token 'deploy' already has 2 object(s) with id 01", fresh_token)
    assert set(fresh_token.objects()) == {("Private", "web"), ("Public", "web")}


def test_key_generate_on_a_token_that_knows_no_sign_recover(
    fresh_token: FreshToken, faulthsm: Path
) -> None:
    """CloudHSM's SDK 5 library has no sign-recover: a template naming CKA_SIGN_RECOVER is
    refused with CKR_ATTRIBUTE_TYPE_INVALID (faulthsm plays it), so the pair is asked for
    without the recover attributes, and its custody is still read back."""
    refused = {
        "FAULTHSM_MODULE": fresh_token.module,
        "FAULTHSM_REFUSE_ATTRIBUTES": "CKA_SIGN_RECOVER,CKA_VERIFY_RECOVER",
    }
    result = fresh_token.cli(
        "key", "generate", "--module", str(faulthsm), "--token", "deploy", "--label", "web",
        "--rsa", "2048", "--pin-file", str(fresh_token.pin_file), env=refused,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert parse_key_uri(result.stdout.strip()).object == "web"
    private = fresh_token.objects()[("Private", "web")]
    assert _field(private, "Access") == "sensitive, always sensitive, never extractable, local"
    # Once the template stops naming the recover attributes the token's defaults apply:
    # SoftHSM2 behind faulthsm turns sign-recover on (pkcs11-tool from OpenSC 0.26, Debian
    # 13, shows it; 0.23 does not), while a token without sign-recover (CloudHSM) has none.
    # Never anything but signing.
    assert set(_field(private, "Usage").split(", ")) in ({"sign"}, {"sign", "signRecover"})


WRONG_PIN = {"WRONG_PIN": "wrong-7731"}
KEY_GENERATE_ERRORS = [
    (["--ec", "P-256", "--pin-env", "WRONG_PIN"], "login to token 'deploy' failed: the PIN is"),
    (["--token", "nope", "--ec", "P-256"], "no token labelled 'nope' in /"),
    (["--ec", "P-521"], "--ec 'P-521': the curve must be one of P-256, P-384"),
    (["--ec", "secp256r1"], "the curve must be one of P-256, P-384"),
    (["--rsa", "1024"], "--rsa '1024': the size must be 2048, 3072, 4096"),
    (["--rsa", "2048.0"], "the size must be 2048, 3072, 4096"),
    (["--ec", "P-256", "--id", "1"], "--id '1' has an odd number of hex digits"),
    (["--ec", "P-256", "--id", "0x01"], "without 0x"),
    (["--ec", "P-256", "--label", ""], "--label is empty"),
    (["--ec", "P-256", "--rsa", "2048"], "argument --rsa: not allowed with argument --ec"),
    ([], "one of the arguments --ec --rsa is required"),
    (["--ec", "P-256", "--no-pin"], "give the token's user PIN with --pin-file FILE or --pin-env"),
]


@pytest.mark.parametrize(("arguments", "message"), KEY_GENERATE_ERRORS)
def test_key_generate_errors_are_one_clear_line(
    empty_token: FreshToken, arguments: list[str], message: str
) -> None:
    options = ["--module", empty_token.module, "--token", "deploy", "--label", "web"]
    if "--no-pin" in arguments:
        arguments = [argument for argument in arguments if argument != "--no-pin"]
    elif "--pin-env" not in arguments:
        options += ["--pin-file", str(empty_token.pin_file)]
    result = empty_token.cli("key", "generate", *options, *arguments, env=WRONG_PIN)
    _one_clear_error(result, message, empty_token)
    assert result.stdout == ""
    assert empty_token.objects() == {}


def test_key_generate_never_takes_the_pin_on_the_command_line(empty_token: FreshToken) -> None:
    result = empty_token.cli(
        "key", "generate", "--module", empty_token.module, "--token", "deploy",
        "--label", "web", "--ec", "P-256", "--pin", empty_token.pin,
    )  # fmt: skip
    assert result.returncode == 2
    assert "error: ambiguous option: --pin could match --pin-file, --pin-env" in result.stderr
    assert empty_token.pin not in result.stdout + result.stderr
    assert empty_token.objects() == {}


def _one_clear_error(
    result: subprocess.CompletedProcess[str], message: str, token: FreshToken
) -> None:
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    for secret in (token.pin, WRONG_PIN["WRONG_PIN"]):
        assert secret not in result.stdout + result.stderr


# -- csr ---------------------------------------------------------------------------------


def _request(
    token: FreshToken, uri: KeyURI, subject: str, *extra: str
) -> x509.CertificateSigningRequest:
    result = token.cli(
        "csr", "--module", token.module, "--key", str(uri), "--subject", subject, *extra,
        "--pin-file", str(token.pin_file),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return x509.load_pem_x509_csr(result.stdout.encode())


def _issue(directory: Path, ca: trustme.CA, request_pem: Path, name: str) -> Path:
    """What a private CA does with the request: `openssl x509 -req`, the SANs copied."""
    ca_cert, ca_key = directory / "ca.pem", directory / "ca-key.pem"
    ca.cert_pem.write_to_path(str(ca_cert))
    ca.private_key_pem.write_to_path(str(ca_key))
    extensions = directory / "server.ext"
    extensions.write_text(
        "basicConstraints = critical, CA:FALSE\n"
        "keyUsage = critical, digitalSignature\n"
        "extendedKeyUsage = serverAuth\n"
        "subjectKeyIdentifier = hash\n"
        "authorityKeyIdentifier = keyid\n"
    )
    certificate = directory / f"{name}.pem"
    subprocess.run(
        ["openssl", "x509", "-req", "-in", str(request_pem), "-CA", str(ca_cert),
         "-CAkey", str(ca_key), "-set_serial", f"0x{secrets.token_hex(8)}", "-days", "30",
         "-copy_extensions", "copy", "-extfile", str(extensions), "-out", str(certificate)],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return certificate


def _config(directory: Path, token: FreshToken, upstream: str, chain: Path, key: KeyURI) -> Path:
    config = directory / "proxy.toml"
    replace_file(
        config,
        (
            f'listen = "127.0.0.1:0"\nupstream = "{upstream}"\n\n'
            f'[token]\nmodule = "{token.module}"\npin = "file:{token.pin_file}"\nsessions = 2\n\n'
            f'[tls]\ncertificate = "{chain}"\nkey = "{key}"\n'
        ).encode(),
    )
    return config


def _signatures(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [line for line in lines if line.get("event") == "token_signature"]


def _audit(stderr: str) -> list[dict[str, Any]]:
    return _signatures([json.loads(line) for line in stderr.splitlines() if line.startswith("{")])


def _spki(key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey | Any) -> bytes:
    return bytes(
        key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


@pytest.mark.parametrize(
    ("kind", "extra", "mechanism"),
    [
        (["--ec", "P-256"], [], "ECDSA"),
        (["--ec", "P-384"], [], "ECDSA"),
        (["--rsa", "2048"], [], "RSA_PKCS"),
        (["--rsa", "2048"], ["--rsa-pss"], "RSA_PKCS_PSS"),
    ],
)
def test_csr_is_signed_in_the_token_and_its_certificate_serves(
    tmp_path: Path,
    fresh_token: FreshToken,
    ca: trustme.CA,
    upstream: RecordingUpstream,
    kind: list[str],
    extra: list[str],
    mechanism: str,
) -> None:
    uri = fresh_token.generate("web", *kind)
    result = fresh_token.cli(
        "csr", "--module", fresh_token.module, "--token", "deploy", "--key", "pkcs11:object=web",
        "--subject", "CN=localhost,O=Example\\, Inc.,C=DE", "--san", "DNS:localhost",
        "--san", "IP:127.0.0.1", "--san", "URI:spiffe://example.org/web", *extra,
        "--pin-env", "CSR_PIN", env={"CSR_PIN": fresh_token.pin},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("-----BEGIN CERTIFICATE REQUEST-----\n")
    assert fresh_token.pin not in result.stdout + result.stderr
    # One signature, made by the token with the key's own mechanism (the audit line).
    audit = _audit(result.stderr)
    assert [(line["purpose"], line["mechanism"], line["result"]) for line in audit] == [
        ("csr", mechanism, "ok")
    ]
    request_file = tmp_path / "web.csr"
    request_file.write_text(result.stdout)
    verified = subprocess.run(
        ["openssl", "req", "-in", str(request_file), "-verify", "-noout"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verified.returncode == 0, verified.stderr
    assert "verify OK" in verified.stdout + verified.stderr
    request = x509.load_pem_x509_csr(result.stdout.encode())
    assert request.subject.rfc4514_string() == "CN=localhost,O=Example\\, Inc.,C=DE"
    assert [attribute.oid for attribute in request.subject] == [
        NameOID.COUNTRY_NAME, NameOID.ORGANIZATION_NAME, NameOID.COMMON_NAME
    ]  # fmt: skip
    sans = request.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://example.org/web"]
    public = request.public_key()
    if "--rsa-pss" in extra:
        assert request.signature_algorithm_oid == x509.SignatureAlgorithmOID.RSASSA_PSS
        assert isinstance(public, rsa.RSAPublicKey)
        public.verify(
            request.signature,
            request.tbs_certrequest_bytes,
            padding.PSS(padding.MGF1(hashes.SHA256()), 32),
            hashes.SHA256(),
        )
    elif isinstance(public, ec.EllipticCurvePublicKey):
        assert public.curve.name == {"P-256": "secp256r1", "P-384": "secp384r1"}[kind[1]]
    assert request.is_signature_valid

    certificate = _issue(tmp_path, ca, request_file, "web")
    proxy = launch(tmp_path, _config(tmp_path, fresh_token, upstream.url, certificate, uri))
    context = client_context(ca)
    assert https_request(proxy.port, context, path="/issued").status == 200
    served = _served_certificate(proxy.port, context)
    assert served == x509.load_pem_x509_certificate(certificate.read_bytes())
    assert _spki(served.public_key()) == _spki(public)


CSR_ERRORS = [
    (["--subject", "CN=web, O=Example"], "--subject 'CN=web, O=Example': unknown attribute"),
    (["--subject", "CN=web;O=Example"], "';' at character 7 must be escaped"),
    (["--subject", "C=Germany"], "C='Germany' must be a two-letter country code"),
    (["--san", "web.example.com"], "--san 'web.example.com': write the type first"),
    (["--san", "DNS:web_1.example.com"], "label 'web_1' is not a DNS label"),
    (["--san", "IP:10.0.0.0/8"], "not an IPv4 or IPv6 address"),
    (["--pin-env", "WRONG_PIN"], "login to token 'deploy' failed: the PIN is incorrect"),
    (["--key", "pkcs11:object=missing"], "no private key in token 'deploy' matches"),
    (["--key", "pkcs11:token=nope;object=web"], "no token in "),
    (["--key", "pkcs11:object=web;id=01"], "must be written byte by byte as %XX"),
    (["--rsa-pss"], "--rsa-pss is for RSA keys; key 'web' is P-256"),
]


@pytest.mark.parametrize(("arguments", "message"), CSR_ERRORS)
def test_csr_errors_are_one_clear_line(
    token_with_key: FreshToken, arguments: list[str], message: str
) -> None:
    options = ["--module", token_with_key.module]
    if "--subject" not in arguments:
        options += ["--subject", "CN=web"]
    if "--key" not in arguments:
        options += ["--key", "pkcs11:token=deploy;object=web"]
    if "--pin-env" not in arguments:
        options += ["--pin-file", str(token_with_key.pin_file)]
    result = token_with_key.cli("csr", *options, *arguments, env=WRONG_PIN)
    _one_clear_error(result, message, token_with_key)
    assert result.stdout == ""


# -- rotation ----------------------------------------------------------------------------


def _served_certificate(port: int, context: ssl.SSLContext) -> x509.Certificate:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


@dataclass
class KeepAliveClient:
    """One HTTP/1.1 keep-alive connection that requests until stopped, and opens a new one
    only when the proxy drops it: ``connections`` counts how many it needed."""

    port: int
    context: ssl.SSLContext
    connections: int = 0
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    certificates: list[bytes] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _thread: threading.Thread | None = None

    def _connect(self) -> tuple[ssl.SSLSocket, Any]:
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        tls = self.context.wrap_socket(raw, server_hostname="localhost")
        with self._lock:
            self.connections += 1
            self.certificates.append(tls.getpeercert(binary_form=True) or b"")
        return tls, tls.makefile("rb")

    def _request(self, reader: Any, tls: ssl.SSLSocket) -> None:
        tls.sendall(b"GET /keepalive HTTP/1.1\r\nHost: localhost\r\n\r\n")
        status = reader.readline()
        if not status:
            raise ConnectionError("the proxy closed the connection")
        length = None
        while (line := reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.lower() == "content-length":
                length = int(value)
            if name.lower() == "connection" and value.strip().lower() == "close":
                raise ConnectionError("the proxy announced a close")
        if length is None:
            raise ConnectionError(f"no Content-Length in the response to {status!r}")
        reader.read(length)
        if not status.startswith(b"HTTP/1.1 200 "):
            raise ConnectionError(f"status {status!r}")

    def _run(self) -> None:
        tls = reader = None
        while not self._stop.is_set():
            try:
                if tls is None:
                    tls, reader = self._connect()
                self._request(reader, tls)
                with self._lock:
                    self.ok += 1
            except (OSError, ConnectionError, ValueError) as exc:
                with self._lock:
                    self.failures.append(repr(exc))
                if tls is not None:
                    tls.close()
                tls = reader = None
            self._stop.wait(0.01)
        if tls is not None:
            tls.close()

    def count(self) -> int:
        with self._lock:
            return self.ok

    def wait_for_more(self, requests: int = 20) -> None:
        target = self.count() + requests
        wait_until(lambda: self.count() >= target, what=f"{requests} more keep-alive requests")

    def __enter__(self) -> KeepAliveClient:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self.wait_for_more(5)
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(timeout=30)


def test_key_rotation_as_documented_drops_no_connection(
    tmp_path: Path, fresh_token: FreshToken, ca: trustme.CA, upstream: RecordingUpstream
) -> None:
    """README "Key rotation": new key, CSR, certificate, config change, reload, while a
    keep-alive client and fresh connections keep requesting."""
    old_key = fresh_token.generate("web-2026", "--ec", "P-256")
    (tmp_path / "old.csr").write_text(
        _request(fresh_token, old_key, "CN=localhost", "--san", "DNS:localhost")
        .public_bytes(serialization.Encoding.PEM)
        .decode()
    )
    old_chain = _issue(tmp_path, ca, tmp_path / "old.csr", "chain-2026")
    config = _config(tmp_path, fresh_token, upstream.url, old_chain, old_key)
    pid_file = tmp_path / "proxy.pid"
    proxy = launch(tmp_path, config, "--pid-file", str(pid_file))
    context = client_context(ca)
    assert _served_certificate(proxy.port, context).serial_number == (
        x509.load_pem_x509_certificate(old_chain.read_bytes()).serial_number
    )

    with (
        KeepAliveClient(proxy.port, context) as client,
        Load(proxy.port, context, fresh=1, keepalive=0) as load,
    ):
        # 1. a new key pair in the token
        generated = fresh_token.cli(
            "key", "generate", "--module", fresh_token.module, "--token", "deploy",
            "--label", "web-2027", "--ec", "P-256", "--pin-file", str(fresh_token.pin_file),
        )  # fmt: skip
        assert generated.returncode == 0, generated.stderr
        new_key = generated.stdout.strip()
        # 2. its request, the module and PIN taken from the running config
        requested = fresh_token.cli(
            "csr", "--config", str(config), "--key", new_key, "--subject", "CN=localhost",
            "--san", "DNS:localhost", "--san", "IP:127.0.0.1",
        )  # fmt: skip
        assert requested.returncode == 0, requested.stderr
        (tmp_path / "new.csr").write_text(requested.stdout)
        # 3. the CA's certificate
        new_chain = _issue(tmp_path, ca, tmp_path / "new.csr", "chain-2027")
        # 4. the config names the new certificate and key (replaced in one rename)
        _config(tmp_path, fresh_token, upstream.url, new_chain, parse_key_uri(new_key))
        checked = run_cli("check", "--config", str(config))
        assert checked.returncode == 0, checked.stdout + checked.stderr
        # 5. reload
        reloaded = run_cli("reload", "--pid-file", str(pid_file))
        assert reloaded.returncode == 0, reloaded.stderr
        assert reloaded.stdout == "reloaded: serving generation 2\n"
        wait_until(
            lambda: (
                _served_certificate(proxy.port, context).serial_number
                == x509.load_pem_x509_certificate(new_chain.read_bytes()).serial_number
            ),
            what="fresh connections to get the new certificate",
        )
        client.wait_for_more()
        load.wait_for_more()

    assert client.failures == []
    assert client.connections == 1  # the keep-alive connection lived through the rotation
    assert x509.load_der_x509_certificate(client.certificates[0]).serial_number == (
        x509.load_pem_x509_certificate(old_chain.read_bytes()).serial_number
    )
    assert load.failures == []
    before = len(_signatures(proxy.lines()))
    https_request(proxy.port, context, path="/after-rotation")
    proxy.wait_for_log(lambda entry: entry.get("path") == "/after-rotation")
    signed = _signatures(proxy.lines())[before:]
    assert [(e["key_uri"], "connection_id" in e) for e in signed] == [(new_key, True)]
