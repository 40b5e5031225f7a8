"""Retry policy: how many tries a task gets and how long it waits between them.

Pure functions, so the rules are tested without a worker. The order of precedence is the
most specific first: the task's own ``max_retries`` (the producer chose it), then the
failing step's, then the pipeline's, then the worker's default.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..models import Message
from ..pipeline import Pipeline
from ..retries import Backoff, check_backoff, listed_delay

#: Reasons that no retry can fix: fail at once (``invalid_result``: a step returned what the
#: queue cannot store; it would return it again).
PERMANENT_REASONS = frozenset({"unknown_pipeline", "invalid_data", "invalid_result", "permanent"})


@dataclass(frozen=True, slots=True)
class RetryDefaults:
    """The worker-wide fallbacks (``worker.max_retries`` etc. in config)."""

    max_retries: int = 3
    retry_backoff: float = 2.0  # seconds before the first retry; doubles each time
    max_backoff: float = 600.0
    jitter: float = 0.5  # the delay is scaled by a random factor in [1 - jitter, 1 + jitter]


def max_retries_for(
    message: Message, pipeline: Pipeline | None, step: str | None, defaults: RetryDefaults
) -> int:
    """The number of retries this task may use after its first attempt."""
    if message.max_retries is not None:
        return message.max_retries
    if pipeline is not None:
        if step is not None:
            try:
                step_retries = pipeline.step_named(step).max_retries
            except KeyError:
                step_retries = None
            if step_retries is not None:
                return step_retries
        if pipeline.max_retries is not None:
            return pipeline.max_retries
    return defaults.max_retries


def should_retry(
    message: Message, pipeline: Pipeline | None, step: str | None, reason: str,
    defaults: RetryDefaults,
) -> bool:  # fmt: skip
    """Retry while tries are left; ``attempts`` counts this delivery (1 on the first run)."""
    if reason in PERMANENT_REASONS:
        return False
    return message.attempts <= max_retries_for(message, pipeline, step, defaults)


def backoff_seconds(
    message: Message,
    pipeline: Pipeline | None,
    step: str | None,
    defaults: RetryDefaults,
    rng: random.Random | None = None,
) -> float:
    """Exponential backoff with jitter: base * 2^(attempt-1), capped, then jittered.

    Jitter spreads retries of tasks that failed together (a broker blip, a down API) so
    they do not all come back in the same instant. A list of delays is used as written:
    retry n waits entry n, past the end the last one (``conveyor.retries``).
    """
    base: Backoff | None = message.retry_backoff
    if base is None and pipeline is not None and step is not None:
        try:
            base = pipeline.step_named(step).retry_backoff
        except KeyError:
            base = None
    if base is None and pipeline is not None:
        base = check_backoff("retry_backoff", pipeline.retry_backoff)
    if base is None:
        base = defaults.retry_backoff
    if isinstance(base, tuple):
        return listed_delay(base, message.attempts)
    delay = min(base * 2 ** max(message.attempts - 1, 0), defaults.max_backoff)
    factor = (rng or random).uniform(1 - defaults.jitter, 1 + defaults.jitter)
    return max(0.0, float(delay * factor))
