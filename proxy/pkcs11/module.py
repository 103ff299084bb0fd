"""The PKCS#11 module: loaded once per process, called from many threads; finding a token.

Theory of operation. :func:`load_module` loads a module by path once per process and
initialises it with CKF_OS_LOCKING_OK: python-pkcs11 passes NULL to C_Initialize, which
promises single-threaded use and lets SoftHSM2 drop its locks, while the session pool
signs from many threads. The few calls python-pkcs11 does not offer (C_Initialize with
arguments, C_Finalize, the session counts of CK_TOKEN_INFO, C_CloseSession without
C_Logout) go through ctypes and the
module's function list, on the handle python-pkcs11 opened, so they share its state.
:func:`select_token` picks the one initialised token that a key URI's token attributes
(slot, label, serial, manufacturer, model) name; its errors list the tokens present.
:func:`unload_module` finalises a module so that another module that forwards to it (dev
mode with faulthsm) can initialise it afresh in the same process.
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pkcs11._pkcs11 as _pkcs11_native
import pkcs11.exceptions as p11err
from pkcs11 import TokenFlag

from proxy.errors import ModuleLoadError, TokenError, TokenNotFoundError
from proxy.pkcs11.uri import KeyURI

T = TypeVar("T")

_loaded_modules: dict[str, Any] = {}
_module_lock = threading.Lock()


class _FunctionListHead(ctypes.Structure):
    # The start of CK_FUNCTION_LIST: the version, then the functions in the standard's order,
    # up to C_CloseSession.
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
        ("C_GetMechanismList", ctypes.c_void_p),
        ("C_GetMechanismInfo", ctypes.c_void_p),
        ("C_InitToken", ctypes.c_void_p),
        ("C_InitPIN", ctypes.c_void_p),
        ("C_SetPIN", ctypes.c_void_p),
        ("C_OpenSession", ctypes.c_void_p),
        ("C_CloseSession", ctypes.c_void_p),
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


def session_room(path: str, slot_id: int) -> int | None:
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


def initialize_threaded(path: str) -> None:
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


def close_session_only(path: str, handle: int) -> None:
    """C_CloseSession on a session handle, without the C_Logout python-pkcs11's close()
    makes first for a session that logged in (which would log the whole process out while
    other sessions still use the login). Errors are ignored: a dead session is closed."""
    c_close = ctypes.CFUNCTYPE(ctypes.c_ulong, ctypes.c_ulong)(
        _function_list_head(path).C_CloseSession
    )
    c_close(handle)


def finalize(path: str) -> None:
    c_finalize = _RAW_CALL(_function_list_head(path).C_Finalize)
    c_finalize(None)  # any error: the module is gone either way


class _ThreadSafeLib(_pkcs11_native.lib):  # type: ignore[misc]
    """python-pkcs11's ``lib``, initialised with CKF_OS_LOCKING_OK (see initialize_threaded).

    The call goes through the module's function list, not an exported C_Initialize symbol:
    a module may export only C_GetFunctionList (faulthsm does, and PKCS#11 allows it).
    """

    def __init__(self, so: str) -> None:
        self._path = so
        super().__init__(so)

    def initialize(self) -> None:
        initialize_threaded(self._path)


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
        finalize(path)


def _initialized_tokens(module: Any, slot_id: int | None = None) -> Iterator[Any]:
    """The initialised tokens in the module's slots (in slot ``slot_id`` only, if given)."""
    for slot in module.get_slots(token_present=True):
        if slot_id is not None and slot.slot_id != slot_id:
            continue
        try:
            token = slot.get_token()
        except (p11err.TokenNotRecognised, p11err.TokenNotPresent):
            continue
        if token.flags & TokenFlag.TOKEN_INITIALIZED:
            yield token


def _serial(token: Any) -> str:
    return str(token.serial.decode().strip())


def list_tokens(module_path: str) -> list[tuple[int, str, str]]:
    """(slot id, token label, serial) of every initialised token the module shows."""
    return [
        (token.slot.slot_id, token.label, _serial(token))
        for token in _initialized_tokens(load_module(module_path))
    ]


def _matching_tokens(module_path: str, uri: KeyURI) -> list[Any]:
    matches = []
    for token in _initialized_tokens(load_module(module_path), uri.slot_id):
        if uri.token is not None and token.label != uri.token:
            continue
        if uri.serial is not None and _serial(token) != uri.serial:
            continue
        if uri.manufacturer is not None and token.manufacturer_id != uri.manufacturer:
            continue
        if uri.model is not None and token.model != uri.model:
            continue
        matches.append(token)
    return matches


# A search that fails or finds nothing, or a login that fails with CKR_GENERAL_ERROR, is
# made again up to this many times in all, the pause doubling from _RETRY_PAUSE: about
# 0.75 s (see select_token).
_ATTEMPTS = 5
_RETRY_PAUSE = 0.05


def patiently(call: Callable[[], T]) -> T:
    """``call()``, made again while it fails with CKR_GENERAL_ERROR, as another process's
    login makes SoftHSM2's token calls fail for a moment (see :func:`select_token`)."""
    pause = _RETRY_PAUSE
    for _attempt in range(1, _ATTEMPTS):
        try:
            return call()
        except p11err.GeneralError:
            time.sleep(pause)
            pause *= 2
    return call()


def select_token(module_path: str, uri: KeyURI) -> Any:
    """The one initialised token that ``uri``'s token attributes name.

    SoftHSM2 rewrites a token's file at every login, so while another process of this host
    logs in (a ``--workers`` sibling reloading at the same moment, an operator's
    pkcs11-tool), C_GetTokenInfo here can fail with CKR_GENERAL_ERROR or show no token. A
    search that fails that way or finds nothing is therefore made again a few times before
    its answer stands.
    """
    pause = _RETRY_PAUSE
    for search in range(1, _ATTEMPTS + 1):
        try:
            matches = _matching_tokens(module_path, uri)
        except p11err.GeneralError:
            if search == _ATTEMPTS:
                raise TokenError(
                    f"cannot look for the token {uri} in {module_path}: GeneralError"
                ) from None
        except p11err.PKCS11Error as exc:
            raise TokenError(
                f"cannot look for the token {uri} in {module_path}: {type(exc).__name__}"
            ) from None
        else:
            if matches or search == _ATTEMPTS:
                break
        time.sleep(pause)
        pause *= 2
    if len(matches) == 1:
        return matches[0]
    try:
        available = ", ".join(
            f"slot {slot} label={label!r} serial={serial!r}"
            for slot, label, serial in list_tokens(module_path)
        )
    except p11err.PKCS11Error as exc:
        available = f"(cannot list them: {type(exc).__name__})"
    if not matches:
        raise TokenNotFoundError(
            f"no token in {module_path} matches {uri}; tokens present: {available or 'none'}"
        )
    raise TokenNotFoundError(
        f"{len(matches)} tokens in {module_path} match {uri}; add token= or serial= to pick "
        f"one; tokens present: {available}"
    )
