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
short-lived child process (``python -m proxy.pkcs11.token --probe-login``) that reads it from a
pipe, never from its command line.

``Token.sign`` is synchronous and thread-safe: it is called from OpenSSL's key callbacks,
inside a handshake step that runs in a worker thread (DESIGN.md, decision 3). It borrows a
session from the pool, signs with the key object found in that session, and returns the
session. Object handles are looked up once per session and cached. Because many threads
call the module, it is initialised with CKF_OS_LOCKING_OK (python-pkcs11 passes NULL,
which lets SoftHSM2 drop its locks).

A token that fails is recovered in place (see :class:`Token`): a lost session or login is
reopened and the signature retried; a failing device marks the token unusable, so that
signatures fail at once, while a background thread rebuilds the pool with backoff.
:attr:`Token.usable` is what readiness reports.

Nothing here knows about trio, OpenSSL or TLS; only this module imports ``pkcs11``. PINs
are passed in, used for ``C_Login`` and never stored, logged, or put into an exception.

The provisioning helpers at the end (initialise a token, generate keys, change a PIN) serve
the dev mode and the tests, which make real SoftHSM2 tokens.
"""

from __future__ import annotations

import ctypes
import enum
import hashlib
import logging
import os
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
from proxy.pkcs11.uri import KeyURI, parse_key_uri


class Mechanism(enum.Enum):
    """The signing mechanisms a TLS handshake needs from a token."""

    ECDSA = "ECDSA"  # the digest goes in, r || s comes out
    RSA_PKCS = "RSA_PKCS"  # PKCS#1 v1.5: DigestInfo in, the token pads
    RSA_X_509 = "RSA_X_509"  # raw RSA: OpenSSL already applied the (PSS) padding
    RSA_PKCS_PSS = "RSA_PKCS_PSS"  # the digest goes in, the token applies PSS padding


_P11_MECHANISM = {
    Mechanism.ECDSA: pkcs11.Mechanism.ECDSA,
    Mechanism.RSA_PKCS: pkcs11.Mechanism.RSA_PKCS,
    Mechanism.RSA_X_509: pkcs11.Mechanism.RSA_X_509,
    Mechanism.RSA_PKCS_PSS: pkcs11.Mechanism.RSA_PKCS_PSS,
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

    def custody_problems(self) -> list[str]:
        """Why the key could leave the token, if it could (empty when it cannot)."""
        problems = []
        if self.extractable is not False:
            problems.append("extractable" if self.extractable else "extractability unknown")
        if self.sensitive is not True:
            problems.append("not sensitive" if self.sensitive is False else "sensitivity unknown")
        return problems


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
    epoch: int = 0
    keys: dict[tuple[str, bytes], Any] = field(default_factory=dict)


_log = logging.getLogger("hsm_proxy.token")
_loaded_modules: dict[str, Any] = {}
_module_lock = threading.Lock()


class _FunctionListHead(ctypes.Structure):
    # The start of CK_FUNCTION_LIST: the version, then the first seven functions.
    _fields_ = [
        ("major", ctypes.c_ubyte),
        ("minor", ctypes.c_ubyte),
        ("C_Initialize", ctypes.c_void_p),
        ("C_Finalize", ctypes.c_void_p),
        ("C_GetInfo", ctypes.c_void_p),
        ("C_GetFunctionList", ctypes.c_void_p),
        ("C_GetSlotList", ctypes.c_void_p),
        ("C_GetSlotInfo", ctypes.c_void_p),
        ("C_GetTokenInfo", ctypes.c_void_p),
    ]


class _TokenInfo(ctypes.Structure):
    # CK_TOKEN_INFO (python-pkcs11 does not expose the session counts).
    _fields_ = [
        ("label", ctypes.c_ubyte * 32),
        ("manufacturerID", ctypes.c_ubyte * 32),
        ("model", ctypes.c_ubyte * 16),
        ("serialNumber", ctypes.c_ubyte * 16),
        ("flags", ctypes.c_ulong),
        ("ulMaxSessionCount", ctypes.c_ulong),
        ("ulSessionCount", ctypes.c_ulong),
        ("ulMaxRwSessionCount", ctypes.c_ulong),
        ("ulRwSessionCount", ctypes.c_ulong),
        ("ulMaxPinLen", ctypes.c_ulong),
        ("ulMinPinLen", ctypes.c_ulong),
        ("ulTotalPublicMemory", ctypes.c_ulong),
        ("ulFreePublicMemory", ctypes.c_ulong),
        ("ulTotalPrivateMemory", ctypes.c_ulong),
        ("ulFreePrivateMemory", ctypes.c_ulong),
        ("hardwareVersion", ctypes.c_ubyte * 2),
        ("firmwareVersion", ctypes.c_ubyte * 2),
        ("utcTime", ctypes.c_ubyte * 16),
    ]


_CK_UNAVAILABLE_INFORMATION = ctypes.c_ulong(-1).value


def _session_room(path: str, slot_id: int) -> int | None:
    """How many more sessions the token says it can open; None when it sets no limit."""
    info = _TokenInfo()
    get_token_info = ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_ulong, ctypes.c_void_p)(
        _function_list_head(path).C_GetTokenInfo
    )
    if get_token_info(slot_id, ctypes.addressof(info)) != 0:
        return None
    limit, used = int(info.ulMaxSessionCount), int(info.ulSessionCount)
    if limit in (0, _CK_UNAVAILABLE_INFORMATION):  # CK_EFFECTIVELY_INFINITE, or unknown
        return None
    return limit - (0 if used == _CK_UNAVAILABLE_INFORMATION else used)


class _InitializeArgs(ctypes.Structure):
    # CK_C_INITIALIZE_ARGS: no mutex callbacks, CKF_OS_LOCKING_OK.
    _fields_ = [
        ("CreateMutex", ctypes.c_void_p),
        ("DestroyMutex", ctypes.c_void_p),
        ("LockMutex", ctypes.c_void_p),
        ("UnlockMutex", ctypes.c_void_p),
        ("flags", ctypes.c_ulong),
        ("pReserved", ctypes.c_void_p),
    ]


_CKF_OS_LOCKING_OK = 0x2
_CKR_CRYPTOKI_ALREADY_INITIALIZED = 0x191
_CKR_CRYPTOKI_NOT_INITIALIZED = 0x190
_RAW_CALL = ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_void_p)


def _function_list_head(path: str) -> _FunctionListHead:
    library = ctypes.CDLL(path)  # the handle python-pkcs11 opened: same module state
    head = ctypes.POINTER(_FunctionListHead)()
    get = library.C_GetFunctionList
    get.argtypes = [ctypes.POINTER(ctypes.POINTER(_FunctionListHead))]
    get.restype = ctypes.c_ulong
    result = get(ctypes.byref(head))
    if result != 0 or not head:
        raise ModuleLoadError(f"C_GetFunctionList of {path} failed with CKR 0x{result:08x}")
    return head.contents


def _initialize_threaded(path: str) -> None:
    """C_Initialize telling the module that several threads call it (CKF_OS_LOCKING_OK).

    python-pkcs11 passes NULL, which per PKCS#11 promises single-threaded use, and
    SoftHSM2 then runs without its mutexes: concurrent signatures in different sessions
    fail with CKR_GENERAL_ERROR. The pool signs from many threads, so the module is told to
    lock.
    """
    arguments = _InitializeArgs(None, None, None, None, _CKF_OS_LOCKING_OK, None)
    initialize = _RAW_CALL(_function_list_head(path).C_Initialize)
    result = initialize(ctypes.addressof(arguments))
    if result not in (0, _CKR_CRYPTOKI_ALREADY_INITIALIZED):
        raise ModuleLoadError(f"C_Initialize of {path} failed with CKR 0x{result:08x}")


def _finalize(path: str) -> None:
    finalize = _RAW_CALL(_function_list_head(path).C_Finalize)
    finalize(None)  # any error: the module is gone either way


class _ThreadSafeLib(_pkcs11_native.lib):  # type: ignore[misc]
    """python-pkcs11's ``lib``, initialised with CKF_OS_LOCKING_OK (see _initialize_threaded).

    The call goes through the module's function list, not an exported C_Initialize symbol:
    a module may export only C_GetFunctionList (faulthsm does, and PKCS#11 allows it).
    """

    def __init__(self, so: str) -> None:
        self._path = so
        super().__init__(so)

    def initialize(self) -> None:
        _initialize_threaded(self._path)


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


def unload_module(path: str) -> None:
    """Finalize the module at ``path`` (C_Finalize) so that another module that forwards to
    it (faulthsm in dev mode) can initialise it afresh in this process."""
    with _module_lock:
        module = _loaded_modules.pop(path, None)
    if module is not None:
        _finalize(path)


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
    try:
        return _select_token_unguarded(module_path, uri)
    except p11err.PKCS11Error as exc:
        raise TokenError(
            f"cannot look for the token {uri} in {module_path}: {type(exc).__name__}"
        ) from None


def _select_token_unguarded(module_path: str, uri: KeyURI) -> Any:
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


_LOGIN_FAILURES = (
    p11err.PinIncorrect,
    p11err.PinLocked,
    p11err.PinExpired,
    p11err.PinInvalid,
    p11err.PinLenRange,
    p11err.UserPinNotInitialized,
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


def _ensure_login(
    token: Any, module_path: str, pin: Callable[[], str], probe: dict[Attribute, Any]
) -> None:
    """Recovery: log the process in again if it lost its login (a new login session).

    Whether it is still logged in is seen from a plain session: private objects (the
    ``probe`` template) are visible only to a logged-in process. The old login session is
    dropped, not closed: it is dead, and if it were not, closing it would log out again.
    """
    key = (module_path, int(token.slot.slot_id))
    with _logins_lock:
        check = token.open()
        try:
            if next(iter(check.get_objects(probe)), None) is not None:
                return
        finally:
            with suppress(p11err.PKCS11Error):
                check.close()
        try:
            session = token.open(user_pin=pin())
        except p11err.UserAlreadyLoggedIn:
            return  # another thread of this process logged in meanwhile
        login = _logins.get(key)
        if login is None:
            _logins[key] = _Login(session, 1)
        else:
            login.session = session


_PROBE_TIMEOUT = 30.0


def probe_login(module_path: str, selection: KeyURI, pin: str) -> None:
    """Prove that ``pin`` logs in to the token, in a child process; raise LoginError if not.

    The child gets the module path and the key URI on its command line (no secret there)
    and the PIN on its standard input; it logs in, logs out and says which PKCS#11 error,
    if any, it met. Live sessions of this process are not touched.
    """
    try:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "proxy.pkcs11.token",
                "--probe-login",
                module_path,
                str(selection),
            ],
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


class _Failure(enum.Enum):
    """How bad a PKCS#11 error is, which decides the recovery."""

    OPERATION = "operation"  # this signature failed; sessions and login are fine
    SESSION = "session"  # a session or the login is gone: reopen the pool, log in again
    DEVICE = "device"  # the token or module is unwell: fail fast, recover in the background


_SESSION_FAILURES = (
    p11err.SessionHandleInvalid,
    p11err.SessionClosed,
    p11err.UserNotLoggedIn,
    p11err.ObjectHandleInvalid,
    p11err.KeyHandleInvalid,
    p11err.OperationActive,
    p11err.OperationNotInitialized,
)
_DEVICE_FAILURES = (
    p11err.DeviceError,
    p11err.DeviceRemoved,
    p11err.DeviceMemory,
    p11err.TokenNotPresent,
    p11err.TokenNotRecognised,
    p11err.GeneralError,
    p11err.FunctionFailed,
)


def _classify(exc: p11err.PKCS11Error) -> _Failure:
    if isinstance(exc, _SESSION_FAILURES):
        return _Failure.SESSION
    if isinstance(exc, _DEVICE_FAILURES):
        return _Failure.DEVICE
    if type(exc) is p11err.PKCS11Error and "not initialized" in str(exc):
        return _Failure.DEVICE  # CKR_CRYPTOKI_NOT_INITIALIZED: the module lost its state
    return _Failure.OPERATION


def _reason(exc: BaseException) -> str:
    if type(exc) is p11err.PKCS11Error and "not initialized" in str(exc):
        return "CryptokiNotInitialized"
    return type(exc).__name__


@dataclass(frozen=True)
class PSSParams:
    """What CKM_RSA_PKCS_PSS needs besides the digest: its hash and the salt length."""

    hash: str  # "SHA256", "SHA384" or "SHA512"; MGF1 uses the same hash
    salt_length: int


_PSS_HASHES = {
    "SHA256": (pkcs11.Mechanism.SHA256, pkcs11.MGF.SHA256, 32),
    "SHA384": (pkcs11.Mechanism.SHA384, pkcs11.MGF.SHA384, 48),
    "SHA512": (pkcs11.Mechanism.SHA512, pkcs11.MGF.SHA512, 64),
}

# What the recovery test signature signs: a SHA-256 digest, as in a TLS handshake.
_PROBE_DIGEST = hashlib.sha256(b"hsm-proxy recovery probe").digest()
_SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")


class Token:
    """A logged-in token with a pool of sessions; thread-safe ``sign`` that recovers.

    Recovery. A PKCS#11 error is classified (:func:`_classify`). An error that only
    concerns the operation fails that signature. One that means a session or the login is
    gone (CKR_SESSION_HANDLE_INVALID, CKR_SESSION_CLOSED, CKR_USER_NOT_LOGGED_IN, ...)
    makes the signing thread rebuild the pool at once (close every session, open new ones,
    log in again with a PIN read afresh from ``pin_provider``) and retry the signature
    once, so the client never notices. One that means the device is unwell
    (CKR_DEVICE_ERROR, CKR_TOKEN_NOT_PRESENT, CKR_CRYPTOKI_NOT_INITIALIZED, ...) marks
    the token unusable: every signature then fails at once, without touching the token,
    while one background thread rebuilds the pool (re-initialising the module when a plain
    rebuild does not work) with exponential backoff, and proves the token works with a
    test signature before it is marked usable again. :attr:`usable` and
    :attr:`unusable_reason` say where it stands (readiness reads them).

    Every pool rebuild starts a new *epoch*: sessions of an older epoch that threads still
    hold are retired when they come back, never reused.
    """

    def __init__(
        self,
        module_path: str,
        selection: KeyURI,
        pin: str,
        pool_size: int = 4,
        acquire_timeout: float = 10.0,
        observer: SignatureObserver = _ignore_event,
        pin_provider: Callable[[], str] | None = None,
        backoff: tuple[float, float] = (0.1, 5.0),
    ) -> None:
        if pool_size < 1:
            raise TokenError(f"the session pool needs at least 1 session, got {pool_size}")
        self.module_path = module_path
        self._selection = selection
        self._token = _select_token(module_path, selection)
        self.label: str = self._token.label
        room = _session_room(module_path, self._token.slot.slot_id)
        if room is not None and room < pool_size:
            if room < 1:
                raise TokenError(f"token {self.label!r} has no free session (its limit is reached)")
            _log.warning(
                f"token {self.label!r} allows {room} more sessions; the pool uses {room} "
                f"instead of the {pool_size} configured",
                extra={"fields": {"event": "token_session_limit"}},
            )
            pool_size = room
        self._size = pool_size
        self._observer = observer
        self._acquire_timeout = acquire_timeout
        self._pin_provider = pin_provider
        self._backoff = backoff
        self._condition = threading.Condition()
        self._recovery_lock = threading.Lock()
        self._idle: list[_PooledSession] = []
        self._borrowed: set[int] = set()  # id() of sessions threads hold now
        self._retired: list[_PooledSession] = []
        self._epoch = 0
        self._closed = False
        self._down_reason: str | None = None
        self._recovering = False
        self._stop = threading.Event()
        self._keys: list[TokenKey] = []
        self._closed = True  # until the login is held
        self._login_key = _acquire_login(self._token, module_path, selection, pin)
        self._closed = False
        try:
            self._idle = self._open_sessions()
        except p11err.PKCS11Error as exc:
            self._closed = True
            _release_login(self._login_key)
            raise TokenError(
                f"token {self.label!r} refused to open {pool_size} sessions "
                f"({_reason(exc)}); lower [token] sessions"
            ) from None
        self.mechanisms = self._read_mechanisms()

    def _read_mechanisms(self) -> frozenset[Mechanism]:
        offered = set(self._token.slot.get_mechanisms())
        return frozenset(ours for ours, theirs in _P11_MECHANISM.items() if theirs in offered)

    def _open_sessions(self) -> list[_PooledSession]:
        """Open ``size`` plain sessions (they share the process's login); all or nothing."""
        opened: list[_PooledSession] = []
        try:
            while len(opened) < self._size:
                opened.append(_PooledSession(self._token.open(), epoch=self._epoch))
        except BaseException:
            for pooled in reversed(opened):
                with suppress(p11err.PKCS11Error):
                    pooled.session.close()
            raise
        return opened

    @property
    def pool_size(self) -> int:
        return self._size

    @property
    def usable(self) -> bool:
        """False while the token is failing and being recovered (or after close)."""
        return not self._closed and self._down_reason is None

    @property
    def unusable_reason(self) -> str | None:
        if self._closed:
            return "closed"
        return self._down_reason

    # -- the pool ------------------------------------------------------------------------

    def _borrow(self, probing: bool = False) -> _PooledSession:
        deadline = time.monotonic() + self._acquire_timeout
        with self._condition:
            while True:
                if self._closed:
                    raise TokenError(f"token {self.label!r} has been closed")
                if self._down_reason is not None and not probing:
                    raise SigningError(self._down_message())
                if self._idle:
                    pooled = self._idle.pop()
                    self._borrowed.add(id(pooled))
                    return pooled
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise SigningError(
                        f"no free session on token {self.label!r} within {self._acquire_timeout:g}s"
                    )
                self._condition.wait(remaining)

    def _give_back(self, pooled: _PooledSession, broken: bool = False) -> None:
        with self._condition:
            self._borrowed.discard(id(pooled))
            if broken or pooled.epoch != self._epoch or self._closed:
                self._retired.append(pooled)
            else:
                self._idle.append(pooled)
            self._condition.notify_all()

    @contextmanager
    def _session(self) -> Iterator[_PooledSession]:
        pooled = self._borrow()
        try:
            yield pooled
        finally:
            self._give_back(pooled)

    def _down_message(self) -> str:
        until = "while it recovers" if self._recovering else "until a reload or restart"
        return f"token {self.label!r} is unusable ({self._down_reason}); refusing at once {until}"

    # -- recovery ------------------------------------------------------------------------

    def _rebuild(self, reinitialize: bool) -> None:
        """Retire every session, then open a fresh, logged-in pool (a new epoch)."""
        if self._pin_provider is None:
            raise TokenError(f"token {self.label!r} cannot log in again: no PIN source")
        with self._condition:
            self._epoch += 1
            self._retired.extend(self._idle)
            self._idle = []
            # Sessions other threads still hold fail the same way; wait for them (bounded)
            # before their pool is replaced.
            deadline = time.monotonic() + self._acquire_timeout
            while self._borrowed and time.monotonic() < deadline:
                self._condition.wait(deadline - time.monotonic())
            retired, self._retired = self._retired, []
        if reinitialize:
            _finalize(self.module_path)  # every session of the process ends here
            try:
                _initialize_threaded(self.module_path)
            except ModuleLoadError as exc:
                raise TokenError(f"re-initialising the module failed: {exc}") from None
            self._token = _select_token(self.module_path, self._selection)
        else:
            for pooled in reversed(retired):
                with suppress(p11err.PKCS11Error):
                    pooled.session.close()
        probe: dict[Attribute, Any] = {Attribute.CLASS: ObjectClass.PRIVATE_KEY}
        if self._keys:
            probe[Attribute.LABEL] = self._keys[0].info.label
            probe[Attribute.ID] = self._keys[0].info.id
        _ensure_login(self._token, self.module_path, self._pin_provider, probe)
        fresh = self._open_sessions()
        with self._condition:
            closed = self._closed
            if not closed:
                self._idle = fresh
                self._condition.notify_all()
        if closed:
            for pooled in reversed(fresh):
                with suppress(p11err.PKCS11Error):
                    pooled.session.close()

    def _probe(self) -> None:
        """One test signature with each key in use: proof that the token really signs.

        Probe signatures are key usage too: each one reaches the observer (the audit log).
        """
        pooled = self._borrow(probing=True)
        broken = False
        try:
            for key in self._keys:
                if key.info.key_type == "EC":
                    mechanism, data = Mechanism.ECDSA, _PROBE_DIGEST
                else:
                    mechanism, data = Mechanism.RSA_PKCS, _SHA256_DIGEST_INFO + _PROBE_DIGEST
                started = time.perf_counter()
                try:
                    self._key_handle(pooled, key).sign(data, mechanism=_P11_MECHANISM[mechanism])
                except p11err.PKCS11Error as exc:
                    elapsed = time.perf_counter() - started
                    self._observer(
                        SignatureEvent(str(key.uri), mechanism, False, elapsed, _reason(exc))
                    )
                    raise
                elapsed = time.perf_counter() - started
                self._observer(SignatureEvent(str(key.uri), mechanism, True, elapsed))
        except p11err.PKCS11Error:
            broken = True
            raise
        finally:
            self._give_back(pooled, broken)

    def _mark_down(self, reason: str, recover: bool = True) -> None:
        with self._condition:
            if self._closed:
                return
            if self._down_reason is None:
                _log.warning(
                    f"token {self.label!r} is unusable ({reason}): new handshakes fail at "
                    "once until it recovers",
                    extra={"fields": {"event": "token_down", "reason": reason}},
                )
            self._down_reason = reason
            self._condition.notify_all()
            if recover and not self._recovering:
                self._recovering = True
                threading.Thread(
                    target=self._recover_in_background, name="token-recovery", daemon=True
                ).start()

    def _recover_in_background(self) -> None:
        delay, ceiling = self._backoff
        attempt = 0
        while not self._stop.is_set():
            attempt += 1
            try:
                with self._recovery_lock:
                    try:
                        self._rebuild(reinitialize=False)
                    except p11err.PKCS11Error:
                        self._rebuild(reinitialize=True)
                    self._probe()
            except _LOGIN_FAILURES as exc:
                # Trying the same PIN again could lock it: stay down until a new generation
                # (a reload with the right PIN) or a restart replaces this token.
                reason = str(_login_failure(exc, self.label))
                with self._condition:
                    self._down_reason = reason
                    self._recovering = False
                _log.error(
                    f"{reason} while recovering; not retrying, so as not to lock the PIN",
                    extra={"fields": {"event": "token_recovery_abandoned"}},
                )
                return
            except (p11err.PKCS11Error, TokenError) as exc:
                reason = str(exc.args[0]) if isinstance(exc, TokenError) else _reason(exc)
                with self._condition:
                    if self._down_reason is not None:
                        self._down_reason = reason
                _log.info(
                    f"token {self.label!r} still unusable after attempt {attempt} ({reason}); "
                    f"next attempt in {delay:g}s",
                    extra={"fields": {"event": "token_recovery_failed", "attempt": attempt}},
                )
                self._stop.wait(delay)
                delay = min(delay * 2, ceiling)
                continue
            with self._condition:
                self._down_reason = None
                self._recovering = False
                self._condition.notify_all()
            _log.warning(
                f"token {self.label!r} is usable again after {attempt} attempt(s)",
                extra={"fields": {"event": "token_recovered", "attempts": attempt}},
            )
            return
        with self._condition:
            self._recovering = False

    def _recover_now(self, failed_epoch: int) -> bool:
        """A session-level failure: rebuild the pool in this thread; True if it worked."""
        with self._recovery_lock:
            with self._condition:
                if self._down_reason is not None:
                    return False
                if self._epoch != failed_epoch:
                    return True  # another thread rebuilt the pool meanwhile
            try:
                self._rebuild(reinitialize=False)
            except _LOGIN_FAILURES as exc:
                reason = str(_login_failure(exc, self.label))
                self._mark_down(reason, recover=False)
                _log.error(
                    f"{reason} while logging in again; not retrying, so as not to lock the PIN",
                    extra={"fields": {"event": "token_recovery_abandoned"}},
                )
                return False
            except (p11err.PKCS11Error, TokenError) as exc:
                reason = exc.args[0] if isinstance(exc, TokenError) else _reason(exc)
                self._mark_down(str(reason))
                return False
            _log.info(
                f"token {self.label!r}: sessions reopened and logged in again",
                extra={"fields": {"event": "token_sessions_reopened"}},
            )
            return True

    # -- keys and signatures -------------------------------------------------------------

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
        key = TokenKey(self, uri, info)
        self._keys.append(key)
        return key

    @staticmethod
    def _key_handle(pooled: _PooledSession, key: TokenKey) -> Any:
        handle = pooled.keys.get((key.info.label, key.info.id))
        if handle is None:
            handle = pooled.session.get_key(
                object_class=ObjectClass.PRIVATE_KEY, label=key.info.label, id=key.info.id
            )
            pooled.keys[(key.info.label, key.info.id)] = handle
        return handle

    def _sign_once(
        self, key: TokenKey, mechanism: Mechanism, data: bytes, pss: PSSParams | None
    ) -> bytes:
        pooled = self._borrow()
        broken = False
        try:
            handle = self._key_handle(pooled, key)
            parameters = None
            if mechanism is Mechanism.RSA_PKCS_PSS:
                if pss is None or pss.hash not in _PSS_HASHES:
                    raise SigningError(f"RSA-PSS needs a hash of {', '.join(_PSS_HASHES)}")
                hash_mechanism, mgf, _ = _PSS_HASHES[pss.hash]
                parameters = (hash_mechanism, mgf, pss.salt_length)
            signature: bytes = handle.sign(
                data, mechanism=_P11_MECHANISM[mechanism], mechanism_param=parameters
            )
        except p11err.PKCS11Error as exc:
            broken = _classify(exc) is not _Failure.OPERATION
            exc.hsm_proxy_epoch = pooled.epoch  # type: ignore[attr-defined]
            raise
        finally:
            self._give_back(pooled, broken)
        return signature

    def sign(
        self, key: TokenKey, mechanism: Mechanism, data: bytes, pss: PSSParams | None = None
    ) -> bytes:
        """Sign ``data`` with ``key`` inside the token. Called from worker threads."""
        started = time.perf_counter()
        uri = str(key.uri)
        try:
            try:
                signature = self._sign_once(key, mechanism, data, pss)
            except p11err.PKCS11Error as exc:
                failure = _classify(exc)
                if failure is _Failure.DEVICE:
                    self._mark_down(_reason(exc))
                    raise
                if failure is _Failure.OPERATION or not self._recover_now(
                    getattr(exc, "hsm_proxy_epoch", -1)
                ):
                    raise
                signature = self._sign_once(key, mechanism, data, pss)  # one retry
        except p11err.PKCS11Error as exc:
            reason = _reason(exc)
            self._observer(
                SignatureEvent(uri, mechanism, False, time.perf_counter() - started, reason)
            )
            raise SigningError(
                f"token {self.label!r} failed to sign with CKM_{mechanism.value}: {reason}"
            ) from None
        except SigningError as exc:
            self._observer(
                SignatureEvent(uri, mechanism, False, time.perf_counter() - started, str(exc))
            )
            raise
        self._observer(SignatureEvent(uri, mechanism, True, time.perf_counter() - started))
        return signature

    def close(self) -> None:
        """Close this object's sessions and stop recovering; the shared login session
        goes with the last user."""
        with self._condition:
            if self._closed:
                return
            self._closed = True
            self._stop.set()
            sessions = self._idle + self._retired
            self._idle, self._retired = [], []
            self._condition.notify_all()
        for pooled in reversed(sessions):
            with suppress(p11err.PKCS11Error):
                pooled.session.close()
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

    @property
    def mechanisms(self) -> frozenset[Mechanism]:
        """The signing mechanisms the token offers (read once, at start-up)."""
        return self.token.mechanisms

    def sign(self, mechanism: Mechanism, data: bytes, pss: PSSParams | None = None) -> bytes:
        return self.token.sign(self, mechanism, data, pss)


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


# --- inventory: what `hsm-proxy doctor` shows ---------------------------------------------


@dataclass(frozen=True)
class SlotReport:
    """One slot of a module, its token (if any) and the mechanisms it offers."""

    slot_id: int
    description: str
    token_label: str | None
    serial: str | None
    manufacturer: str | None
    model: str | None
    login_required: bool
    mechanisms: tuple[str, ...]  # names (CKM_ without the prefix), vendor ones in hex

    def uri(self) -> KeyURI:
        """A key URI selection naming this token (label, and serial to be exact)."""
        return KeyURI(token=self.token_label, serial=self.serial or None, slot_id=self.slot_id)


# The mechanisms the key bridge uses (RSA_PKCS_PSS: tokens that pad PSS themselves).
PROXY_MECHANISMS = ("ECDSA", "RSA_PKCS", "RSA_X_509", "RSA_PKCS_PSS")


def _mechanism_name(mechanism: Any) -> str:
    name = getattr(mechanism, "name", None)
    return str(name) if name else f"0x{int(mechanism):08x}"


def describe_slots(module_path: str) -> list[SlotReport]:
    """Every slot with a token present: token identity and mechanism names."""
    module = load_module(module_path)
    reports = []
    try:
        slots = module.get_slots(token_present=True)
    except p11err.PKCS11Error as exc:
        raise TokenError(f"{module_path}: listing slots failed: {type(exc).__name__}") from None
    for slot in slots:
        label = serial = manufacturer = model = None
        login_required = False
        with suppress(p11err.TokenNotRecognised, p11err.TokenNotPresent):
            token = slot.get_token()
            if token.flags & TokenFlag.TOKEN_INITIALIZED:
                label = token.label
                serial = token.serial.decode(errors="replace").strip()
                manufacturer = token.manufacturer_id
                model = token.model
                login_required = bool(token.flags & TokenFlag.LOGIN_REQUIRED)
        try:
            names = sorted(_mechanism_name(mechanism) for mechanism in slot.get_mechanisms())
        except p11err.PKCS11Error:
            names = []
        reports.append(
            SlotReport(
                slot.slot_id,
                str(slot.slot_description).strip(),
                label,
                serial,
                manufacturer,
                model,
                login_required,
                tuple(names),
            )
        )
    return reports


@dataclass(frozen=True)
class KeyListing:
    """A private key object as listed: its description, or why the proxy cannot use it."""

    label: str
    id: bytes
    info: KeyInfo | None
    problem: str | None


def list_private_keys(token: Token) -> list[KeyListing]:
    """Every private key object the logged-in ``token`` shows, in token order."""
    listings = []
    with token._session() as pooled:
        try:
            objects = list(pooled.session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY}))
        except p11err.PKCS11Error as exc:
            raise TokenError(
                f"listing the keys of token {token.label!r} failed: {type(exc).__name__}"
            ) from None
        for obj in objects:
            label = obj.label or ""
            key_id = bytes(obj[Attribute.ID])
            try:
                listings.append(KeyListing(label, key_id, _describe_key(pooled.session, obj), None))
            except TokenError as exc:
                listings.append(KeyListing(label, key_id, None, str(exc)))
    return listings


if (
    __name__ == "__main__"
):  # probe_login's child: python -m proxy.pkcs11.token --probe-login MODULE URI
    if len(sys.argv) != 4 or sys.argv[1] != "--probe-login":
        print("usage: python -m proxy.pkcs11.token --probe-login MODULE TOKEN-URI (PIN on stdin)")
        raise SystemExit(2)
    raise SystemExit(_probe_login_main(sys.argv[2], sys.argv[3]))
