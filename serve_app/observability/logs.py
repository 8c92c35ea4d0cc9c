"""Structured logging: one JSON object per line, with the `extra=` fields of each call."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}
_SECRET_WORDS = ("secret", "password", "token", "credential")


class JsonFormatter(logging.Formatter):
    """Formats a record as JSON; fields whose name looks secret are masked."""

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key in _RESERVED or key.startswith("_"):
                continue
            masked = any(word in key.lower() for word in _SECRET_WORDS)
            body[key] = "***" if masked else value
        if record.exc_info:
            body["exc"] = self.formatException(record.exc_info)
        return json.dumps(body, default=str)


def configure_logging(level: int = logging.INFO) -> None:
    """Send `serve_app` logs to stderr as JSON lines (idempotent; called by deployments/CLI)."""
    logger = logging.getLogger("serve_app")
    if any(isinstance(h.formatter, JsonFormatter) for h in logger.handlers):
        return
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
