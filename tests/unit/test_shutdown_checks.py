"""How a test learns that a proxy did not stop cleanly (proxy/pytest_plugin.py): hung at
shutdown, a failure status, a traceback in its log. Real child processes stand in for the
proxy here; tests/integration/ shows the same on real proxies."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from proxy.pytest_plugin import shutdown_problems, stop_process

IGNORES_SIGTERM = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('ready', flush=True)\n"
    "time.sleep(600)\n"
)


def _child(code: str, log: Path) -> subprocess.Popen[str]:
    with log.open("w") as sink:
        return subprocess.Popen(
            [sys.executable, "-c", code], stdout=sink, stderr=subprocess.STDOUT, text=True
        )


def test_a_process_that_ignores_sigterm_is_killed_and_reported_hung(tmp_path: Path) -> None:
    log = tmp_path / "log"
    process = _child(IGNORES_SIGTERM, log)
    while "ready" not in log.read_text():  # its SIGTERM handler is in place
        assert process.poll() is None, log.read_text()
    assert stop_process(process, timeout=1) is True
    assert shutdown_problems(process, log.read_text(), hung=True, timeout=1) == [
        "it did not exit within 1 s of SIGTERM and was killed"
    ]


def test_a_failure_status_and_a_traceback_on_stderr_are_both_reported(tmp_path: Path) -> None:
    log = tmp_path / "log"
    process = _child("raise RuntimeError('boom')", log)
    process.wait()
    assert stop_process(process) is False
    assert shutdown_problems(process, log.read_text(), hung=False) == [
        "it exited with status 1",
        "its log holds 1 traceback(s)",
    ]


def test_a_logged_exception_fails_even_with_a_clean_exit(tmp_path: Path) -> None:
    log = tmp_path / "log"
    lines = [
        {"level": "info", "message": "serving https://127.0.0.1:1"},
        {"level": "error", "message": "connection failed unexpectedly", "exception": "Trace"},
    ]
    code = "".join(f"print({json.dumps(json.dumps(line))})\n" for line in lines)
    process = _child(code, log)
    process.wait()
    text = log.read_text()
    assert shutdown_problems(process, text, hung=False) == ["its log holds 1 traceback(s)"]
    assert shutdown_problems(process, text, hung=False, tracebacks_expected=True) == []


def test_a_clean_exit_and_an_expected_status_pass(tmp_path: Path) -> None:
    log = tmp_path / "log"
    process = _child("import sys; print('bye'); sys.exit(3)", log)
    process.wait()
    assert shutdown_problems(process, log.read_text(), hung=False) == ["it exited with status 3"]
    expected = frozenset({3})
    assert shutdown_problems(process, log.read_text(), hung=False, exit_statuses=expected) == []
