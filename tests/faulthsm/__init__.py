"""faulthsm: the fault-injecting, latency-adding PKCS#11 module (faulthsm.c), built for tests
and the benchmark with the system C compiler, and a handle on its control file.

``python -m tests.faulthsm DIR`` builds ``DIR/libfaulthsm.so`` (when missing or older than the
source) and prints its path. The settings are documented at the top of faulthsm.c.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

SOURCE = Path(__file__).resolve().parent / "faulthsm.c"


def build(directory: Path) -> Path:
    """Compile faulthsm.c into ``directory`` unless an up-to-date build is already there."""
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / "libfaulthsm.so"
    if target.exists() and target.stat().st_mtime >= SOURCE.stat().st_mtime:
        return target
    compiler = shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        raise RuntimeError("no C compiler (gcc) found; deploy/setup.sh installs gcc")
    partial = directory / f"libfaulthsm.so.{id(directory)}.tmp"
    subprocess.run(
        [
            compiler,
            "-shared",
            "-fPIC",
            "-O2",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-fvisibility=hidden",
            "-o",
            str(partial),
            str(SOURCE),
            "-ldl",
            "-lpthread",
        ],
        check=True,
    )
    partial.replace(target)
    return target


class FaultControl:
    """The control file faulthsm reads on every intercepted call (FAULTHSM_CONTROL)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def set(self, **settings: object) -> None:
        """Replace the settings in force, for example ``set(error="CKR_DEVICE_ERROR")``."""
        text = "".join(f"{key}={value}\n" for key, value in settings.items())
        partial = self.path.with_suffix(".tmp")
        partial.write_text(text)
        partial.replace(self.path)  # atomic: a reader sees the old or the new settings

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


def read_stats(path: Path) -> dict[str, int]:
    """The FAULTHSM_STATS file: ``signatures``, ``in_flight`` and ``max_in_flight`` (zeros
    before any)."""
    stats = {"signatures": 0, "in_flight": 0, "max_in_flight": 0}
    if path.exists():
        for line in path.read_text().splitlines():
            name, _, value = line.partition("=")
            stats[name] = int(value)
    return stats
