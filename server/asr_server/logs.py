"""Logging: set up once by the CLI (text or JSON lines), and the access log (one line per RPC).

`--log-format json` writes one JSON object per line, a traceback included as a string field, so a log shipper never
splits one event over several records. The access log is the logger `asr_server.access`: one line per AsrService
call, whatever its status (silence it with that logger's level).
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

from asr_server.metrics import HttpOutcome, RpcOutcome

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
ACCESS_LOGGER = "asr_server.access"
# Attribute of a LogRecord holding an access line's fields (JSON: merged into the object).
_ACCESS_FIELDS = "asr_access"
# Statuses that are our fault: their access line is an error, the others are the caller's business (INFO).
_SERVER_FAULTS = frozenset({"INTERNAL", "UNKNOWN", "DATA_LOSS"})


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, the access fields, `exception` as one string."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, _ACCESS_FIELDS, None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        # default=str: an argument json cannot encode is written as its text rather than losing the record.
        return json.dumps(entry, ensure_ascii=False, default=str)


def formatter_for(log_format: LogFormat) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)


def setup_logging(level: str, log_format: LogFormat, stream: TextIO | None = None) -> None:
    """The root logger writes to `stream` (stderr) in the chosen format; called once, by the CLI."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter_for(log_format))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())


class AccessLog:
    """An RpcObserver writing one access line per finished call."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._logger = logger or logging.getLogger(ACCESS_LOGGER)

    def rpc_started(self, service: str, method: str, rpc_type: str) -> None:
        """Nothing: the line is written when the call ends."""

    def rpc_finished(self, outcome: RpcOutcome) -> None:
        fields: dict[str, Any] = {
            "method": outcome.method,
            "peer": outcome.peer,
            "code": outcome.code,
            "duration_ms": round(outcome.duration_s * 1000, 1),
            "audio_ms": round(outcome.audio_s * 1000),
            "request_bytes": outcome.request_bytes,
            "request_id": outcome.request_id,
        }
        self._write("rpc", fields, outcome.message, server_fault=outcome.code in _SERVER_FAULTS)

    def http_finished(self, outcome: HttpOutcome) -> None:
        """One line per request of the HTTP front, "http ..." beside the RPCs' "rpc ..."."""
        fields: dict[str, Any] = {
            "method": outcome.method,
            "route": outcome.route,
            "peer": outcome.peer,
            "status_code": outcome.status_code,
            "duration_ms": round(outcome.duration_s * 1000, 1),
            "audio_ms": round(outcome.audio_s * 1000),
            "request_bytes": outcome.request_bytes,
            "request_id": outcome.request_id,
        }
        server_fault = outcome.status_code >= 500 and outcome.status_code != 503
        self._write("http", fields, outcome.message, server_fault=server_fault)

    def _write(self, kind: str, fields: dict[str, Any], message: str, *, server_fault: bool) -> None:
        if message:
            fields["status_message"] = message
        level = logging.ERROR if server_fault else logging.INFO
        if not self._logger.isEnabledFor(level):
            return
        text = " ".join(f"{key}={_text_value(value)}" for key, value in fields.items())
        self._logger.log(level, "%s %s", kind, text, extra={_ACCESS_FIELDS: fields})


def _text_value(value: object) -> str:
    # Quoted only where needed, so the line stays key=value parseable: a message with spaces or quotes is JSON-quoted.
    text = str(value)
    if text and not any(c.isspace() or c in '"=' for c in text):
        return text
    return json.dumps(text, ensure_ascii=False)
