"""Server logs: one line per event, as text for people or JSON for log pipelines.

Call sites pass structured fields with `extra={"fields": {...}}` (request id, RPC, model, status
code, audio seconds, latency); the text format appends them as key=value, the JSON format
merges them into the object, so a collector can filter on `request_id` without parsing prose.

Requests are untrusted, and what they say ends up in log lines and status messages. So user
text is echoed through `quoted` (escaped, and cut to `ECHO_LIMIT` characters: a 100 KB model
name would otherwise make the status trailer exceed gRPC's metadata limit), and the text
format escapes control characters in every message and field: a CR/LF in a request field
cannot start a forged line. (JSON escapes them already.)
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

ECHO_LIMIT = 200  # characters of user text repeated in a log line or status message


def quoted(text: str, limit: int = ECHO_LIMIT) -> str:
    """`text` from a request as it may be echoed: quoted with control characters escaped
    (`repr`), and cut to `limit` characters with its full length given."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def escape(text: str) -> str:
    """Control and other unprintable characters (CR, LF, ESC, U+2028, ...) as backslash
    escapes, so that `text` stays on one line and cannot move the terminal's cursor."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


def fields(**values: Any) -> dict[str, Any]:
    """`extra=` for a log call: `log.info("done", extra=fields(request_id=rid))`."""
    return {"fields": values}


class JsonFormatter(logging.Formatter):
    """{"time", "level", "logger", "message", ...fields, "exception"?} on one line."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created, UTC)
        entry: dict[str, Any] = {
            "time": when.isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """`time logger message key=value ...`, one line per record: the message and the fields
    have their control characters escaped, and a traceback's lines below it are indented, so
    every line that does not start with a space starts a record."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        # A copy: other handlers (JSON, pytest's capture) keep the record as logged.
        safe = logging.makeLogRecord(record.__dict__)
        safe.message = escape(record.message)
        return super().formatMessage(safe)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = getattr(record, "fields", {})
        head, sep, trace = line.partition("\n")  # a traceback or stack, below the fields
        if extra:
            head += " " + " ".join(f"{k}={escape(str(v))}" for k, v in extra.items())
        # An exception's message may carry request text with newlines of its own.
        trace = "\n".join("    " + t for t in trace.splitlines())
        return f"{head}{sep}{trace}"


FORMATTERS: dict[str, type[logging.Formatter]] = {"text": TextFormatter, "json": JsonFormatter}


def configure(log_format: str = "text", level: int = logging.INFO) -> None:
    """Route the root logger to stderr in `log_format` ("text" or "json")."""
    if log_format not in FORMATTERS:
        choices = ", ".join(FORMATTERS)
        raise ValueError(f"unknown log format {log_format!r}; choose one of {choices}")
    handler = logging.StreamHandler()
    handler.setFormatter(FORMATTERS[log_format]())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
