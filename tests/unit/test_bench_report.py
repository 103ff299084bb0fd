"""The bench's result files have the schema the issue asks for (made-up numbers; the bench
itself never runs in the test suite: speed belongs in bench/, not in tests)."""

from __future__ import annotations

import json
from pathlib import Path

from bench.report import Run, Unavailable, write_results

KEYS = {"scenario", "contender", "unit", "median", "min", "max"}


def test_results_json_has_the_issue_schema_with_median_min_max(tmp_path: Path) -> None:
    runs = [
        Run("1", "proxy", rep, {"handshakes/s": value, "handshakes/s per core": value * 2})
        for rep, value in enumerate([900.0, 1100.0, 1000.0])
    ] + [
        Run("1", "nginx-engine", rep, {"handshakes/s": value, "handshakes/s per core": value})
        for rep, value in enumerate([2000.0, 2200.0, 2100.0])
    ]
    unavailable = [Unavailable("2a", "proxy", "no delaying module")]

    write_results(tmp_path, runs, unavailable, ["a test machine"])

    results = json.loads((tmp_path / "results.json").read_text())
    assert all(set(entry) == KEYS for entry in results)
    assert {entry["scenario"] for entry in results} <= {"1", "2a", "2b", "3", "4", "4b", "5", "6"}
    assert {entry["contender"] for entry in results} <= {
        "proxy",
        "proxy-2w",
        "nginx",
        "nginx-engine",
    }
    proxy_rate = next(
        entry
        for entry in results
        if (entry["scenario"], entry["contender"], entry["unit"]) == ("1", "proxy", "handshakes/s")
    )
    assert (proxy_rate["median"], proxy_rate["min"], proxy_rate["max"]) == (1000, 900, 1100)
    missing = next(entry for entry in results if entry["scenario"] == "2a")
    assert (missing["contender"], missing["median"], missing["min"], missing["max"]) == (
        "proxy",
        None,
        None,
        None,
    )


def test_results_markdown_shows_ratios_and_unavailable_scenarios(tmp_path: Path) -> None:
    runs = [
        Run("1", "proxy", 0, {"handshakes/s per core": 1500.0}),
        Run("1", "nginx-engine", 0, {"handshakes/s per core": 2000.0}, disturbed=True),
        Run("3", "proxy", 0, {"requests/s": 10.0}, failed=True),
        Run("3", "proxy", 1, {"requests/s": 3000.0}),
    ]
    write_results(tmp_path, runs, [Unavailable("2b", "proxy", "no delaying module")], ["m"])

    text = (tmp_path / "RESULTS.md").read_text()
    assert "| 1 | handshakes/s per core | nginx-engine | 0.75x | >= 0.5x | yes |" in text
    assert "proxy: not available yet (no delaying module)" in text
    assert "1 flagged as disturbed by foreign CPU use, 1 failed" in text
    assert "| proxy | requests/s | 3,000 | 3,000 - 3,000 |" in text  # the failed run left out
    raw = json.loads((tmp_path / "runs.json").read_text())
    assert [run["disturbed"] for run in raw["runs"]] == [False, True, False, False]
    assert [run["failed"] for run in raw["runs"]] == [False, False, True, False]


def test_the_rsa_scenario_is_reported_beside_the_schema_not_in_it(tmp_path: Path) -> None:
    runs = [
        Run("1r", "proxy", 0, {"handshakes/s": 400.0}),
        Run("1r", "proxy-2w", 0, {"handshakes/s": 720.0}),
        Run("1", "proxy", 0, {"handshakes/s": 800.0}),
    ]
    write_results(tmp_path, runs, [], ["m"])

    results = json.loads((tmp_path / "results.json").read_text())
    assert {entry["scenario"] for entry in results} == {"1"}
    text = (tmp_path / "RESULTS.md").read_text()
    assert "| 1r | handshakes/s | proxy (1 worker) | 1.80x | >= 1.7x (proxy-2w) | yes |" in text
    assert "## Scenario 1r: Full TLS 1.3 handshakes, RSA-2048 key in the token" in text
    # Scenario sections keep their order: 1, then 1r, before 3.
    assert text.index("## Scenario 1:") < text.index("## Scenario 1r:")
    raw = json.loads((tmp_path / "runs.json").read_text())
    assert [run["scenario"] for run in raw["runs"]] == ["1r", "1r", "1"]


def test_ab_trees_are_named_directories_holding_proxy_with_their_environment(
    tmp_path: Path,
) -> None:
    import pytest

    from bench.ab import parse_trees

    (tmp_path / "proxy").mkdir()
    trees = parse_trees([f"A={tmp_path}", f"B={tmp_path},GLIBC_TUNABLES=x=1,FOO=bar"])
    assert trees == {
        "A": (str(tmp_path), {}),
        "B": (str(tmp_path), {"GLIBC_TUNABLES": "x=1", "FOO": "bar"}),
    }
    with pytest.raises(SystemExit, match="not NAME=TREE"):
        parse_trees([f"C={tmp_path / 'elsewhere'}"])
