"""The token layer: every PKCS#11 call hsm-proxy makes goes through this module.

Theory of operation. A :class:`Token` loads a PKCS#11 module by path, selects one token by
the token attributes of a key URI (label, serial, ...), logs in once with the PIN and keeps
a small pool of sessions. PKCS#11 login state belongs to the application, not the session:
the first session logs in and every later session shares that login. One "login session"
per token and process is kept apart from the pools (closing it logs the whole process out,
because python-pkcs11 calls C_Logout on it), shared by every :class:`Token` object of that
token and closed when the last of them closes.

That sharing is what lets a reload rotate the PIN without touching a live connection: a new
generation opens its own fresh sessions while the old generation's are still signing, and
the old ones are closed only when nothing uses them. A second C_Login in a process that is
already logged in returns CKR_USER_ALREADY_LOGGED_IN without looking at the PIN, so when
the process is logged in already, the new PIN is proven by :func:`probe_login` in a
short-lived child process (``python -m proxy.token --probe-login``) that reads it from a
pipe, never from its command line.

``Token.sign`` is synchronous and thread-safe: it is called from OpenSSL's key callbacks,
inside a handshake step that runs in a worker thread (DESIGN.md, decision 3). It borrows a
session from the pool, signs with the key object found in that session, and returns the
session. Object handles are looked up once per session and cached.

Nothing here knows about trio, OpenSSL or TLS; only this module imports ``pkcs11``. PINs
are passed in, used for ``C_Login`` and never stored, logged, or put into an exception.

The provisioning helpers at the end (initialise a token, generate keys, change a PIN) serve
the dev mode and the tests, which make real SoftHSM2 tokens.
"""

from __future__ import annotations

import ctypes
import enum
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import pkcs11
import pkcs11._pkcs11 as _pkcs11_native
import pkcs11.exceptions as p11err
from asn1crypto.keys import ECDomainParameters, PublicKeyInfo, RSAPublicKey
from pkcs11 import Attribute, KeyType, ObjectClass, TokenFlag
from pkcs11.util.ec import encode_ec_public_key, encode_named_curve_parameters

from proxy.errors import (
    AmbiguousKeyError,
    KeyNotFoundError,
    LoginError,
    ModuleLoadError,
    ProxyError,
    SigningError,
    TokenError,
    TokenNotFoundError,
)
from proxy.pkcs11uri import KeyURI, parse_key_uri


class Mechanism(enum.Enum):
    """The signing mechanisms a TLS handshake needs from a token."""

    ECDSA = "ECDSA"  # the digest goes in, r || s comes out
    RSA_PKCS = "RSA_PKCS"  # PKCS#1 v1.5: DigestInfo in, the token pads
    RSA_X_509 = "RSA_X_509"  # raw RSA: OpenSSL already applied the (PSS) padding


_P11_MECHANISM = {
    Mechanism.ECDSA: pkcs11.Mechanism.ECDSA,
    Mechanism.RSA_PKCS: pkcs11.Mechanism.RSA_PKCS,
    Mechanism.RSA_X_509: pkcs11.Mechanism.RSA_X_509,
}

# Named curves the key bridge supports, by OID.
EC_CURVES = {"1.2.840.10045.3.1.7": "P-256", "1.3.132.0.34": "P-384"}
RSA_BITS = range(2048, 4097)


@dataclass(frozen=True)
class KeyInfo:
    """What the proxy knows about a private key in the token. Never key material."""

    label: str
    id: bytes
    key_type: str  # "EC" or "RSA"
    size: str  # "P-256", "P-384" or "RSA-2048" ...
    public_key_der: bytes | None  # SubjectPublicKeyInfo DER, when the token exposes it
    sensitive: bool | None
    extractable: bool | None
    always_sensitive: bool | None
    never_extractable: bool | None

    def describe(self) -> str:
        return f"label={self.label!r} id={self.id.hex() or '(empty)'} type={self.size}"


@dataclass(frozen=True)
class SignatureEvent:
    """One signature made by the token, as reported to the observer (audit, metrics)."""

    key_uri: str
    mechanism: Mechanism
    ok: bool
    seconds: float
    error: str | None = None


SignatureObserver = Callable[[SignatureEvent], None]


