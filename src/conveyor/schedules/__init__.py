"""Cron schedules: declared in config (``schedules:``) or in code (``pipeline.schedule``),
pushed exactly once per tick by the schedulers every worker runs, visible in the backend's
schedules registry (``conveyor schedules``, ``GET /api/v1/schedules``, the dashboard).

Module map: ``definition`` (a schedule and its ticks, via cronsim), ``scheduler`` (one pass:
the due ticks, pushed once), ``listing`` (what readers show, conflicts included),
``runner`` (the thread a worker runs it in).
"""

from .definition import Schedule, schedule_from
from .scheduler import Pushed, Scheduler

__all__ = ["Pushed", "Schedule", "Scheduler", "schedule_from"]
