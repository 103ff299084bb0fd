"""The supervisor's admin answers under ``--workers``: the workers' metrics added up, and
readiness meaning "every worker is ready".

Theory of operation. Each worker writes its metrics to prometheus-client's multiprocess
files in the supervisor's private directory (ops/admin.py says how each gauge combines).
:class:`FleetMetrics` reads them with the library's own merge (counters and histograms
summed over every worker that ever ran, so a replaced worker never makes a counter go
down), leaves out what is the supervisor's to say (``hsm_proxy_ready``) and the server
names a reload dropped, and adds the supervisor's own gauges. :func:`worker_exited` does
the library's bookkeeping for a worker that is gone (its live gauges stop counting).

:class:`FleetEndpoint` is sans-IO like :class:`~proxy.ops.admin.AdminEndpoint`, with the
same paths: ``/healthz`` (the supervisor runs), ``/metrics``, and ``/readyz``, which the
listener (net/fleet.py) answers after asking every running worker's own ``/readyz``: ready
only when as many workers as configured are running and each said ready. The body has one
line per worker and, for a worker that is not ready, its own failing lines.
"""

from __future__ import annotations

import glob
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from proxy.ops.admin import (
    EXPIRY_METRIC,
    READY_METRIC,
    AdminAnswer,
    common_answer,
    readiness_answer,
)


@dataclass(frozen=True)
class WorkerAnswer:
    """What one worker's ``/readyz`` said: ``status`` None when it could not be asked."""

    number: int
    pid: int
    status: int | None
    body: str


class _WorkerFiles:
    """A collector over the workers' multiprocess files (the library's merge)."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory

    def collect(self) -> Iterator[Metric]:
        files = glob.glob(os.path.join(self._directory, "*.db"))
        for metric in MultiProcessCollector.merge(files, accumulate=True):  # type: ignore[no-untyped-call]
            if metric.name == READY_METRIC:
                continue  # each worker's own verdict; the supervisor's is the fleet's
            if metric.name == EXPIRY_METRIC:
                metric.samples = [each for each in metric.samples if not math.isinf(each.value)]
            yield metric


class FleetMetrics:
    """The supervisor's registry: the workers' files plus its own few gauges."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_WorkerFiles(directory))  # type: ignore[arg-type]
        self.ready = Gauge(
            READY_METRIC,
            "1 when /readyz says ready, else 0 (as of the last probe)",
            registry=self.registry,
        )
        self.restarts = Counter(
            "hsm_proxy_worker_restarts",
            "Workers that exited after start-up and were replaced (--workers)",
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


def worker_exited(pid: int, directory: Path) -> None:
    """A worker is gone: its live gauges (open connections ...) stop counting."""
    mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]


class FleetEndpoint:
    """The supervisor's admin answers, sans-IO."""

    def __init__(self, metrics: FleetMetrics, expected: int) -> None:
        self.metrics = metrics
        self.expected = expected

    @staticmethod
    def asks_workers(method: str, target: str) -> bool:
        """Whether answering needs every worker's /readyz first (see ``respond``)."""
        return method in ("GET", "HEAD") and target.split("?", 1)[0] == "/readyz"

    def respond(
        self, method: str, target: str, answers: Sequence[WorkerAnswer] = ()
    ) -> AdminAnswer:
        path, answer = common_answer(method, target)
        if answer is not None:
            return answer
        if path == "/metrics":
            return 200, [("content-type", CONTENT_TYPE_LATEST)], self.metrics.render()
        ready, lines = self._readiness(answers)
        self.metrics.ready.set(1 if ready else 0)
        return readiness_answer(ready, lines)

    def _readiness(self, answers: Sequence[WorkerAnswer]) -> tuple[bool, list[str]]:
        lines = []
        for answer in answers:
            name = f"worker {answer.number} (pid {answer.pid})"
            if answer.status == 200:
                lines.append(f"ok {name}: ready")
                continue
            said = answer.body.strip().splitlines()
            if answer.status is None:
                lines.append(f"FAIL {name}: {answer.body.strip()}")
            else:
                lines.append(f"FAIL {name}: {said[0] if said else answer.status}")
                lines += [f"  {line}" for line in said[1:] if line.startswith("FAIL")]
        running = {answer.number for answer in answers}
        for number in range(1, self.expected + 1):
            if number not in running:
                lines.append(f"FAIL worker {number}: not running (starting or being replaced)")
        ready = len(answers) == self.expected and all(a.status == 200 for a in answers)
        return ready, lines
