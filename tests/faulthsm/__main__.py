"""``python -m tests.faulthsm BUILD_DIR``: build libfaulthsm.so there and print its path."""

from __future__ import annotations

import sys
from pathlib import Path

from tests.faulthsm import build

if len(sys.argv) != 2:
    print("usage: python -m tests.faulthsm BUILD_DIR", file=sys.stderr)
    raise SystemExit(2)
print(build(Path(sys.argv[1])))
