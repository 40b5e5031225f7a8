"""What an unsuccessful run becomes: canceled, handed back, retried later, or failed.

Pure decisions (no I/O), so the rules read in one place: the worker puts the verdict's
outcome into its outbox, logs its line and counts a failure. The retry rules themselves
(how many tries, how long between them) are ``policy``'s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from .. import outcomes as build
from ..backends import Outcome
from ..models import Message
from .options import WorkerOptions
from .policy import backoff_seconds, should_retry
from .slots import RunningTask

_SHUTDOWN_ERROR = {"type": "WorkerShutdown", "message": "the worker shut down", "traceback": None}


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome to send, the log line that says so (at ``level``), and whether it counts
    as a failed task in the worker's totals."""

    outcome: Outcome
    level: Literal["INFO", "WARNING", "ERROR"]
    text: str
    failed: bool = False


def after_error(
    task: RunningTask, reason: str, error: dict[str, Any], step: str | None, *,
    cancel_asked: bool, stopping: bool, options: WorkerOptions,
) -> Verdict:  # fmt: skip
    """A run that ended with ``reason`` (a step raised, a crash, a time limit...)."""
    message = task.message
    details = {key: error.get(key) for key in ("type", "message", "traceback")}
    if reason == "canceled" or cancel_asked:
        # A step that raised because it saw ctx.cancelled was canceled, not broken.
        outcome = build.fail(message.task_id, message.token, reason="canceled", error=details,
                             canceled=True)  # fmt: skip
        return Verdict(outcome, "INFO", "canceled")
    if stopping and reason == "error":
        # A step that stopped early because it saw ctx.shutting_down: that is the
        # shutdown's doing, so the task is handed back (or failed) as the mode says.
        return after_shutdown(message, options)
    if should_retry(message, task.pipeline, step, reason, options.retry):
        delay = backoff_seconds(message, task.pipeline, step, options.retry)
        text = f"retry in {delay:.1f}s after {details['type']}: {details['message']}"
        return Verdict(build.nack(message, delay, error=details), "WARNING", text)
    outcome = build.fail(message.task_id, message.token, reason=reason, error=details)
    text = f"failed ({reason}): {details['type']}: {details['message']}"
    return Verdict(outcome, "ERROR", text, failed=True)


def after_shutdown(message: Message, options: WorkerOptions) -> Verdict:
    """A run the shutdown interrupted: back in line without using a retry, or failed."""
    if options.shutdown_mode == "fail":
        outcome = build.fail(
            message.task_id, message.token, reason="shutdown", error=_SHUTDOWN_ERROR
        )
        return Verdict(outcome, "WARNING", "failed: shutdown")
    return Verdict(
        build.nack(message, count_attempt=False), "WARNING", "interrupted: handed back to the queue"
    )
