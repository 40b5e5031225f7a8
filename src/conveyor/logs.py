"""Logging setup for workers and the CLI: loguru to stderr, JSON lines, a rotating file.

Every task event is one line carrying ``task_id``, ``queue``, ``type`` and ``attempt`` (as
loguru ``extra`` fields), so ``grep task_id=...`` or a JSON log pipeline finds a task's
whole story.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from loguru import logger

if TYPE_CHECKING:
    from loguru import Record

    from .settings import LoggingSettings

_TEXT_FORMAT = (
    "<green>{time:YYYY-MM-DD HH:mm:ss.SSS}</green> | <level>{level: <7}</level> | "
    "{message}{extra[context]}"
)


def _context(record: Record) -> None:
    """Render the bound task fields as ``key=value`` after the message."""
    fields = {k: v for k, v in record["extra"].items() if k != "context" and v is not None}
    record["extra"]["context"] = "".join(f" {key}={value}" for key, value in fields.items())


def configure_logging(settings: LoggingSettings) -> None:
    """Replace loguru's default sink with the configured ones (idempotent)."""
    logger.remove()
    logger.configure(patcher=_context)
    logger.add(
        sys.stderr,
        level=settings.level,
        format=_TEXT_FORMAT,
        serialize=settings.json_lines,
        colorize=None if not settings.json_lines else False,
        backtrace=False,
        diagnose=False,  # never dump local variables (secrets) into logs
    )
    if settings.file:
        Path(settings.file).parent.mkdir(parents=True, exist_ok=True)
        logger.add(
            settings.file,
            level=settings.level,
            format=_TEXT_FORMAT,
            serialize=settings.json_lines,
            rotation=settings.rotation,
            retention=settings.retention,
            enqueue=False,
            backtrace=False,
            diagnose=False,
        )
