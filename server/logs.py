"""Server logs: one line per event, as text for people or JSON for log pipelines.

Call sites pass structured fields with `extra={"fields": {...}}` (request id, RPC, model, status
code, audio seconds, latency); the text format appends them as key=value, the JSON format
merges them into the object, so a collector can filter on `request_id` without parsing prose.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any


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
    """`time logger message key=value ...`."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = getattr(record, "fields", {})
        if not extra:
            return line
        head, sep, trace = line.partition("\n")  # keep a traceback below the fields
        pairs = " ".join(f"{k}={v}" for k, v in extra.items())
        return f"{head} {pairs}{sep}{trace}"


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
