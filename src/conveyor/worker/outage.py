"""Whether the running worker's backend answers, and when to ask it again.

A broker restart, a failover or a network blip must not end a worker: the loop reports
every ``BrokerUnavailableError`` here (``lost``) and carries on without the backend
(children keep running, their outcomes wait in the outbox, nothing new starts). It asks
again when ``may_try()`` says so, with the start-up wait's backoff (0.1 s doubling to 1 s,
jittered: ``worker.reconnect_backoff``/``reconnect_max_backoff``), so work resumes within
about a second of the backend answering, and a fleet that lost it together does not
knock in lockstep. One line says the backend went away, one that it is back and how long
it was gone; refused credentials are said loudly (they may be rotating under a running
worker, so they are retried like an outage rather than ending it).
"""

from __future__ import annotations

import time

from loguru import logger

from ..errors import BrokerAuthenticationError, BrokerUnavailableError
from .backoff import Backoff


class OutageWatch:
    """The backend's state as the loop saw it last: answering, or down since when."""

    def __init__(self, url: str, backoff: Backoff) -> None:
        self.url = url
        self._backoff = backoff
        self.down_since: float | None = None
        self._next_try = 0.0
        self._said_auth = False

    @property
    def up(self) -> bool:
        return self.down_since is None

    def lost(self, error: BrokerUnavailableError) -> None:
        """A backend call failed: begin the outage (one line), or wait longer before the
        next try of one that goes on. Refused credentials are an error line of their own."""
        now = time.monotonic()
        refused = isinstance(error, BrokerAuthenticationError)
        if self.down_since is None and not refused:
            logger.warning("backend {} does not answer: {}. {}", self.url, error, self._carry_on())
        if refused and not self._said_auth:
            logger.error(
                "backend {} refused the worker's credentials while it was running: {}. {}; "
                "they may be being rotated, so this is retried like an outage: if it goes on, "
                "fix the user and password in the URL and restart the worker",
                self.url, error, self._carry_on(),
            )  # fmt: skip
            self._said_auth = True
        if self.down_since is None:
            self.down_since = now
        self._next_try = now + self._backoff.next_delay()

    def _carry_on(self) -> str:
        return (
            "Running tasks carry on and their outcomes wait in memory; no new task starts "
            f"until it answers (asking again every {self._backoff.cap:g}s at most)"
        )

    def may_try(self) -> bool:
        """Is it time to ask a down backend again?"""
        return time.monotonic() >= self._next_try

    def until_next_try(self) -> float:
        """Seconds until the next try (0 when due, or while the backend is up)."""
        return 0.0 if self.up else max(0.0, self._next_try - time.monotonic())

    def answered(self, waiting: int) -> float:
        """The backend answered again: end the outage (one line); returns its length."""
        if self.down_since is None:
            return 0.0
        length = time.monotonic() - self.down_since
        self.down_since = None
        self._said_auth = False
        self._backoff.reset()
        logger.info(
            "backend {} answers again after {:.1f}s; sending {} waiting outcome(s), then "
            "taking work again", self.url, length, waiting,
        )  # fmt: skip
        return length