def _ignore_event(_event: SignatureEvent) -> None:
    return None


@dataclass
class _PooledSession:
    session: Any
    keys: dict[tuple[str, bytes], Any] = field(default_factory=dict)


_loaded_modules: dict[str, Any] = {}
_module_lock = threading.Lock()
_CKF_OS_LOCKING_OK = 0x00000002
_CKR_CRYPTOKI_ALREADY_INITIALIZED = 0x00000191


class _CInitializeArgs(ctypes.Structure):
    _fields_ = [
        ("CreateMutex", ctypes.c_void_p),
        ("DestroyMutex", ctypes.c_void_p),
        ("LockMutex", ctypes.c_void_p),
        ("UnlockMutex", ctypes.c_void_p),
        ("flags", ctypes.c_ulong),
        ("pReserved", ctypes.c_void_p),
    ]


class _ThreadSafeLib(_pkcs11_native.lib):  # type: ignore[misc]
    """python-pkcs11's ``lib``, initialised with CKF_OS_LOCKING_OK.

    python-pkcs11 calls C_Initialize(NULL), which tells the module that no two threads
    will call it at once; SoftHSM2 then turns its locks off, and concurrent handshakes
    (one signature each, in worker threads) corrupt its memory. Signing from several
    threads is the design (DESIGN.md, decision 3), so the module is told to lock.
    """

    def __init__(self, so: str) -> None:
        self._path = so
        super().__init__(so)

    def initialize(self) -> None:
        library = ctypes.CDLL(self._path)  # the same loaded object python-pkcs11 uses
        arguments = _CInitializeArgs(None, None, None, None, _CKF_OS_LOCKING_OK, None)
        library.C_Initialize.argtypes = [ctypes.c_void_p]
        library.C_Initialize.restype = ctypes.c_ulong
        result = library.C_Initialize(ctypes.byref(arguments))
        if result not in (0, _CKR_CRYPTOKI_ALREADY_INITIALIZED):
            raise ModuleLoadError(
                f"cannot initialise PKCS#11 module {self._path}: C_Initialize returned "
                f"CKR 0x{result:08x}"
            )


def load_module(path: str) -> Any:
    """Load and initialise the PKCS#11 module at ``path`` once per process."""
    with _module_lock:
        if path in _loaded_modules:
            return _loaded_modules[path]
        try:
            module = _ThreadSafeLib(path)
        except p11err.PKCS11Error as exc:
            raise ModuleLoadError(f"cannot load PKCS#11 module {path}: {exc}") from None
        except OSError as exc:  # pragma: no cover - depends on the loader
            raise ModuleLoadError(f"cannot load PKCS#11 module {path}: {exc}") from None
        _loaded_modules[path] = module
        return module


def _token_filter(uri: KeyURI) -> dict[str, str]:
    selection = {}
    if uri.token is not None:
        selection["token_label"] = uri.token
    if uri.serial is not None:
        selection["token_serial"] = uri.serial
    return selection


def list_tokens(module_path: str) -> list[tuple[int, str, str]]:
    """(slot id, token label, serial) of every initialised token the module shows."""
    module = load_module(module_path)
    found = []
    for slot in module.get_slots(token_present=True):
        with suppress(p11err.TokenNotRecognised, p11err.TokenNotPresent):
            token = slot.get_token()
            if token.flags & TokenFlag.TOKEN_INITIALIZED:
                found.append((slot.slot_id, token.label, token.serial.decode().strip()))
    return found


def _select_token(module_path: str, uri: KeyURI) -> Any:
    module = load_module(module_path)
    matches = []
    for slot in module.get_slots(token_present=True):
        if uri.slot_id is not None and slot.slot_id != uri.slot_id:
            continue
        try:
            token = slot.get_token()
        except (p11err.TokenNotRecognised, p11err.TokenNotPresent):
            continue
        if not token.flags & TokenFlag.TOKEN_INITIALIZED:
            continue
        if uri.token is not None and token.label != uri.token:
            continue
        if uri.serial is not None and token.serial.decode().strip() != uri.serial:
            continue
        if uri.manufacturer is not None and token.manufacturer_id != uri.manufacturer:
            continue
        if uri.model is not None and token.model != uri.model:
            continue
        matches.append(token)
    if len(matches) == 1:
        return matches[0]
    available = ", ".join(
        f"slot {slot} label={label!r} serial={serial!r}"
        for slot, label, serial in list_tokens(module_path)
    )
    if not matches:
        raise TokenNotFoundError(
            f"no token in {module_path} matches {uri}; tokens present: {available or 'none'}"
        )
    raise TokenNotFoundError(
        f"{len(matches)} tokens in {module_path} match {uri}; add token= or serial= to pick "
        f"one; tokens present: {available}"
    )


