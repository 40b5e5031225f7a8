"""Worker tuning beyond TaskWorker's own arguments (a settings object, not 16 kwargs)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from .policy import RetryDefaults
from .preemption import PreemptPolicy
from .reserve import Reserve


@dataclass(frozen=True, slots=True)
class WorkerOptions:
    """Recycling limits (None: no limit), shutdown mode, heartbeats and retry defaults."""

    shutdown_mode: Literal["requeue", "fail"] = "requeue"
    max_jobs: int | None = None
    max_time: float | None = None
    memory_mb: float | None = None
    heartbeat_interval: float = 5.0
    # An idle worker's longest wait for work: on a doorbell, or (SQLite) in a blocking claim
    # that also polls the worker's signal pipe; a signal ends either at once.
    idle_block: float = 1.0
    worker_id: str | None = None
    retry: RetryDefaults = field(default_factory=RetryDefaults)
    # Reconnecting to an unreachable backend: backoff doubling from the first to the cap.
    reconnect_backoff: float = 0.1
    reconnect_max_backoff: float = 1.0
    # A pipeline hook running longer than this is logged and left behind (see hooks.py).
    hook_timeout: float = 30.0
    # Step-boundary preemption (worker.preempt_margin None: off) and reserved slots.
    preemption: PreemptPolicy | None = None
    reserve: Reserve | None = None
    #: Where steps run: child processes (isolated, killable) or threads of the worker.
    pool: Literal["process", "thread"] = "process"

    def renew_interval(self, visibility_timeout: float) -> float:
        """Renew a lease three times per visibility window, so one slow round trip is safe."""
        return max(min(visibility_timeout / 3, self.heartbeat_interval), 0.05)

    def renew_check_period(self, visibility_timeout: float) -> float:
        """How often the loop checks whether a renewal is due. A lease is so renewed at most
        ``renew_interval + renew_check_period`` after the last renewal: half the visibility
        timeout at worst (see tests/test_pure_logic.py)."""
        return self.renew_interval(visibility_timeout) / 2

    def worst_renewal_gap(self, visibility_timeout: float) -> float:
        """The longest a held lease goes without renewal, loop latency aside."""
        return self.renew_interval(visibility_timeout) + self.renew_check_period(visibility_timeout)
