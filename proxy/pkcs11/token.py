"""The token: a logged-in token, a pool of sessions, thread-safe signing that recovers.

Theory of operation. A :class:`Token` selects one token of a module by the token
attributes of a key URI (module.py), logs in once with the PIN, joining the process's login
if there is one (login.py), and keeps a small pool of plain sessions.
:meth:`Token.find_private_key` turns a key URI into a :class:`TokenKey`: something that
signs, nothing that leaks.

``Token.sign`` is synchronous and thread-safe: it is called from OpenSSL's key callbacks,
inside a handshake step that runs in a worker thread (ARCHITECTURE.md, decision 3). It borrows a
session from the pool, signs with the key object found in that session, and returns the
session. Object handles are looked up once per session and cached.

A token that fails is recovered in place (see :class:`Token`): a lost session or login is
reopened and the signature retried; a failing device marks the token unusable, so that
signatures fail at once, while a background thread rebuilds the pool with backoff.
:attr:`Token.usable` is what readiness reports. Nothing here knows about trio, OpenSSL or
TLS.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import pkcs11.exceptions as p11err
from pkcs11 import Attribute, ObjectClass

from proxy.errors import (
    AmbiguousKeyError,
    KeyNotFoundError,
    ModuleLoadError,
    SigningError,
    TokenError,
)
from proxy.pkcs11.keys import (
    P11_MECHANISM,
    PSS_HASHES,
    SHA256_DIGEST_INFO,
    KeyInfo,
    Mechanism,
    PSSParams,
    SignatureEvent,
    SignatureObserver,
    describe_key,
)
from proxy.pkcs11.login import (
    LOGIN_FAILURES,
    acquire_login,
    ensure_login,
    login_failure,
    release_login,
)
from proxy.pkcs11.module import finalize, initialize_threaded, select_token, session_room
from proxy.pkcs11.uri import KeyURI


def _ignore_event(_event: SignatureEvent) -> None:
    return None


@dataclass
class _PooledSession:
    session: Any
    epoch: int = 0
    module_epoch: int = 0  # module initialisations before it was opened (see _give_back)
    keys: dict[tuple[str, bytes], Any] = field(default_factory=dict)


_log = logging.getLogger("hsm_proxy.token")


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


def _not_initialized(exc: BaseException) -> bool:
    """CKR_CRYPTOKI_NOT_INITIALIZED: python-pkcs11 raises it as a bare PKCS11Error."""
    return type(exc) is p11err.PKCS11Error and "not initialized" in str(exc)


def _classify(exc: p11err.PKCS11Error) -> _Failure:
    if isinstance(exc, _SESSION_FAILURES):
        return _Failure.SESSION
    if isinstance(exc, _DEVICE_FAILURES):
        return _Failure.DEVICE
    if _not_initialized(exc):
        return _Failure.DEVICE  # the module lost its state
    return _Failure.OPERATION


def _reason(exc: BaseException) -> str:
    """What failed, in a few words: a TokenError's message, else the PKCS#11 error's name."""
    if isinstance(exc, TokenError):
        return str(exc.args[0])
    if _not_initialized(exc):
        return "CryptokiNotInitialized"
    return type(exc).__name__


def _close_sessions(sessions: list[_PooledSession]) -> None:
    """Close sessions, newest first; one that is gone already is no error."""
    for pooled in reversed(sessions):
        with suppress(p11err.PKCS11Error):
            pooled.session.close()


def _key_names(keys: Iterable[Any]) -> list[str]:
    """``label=... id=...`` of private key objects, as error messages list them."""
    return [f"label={key.label!r} id={bytes(key[Attribute.ID]).hex() or '(empty)'}" for key in keys]


# What the recovery test signature signs: a SHA-256 digest, as in a TLS handshake.
_PROBE_DIGEST = hashlib.sha256(b"hsm-proxy recovery probe").digest()


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
        self._token = select_token(module_path, selection)
        self.label: str = self._token.label
        room = session_room(module_path, self._token.slot.slot_id)
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
        self._module_epoch = 0  # re-initialisations of the module: older handles are void
        self._down_reason: str | None = None
        self._recovering = False
        self._stop = threading.Event()
        self._keys: list[TokenKey] = []
        self._closed = True  # until the login is held
        self._login_key = acquire_login(self._token, module_path, selection, pin)
        self._closed = False
        try:
            self._idle = self._open_sessions()
        except p11err.PKCS11Error as exc:
            self._closed = True
            release_login(self._login_key)
            raise TokenError(
                f"token {self.label!r} refused to open {pool_size} sessions "
                f"({_reason(exc)}); lower [token] sessions"
            ) from None
        self.mechanisms = self._read_mechanisms()

    def _read_mechanisms(self) -> frozenset[Mechanism]:
        offered = set(self._token.slot.get_mechanisms())
        return frozenset(ours for ours, theirs in P11_MECHANISM.items() if theirs in offered)

    def _open_sessions(self) -> list[_PooledSession]:
        """Open ``size`` plain sessions (they share the process's login); all or nothing."""
        opened: list[_PooledSession] = []
        try:
            while len(opened) < self._size:
                opened.append(_PooledSession(self._token.open(), self._epoch, self._module_epoch))
        except BaseException:
            _close_sessions(opened)
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
        """Return a borrowed session: to the pool, or closed at once when it will not be
        used again (broken, from a pool since rebuilt, or the token closed), so that no
        session handle outlives its use: a token has few (CloudHSM: a fixed number per
        client), and a lost session, login or a reload must not eat them. While a rebuild
        runs (it may re-initialise the module, after which an old handle number can belong
        to a new session) it is left to the rebuild instead; one opened before the module
        was re-initialised is only dropped."""
        with self._condition:
            self._borrowed.discard(id(pooled))
            retire = broken or pooled.epoch != self._epoch or self._closed
            if not retire:
                self._idle.append(pooled)
            self._condition.notify_all()
        if not retire:
            return
        if not self._recovery_lock.acquire(blocking=False):
            with self._condition:
                self._retired.append(pooled)  # the rebuild under way closes or drops it
            return
        try:
            if pooled.module_epoch == self._module_epoch:
                _close_sessions([pooled])
        finally:
            self._recovery_lock.release()

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
        """Retire every session, then open a fresh, logged-in pool (a new epoch). Called
        with ``_recovery_lock`` held."""
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
            self._module_epoch += 1  # handles opened before are void from here on
            finalize(self.module_path)  # every session of the process ends here
            try:
                initialize_threaded(self.module_path)
            except ModuleLoadError as exc:
                raise TokenError(f"re-initialising the module failed: {exc}") from None
            self._token = select_token(self.module_path, self._selection)
        else:
            _close_sessions(retired)
        probe: dict[Attribute, Any] = {Attribute.CLASS: ObjectClass.PRIVATE_KEY}
        if self._keys:
            probe[Attribute.LABEL] = self._keys[0].info.label
            probe[Attribute.ID] = self._keys[0].info.id
        ensure_login(self._token, self.module_path, self._pin_provider, probe, reinitialize)
        fresh = self._open_sessions()
        with self._condition:
            closed = self._closed
            if not closed:
                self._idle = fresh
                self._condition.notify_all()
        if closed:
            _close_sessions(fresh)

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
                    mechanism, data = Mechanism.RSA_PKCS, SHA256_DIGEST_INFO + _PROBE_DIGEST
                started = time.perf_counter()
                try:
                    self._key_handle(pooled, key).sign(data, mechanism=P11_MECHANISM[mechanism])
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
            except LOGIN_FAILURES as exc:
                # Trying the same PIN again could lock it: stay down until a new generation
                # (a reload with the right PIN) or a restart replaces this token.
                reason = str(login_failure(exc, self.label))
                with self._condition:
                    self._down_reason = reason
                    self._recovering = False
                _log.error(
                    f"{reason} while recovering; not retrying, so as not to lock the PIN",
                    extra={"fields": {"event": "token_recovery_abandoned"}},
                )
                return
            except (p11err.PKCS11Error, TokenError) as exc:
                reason = _reason(exc)
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
            except LOGIN_FAILURES as exc:
                reason = str(login_failure(exc, self.label))
                self._mark_down(reason, recover=False)
                _log.error(
                    f"{reason} while logging in again; not retrying, so as not to lock the PIN",
                    extra={"fields": {"event": "token_recovery_abandoned"}},
                )
                return False
            except (p11err.PKCS11Error, TokenError) as exc:
                self._mark_down(_reason(exc))
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
                present = _key_names(
                    session.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY})
                )
                raise KeyNotFoundError(
                    f"no private key in token {self.label!r} matches {uri}; private keys "
                    f"present: {'; '.join(present) or 'none'}"
                )
            if len(matches) > 1:
                listed = "; ".join(_key_names(matches))
                raise AmbiguousKeyError(
                    f"{len(matches)} private keys in token {self.label!r} match {uri}: "
                    f"{listed}; add id= (or a unique object=) to the key URI"
                )
            info = describe_key(session, matches[0])
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
                if pss is None or pss.hash not in PSS_HASHES:
                    raise SigningError(f"RSA-PSS needs a hash of {', '.join(PSS_HASHES)}")
                hash_mechanism, mgf, _ = PSS_HASHES[pss.hash]
                parameters = (hash_mechanism, mgf, pss.salt_length)
            signature: bytes = handle.sign(
                data, mechanism=P11_MECHANISM[mechanism], mechanism_param=parameters
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
        _close_sessions(sessions)
        release_login(self._login_key)

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
