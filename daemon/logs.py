"""structlog set-up: one JSON object per line on stdout, with contextvars such as request_id."""

from __future__ import annotations

import io
import logging
import sys
from typing import TextIO

import structlog


def event_first(_logger: object, _name: str, event_dict: structlog.typing.EventDict) -> structlog.typing.EventDict:
    """Put `event` first so a tailed line reads naturally."""
    return {"event": event_dict.pop("event", None), **event_dict}


def configure(stream: TextIO | None = None, level: int = logging.INFO) -> None:
    """Route structlog (and stdlib logging from libraries) to JSON lines on `stream`."""
    out = stream or sys.stdout
    if isinstance(out, io.TextIOWrapper):  # a file name that is not UTF-8 is logged escaped, never a failed line
        out.reconfigure(errors="backslashreplace")
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            event_first,
            structlog.processors.JSONRenderer(ensure_ascii=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    # aiohttp's access log and library warnings go through the same JSON pipe.
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processor=structlog.processors.JSONRenderer(),
            foreign_pre_chain=[
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    logger: structlog.stdlib.BoundLogger = structlog.get_logger(name)
    return logger
