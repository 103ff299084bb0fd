"""Logging: human-readable lines on a terminal, one JSON object per line otherwise.

Three loggers matter: ``hsm_proxy`` (operations), ``hsm_proxy.access`` (one line per
request) and ``hsm_proxy.audit`` (one line per token signature: the key-usage trail).
Structured fields travel in ``extra={"fields": {...}}`` and become JSON keys. Nothing
here ever receives a secret: callers pass key URIs (which cannot hold a PIN, see
pkcs11uri.py), addresses and outcomes.
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
import os
import sys
import time
from typing import Any

from proxy.ops.hardening import ScrubbingFilter, scrub, scrub_fields
from proxy.pkcs11.keys import SignatureEvent

log = logging.getLogger("hsm_proxy")
_ROOT = log
access_log = logging.getLogger("hsm_proxy.access")
audit_log = logging.getLogger("hsm_proxy.audit")

# Which connection a token signature is made for; trio copies it into worker threads.
connection_context: contextvars.ContextVar[dict[str, object] | None] = contextvars.ContextVar(
    "connection_context", default=None
)


class _JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,  # tells the workers of `run --workers N` apart
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_text:  # the scrubbed traceback (hardening.ScrubbingFilter)
            entry["exception"] = record.exc_text
        return json.dumps(entry, sort_keys=False)


class _HumanFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", {})
        extra = " ".join(f"{key}={value}" for key, value in fields.items())
        line = f"hsm-proxy: {record.getMessage()}{' ' + extra if extra else ''}"
        return f"{line}\n{record.exc_text}" if record.exc_text else line


def setup_logging(level: str = "info", json_lines: bool | None = None) -> None:
    """Configure the ``hsm_proxy`` loggers; JSON unless stderr is a terminal."""
    # No line says which source line, thread or multiprocessing process wrote it: skip
    # collecting those for every record (the logging HOWTO's "Optimization" section).
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logMultiprocessing = False
    if json_lines is None:
        json_lines = not sys.stderr.isatty()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JSONFormatter() if json_lines else _HumanFormatter())
    handler.addFilter(ScrubbingFilter())  # no PIN, no credential header in any line
    root = logging.getLogger("hsm_proxy")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    global _json_handler
    _json_handler = handler if json_lines else None


# The handler setup_logging installed for JSON lines: what :func:`info_line` writes to.
_json_handler: logging.StreamHandler[Any] | None = None
# Keys a line has before its fields; a field of the same name changes the key order.
_LEADING_KEYS = frozenset({"time", "level", "logger", "message", "pid"})


def info_line(logger: logging.Logger, message: str, fields: dict[str, Any]) -> None:
    """``logger.info(message, extra={"fields": fields})`` for the lines written per request
    or per signature (access and audit), byte for byte the same line, without a
    ``LogRecord``, a filter chain and a formatter each time: the fixed part is encoded
    once per line from constants, the fields are scrubbed and encoded as the filter and
    formatter would. Anything unusual (another handler or filter, human-readable lines, a
    field named like a leading key) goes the ordinary way."""
    handler = _json_handler
    if (
        handler is None
        or not fields
        or logger.handlers
        or logger.filters
        or logger.disabled
        or _ROOT.handlers != [handler]
        or not logger.isEnabledFor(logging.INFO)
        or not _LEADING_KEYS.isdisjoint(fields)
    ):
        logger.info(message, extra={"fields": fields})
        return
    stamp = datetime.datetime.fromtimestamp(time.time(), datetime.UTC).isoformat()
    body = json.dumps(scrub_fields(fields))
    line = (
        f'{{"time": "{stamp}", "level": "info", "logger": {json.dumps(logger.name)}, '
        f'"message": {json.dumps(scrub(message))}, "pid": {os.getpid()}, {body[1:]}\n'
    )
    handler.acquire()
    try:
        handler.stream.write(line)
        handler.flush()
    except Exception:  # as logging.StreamHandler.emit does: never let a log line fail a request
        handler.handleError(logging.makeLogRecord({"msg": message}))
    finally:
        handler.release()


def audit_signature(event: SignatureEvent) -> None:
    """Token observer: one audit line per signature, with the connection it served."""
    fields = {
        "event": "token_signature",
        "key_uri": event.key_uri,
        "mechanism": event.mechanism.value,
        "result": "ok" if event.ok else "error",
        "latency_ms": round(event.seconds * 1000, 3),
        **(connection_context.get() or {}),
    }
    if event.error:
        fields["error"] = event.error
    info_line(audit_log, "token signature", fields)
