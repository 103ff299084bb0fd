"""The dev-mode state directory: a SoftHSM2 token, a token key, a dev CA and a certificate.

Theory of operation. ``hsm-proxy dev`` (and the tests, and the pytest plugin) call
:func:`prepare_dev_state` on a directory. The first time, it writes ``softhsm2.conf``
pointing SoftHSM2 at ``tokens/`` inside the directory, initialises a token with a random
PIN (kept in ``pin``, mode 0600; the SO PIN is random and discarded), and generates a P-256
key pair inside the token: sensitive, never extractable. It then has a throw-away CA,
whose key lives only in memory, issue a certificate for that key's public half, naming
localhost, 127.0.0.1 and ::1, and writes ``ca.pem`` and ``cert.pem``. Later runs reuse all
of it, and issue a new certificate (and CA) only when the old one no longer fits the key or
is about to expire. No private key of a served certificate is ever written to disk.

SoftHSM2 reads ``SOFTHSM2_CONF`` when the module is first initialised, so this sets it
before anything loads the module.
"""

from __future__ import annotations

import datetime
import os
import secrets as random_source
from dataclasses import dataclass
from pathlib import Path

from proxy.errors import CertificateError, ConfigError, KeyMismatchError
from proxy.pkcs11.module import list_tokens
from proxy.pkcs11.provision import generate_key, initialize_token
from proxy.pkcs11.token import Token
from proxy.pkcs11.uri import KeyURI
from proxy.secrets.store import PinSource, read_pin, write_secret_file
from proxy.tls.certificates import DevCA, check_key_matches, load_chain

DEV_TOKEN_LABEL = "hsm-proxy-dev"  # noqa: S105 - a label, not a secret
DEV_KEY_LABEL = "hsm-proxy-dev-key"
DEV_KEY_ID = b"\x01"
DEV_NAMES = ("localhost", "127.0.0.1", "::1")
SOFTHSM_MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
)
RENEW_BEFORE = datetime.timedelta(days=30)


@dataclass(frozen=True)
class DevState:
    directory: Path
    module: str
    key_uri: KeyURI
    pin: PinSource
    certificate: Path
    ca: Path


def default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "hsm-proxy" / "dev"


def find_softhsm_module() -> str:
    for candidate in SOFTHSM_MODULE_CANDIDATES:
        if Path(candidate).exists():
            return candidate
    raise ConfigError(
        "SoftHSM2 is not installed (no libsofthsm2.so in "
        f"{', '.join(SOFTHSM_MODULE_CANDIDATES)}); run deploy/setup.sh or apt-get install softhsm2"
    )


def use_softhsm_config(directory: Path) -> Path:
    """Write (once) and select the SoftHSM2 config that keeps tokens inside ``directory``."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    tokens = directory / "tokens"
    tokens.mkdir(exist_ok=True, mode=0o700)
    config = directory / "softhsm2.conf"
    if not config.exists():
        config.write_text(
            f"directories.tokendir = {tokens}\n"
            "objectstore.backend = file\n"
            "log.level = ERROR\n"
            "slots.removable = false\n"
        )
    os.environ["SOFTHSM2_CONF"] = str(config)
    return config


def prepare_dev_state(directory: Path, names: tuple[str, ...] = DEV_NAMES) -> DevState:
    """Create or reuse the dev token, key, CA and certificate in ``directory``."""
    directory = directory.resolve()
    use_softhsm_config(directory)
    module = find_softhsm_module()
    pin_source = PinSource(file=directory / "pin")
    key_uri = KeyURI(token=DEV_TOKEN_LABEL, object=DEV_KEY_LABEL, id=DEV_KEY_ID)
    have_token = any(label == DEV_TOKEN_LABEL for _, label, _ in list_tokens(module))
    if not have_token:
        pin = random_source.token_hex(16)
        initialize_token(module, DEV_TOKEN_LABEL, random_source.token_hex(16), pin)
        write_secret_file(directory / "pin", pin)
        generate_key(module, DEV_TOKEN_LABEL, pin, DEV_KEY_LABEL, DEV_KEY_ID, "P-256")
    elif not (directory / "pin").exists():
        raise ConfigError(
            f"{directory} holds the dev token but no 'pin' file; remove the directory to start "
            "over with a new token"
        )
    state = DevState(
        directory, module, key_uri, pin_source, directory / "cert.pem", directory / "ca.pem"
    )
    _ensure_certificate(state, names)
    return state


def _ensure_certificate(state: DevState, names: tuple[str, ...]) -> None:
    with Token(state.module, state.key_uri, read_pin(state.pin), pool_size=1) as token:
        key = token.find_private_key(state.key_uri)
        if state.certificate.exists() and state.ca.exists():
            try:
                chain = load_chain(state.certificate)
                check_key_matches(chain, key)
                if chain.not_after() - datetime.datetime.now(datetime.UTC) > RENEW_BEFORE:
                    return
            except (CertificateError, KeyMismatchError):
                pass  # replaced below
        assert key.info.public_key_der is not None  # SoftHSM2 keeps the public key object
        ca = DevCA.create()
        state.ca.write_bytes(ca.pem())
        state.certificate.write_bytes(ca.issue(key.info.public_key_der, names))
