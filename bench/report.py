"""The bench's results: per-run records in, ``results.json`` and ``RESULTS.md`` out.

Theory of operation. The runner records one :class:`Run` per measurement (a scenario, a
contender, a repetition) holding one or more figures keyed by unit, plus what was checked
on the server side and how much foreign CPU disturbed it. :func:`summarise` turns the runs
into the issue's schema: one object per (scenario, contender, unit) with the median, min
and max over the repetitions; a scenario a contender cannot run yet appears with null
figures. :func:`write_results` writes ``results.json`` (that schema exactly),
``runs.json`` (every run, for anyone who wants to check a figure) and ``RESULTS.md`` (the
tables, the ratios to nginx and the targets of the issue). No measuring happens here, so
it is tested with made-up numbers.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SCENARIOS = ("1", "2a", "2b", "3", "4", "4b", "5", "6", "7", "7p")
# Measured beside the scenarios, shown in RESULTS.md and runs.json; results.json
# keeps to the schema.
EXTRA_SCENARIOS = ("1r",)
CONTENDERS = ("proxy", "proxy-2w", "nginx", "nginx-engine")
SCENARIO_TITLES = {
    "1": "Full TLS 1.3 handshakes (P-256 key in the token, new connection per request)",
    "1r": "Full TLS 1.3 handshakes, RSA-2048 key in the token (how --workers scales when "
    "the server, not the client, is the bottleneck)",
    "2a": "Full handshakes with 2 ms per token signature",
    "2b": "Full handshakes with 10 ms per token signature",
    "3": "Keep-alive requests, 100-byte responses, 32 connections",
    "4": "Throughput, 1 MiB responses",
    "4b": "Throughput, 64 KiB responses over 32 keep-alive connections",
    "5": "Resident memory, 5,000 idle TLS keep-alive connections",
    "6": "Resumed handshakes (session tickets)",
    "7": "HTTP/2 keep-alive requests, 100-byte responses, 32 connections x 10 streams (h2load)",
    "7p": "Page loads: 6 parallel requests on new connections, token signatures per page "
    "(nginx: full handshakes), HTTP/1.1 (a connection per request) and HTTP/2 (one)",
}
# (scenario, unit of the compared figure, contender compared, target ratio, higher is better)
TARGETS = (
    ("1", "handshakes/s per core", "nginx-engine", 0.5, True),
    ("2a", "handshakes/s", "nginx-engine", 2.0, True),
    ("2b", "handshakes/s", "nginx-engine", 5.0, True),
    ("3", "requests/s per core", "nginx", 0.1, True),
    ("4", "MB/s per core", "nginx", 0.8, True),
    ("4b", "MB/s per core", "nginx", 0.5, True),
    ("5", "KiB per connection", "nginx", 2.0, False),
)
RESUMED_UNIT = "token signatures per 1000 resumed handshakes"
# The figure each scenario is mainly about: what an unavailable cell is reported in.
PRIMARY_UNIT = {
    "1": "handshakes/s",
    "1r": "handshakes/s",
    "2a": "handshakes/s",
    "2b": "handshakes/s",
    "3": "requests/s",
    "4": "MB/s",
    "4b": "MB/s",
    "5": "KiB per connection",
    "6": "handshakes/s",
    "7": "requests/s",
    "7p": "token signatures per page load, HTTP/2",
}
H2_PAGE_UNIT = "token signatures per page load, HTTP/2"


@dataclass
class Run:
    scenario: str
    contender: str
    repetition: int
    figures: dict[str, float]
    checks: dict[str, Any] = field(default_factory=dict)
    foreign_cpu_cores: float = 0.0
    disturbed: bool = False
    failed: bool = False  # client errors or a crash: kept in runs.json, left out of figures


@dataclass(frozen=True)
class Unavailable:
    scenario: str
    contender: str
    reason: str


def summarise(runs: Iterable[Run], unavailable: Iterable[Unavailable] = ()) -> list[dict[str, Any]]:
    """The issue's schema: median, min and max per (scenario, contender, unit)."""
    values: dict[tuple[str, str, str], list[float]] = {}
    for run in runs:
        if run.failed:
            continue
        for unit, value in run.figures.items():
            values.setdefault((run.scenario, run.contender, unit), []).append(value)
    results: list[dict[str, Any]] = [
        {
            "scenario": scenario,
            "contender": contender,
            "unit": unit,
            "median": round(statistics.median(figures), 3),
            "min": round(min(figures), 3),
            "max": round(max(figures), 3),
        }
        for (scenario, contender, unit), figures in values.items()
    ]
    for missing in unavailable:
        results.append(
            {
                "scenario": missing.scenario,
                "contender": missing.contender,
                "unit": PRIMARY_UNIT[missing.scenario],
                "median": None,
                "min": None,
                "max": None,
            }
        )

    def order(entry: dict[str, Any]) -> tuple[int, int, str]:
        return (
            (*SCENARIOS, *EXTRA_SCENARIOS).index(entry["scenario"]),
            CONTENDERS.index(entry["contender"]),
            entry["unit"],
        )

    return sorted(results, key=order)


def _find(results: Sequence[dict[str, Any]], scenario: str, contender: str, unit: str) -> Any:
    for entry in results:
        if (entry["scenario"], entry["contender"], entry["unit"]) == (scenario, contender, unit):
            return entry["median"]
    return None


