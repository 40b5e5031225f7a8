"""A cron schedule: what it pushes, when, and its ticks in its time zone.

Cron expressions are parsed and evaluated by ``cronsim`` (the optional ``schedules``
dependency group), with ``zoneinfo`` time zones. cronsim follows Debian/Vixie cron across
daylight-saving changes: a fixed local time the clocks skip runs once, at the first valid
time after it; a fixed local time that occurs twice runs once, at its first occurrence
(expressions with a wildcard hour keep running every hour, as in Vixie cron).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from ..errors import ConfigError
from ..validation import check_name, check_queue_name

MissedPolicy = Literal["skip", "run_once"]
MISSED_POLICIES = ("skip", "run_once")


def _cronsim() -> Any:
    try:
        from cronsim import CronSim
    except ImportError:
        raise ConfigError(
            "schedules need the cronsim package: pip install 'conveyor[schedules]'"
        ) from None
    return CronSim


@dataclass(frozen=True)
class Schedule:
    """One named schedule. ``data``/``priority``/``type``/``options`` make its task;
    ``missed`` says what a scheduler does with ticks that passed while none ran.

    ``grace``: a tick is on time when a scheduler sees it within this many seconds; older
    ones are missed (``skip``: none of them runs; ``run_once``: one task for all of them).
    """

    name: str
    cron: str
    queue: str = "default"
    data: Any = None
    tz: str = "UTC"
    priority: int = 5
    type: str | None = None
    missed: MissedPolicy = "skip"
    grace: float = 60.0
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = f"schedule {self.name!r}"
        try:
            check_name("schedule name", self.name)
            check_queue_name(self.queue, "queue")
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if self.missed not in MISSED_POLICIES:
            raise ConfigError(
                f"{where}: missed must be one of {MISSED_POLICIES}, got {self.missed!r}"
            )
        if not self.grace > 0:
            raise ConfigError(f"{where}: grace must be seconds > 0, got {self.grace!r}")
        try:
            ZoneInfo(self.tz)
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigError(
                f"{where}: unknown time zone {self.tz!r}; use an IANA name such as "
                "'Europe/Paris' (pip install tzdata where the system has none)"
            ) from None
        try:
            _cronsim()(self.cron, datetime.now(UTC))
        except ConfigError:
            raise
        except Exception as exc:  # cronsim raises CronSimError (a ValueError) with a reason
            raise ConfigError(f"{where}: bad cron expression {self.cron!r}: {exc}") from None
        try:
            json.dumps(self.data)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: data must be JSON: {exc}") from None

    # -- identity ---------------------------------------------------------------------------

    def definition(self) -> dict[str, Any]:
        """What makes it this schedule, as JSON: two definitions under one name conflict."""
        return {
            "name": self.name, "cron": self.cron, "queue": self.queue, "data": self.data,
            "tz": self.tz, "priority": self.priority, "type": self.type,
            "missed": self.missed, "grace": self.grace, "options": dict(self.options),
        }  # fmt: skip

    def fingerprint(self) -> str:
        text = json.dumps(self.definition(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def task_id(self, tick: float) -> str:
        """The deterministic id of the tick's task: every scheduler pushes the same one."""
        return f"cron:{self.name}:{round(tick)}"

    # -- ticks ------------------------------------------------------------------------------

    def _moment(self, epoch: float) -> datetime:
        return datetime.fromtimestamp(epoch, tz=ZoneInfo(self.tz))

    def ticks_after(self, epoch: float) -> Iterator[float]:
        """Ticks strictly after ``epoch`` (epoch seconds), in order, without end."""
        for moment in _cronsim()(self.cron, self._moment(epoch)):
            yield moment.timestamp()

    def next_after(self, epoch: float) -> float:
        return next(self.ticks_after(epoch))

    def last_at_or_before(self, epoch: float) -> float | None:
        """The latest tick at or before ``epoch`` (None when the expression has none)."""
        # Reverse iteration starts strictly before a whole second: floor, then one after.
        moment = self._moment(math.floor(epoch) + 1)
        for tick in _cronsim()(self.cron, moment, reverse=True):
            return float(tick.timestamp())
        return None


def schedule_from(item: Mapping[str, Any]) -> Schedule:
    """A schedule from a config entry (``schedules:`` in YAML)."""
    known = {"name", "cron", "queue", "data", "tz", "priority", "type", "missed", "grace",
             "options"}  # fmt: skip
    unknown = set(item) - known
    if unknown:
        raise ConfigError(f"schedules: unknown key(s) {sorted(unknown)}; known: {sorted(known)}")
    if "name" not in item or "cron" not in item:
        raise ConfigError("schedules: each entry needs a name and a cron expression")
    return Schedule(**dict(item))