def _login_failure(exc: p11err.PKCS11Error, token_label: str) -> LoginError:
    reasons = {
        p11err.PinIncorrect: "the PIN is incorrect",
        p11err.PinLocked: "the PIN is locked (too many wrong attempts)",
        p11err.PinExpired: "the PIN has expired",
        p11err.PinInvalid: "the PIN has characters the token does not accept",
        p11err.PinLenRange: "the PIN's length is outside the range the token accepts",
        p11err.UserPinNotInitialized: "the token's user PIN has not been initialised",
        p11err.UserAlreadyLoggedIn: "this process is already logged in to the token",
    }
    for kind, reason in reasons.items():
        if isinstance(exc, kind):
            return LoginError(f"login to token {token_label!r} failed: {reason}")
    return LoginError(f"login to token {token_label!r} failed: {type(exc).__name__}")


@dataclass
class _Login:
    session: Any
    users: int


# The one login session per (module, slot) of this process, shared by Token objects.
_logins: dict[tuple[str, int], _Login] = {}
_logins_lock = threading.Lock()


def _acquire_login(token: Any, module_path: str, selection: KeyURI, pin: str) -> tuple[str, int]:
    """Log in to ``token`` (or join this process's login, after proving ``pin`` elsewhere)."""
    key = (module_path, int(token.slot.slot_id))
    with _logins_lock:
        logged_in = key in _logins
    if logged_in:
        # C_Login would not check the PIN now; a child process does, on its own login. The
        # lock is not held meanwhile: closing an old generation must not wait for it.
        probe_login(module_path, selection, pin)
    with _logins_lock:
        login = _logins.get(key)
        if login is not None:
            login.users += 1
            return key
        try:
            session = token.open(user_pin=pin)
        except p11err.PKCS11Error as exc:
            raise _login_failure(exc, token.label) from None
        _logins[key] = _Login(session, 1)
        return key


def _release_login(key: tuple[str, int]) -> None:
    with _logins_lock:
        login = _logins.get(key)
        if login is None:
            return
        login.users -= 1
        if login.users > 0:
            return
        del _logins[key]
        with suppress(p11err.PKCS11Error):
            login.session.close()  # C_Logout, then C_CloseSession


_PROBE_TIMEOUT = 30.0


