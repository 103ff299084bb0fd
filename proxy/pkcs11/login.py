"""Logging in: one shared login per token and process; refused logins named; PIN probes.

Theory of operation. PKCS#11 login state belongs to the application, not the session: the
first session logs in and every later session shares that login. One "login session" per
token and process is kept apart from the session pools (closing it logs the whole process
out, because python-pkcs11 calls C_Logout on it), shared by every Token object of that
token (:func:`acquire_login`) and closed when the last of them lets go
(:func:`release_login`). :func:`ensure_login` logs the process in again when a token's
recovery finds the login lost.

That sharing is what lets a reload rotate the PIN without touching a live connection: a new
generation opens its own fresh sessions while the old generation's are still signing, and
the old ones are closed only when nothing uses them. A second C_Login in a process that is
already logged in returns CKR_USER_ALREADY_LOGGED_IN without looking at the PIN, so when
the process is logged in already, the new PIN is proven by :func:`probe_login` in a
short-lived child process (``python -m proxy.pkcs11.login --probe-login``) that reads it
from a pipe, never from its command line.

PINs are passed in, used for ``C_Login`` and never stored, logged, or put into an
exception; :func:`login_failure` says why a login was refused (wrong, locked, expired ...).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import pkcs11.exceptions as p11err
from pkcs11 import Attribute

from proxy.errors import LoginError, ProxyError
from proxy.pkcs11.module import close_session_only, patiently, select_token
from proxy.pkcs11.uri import KeyURI, parse_key_uri

LOGIN_FAILURES = (
    p11err.PinIncorrect,
    p11err.PinLocked,
    p11err.PinExpired,
    p11err.PinInvalid,
    p11err.PinLenRange,
    p11err.UserPinNotInitialized,
)


def login_failure(exc: p11err.PKCS11Error, token_label: str) -> LoginError:
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


def _log_in(token: Any, pin: str) -> Any:
    """A session that logged the process in with ``pin``; a refusal says why."""
    try:
        return patiently(lambda: token.open(user_pin=pin))
    except p11err.PKCS11Error as exc:
        raise login_failure(exc, token.label) from None


@dataclass
class _Login:
    session: Any
    users: int


# The one login session per (module, slot) of this process, shared by Token objects.
_logins: dict[tuple[str, int], _Login] = {}
_logins_lock = threading.Lock()


def acquire_login(token: Any, module_path: str, selection: KeyURI, pin: str) -> tuple[str, int]:
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
        _logins[key] = _Login(_log_in(token, pin), 1)
        return key


def release_login(key: tuple[str, int]) -> None:
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


def ensure_login(
    token: Any,
    module_path: str,
    pin: Callable[[], str],
    probe: dict[Attribute, Any],
    reinitialized: bool = False,
) -> None:
    """Recovery: log the process in again if it lost its login (a new login session).

    Whether it is still logged in is seen from a plain session: private objects (the
    ``probe`` template) are visible only to a logged-in process. The old login session is
    then closed without a C_Logout (that would log the new login out again), so a lost
    login does not leave its session open; after the module was re-initialised
    (``reinitialized``) it is only dropped: C_Finalize ended it, and its handle number may
    belong to a new session by now.
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
            return
        old, login.session = login.session, session
        if not reinitialized and old.handle != session.handle:
            close_session_only(module_path, old.handle)


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
                "proxy.pkcs11.login",
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
        _log_in(select_token(module_path, parse_key_uri(uri_text)), pin).close()
    except ProxyError as exc:
        print(str(exc))
        return 1
    print("ok")
    return 0


if __name__ == "__main__":  # probe_login's child: python -m proxy.pkcs11.login --probe-login ...
    if len(sys.argv) != 4 or sys.argv[1] != "--probe-login":
        print("usage: python -m proxy.pkcs11.login --probe-login MODULE TOKEN-URI (PIN on stdin)")
        raise SystemExit(2)
    raise SystemExit(_probe_login_main(sys.argv[2], sys.argv[3]))
