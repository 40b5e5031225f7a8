"""One exception root for everything Conveyor raises.

Backends translate their driver's exceptions (redis-py, sqlite3, pika) into these at the
backend boundary, so nothing above a backend ever imports a driver's exception types.
"""

from __future__ import annotations


class ConveyorError(Exception):
    """Root of every error Conveyor raises on purpose."""


class ConfigError(ConveyorError, ValueError):
    """A setting is missing or wrong; the message names the key and the reason."""


class TaskValidationError(ConveyorError, ValueError):
    """A task's field has a bad value (priority out of range, payload too large, ...).

    Raised before anything is written, so a rejected push leaves no trace.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message


class TaskTypeError(ConveyorError, TypeError):
    """A task's field has the wrong type (priority "5", data that is not JSON, ...)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message


class BrokerUnavailableError(ConveyorError, ConnectionError):
    """The backend cannot be reached; the message names the URL with its password masked."""


class BrokerAuthenticationError(BrokerUnavailableError):
    """The broker refused the credentials (wrong user or password, no AUTH given).

    A subclass of ``BrokerUnavailableError`` so code that only asks "can I use the broker?"
    keeps working; a worker starting up tells the two apart: it waits while the broker is
    unreachable, but stops at once (exit 2) on credentials that waiting will not fix. A
    worker already running retries it like an outage: credentials can be rotated under it.
    """


class BackendError(ConveyorError):
    """The backend answered, but not as expected (a script error, a corrupt database)."""


class TaskNotFoundError(ConveyorError, LookupError):
    """No task with that id exists in the queue."""