def probe_login(module_path: str, selection: KeyURI, pin: str) -> None:
    """Prove that ``pin`` logs in to the token, in a child process; raise LoginError if not.

    The child gets the module path and the key URI on its command line (no secret there)
    and the PIN on its standard input; it logs in, logs out and says which PKCS#11 error,
    if any, it met. Live sessions of this process are not touched.
    """
    try:
        result = subprocess.run(
            [sys.executable, "-m", "proxy.token", "--probe-login", module_path, str(selection)],
            input=pin.encode("utf-8"),
            capture_output=True,
            timeout=_PROBE_TIMEOUT,
            env=os.environ.copy(),
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LoginError(f"could not check the new PIN in a child process: {exc}") from None
    answer = result.stdout.decode("utf-8", "replace").strip()
    if result.returncode == 0 and answer == "ok":
        return
    raise LoginError(answer or f"the PIN check process failed (exit status {result.returncode})")


def _probe_login_main(module_path: str, uri_text: str) -> int:
    pin = sys.stdin.buffer.read().decode("utf-8")
    try:
        token = _select_token(module_path, parse_key_uri(uri_text))
        try:
            session = token.open(user_pin=pin)
        except p11err.PKCS11Error as exc:
            raise _login_failure(exc, token.label) from None
        session.close()
    except ProxyError as exc:
        print(str(exc))
        return 1
    print("ok")
    return 0


class Token:
    """A logged-in token with a pool of sessions; thread-safe ``sign``."""

    def __init__(
        self,
        module_path: str,
        selection: KeyURI,
        pin: str,
        pool_size: int = 4,
        acquire_timeout: float = 10.0,
        observer: SignatureObserver = _ignore_event,
    ) -> None:
        if pool_size < 1:
            raise TokenError(f"the session pool needs at least 1 session, got {pool_size}")
        self.module_path = module_path
        self._token = _select_token(module_path, selection)
        self.label: str = self._token.label
        self._observer = observer
        self._acquire_timeout = acquire_timeout
        self._pool: queue.LifoQueue[_PooledSession] = queue.LifoQueue()
        self._sessions: list[_PooledSession] = []
        self._closed = True  # until the login is held
        self._login_key = _acquire_login(self._token, module_path, selection, pin)
        self._closed = False
        try:
            for _ in range(pool_size):
                self._sessions.append(_PooledSession(self._token.open()))
        except p11err.PKCS11Error as exc:
            self.close()
            raise TokenError(
                f"token {self.label!r} refused to open {pool_size} sessions "
                f"({type(exc).__name__}); lower [token] sessions"
            ) from None
        for pooled in self._sessions:
            self._pool.put(pooled)
        self.mechanisms = frozenset(
            ours
            for ours, theirs in _P11_MECHANISM.items()
            if theirs in self._token.slot.get_mechanisms()
        )

    @property
    def pool_size(self) -> int:
        return len(self._sessions)

    @contextmanager
    def _session(self) -> Iterator[_PooledSession]:
        if self._closed:
            raise TokenError(f"token {self.label!r} has been closed")
        try:
            pooled = self._pool.get(timeout=self._acquire_timeout)
        except queue.Empty:
            raise SigningError(
                f"no free session on token {self.label!r} within {self._acquire_timeout:g}s"
            ) from None
        try:
            yield pooled
        finally:
            self._pool.put(pooled)

    def find_private_key(self, uri: KeyURI) -> TokenKey:
        """The one private key that ``uri`` names, or a clear error listing what matched."""
        with self._session() as pooled:
            session = pooled.session
            template: dict[Attribute, Any] = {Attribute.CLASS: ObjectClass.PRIVATE_KEY}
            if uri.object is not None:
                template[Attribute.LABEL] = uri.object
            if uri.id is not None:
                template[Attribute.ID] = uri.id
            try:
                matches = list(session.get_objects(template))
            except p11err.PKCS11Error as exc:
                raise TokenError(
                    f"searching token {self.label!r} for {uri} failed: {type(exc).__name__}"
                ) from None
            if not matches:
                present = [
                    f"label={key.label!r} id={bytes(key[Attribute.ID]).hex() or '(empty)'}"
                    for key in session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY})
                ]
                raise KeyNotFoundError(
                    f"no private key in token {self.label!r} matches {uri}; private keys "
                    f"present: {'; '.join(present) or 'none'}"
                )
            if len(matches) > 1:
                listed = "; ".join(
                    f"label={key.label!r} id={bytes(key[Attribute.ID]).hex() or '(empty)'}"
                    for key in matches
                )
                raise AmbiguousKeyError(
                    f"{len(matches)} private keys in token {self.label!r} match {uri}: "
                    f"{listed}; add id= (or a unique object=) to the key URI"
                )
            info = _describe_key(session, matches[0])
        return TokenKey(self, uri, info)

    def sign(self, key: TokenKey, mechanism: Mechanism, data: bytes) -> bytes:
        """Sign ``data`` with ``key`` inside the token. Called from worker threads."""
        started = time.perf_counter()
        try:
            with self._session() as pooled:
                handle = pooled.keys.get((key.info.label, key.info.id))
                if handle is None:
                    handle = pooled.session.get_key(
                        object_class=ObjectClass.PRIVATE_KEY,
                        label=key.info.label,
                        id=key.info.id,
                    )
                    pooled.keys[(key.info.label, key.info.id)] = handle
                signature: bytes = handle.sign(data, mechanism=_P11_MECHANISM[mechanism])
        except p11err.PKCS11Error as exc:
            reason = type(exc).__name__
            self._observer(
                SignatureEvent(
                    str(key.uri), mechanism, False, time.perf_counter() - started, reason
                )
            )
            raise SigningError(f"token {self.label!r} failed to sign: {reason}") from None
        except SigningError as exc:
            self._observer(
                SignatureEvent(
                    str(key.uri), mechanism, False, time.perf_counter() - started, str(exc)
                )
            )
            raise
        self._observer(SignatureEvent(str(key.uri), mechanism, True, time.perf_counter() - started))
        return signature

    def close(self) -> None:
        """Close this object's sessions; the shared login session goes with the last user."""
        if self._closed:
            return
        self._closed = True
        for pooled in reversed(self._sessions):
            with suppress(p11err.PKCS11Error):
                pooled.session.close()
        self._sessions.clear()
        _release_login(self._login_key)

    def __enter__(self) -> Token:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class TokenKey:
    """A private key in a logged-in token: something that signs, nothing that leaks."""

    token: Token
    uri: KeyURI
    info: KeyInfo

    def sign(self, mechanism: Mechanism, data: bytes) -> bytes:
        return self.token.sign(self, mechanism, data)


