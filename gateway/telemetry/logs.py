"""Logging set-up: one JSON object per line on stdout, or a readable line on a terminal.

Every record may carry structured fields through ``extra={...}`` (``event``, ``request_id`` and
whatever the event needs); the JSON formatter writes them as top-level keys, and stamps each line
with the pipeline version (``EVAL_PIPELINE_VERSION``) and the effective config's short hash.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any, TextIO

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields a record was given with ``extra=``."""
    return {key: value for key, value in vars(record).items() if key not in _STANDARD}


class JsonFormatter(logging.Formatter):
    def __init__(self, *, stamp: dict[str, str]) -> None:
        super().__init__()
        self.stamp = stamp

    def format(self, record: logging.LogRecord) -> str:
        document: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "event": getattr(record, "event", None) or "log",
            "message": record.getMessage(),
        }
        document.update(record_fields(record))
        document.update(self.stamp)
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document, default=str, separators=(",", ":"))


class ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{key}={value}" for key, value in record_fields(record).items() if key != "event")
        clock = time.strftime("%H:%M:%S", time.localtime(record.created))
        line = f"{clock} {record.levelname:<7} {record.getMessage()}" + (f"  {fields}" if fields else "")
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class StdoutHandler(logging.StreamHandler[TextIO]):
    """Writes to stdout; once its reader has gone (``lmgate serve | head``), drops the logs.

    The default handler prints a "--- Logging error ---" traceback on stderr for every record it
    can no longer write: a gateway under load would flood stderr for as long as it serves. One line
    says what happened, then the logs are dropped and serving goes on.
    """

    def __init__(self) -> None:
        super().__init__(sys.stdout)
        self.reader_left = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.reader_left:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        if isinstance(sys.exc_info()[1], BrokenPipeError):
            self.reader_left = True
            # stdout stays broken: point it at devnull so the interpreter's own flush at exit is quiet.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
            print("lmgate: stdout was closed by its reader; logs are dropped from now on", file=sys.stderr, flush=True)
            return
        super().handleError(record)


def configure_logging(*, level: str, fmt: str, pipeline_version: str | None, config_hash: str) -> None:
    """Route the ``lmgate`` and ``hypercorn.error`` loggers to stdout in the chosen format."""
    use_json = fmt == "json" or (fmt == "auto" and not sys.stdout.isatty())
    stamp = {"config_hash": config_hash}
    if pipeline_version:
        stamp["pipeline_version"] = pipeline_version
    handler = StdoutHandler()
    handler.setFormatter(JsonFormatter(stamp=stamp) if use_json else ConsoleFormatter())
    for name in ("lmgate", "hypercorn.error"):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level.upper())
        logger.propagate = False
