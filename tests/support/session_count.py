"""Whether a token leaves sessions open when its sessions or its login are lost:
``python -m tests.support.session_count MODULE KEY_URI`` (the PIN on stdin) prints two
numbers. First, the pool is rebuilt three times (faulthsm, MODULE, fails a signature with
CKR_SESSION_HANDLE_INVALID) while a session of the old pool is held, which is then given
back: how many of those three sessions were still open after that. Second, the process is
logged out for real (C_Logout) and the next signature logs it in again: whether the old
login session was still open then (C_GetSessionInfo on the handles). It runs in a process
of its own: faulthsm and SoftHSM2 read their settings from the environment once per
process."""

from __future__ import annotations

import ctypes
import hashlib
import os
import sys
from pathlib import Path

from proxy.pkcs11.keys import Mechanism
from proxy.pkcs11.login import _logins
from proxy.pkcs11.token import Token
from proxy.pkcs11.uri import parse_key_uri
from tests.faulthsm import FaultControl


class _Functions(ctypes.Structure):
    # CK_FUNCTION_LIST up to C_Logout, in the standard's order (f15: C_GetSessionInfo).
    _fields_ = [("major", ctypes.c_ubyte), ("minor", ctypes.c_ubyte)] + [
        (f"f{index}", ctypes.c_void_p) for index in range(20)
    ]


def _functions(module: str) -> _Functions:
    functions = ctypes.POINTER(_Functions)()
    ctypes.CDLL(module).C_GetFunctionList(ctypes.byref(functions))
    return functions.contents


def session_open(module: str, handle: int) -> bool:
    get_session_info = ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_ulong, ctypes.c_void_p)(
        _functions(module).f15
    )
    info = ctypes.create_string_buffer(64)
    return int(get_session_info(handle, ctypes.addressof(info))) == 0


def log_out(module: str, handle: int) -> None:
    """C_Logout: the whole process loses its login, as when an HSM drops it."""
    c_logout = ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_ulong)(_functions(module).f19)
    assert c_logout(handle) == 0


module, uri_text, pin = sys.argv[1], sys.argv[2], sys.stdin.read().strip()
control = FaultControl(Path(os.environ["FAULTHSM_CONTROL"]))
uri = parse_key_uri(uri_text)
token = Token(module, uri, pin, pool_size=2, acquire_timeout=0.1, pin_provider=lambda: pin)
key = token.find_private_key(uri)
digest = hashlib.sha256(b"x").digest()
key.sign(Mechanism.ECDSA, digest)
still_open = 0
for number in range(3):
    held = token._borrow()  # a handshake still signing on the old pool
    control.set(error="CKR_SESSION_HANDLE_INVALID", error_count=1)
    # faulthsm counts error_count per control file inode: keep this one alive, so that the
    # next control file cannot reuse its inode number and pass for the same file.
    os.link(control.path, control.path.with_name(f"control-{number}"))
    key.sign(Mechanism.ECDSA, digest)  # fails once, the pool is rebuilt, the retry signs
    control.clear()
    token._give_back(held)  # the held session comes back after its pool was replaced
    still_open += session_open(module, held.session.handle)
    key.sign(Mechanism.ECDSA, digest)
login = _logins[(module, int(token._token.slot.slot_id))]
old_login = login.session.handle
log_out(module, old_login)
key.sign(Mechanism.ECDSA, digest)  # not logged in: a new login, then the signature
assert login.session.handle != old_login
# sessions left open, pool rebuilds, whether the lost login's session is still open
print(still_open, token._epoch, int(session_open(module, old_login)), flush=True)
token.close()