def _bool_attribute(obj: Any, attribute: Attribute) -> bool | None:
    try:
        return bool(obj[attribute])
    except p11err.PKCS11Error:
        return None


def _describe_key(session: Any, key: Any) -> KeyInfo:
    label = key.label
    key_id = bytes(key[Attribute.ID])
    key_type = key.key_type
    public_der: bytes | None
    if key_type == KeyType.EC:
        params = bytes(key[Attribute.EC_PARAMS])
        curve_oid = ECDomainParameters.load(params).chosen.dotted
        if curve_oid not in EC_CURVES:
            raise TokenError(
                f"key label={label!r} is on curve {curve_oid}; supported curves: P-256, P-384"
            )
        size = EC_CURVES[curve_oid]
        public_der = _find_ec_public_key(session, label, key_id)
        kind = "EC"
    elif key_type == KeyType.RSA:
        modulus = int.from_bytes(bytes(key[Attribute.MODULUS]), "big")
        exponent = int.from_bytes(bytes(key[Attribute.PUBLIC_EXPONENT]), "big")
        bits = modulus.bit_length()
        if bits not in RSA_BITS:
            raise TokenError(f"RSA key label={label!r} has {bits} bits; supported: 2048 to 4096")
        size = f"RSA-{bits}"
        public_der = PublicKeyInfo(
            {
                "algorithm": {"algorithm": "rsa"},
                "public_key": RSAPublicKey({"modulus": modulus, "public_exponent": exponent}),
            }
        ).dump()
        kind = "RSA"
    else:
        raise TokenError(f"key label={label!r} is of type {key_type!r}; supported: EC and RSA")
    return KeyInfo(
        label=label,
        id=key_id,
        key_type=kind,
        size=size,
        public_key_der=public_der,
        sensitive=_bool_attribute(key, Attribute.SENSITIVE),
        extractable=_bool_attribute(key, Attribute.EXTRACTABLE),
        always_sensitive=_bool_attribute(key, Attribute.ALWAYS_SENSITIVE),
        never_extractable=_bool_attribute(key, Attribute.NEVER_EXTRACTABLE),
    )


def _find_ec_public_key(session: Any, label: str, key_id: bytes) -> bytes | None:
    """The SPKI of the EC public key object paired with a private key, if the token has one.

    EC private key objects carry no public point, so the pair is found by CKA_ID (or by
    label when the ID is empty). Tokens that keep no public key object rely on the test
    signature that validation makes against the certificate instead.
    """
    template: dict[Attribute, Any] = {Attribute.CLASS: ObjectClass.PUBLIC_KEY}
    if key_id:
        template[Attribute.ID] = key_id
    else:
        template[Attribute.LABEL] = label
    candidates = list(session.get_objects(template))
    if len(candidates) != 1:
        return None
    return encode_ec_public_key(candidates[0])


# --- provisioning: dev mode and tests make real SoftHSM2 tokens with these ---------------


