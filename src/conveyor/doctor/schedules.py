"""Doctor check: two definitions under one schedule name (different hosts or deployments
running different schedules as one) are a problem: which one runs a tick is a race."""

from __future__ import annotations

from ..errors import ConveyorError
from ..manager import QueueManager
from ..schedules.listing import conflicts, schedule_entries
from ..settings import Settings
from . import Finding


def check_schedules(settings: Settings) -> list[Finding]:
    try:
        with QueueManager.from_settings(settings) as queue:
            entries = schedule_entries(queue.server.registry.schedules())
    except ConveyorError as exc:
        return [Finding("schedules", "unchecked", f"cannot read the schedules registry: {exc}")]
    lines = conflicts(entries)
    if not lines:
        return [
            Finding("schedules", "ok", f"{len(entries)} schedule(s), no conflicting definitions")
        ]
    fix = "give each definition its own name, or deploy one definition to every host"
    return [Finding("schedules", "problem", line, fix) for line in lines]
