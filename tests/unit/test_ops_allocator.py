"""The C allocator's thresholds (proxy/ops/allocator.py): large buffers relayed again and
again stop costing page faults, and an operator's own malloc settings are left alone."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from proxy.ops.allocator import operator_tuned

# Per round: three 512 KiB blocks made, touched and freed, as a relayed 1 MiB response does
# with its upstream reads and body slices; the minor page faults of the last 50 rounds.
_ROUNDS = """
import json, resource, sys
sys.path.insert(0, {root!r})
if {tune!r}:
    from proxy.ops.allocator import tune_allocator
    print(tune_allocator(), file=sys.stderr)
def round_():
    blocks = [bytearray(512 * 1024) for _ in range(3)]
    del blocks
for _ in range(10):
    round_()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    round_()
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before))
"""


def _faults(tune: bool, env: dict[str, str] | None = None) -> int:
    root = str(__import__("pathlib").Path(__file__).resolve().parents[2])
    completed = subprocess.run(
        [sys.executable, "-c", _ROUNDS.format(root=root, tune=tune)],
        capture_output=True,
        text=True,
        check=True,
        env=env if env is not None else {"PATH": "/usr/bin:/bin"},
    )
    return int(json.loads(completed.stdout))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_relayed_large_blocks_stop_faulting_pages_once_tuned() -> None:
    untuned = _faults(tune=False)
    tuned = _faults(tune=True)
    # Untuned, glibc trims the freed heap top every round and faults it back in (about
    # 384 faults a round here); tuned, the heap stays and nothing faults.
    assert untuned > 50 * 100, untuned
    assert tuned < 50, tuned


def test_an_operators_malloc_settings_are_left_alone() -> None:
    assert operator_tuned({"MALLOC_TRIM_THRESHOLD_": "1000000"})
    assert operator_tuned({"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"})
    assert not operator_tuned({"GLIBC_TUNABLES": "glibc.rtld.nns=4"})
    assert not operator_tuned({})
    # And with them set, the process keeps faulting as the operator asked.
    env = {"PATH": "/usr/bin:/bin", "MALLOC_TRIM_THRESHOLD_": "131072"}
    assert _faults(tune=True, env=env) > 50 * 100
