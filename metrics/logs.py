"""structlog set-up: JSON lines when not on a terminal (journald keeps them), console otherwise.

Under systemd, with stdout connected to the journal, each line starts with its
syslog priority (``<4>`` for a warning): journald strips the prefix and files the
line at that priority (``SyslogLevelPrefix=``, on by default), so
``journalctl -p warning`` finds warnings.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Literal

import structlog

LogFormat = Literal["auto", "json", "console"]
# structlog's level names -> syslog priorities (sd-daemon.h's SD_DEBUG ... SD_CRIT).
SYSLOG_PRIORITIES = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2}


def configure_logging(log_format: LogFormat = "auto", level: str = "info") -> None:
    """Configure structlog once per process. Raises ValueError for an unknown level."""
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    if log_format == "auto":
        log_format = "console" if sys.stdout.isatty() else "json"
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stdout.isatty())
    )
    if stdout_is_journal():
        renderer = with_syslog_priority(renderer)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )


def stdout_is_journal() -> bool:
    """True when stdout is systemd's journal stream: ``$JOURNAL_STREAM`` names its
    device and inode (a child that inherited the variable but not the stream is not)."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        stat = os.fstat(sys.stdout.fileno())
    except (OSError, ValueError):
        return False
    return expected == f"{stat.st_dev}:{stat.st_ino}"


def with_syslog_priority(renderer: structlog.typing.Processor) -> structlog.typing.Processor:
    """``renderer``'s line behind its level's ``<N>`` syslog priority prefix."""

    def render(
        logger: structlog.typing.WrappedLogger, name: str, event_dict: structlog.typing.EventDict
    ) -> str:
        priority = SYSLOG_PRIORITIES.get(str(event_dict.get("level")), 6)
        line = renderer(logger, name, event_dict)
        assert isinstance(line, str)  # both renderers above write text
        return f"<{priority}>{line}"

    return render
