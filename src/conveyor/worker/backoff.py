"""Reconnect backoff: how long to wait before the next attempt to reach the backend.

Exponential with jitter, from ``first`` (0.1 s) doubling up to ``cap`` (1 s): a broker that
answers again is used within about ``cap`` seconds, and a fleet of workers that lost it
together does not knock on its door in lockstep. Each delay is drawn from ``[d/2, d]``
("equal jitter"), so it never collapses to zero and never exceeds the cap.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(slots=True)
class Backoff:
    """Delays for successive attempts; ``reset()`` after a success starts over at ``first``."""

    first: float = 0.1
    cap: float = 1.0
    _attempts: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if not 0 < self.first <= self.cap:
            raise ValueError(f"backoff: need 0 < first <= cap, got {self.first}, {self.cap}")

    def next_delay(self) -> float:
        """The delay before the next attempt (each call counts one more failed attempt)."""
        ceiling = min(self.cap, self.first * 2 ** min(self._attempts, 32))
        self._attempts += 1
        return random.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self._attempts = 0
