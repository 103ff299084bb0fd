"""CPU per operation of the proxy, broken down by component, from a profiled bench run.

Theory of operation. ``bench/run.sh --profile DIR`` leaves, per proxy run, a py-spy
profile (raw collapsed stacks, Python frames) and, where Linux ``perf`` is installed, a
``perf record`` file (samples by shared object); ``runs.json`` has the proxy's CPU time,
its kernel part (stime) and its context switches over each run. This module joins them::

    python -m bench.breakdown OUTPUT_DIR/runs.json DIR

* the CPU per operation is the proxy's utime + stime over the requests wrk counted (a full
  handshake in scenario 1, a keep-alive request in 3, a 64 KiB response in 4b);
* "kernel" is stime per operation (system calls, TCP on loopback, scheduling);
* user time is split by the py-spy samples of the proxy's threads, each stack read from
  its innermost frame out: the first frame in pyOpenSSL or the project's libssl binding
  counts as OpenSSL (the C work inside is sampled on the Python frame that called it),
  then the token (python-pkcs11), h11, logging, metrics, trio's thread hand-off, trio's
  scheduler; the rest is the proxy's own Python glue. Samples whose innermost frame is a
  socket call (its time is mostly the kernel's, counted above) are left out of the split;
* the perf split by shared object says how much of all the CPU was libssl + libcrypto
  themselves, the interpreter, the kernel and SoftHSM2: a cross-check of the above.

Context switches are counted per operation: a handshake step handed to a worker thread
costs two or more.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

# Categories of a py-spy stack: the first rule that matches a frame, innermost frame first.
_RULES = (
    ("OpenSSL", ("(OpenSSL/", "(proxy/tls/binding.py", "(proxy/tls/socketstream.py")),
    ("token", ("(pkcs11/", "(proxy/pkcs11/")),
    ("h11", ("(h11/",)),
    ("logging", ("(logging/", "(proxy/ops/logs.py", "(json/", "orjson")),
    ("metrics", ("(prometheus_client/", "(proxy/ops/admin.py")),
    ("thread hand-off", ("(trio/_threads.py", "(threading.py", "(queue.py", "(trio/_core/_thread")),
)
# Lines of the project's own modules that are one system call (socket send/recv/close, the
# poll): their time is the kernel's, counted from stime instead.
_SOCKET_MODULES = ("(proxy/net/sockets.py", "(socket.py")
_SOCKET_LEAVES = ("epoll", "(trio/_core/_io_epoll.py", "(selectors.py")
# Waits py-spy does not always see as idle: the reload trigger's file watcher (in Rust,
# under anyio) and trio's idle worker threads waiting for a job.
_IGNORED_THREADS = ("_file_events", "(anyio/_backends/")
_IGNORED_LEAVES = ("WorkerThread._work (trio/_core/_thread_cache.py",)
_SCENARIO_OPERATION = {
    "1": "full handshake (a new connection, one request)",
    "2a": "full handshake, 2 ms token",
    "2b": "full handshake, 10 ms token",
    "3": "keep-alive request, 100 bytes",
    "4": "1 MiB response",
    "4b": "64 KiB response",
    "6": "resumed handshake",
}


def classify(stack: list[str]) -> str:
    """The component a py-spy stack (outermost frame first) is spending its time in."""
    leaf = stack[-1] if stack else ""
    if any(needle in leaf for needle in _SOCKET_MODULES):
        return "socket calls"
    if any(needle in leaf for needle in _SOCKET_LEAVES):
        return "socket calls"
    for frame in reversed(stack):
        for name, needles in _RULES:
            if any(needle in frame for needle in needles):
                return name
    if any("(trio/" in frame for frame in stack[-2:]):
        return "trio scheduler"
    return "Python glue"


def py_spy_split(path: Path) -> Counter[str]:
    counts: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack_text, _, number = line.rpartition(" ")
        if not number.isdigit():
            continue
        if any(name in stack_text for name in _IGNORED_THREADS):
            continue
        frames = [frame for frame in stack_text.split(";") if not frame.startswith("thread ")]
        frames = [frame for frame in frames if not frame.startswith("process ")]
        if frames and frames[-1].startswith(_IGNORED_LEAVES):
            continue
        counts[classify(frames)] += int(number)
    return counts


_DSO_NAMES = {
    "[kernel.kallsyms]": "kernel",
    "libssl.so.3": "libssl+libcrypto",
    "libcrypto.so.3": "libssl+libcrypto",
    "libsofthsm2.so": "SoftHSM2",
}


def perf_split(path: Path) -> Counter[str]:
    completed = subprocess.run(
        ["perf", "report", "-i", str(path), "--sort", "dso", "--stdio", "-q"],
        capture_output=True,
        text=True,
        check=False,
    )
    shares: Counter[str] = Counter()
    for line in completed.stdout.splitlines():
        parts = line.split()
        if len(parts) < 2 or not parts[0].endswith("%"):
            continue
        dso = parts[1]
        name = _DSO_NAMES.get(dso)
        if name is None:
            name = "interpreter" if dso.startswith(("python", "libpython")) else "other"
        shares[name] += round(float(parts[0].rstrip("%")) * 10)
    return shares


def report(runs: list[dict[str, Any]], profiles: Path) -> str:
    lines = []
    for run in runs:
        if run["contender"] != "proxy" or run.get("failed"):
            continue
        checks = run["checks"]
        if "frontend_cpu_seconds" not in checks or not checks.get("client_requests"):
            continue
        scenario, repetition = run["scenario"], run["repetition"]
        operations = checks["client_requests"]
        total = 1e6 * checks["frontend_cpu_seconds"] / operations
        kernel = 1e6 * checks["frontend_kernel_seconds"] / operations
        switches = checks["frontend_context_switches"] / operations
        stem = profiles / f"proxy-{_variant(scenario)}-s{scenario}-r{repetition}"
        lines.append(
            f"### scenario {scenario}, repetition {repetition + 1}: "
            f"{_SCENARIO_OPERATION.get(scenario, 'operation')}"
        )
        lines.append("")
        lines.append(
            f"{operations} operations; **{total:.0f} µs CPU each**, of which kernel "
            f"{kernel:.0f} µs; {switches:.1f} context switches each"
        )
        lines.append("")
        spy = stem.with_suffix(".txt")
        if spy.exists():
            counts = py_spy_split(spy)
            counts.pop("socket calls", None)
            sampled = sum(counts.values()) or 1
            lines.append("| component (user time) | share | µs per operation |")
            lines.append("| --- | ---: | ---: |")
            for name, count in counts.most_common():
                share = count / sampled
                lines.append(f"| {name} | {100 * share:.0f}% | {share * (total - kernel):.0f} |")
            lines.append(f"| kernel (stime) | | {kernel:.0f} |")
            lines.append("")
        perf = stem.with_suffix(".perf")
        if perf.exists():
            shares = perf_split(perf)
            whole = sum(shares.values()) or 1
            parts = ", ".join(
                f"{name} {100 * value / whole:.0f}%" for name, value in shares.most_common()
            )
            lines.append(f"perf, by shared object: {parts}")
            lines.append("")
    return "\n".join(lines)


def _variant(scenario: str) -> str:
    from bench.runner import variant_of

    return variant_of(scenario)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m bench.breakdown RUNS_JSON PROFILE_DIR", file=sys.stderr)
        return 2
    runs = json.loads(Path(argv[0]).read_text())
    if isinstance(runs, dict):
        runs = runs.get("runs", [])
    print(report(runs, Path(argv[1])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
