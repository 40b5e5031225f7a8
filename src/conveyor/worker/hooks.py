"""Pipeline hooks: ``on_success``, ``on_failure``, ``on_retry``, ``on_cancel``.

A hook runs in the worker process, after the backend accepted the outcome it is about, with
the task's record as stored then. It runs **at most once**: if the worker dies between the
outcome and the hook, the hook does not run (nothing records that a hook is owed). A hook
can never change the outcome, and can never stall the worker's loop: each runs in a daemon
thread of its own; one that raises is logged; one that runs past ``hook_timeout`` is logged
once and left behind; and while ``MAX_THREADS`` hooks are still running, further hooks are
skipped with a warning (bounded memory and threads, whatever the hooks do).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from loguru import logger

from ..lifecycle import Op, TaskStatus
from ..models import TaskRecord

HookFunction = Callable[[TaskRecord], Any]
#: Hook threads alive at once (hung ones included) before further hooks are skipped.
MAX_THREADS = 16
HOOK_NAMES = ("on_success", "on_failure", "on_retry", "on_cancel")


def hook_name(op: Op, status: str | None) -> str | None:
    """Which hook an accepted final outcome calls (None: none, as for a hand-back)."""
    if status == TaskStatus.SUCCESS:
        return "on_success"
    if status == TaskStatus.CANCELED:
        return "on_cancel"
    if status == TaskStatus.FAILED:
        return "on_failure"
    if op is Op.NACK and status in (TaskStatus.PENDING, TaskStatus.SCHEDULED):
        return "on_retry"
    return None


@dataclass
class _Running:
    name: str
    task_id: str
    thread: threading.Thread
    started: float = field(default_factory=time.monotonic)
    overdue: bool = False


class HookRunner:
    """Runs hooks in daemon threads, bounded by ``timeout`` (logged) and ``MAX_THREADS``."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._running: list[_Running] = []
        self.skipped = 0

    def fire(self, name: str, function: HookFunction, record: TaskRecord) -> bool:
        """Start ``function(record)``; False when too many hooks are still running."""
        self.check()
        if len(self._running) >= MAX_THREADS:
            self.skipped += 1
            logger.warning(
                "task {}: {} skipped: {} hooks are still running (hung?); skipped so far: {}",
                record.id, name, len(self._running), self.skipped,
            )  # fmt: skip
            return False
        thread = threading.Thread(
            target=_call, args=(name, function, record), name=f"hook-{name}", daemon=True
        )
        self._running.append(_Running(name, record.id, thread))
        thread.start()
        return True

    def check(self) -> None:
        """Forget finished hooks; log, once each, those past the timeout."""
        now = time.monotonic()
        alive = []
        for hook in self._running:
            if not hook.thread.is_alive():
                continue
            if not hook.overdue and now - hook.started > self.timeout:
                hook.overdue = True
                logger.warning(
                    "task {}: {} still running after {:g}s (worker.hook_timeout); it is left "
                    "to finish on its own and the worker goes on", hook.task_id, hook.name,
                    self.timeout,
                )  # fmt: skip
            alive.append(hook)
        self._running = alive

    def wait(self, seconds: float) -> None:
        """At exit: give running hooks up to ``seconds`` to finish."""
        deadline = time.monotonic() + seconds
        for hook in self._running:
            hook.thread.join(max(0.0, deadline - time.monotonic()))
        self.check()


def _call(name: str, function: HookFunction, record: TaskRecord) -> None:
    try:
        function(record)
    except Exception:  # a hook's failure is logged; it never changes the outcome
        logger.opt(exception=True).error("task {}: {} raised", record.id, name)
