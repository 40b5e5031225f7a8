"""``GET /metrics``: Prometheus metrics read from the backend at scrape time.

The API process runs no tasks, so it has nothing to count by itself: a custom collector
asks the backend on every scrape, and any number of API replicas report the same values.

What each metric means (labels ``queue``, and ``status``/``outcome`` where named):

``conveyor_backend_up``
    1 when the backend answered this scrape, 0 when not (the other metrics are then absent).
``conveyor_tasks{queue,status}`` (gauge)
    tasks the backend holds in each status.
``conveyor_queue_depth{queue}`` (gauge)
    tasks ready to run now (pending); ``conveyor_tasks_scheduled`` wait for their time.
``conveyor_tasks_in_flight{queue}`` (gauge)
    tasks being processed by a worker now.
``conveyor_tasks_finished_total{queue,outcome}`` (counter)
    tasks that finished, by outcome (success, failed, canceled, timeout; ``failed``
    includes the dead-lettered), counted by the transitions themselves in the backend's
    monotonic counters: it never goes down when records expire or are purged.
``conveyor_events_total{queue,event}`` (counter)
    every event the queue emitted (pushed, started, retrying, progress...), from the same
    counters.
``conveyor_task_run_seconds_last_minute{queue}`` (summary)
    run time of the tasks that succeeded in the last 60 s: ``_count`` how many, ``_sum``
    their total seconds. A sliding window, not a cumulative summary: read
    ``_sum / _count`` as the recent mean, and ``_count`` as throughput per minute; do not
    ``rate()`` it.
``conveyor_tasks_failed_last_minute{queue}`` (gauge)
    tasks dead-lettered in the last 60 s.
``conveyor_workers`` (gauge)
    live workers (heartbeat within its ttl) on the backend, and
    ``conveyor_worker_tasks_running`` the tasks they report running.
"""

from __future__ import annotations

from collections.abc import Iterator

from loguru import logger
from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from ..errors import ConveyorError
from ..lifecycle import Event
from ..models import TaskStatus
from .registry import QueueRegistry


class BackendCollector(Collector):
    """Reads queue stats and the worker registry each time Prometheus scrapes."""

    def __init__(self, registry: QueueRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("conveyor_backend_up", "1 if the backend answered this scrape")
        try:
            stats = self._registry.stats()
            workers = self._registry.workers()
        except ConveyorError as exc:
            logger.warning("metrics: the backend did not answer: {}", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up

        tasks = GaugeMetricFamily(
            "conveyor_tasks", "Tasks the backend holds, by status", labels=["queue", "status"]
        )
        depth = GaugeMetricFamily(
            "conveyor_queue_depth", "Tasks ready to run now (pending)", labels=["queue"]
        )
        in_flight = GaugeMetricFamily(
            "conveyor_tasks_in_flight", "Tasks being processed now", labels=["queue"]
        )
        finished = CounterMetricFamily(
            "conveyor_tasks_finished",
            "Tasks that finished, by outcome (monotonic counters kept by the transitions)",
            labels=["queue", "outcome"],
        )
        emitted = CounterMetricFamily(
            "conveyor_events", "Events each queue emitted, by event", labels=["queue", "event"]
        )
        run = SummaryMetricFamily(
            "conveyor_task_run_seconds_last_minute",
            "Run time of the tasks that succeeded in the last 60 s (a sliding window)",
            labels=["queue"],
        )
        failed = GaugeMetricFamily(
            "conveyor_tasks_failed_last_minute",
            "Tasks dead-lettered in the last 60 s",
            labels=["queue"],
        )
        for each in stats:
            label = [each.queue]
            for status in TaskStatus:
                tasks.add_metric([each.queue, status.value], each.counts.get(status.value, 0))
            counters = self._counters(each.queue)
            if counters is not None:  # None: no log to count from; the gauges still show
                for outcome, total in finished_counts(counters).items():
                    finished.add_metric([each.queue, outcome], total)
                for event, total in sorted(counters.items()):
                    emitted.add_metric([each.queue, event], total)
            depth.add_metric(label, each.counts.get(TaskStatus.PENDING.value, 0))
            in_flight.add_metric(label, each.counts.get(TaskStatus.PROCESSING.value, 0))
            done = each.done_last_minute
            run.add_metric(label, count_value=done, sum_value=(each.mean_run_seconds or 0) * done)
            failed.add_metric(label, each.failed_last_minute)
        yield from (tasks, depth, in_flight, finished, emitted, run, failed)

        live = GaugeMetricFamily("conveyor_workers", "Live workers (heartbeat within its ttl)")
        live.add_metric([], len(workers))
        running = GaugeMetricFamily(
            "conveyor_worker_tasks_running", "Tasks the live workers report running"
        )
        running.add_metric([], sum(len(info.get("current") or []) for info in workers))
        yield from (live, running)

    def _counters(self, queue: str) -> dict[str, int] | None:
        """The queue's event counters, or None when the backend keeps no event log (or it
        failed now): the counter families then leave the queue out rather than fail the
        scrape, and a counter never reads as a drop to zero."""
        try:
            with self._registry.use(queue) as manager:
                return manager.event_log().counters()
        except ConveyorError as exc:
            logger.warning("metrics: no event counters for queue {}: {}", queue, exc)
            return None


def finished_counts(counters: dict[str, int]) -> dict[str, int]:
    """Finished tasks per outcome (the status they ended in), from the event counters."""
    ended = {
        TaskStatus.SUCCESS: (Event.SUCCEEDED,),
        TaskStatus.FAILED: (Event.FAILED, Event.DEAD_LETTERED),
        TaskStatus.CANCELED: (Event.CANCELED,),
        TaskStatus.TIMEOUT: (Event.TIMEOUT,),
    }
    return {
        status.value: sum(counters.get(event.value, 0) for event in events)
        for status, events in ended.items()
    }


def metrics_registry(registry: QueueRegistry) -> CollectorRegistry:
    """A registry of this app's own (not the process-global one, so apps do not clash)."""
    collectors = CollectorRegistry(auto_describe=False)
    collectors.register(BackendCollector(registry))
    return collectors
