"""The C allocator's thresholds for a process that relays large bodies: set once, at start.

Why (bench/README.md, "Issue 13, round 3"). glibc's malloc serves a block above its mmap
threshold (128 KiB at first, then raised on the fly to the largest block freed) with a
fresh ``mmap``, and hands the top of its heap back to the kernel whenever more than the
trim threshold (twice the mmap threshold) lies free there. Relaying a 1 MiB response moves
blocks of 64 KiB to 512 KiB (the upstream read, h11's body slices, the join before the TLS
write) that are freed again within the response, so the heap grew and shrank on every one:
170 to 320 minor page faults per 1 MiB response, each a page the kernel zeroes again, about
a fifth of the proxy's CPU per byte. Fixed thresholds keep those blocks in the heap and
the heap's top in the process: after the first responses, none fault.

What it costs: up to :data:`TRIM_THRESHOLD` of freed memory may stay resident per process,
once the proxy has needed that much at one time (the idle-connection memory of scenario 5
is unchanged: idle connections hold no such blocks).

The operator's word wins: when the environment already sets a malloc tunable
(``GLIBC_TUNABLES`` naming ``glibc.malloc``, or ``MALLOC_MMAP_THRESHOLD_`` /
``MALLOC_TRIM_THRESHOLD_``), nothing is changed. A C library without ``mallopt`` (musl)
is left as it is.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping

# mallopt's parameter numbers (glibc's malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 4 * 1024 * 1024
TRIM_THRESHOLD = 16 * 1024 * 1024

_OPERATOR_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def operator_tuned(environ: Mapping[str, str]) -> bool:
    """Whether the environment already tunes malloc's thresholds (then they stay)."""
    if any(name in environ for name in _OPERATOR_SETTINGS):
        return True
    return "glibc.malloc." in environ.get("GLIBC_TUNABLES", "")


def tune_allocator(environ: Mapping[str, str] = os.environ) -> str:
    """Set glibc's mmap and trim thresholds for this process; say what was done."""
    if operator_tuned(environ):
        return "malloc thresholds: the environment's"
    libc = ctypes.CDLL(None)
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return "malloc thresholds: the C library's own (no mallopt)"
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    if not mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD):
        return "malloc thresholds: the C library's own (mallopt refused)"
    if not mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD):
        return "malloc thresholds: the C library's own (mallopt refused)"
    return f"malloc thresholds: mmap {MMAP_THRESHOLD >> 20} MiB, trim {TRIM_THRESHOLD >> 20} MiB"
