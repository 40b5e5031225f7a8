"""Start-up waits for the backend: a worker started before its broker, or during an
outage, waits for it instead of exiting.

A deployment starts its workers and its broker in no fixed order (boot, ``docker compose
up``, a failover), and a supervisor gives up on a program that keeps exiting at start. So
an unreachable Redis or RabbitMQ is waited for, ``worker.broker_wait`` seconds or forever
(the default), with one log line when the wait begins and one when the backend answers.
What waiting cannot fix still ends the worker at once with exit 2: a bad URL, an unknown
scheme (caught by the settings), credentials the broker refuses.

SQLite is a file, not a server: its errors (a missing directory, no permission) are
configuration mistakes, so it is opened at once, as before.

Signals: SIGTERM or SIGINT during the wait ends it promptly (the worker then exits 0). The
handlers (``bootstrap.StartupSignals``) only record the signal; the waiting loop reads it
at least every 50 ms, and a connection attempt runs on a helper thread so a connect that
hangs (a host that drops SYNs) cannot delay the exit.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from loguru import logger

from ..backends import QueueBackend, backend_for_url
from ..errors import BrokerAuthenticationError, BrokerUnavailableError, ConfigError
from ..manager import QueueManager
from ..settings import Settings
from ..urls import mask_url
from .backoff import Backoff

_POLL = 0.05  # seconds between looks at the stop flag while waiting


def open_queues(
    settings: Settings, queues: list[QueueManager], stopping: Callable[[], bool]
) -> bool:
    """Open a manager per ``worker.queues`` into ``queues``, waiting for the backend.

    Returns False when ``stopping()`` became true while waiting (the caller exits 0 and
    closes what was opened). Raises ``ConfigError`` or ``BrokerAuthenticationError`` at
    once, and ``BrokerUnavailableError`` once ``worker.broker_wait`` seconds are over.
    """
    url = settings.backend_url()
    limit = settings.worker.broker_wait_seconds()
    first, *others = settings.worker.queues
    if backend_for_url(url) is QueueBackend.SQLITE or limit == 0:
        queues.append(QueueManager.from_settings(settings, queue_name=first))
        queues += [queues[0].for_queue(name) for name in others]
        return True
    check_url(url)
    wait = _Wait(
        mask_url(url),
        limit,
        Backoff(settings.worker.reconnect_backoff, settings.worker.reconnect_max_backoff),
    )
    while True:
        try:
            opened = _attempt(_opener(settings, first), stopping)
        except BrokerAuthenticationError:
            raise
        except BrokerUnavailableError as exc:
            if not wait.pause(exc, stopping):
                return False
            continue
        if opened is None:
            return False
        queues.append(opened)
        break
    # The other queues share the first one's connection (on RabbitMQ: one AMQP connection).
    queues += [queues[0].for_queue(name) for name in others]
    wait.done()
    return True


def _opener(settings: Settings, name: str) -> Callable[[], QueueManager]:
    return lambda: QueueManager.from_settings(settings, queue_name=name)


def check_url(url: str) -> None:
    """A port that is not a number (or out of range) is a typo, not an outage."""
    try:
        urlsplit(url).port  # noqa: B018  # the property parses and validates the port
    except ValueError as exc:
        raise ConfigError(f"url: {mask_url(url)}: {exc}") from None


def _attempt(
    open_one: Callable[[], QueueManager], stopping: Callable[[], bool]
) -> QueueManager | None:
    """``open_one()`` on a helper thread; None if ``stopping()`` came first (the attempt is
    abandoned: the process is about to exit)."""
    outcome: dict[str, Any] = {}
    finished = threading.Event()

    def run() -> None:
        try:
            outcome["queue"] = open_one()
        except BaseException as exc:  # handed to the caller's thread below
            outcome["error"] = exc
        finally:
            finished.set()

    threading.Thread(target=run, name="conveyor-connect", daemon=True).start()
    while not finished.wait(_POLL):
        if stopping():
            return None
    error = outcome.get("error")
    if isinstance(error, ValueError | TypeError) and not isinstance(error, ConfigError):
        # A URL the driver cannot parse (an option with a bad value): not an outage.
        raise ConfigError(f"url: {error}") from None
    if error is not None:
        raise error
    queue: QueueManager = outcome["queue"]
    return queue


class _Wait:
    """The wait for one backend: its two log lines, its deadline and its backoff."""

    def __init__(self, url: str, limit: float | None, backoff: Backoff) -> None:
        self.url, self.limit, self.backoff = url, limit, backoff
        self.started: float | None = None

    def pause(self, error: BrokerUnavailableError, stopping: Callable[[], bool]) -> bool:
        """Sleep before the next attempt; False if stopped. Raises when the time is up."""
        now = time.monotonic()
        if self.started is None:
            self.started = now
            how = "as long as it takes" if self.limit is None else f"up to {self.limit:g}s"
            logger.warning(
                "{}; waiting for the backend ({}, worker.broker_wait; SIGTERM stops the wait)",
                error, how,
            )  # fmt: skip
        waited = now - self.started
        if self.limit is not None and waited >= self.limit:
            raise BrokerUnavailableError(
                f"{error} (gave up after waiting {waited:.1f}s: worker.broker_wait is "
                f"{self.limit:g}s; 'forever' waits as long as it takes)"
            )
        delay = self.backoff.next_delay()
        if self.limit is not None:
            delay = min(delay, self.limit - waited)
        deadline = now + delay
        while (left := deadline - time.monotonic()) > 0:
            if stopping():
                return False
            time.sleep(min(left, _POLL))
        return not stopping()

    def done(self) -> None:
        if self.started is not None:
            logger.info(
                "backend {} answered after {:.1f}s of waiting; starting",
                self.url, time.monotonic() - self.started,
            )  # fmt: skip
