"""Logging set-up for the command line: text for people, JSON lines for log shippers.

A record may carry ``extra={"event": {...}}`` (the worker's topology and queue events,
recovered leases, cancelled tasks): the JSON form puts it under ``"event"``, so a log
pipeline can filter on ``event.event`` (the kind, as in ``cluster watch --json``)
without parsing the message.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Literal

LogFormat = Literal["text", "json"]
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, event (if any),
    exception (type, message and traceback text, if any)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        event = getattr(record, "event", None)
        if isinstance(event, dict):
            out["event"] = event
        if record.exc_info and record.exc_info[0] is not None:
            out["exception"] = {
                "type": record.exc_info[0].__name__,
                "message": str(record.exc_info[1]),
                "traceback": self.formatException(record.exc_info),
            }
        return json.dumps(out, default=str)


#: Control characters (C0, DEL, C1), newlines included, as they are escaped in text logs.
_ESCAPES = {code: f"\\x{code:02x}" for code in [*range(0x20), *range(0x7F, 0xA0)]}


def escape_controls(text: str) -> str:
    """``text`` with control characters escaped (``\\x1b``): a worker name, a task's
    error or a queue name cannot colour, move or forge lines of a terminal or a log."""
    return text.translate(_ESCAPES)


class TextFormatter(logging.Formatter):
    """:data:`TEXT_FORMAT`, with control characters of the message escaped (the
    traceback that may follow keeps its lines)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        safe = logging.makeLogRecord(record.__dict__)
        safe.message = escape_controls(record.message)
        return super().formatMessage(safe)

    def formatException(self, ei: Any) -> str:
        lines = super().formatException(ei).split("\n")
        return "\n".join(escape_controls(line) for line in lines)


def configure(level: str = "INFO", fmt: LogFormat = "text") -> None:
    """Log to stderr at ``level`` in ``fmt``; replaces handlers set before."""
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
