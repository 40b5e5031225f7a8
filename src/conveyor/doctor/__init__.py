"""``conveyor doctor``: find the deployment mistakes that lose tasks, and say how to fix each.

Checks (each yields :class:`Finding` values; a ``problem`` makes ``conveyor doctor`` exit 1):

* the backend answers at all;
* Redis persists what it acknowledges (``appendonly yes``) and never evicts keys
  (``maxmemory-policy noeviction``), read with ``CONFIG GET`` (``unchecked`` when a managed
  Redis disables CONFIG);
* the process manager waits longer than the worker drains: supervisor ``stopwaitsecs``
  (from a config file or a running supervisord over XML-RPC) and docker-compose
  ``stop_grace_period`` must exceed ``worker.max_shutdown_wait`` plus a margin, or the
  worker is SIGKILLed mid-drain; the stop signal must be one the worker drains on;
* supervisor can start the workers at all: their log directories exist, and a
  ``startsecs``/``startretries`` pair does not leave them FATAL during a broker outage
  (see ``doctor.starts``);
* on PostgreSQL (the backend, or RabbitMQ's task store), the schema's migration version
  and that LISTEN/NOTIFY wake-ups arrive (they do not through PgBouncer transaction pooling);
* on RabbitMQ, a SQLite task store through a relative path (a warning: each working
  directory and host gets a store of its own);
* on RabbitMQ, a pipeline whose hard time limit is missing or above the broker's
  ``consumer_timeout`` (the broker would deliver the task again while it still runs);
* no schedule name has two different definitions in use (see ``doctor.schedules``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from ..settings import Settings

#: ``warning``: worth fixing, but loses no task by itself (does not fail the run).
Status = Literal["ok", "problem", "warning", "unchecked", "skipped"]

#: Seconds the process manager must wait beyond ``max_shutdown_wait``: the drain ends with
#: hand-backs, closing children and unregistering, which take a moment after the wait.
DEFAULT_MARGIN = 10.0


@dataclass(frozen=True, slots=True)
class Finding:
    """One check's outcome: ``problem`` comes with ``fix``, what to change."""

    check: str
    status: Status
    message: str
    fix: str | None = None


@dataclass(frozen=True, slots=True)
class DoctorOptions:
    """Where the deployment files are; None skips that check."""

    supervisor_conf: Path | None = None
    supervisor_url: str | None = None
    compose: Path | None = None
    margin: float = DEFAULT_MARGIN


def run_checks(settings: Settings, options: DoctorOptions) -> list[Finding]:
    """Every check, in a fixed order; never raises for what it finds."""
    from .deployment import check_compose, check_supervisor_file, check_supervisord
    from .server import check_backend, check_rabbitmq, check_redis
    from .stores import check_postgres, check_task_store

    findings = check_backend(settings)
    if findings[0].status == "ok":
        findings += check_redis(settings)
        findings += check_postgres(settings)
        from .schedules import check_schedules

        findings += check_schedules(settings)
    if options.supervisor_conf is not None:
        findings += check_supervisor_file(options.supervisor_conf, settings, options.margin)
    if options.supervisor_url is not None:
        findings += check_supervisord(options.supervisor_url, settings, options.margin)
    if options.compose is not None:
        findings += check_compose(options.compose, settings, options.margin)
    findings += check_rabbitmq(settings)
    findings += check_task_store(settings)
    return findings


__all__ = ["DEFAULT_MARGIN", "DoctorOptions", "Finding", "run_checks"]