def ratios(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The proxy's figure over its reference's, for each target of the issue."""
    rows = []
    for scenario, unit, reference, target, higher_better in TARGETS:
        ours, theirs = (
            _find(results, scenario, "proxy", unit),
            _find(results, scenario, reference, unit),
        )
        ratio = ours / theirs if ours is not None and theirs else None
        met = None if ratio is None else (ratio >= target if higher_better else ratio <= target)
        rows.append(
            {
                "scenario": scenario,
                "unit": unit,
                "reference": reference,
                "ratio": ratio,
                "target": f"{'>=' if higher_better else '<='} {target}x",
                "met": met,
            }
        )
    for scenario, unit in (("1", "handshakes/s"), ("1r", "handshakes/s"), ("3", "requests/s")):
        one, two = (
            _find(results, scenario, "proxy", unit),
            _find(results, scenario, "proxy-2w", unit),
        )
        ratio = two / one if one and two is not None else None
        rows.append(
            {
                "scenario": scenario,
                "unit": unit,
                "reference": "proxy (1 worker)",
                "ratio": ratio,
                "target": ">= 1.7x (proxy-2w)",
                "met": None if ratio is None else ratio >= 1.7,
            }
        )
    http2, http1 = (
        _find(results, "7", "proxy", "requests/s per core"),
        _find(results, "3", "proxy", "requests/s per core"),
    )
    ratio = http2 / http1 if http1 and http2 is not None else None
    rows.append(
        {
            "scenario": "7",
            "unit": "requests/s per core",
            "reference": "proxy, HTTP/1.1 (scenario 3)",
            "ratio": ratio,
            "target": ">= 0.7x",
            "met": None if ratio is None else ratio >= 0.7,
        }
    )
    pages = _find(results, "7p", "proxy", H2_PAGE_UNIT)
    rows.append(
        {
            "scenario": "7p",
            "unit": H2_PAGE_UNIT,
            "reference": "(absolute)",
            "ratio": pages,
            "target": "1",
            "met": None if pages is None else pages == 1,
            "absolute": True,
        }
    )
    resumed = _find(results, "6", "proxy", RESUMED_UNIT)
    rows.append(
        {
            "scenario": "6",
            "unit": RESUMED_UNIT,
            "reference": "(absolute)",
            "ratio": resumed,
            "target": "0",
            "met": None if resumed is None else resumed == 0,
            "absolute": True,
        }
    )
    return rows


def _number(value: Any) -> str:
    if value is None:
        return "n/a"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def markdown(
    results: Sequence[dict[str, Any]],
    runs: Sequence[Run],
    unavailable: Sequence[Unavailable],
    machine: Sequence[str],
) -> str:
    lines = ["# Benchmark results", "", "Machine and run:", ""]
    lines += [f"- {line}" for line in machine]
    disturbed = sum(1 for run in runs if run.disturbed)
    failed = sum(1 for run in runs if run.failed)
    lines += [
        f"- {len(runs)} measurements, {disturbed} flagged as disturbed by foreign CPU use, "
        f"{failed} failed (client errors above 1% or a crash) and left out of the figures "
        "(see `runs.json`)",
        "",
        'Each figure: median of the repetitions, [min - max]. "per core" divides the rate by '
        "the share of one CPU the front end used (all its processes and threads) during the "
        "run.",
        "",
        "## Ratios against the targets of the issue",
        "",
        "| scenario | figure | proxy / reference | ratio | target | met |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in ratios(results):
        met = {True: "yes", False: "**no**", None: "n/a"}[row["met"]]
        ratio = "n/a" if row["ratio"] is None else f"{row['ratio']:.2f}"
        if row["ratio"] is not None and not row.get("absolute"):
            ratio += "x"
        lines.append(
            f"| {row['scenario']} | {row['unit']} | {row['reference']} | {ratio} | "
            f"{row['target']} | {met} |"
        )
    for scenario in sorted((*SCENARIOS, *EXTRA_SCENARIOS), key=_display_order):
        entries = [entry for entry in results if entry["scenario"] == scenario]
        if not entries:
            continue
        lines += [
            "",
            f"## Scenario {scenario}: {SCENARIO_TITLES[scenario]}",
            "",
            "| contender | figure | median | min - max |",
            "| --- | --- | --- | --- |",
        ]
        for entry in entries:
            spread = (
                "not available yet"
                if entry["median"] is None
                else f"{_number(entry['min'])} - {_number(entry['max'])}"
            )
            lines.append(
                f"| {entry['contender']} | {entry['unit']} | {_number(entry['median'])} | "
                f"{spread} |"
            )
        reasons: dict[str, list[str]] = {}
        for missing in unavailable:
            if missing.scenario == scenario:
                reasons.setdefault(missing.reason, []).append(missing.contender)
        for reason, names in reasons.items():
            lines.append(f"\n{', '.join(names)}: not available yet ({reason}).")
    lines.append("")
    return "\n".join(lines)


def _display_order(scenario: str) -> tuple[int, str]:
    return (int(scenario[0]), scenario)


def write_results(
    directory: Path,
    runs: Sequence[Run],
    unavailable: Sequence[Unavailable],
    machine: Sequence[str],
) -> list[dict[str, Any]]:
    results = summarise(runs, unavailable)
    directory.mkdir(parents=True, exist_ok=True)
    schema = [entry for entry in results if entry["scenario"] in SCENARIOS]
    (directory / "results.json").write_text(json.dumps(schema, indent=2) + "\n")
    (directory / "runs.json").write_text(
        json.dumps(
            {
                "machine": list(machine),
                "runs": [asdict(run) for run in runs],
                "unavailable": [asdict(missing) for missing in unavailable],
            },
            indent=2,
        )
        + "\n"
    )
    (directory / "RESULTS.md").write_text(markdown(results, runs, unavailable, machine))
    return results
