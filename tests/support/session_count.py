"""Whether sessions held across a rebuild of a token's session pool are closed when they
come back: ``python -m tests.support.session_count MODULE KEY_URI`` (the PIN on stdin)
rebuilds the pool three times (faulthsm, MODULE, fails a signature with
CKR_SESSION_HANDLE_INVALID) while a session of the old pool is held, gives it back, and
prints how many of those sessions were still open then (C_GetSessionInfo on their
handles). It runs in a process of its own: faulthsm and SoftHSM2 read their settings from
the environment once per process."""

from __future__ import annotations

import ctypes
import hashlib
import os
import sys
from pathlib import Path

from proxy.pkcs11.keys import Mechanism
from proxy.pkcs11.token import Token
from proxy.pkcs11.uri import parse_key_uri
from tests.faulthsm import FaultControl


class _Functions(ctypes.Structure):
    # CK_FUNCTION_LIST up to C_GetSessionInfo, in the standard's order.
    _fields_ = [("major", ctypes.c_ubyte), ("minor", ctypes.c_ubyte)] + [
        (f"f{index}", ctypes.c_void_p) for index in range(16)
    ]


def session_open(module: str, handle: int) -> bool:
    functions = ctypes.POINTER(_Functions)()
    ctypes.CDLL(module).C_GetFunctionList(ctypes.byref(functions))
    get_session_info = ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_ulong, ctypes.c_void_p)(
        functions.contents.f15
    )
    info = ctypes.create_string_buffer(64)
    return int(get_session_info(handle, ctypes.addressof(info))) == 0


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
print(still_open, token._epoch, flush=True)  # sessions left open, pool rebuilds
token.close()
