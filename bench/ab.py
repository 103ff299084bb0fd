"""An interleaved A/B of proxy source trees: CPU per operation, side by side, in one run.

Usage (from a checkout with ``.venv``)::

    .venv/bin/python -m bench.ab --scenarios 3,4 --rounds 4 \\
        A=/path/to/tree-before B=/path/to/tree-after,GLIBC_TUNABLES=...

Why. On a shared or virtual machine the CPU a request costs moves by 10-30% from one
minute to the next (bench/README.md, "Issue 13"), so a lever measured in one run and its
baseline in another says little. Here every tree runs as its own ``hsm-proxy run`` (the
tree first on ``PYTHONPATH``, optional ``NAME=VALUE`` environment after commas) on the same
token, backend and core, and each round measures every tree once per scenario, the order
reversed every other round. The figure per run is the proxy's CPU (user + system, all
threads) over the client's request count, with its minor page faults per request beside
it; the medians come last. Scenarios are those of run.sh with wrk (1, 1r, 2a, 2b, 3, 4,
4b, 6); nginx is not run: this compares proxy trees, not the proxy with nginx.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import runner


class TreeProxy(runner.ProxyContender):
    """``hsm-proxy run`` with another source tree first on ``PYTHONPATH``."""

    tree = ""
    environment: dict[str, str] = {}

    def token_env(self) -> dict[str, str]:
        return {**super().token_env(), "PYTHONPATH": self.tree, **self.environment}


def minor_faults(contender: runner.Contender) -> int:
    total = 0
    for pid in contender.pids():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # a thread or child that ended meanwhile
        total += int(fields[7])
    return total


def parse_trees(specs: Sequence[str]) -> dict[str, tuple[str, dict[str, str]]]:
    trees: dict[str, tuple[str, dict[str, str]]] = {}
    for spec in specs:
        name, _, rest = spec.partition("=")
        path, *assignments = rest.split(",")
        if not name or not Path(path, "proxy").is_dir():
            raise SystemExit(f"not NAME=TREE (a directory holding proxy/): {spec!r}")
        trees[name] = (str(Path(path).resolve()), dict(a.split("=", 1) for a in assignments))
    return trees


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.split("\n")[0])
    parser.add_argument("--scenarios", default="3", type=lambda text: text.split(","))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=4.0, help="per measurement")
    parser.add_argument("trees", nargs="+", help="NAME=TREE[,VAR=VALUE...]")
    args = parser.parse_args(argv)
    trees = parse_trees(args.trees)
    bench_args = runner.parse_args(
        ["--scenarios", ",".join(args.scenarios), "--seconds", str(args.seconds)]
    )
    work = Path(tempfile.mkdtemp(prefix="hsm-proxy-ab-"))
    bench = runner.Bench(bench_args, work)
    results: dict[tuple[str, str], list[float]] = {}
    try:
        bench.material = runner.provision(work)
        bench.backend = runner.Backend("backend", work, bench.cores.backend)
        bench.started.append(bench.backend)
        bench.backend.start()
        for name, (tree, environment) in trees.items():
            for variant in {runner.variant_of(scenario) for scenario in args.scenarios}:
                contender = TreeProxy(
                    f"{name}-{variant}", work, bench.cores.frontend, bench.material, bench.backend
                )
                contender.tree, contender.environment = tree, environment
                contender.delay_ms = runner.DELAYS.get(variant)
                contender.rsa = variant == "rsa"
                bench.started.append(contender)
                contender.start()
                bench.contenders[(name, variant)] = contender
        for number in range(args.rounds):
            for scenario in args.scenarios:
                names = list(trees) if number % 2 == 0 else list(reversed(trees))
                for name in names:
                    measured = bench.contenders[(name, runner.variant_of(scenario))]
                    faults = minor_faults(measured)
                    run: Any = bench.measure(scenario, name, number)
                    faults = minor_faults(measured) - faults
                    requests = run.checks.get("client_requests") or 1
                    cpu = 1e6 * run.checks["frontend_cpu_seconds"] / requests
                    results.setdefault((scenario, name), []).append(cpu)
                    print(
                        f"round {number + 1} scenario {scenario} {name}: {cpu:,.0f} µs CPU and "
                        f"{faults / requests:.1f} minor faults per operation; foreign CPU "
                        f"{run.foreign_cpu_cores:.2f} cores",
                        flush=True,
                    )
    finally:
        bench.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    for (scenario, name), values in sorted(results.items()):
        listed = " ".join(f"{value:,.0f}" for value in values)
        print(
            f"scenario {scenario} {name}: median {statistics.median(values):,.0f} µs per "
            f"operation (runs: {listed})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
