"""Service logs on stderr: plain lines for people, or one JSON object per line for a log collector.

A JSON line holds ``time`` (UTC, ISO 8601), ``level``, ``logger``, ``message``, the
process id (``pid``: workers share one stream), the fields a call passed with
``extra={...}``, and ``exception`` when there is one.  Newlines and control
characters inside a message are escaped, so one event is always one line.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

from medbridge.errors import InvalidInput

FORMATS = ("text", "json")

#: What every LogRecord carries; anything else on a record came from ``extra``.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}
_BASE = ("time", "level", "logger", "message", "pid")


class JsonFormatter(logging.Formatter):
    """One JSON object per record."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in _BASE and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        return json.dumps(line, default=str)


def check_format(value: object, where: str) -> str:
    if value not in FORMATS:
        raise InvalidInput(f"{where}: {value!r} is not a log format (one of {', '.join(FORMATS)})")
    return str(value)


def configure(service: str, fmt: str, *, stream: TextIO | None = None) -> None:
    """Send logs to stderr as ``fmt``: medbridge's own from INFO, every library's from WARNING."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if check_format(fmt, "log format") == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(f"medbridge {service}: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("medbridge").setLevel(logging.INFO)