def initialize_token(module_path: str, label: str, so_pin: str, user_pin: str) -> None:
    """Initialise the first free slot of ``module_path`` as token ``label`` with both PINs.

    python-pkcs11 has no C_InitToken, and softhsm2-util would need the PINs on its command
    line, so the one call is made through ctypes on the same, already initialised module.
    """
    encoded_label = label.encode("utf-8")
    if len(encoded_label) > 32:
        raise TokenError(f"token label {label!r} is longer than PKCS#11's 32 bytes")
    module = load_module(module_path)
    free = [
        slot
        for slot in module.get_slots(token_present=True)
        if not slot.get_token().flags & TokenFlag.TOKEN_INITIALIZED
    ]
    if not free:
        raise TokenError(f"{module_path} has no free slot to initialise a token in")
    library = ctypes.CDLL(module_path)
    library.C_InitToken.argtypes = [
        ctypes.c_ulong,
        ctypes.c_char_p,
        ctypes.c_ulong,
        ctypes.c_char_p,
    ]
    library.C_InitToken.restype = ctypes.c_ulong
    so_pin_bytes = so_pin.encode("utf-8")
    padded_label = encoded_label + b" " * (32 - len(encoded_label))  # PKCS#11 blank-pads labels
    result = library.C_InitToken(free[0].slot_id, so_pin_bytes, len(so_pin_bytes), padded_label)
    if result != 0:
        raise TokenError(f"C_InitToken for {label!r} failed with CKR 0x{result:08x}")
    token = module.get_token(token_label=label)
    with token.open(rw=True, so_pin=so_pin) as session:
        session.init_pin(user_pin)


def generate_key(
    module_path: str,
    token_label: str,
    pin: str,
    label: str,
    key_id: bytes,
    kind: str,
    *,
    extractable: bool = False,
) -> None:
    """Generate a key pair in the token: ``kind`` is ``P-256``, ``P-384`` or ``RSA-<bits>``.

    The private key is sensitive, can only sign, and, unless asked otherwise, is never
    extractable.
    """
    token = load_module(module_path).get_token(token_label=token_label)
    private_template = {
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: extractable,
        Attribute.SIGN: True,
        Attribute.SIGN_RECOVER: False,
        Attribute.PRIVATE: True,
    }
    curves = {name: oid for oid, name in EC_CURVES.items()}
    try:
        with token.open(rw=True, user_pin=pin) as session:
            if kind in curves:
                private_template[Attribute.DERIVE] = False  # a TLS key only ever signs
                params = session.create_domain_parameters(
                    KeyType.EC,
                    {Attribute.EC_PARAMS: encode_named_curve_parameters(curves[kind])},
                    local=True,
                )
                params.generate_keypair(
                    store=True, label=label, id=key_id, private_template=private_template
                )
            elif kind.startswith("RSA-") and kind[4:].isdigit() and int(kind[4:]) in RSA_BITS:
                private_template[Attribute.DECRYPT] = False
                private_template[Attribute.UNWRAP] = False
                session.generate_keypair(
                    KeyType.RSA,
                    int(kind[4:]),
                    store=True,
                    label=label,
                    id=key_id,
                    private_template=private_template,
                )
            else:
                raise TokenError(
                    f"unsupported key kind {kind!r}; use P-256, P-384 or RSA-2048..4096"
                )
    except p11err.PKCS11Error as exc:
        raise TokenError(f"generating {kind} key {label!r} failed: {type(exc).__name__}") from None


def change_pin(module_path: str, token_label: str, old_pin: str, new_pin: str) -> None:
    """Change the user PIN of a token (C_SetPIN), as an operator rotating it would."""
    token = load_module(module_path).get_token(token_label=token_label)
    try:
        with token.open(rw=True, user_pin=old_pin) as session:
            session.set_pin(old_pin, new_pin)
    except p11err.PKCS11Error as exc:
        raise _login_failure(exc, token_label) from None


if __name__ == "__main__":  # probe_login's child: python -m proxy.token --probe-login MODULE URI
    if len(sys.argv) != 4 or sys.argv[1] != "--probe-login":
        print("usage: python -m proxy.token --probe-login MODULE TOKEN-URI (PIN on stdin)")
        raise SystemExit(2)
    raise SystemExit(_probe_login_main(sys.argv[2], sys.argv[3]))
