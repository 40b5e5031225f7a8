"""The Backend primitives that are the task store's alone: records, stats, the registry.

Kept apart from ``backend`` so that module shows only what involves the broker.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..base import Backend
from .store import TaskStore


class StoreDelegate(Backend):
    """Answers from ``store`` (task records never live in RabbitMQ)."""

    store: TaskStore

    def checkpoint(self, task_id: str, token: str, steps_json: str) -> bool:
        return self.store.checkpoint(task_id, token, steps_json)

    def set_progress(self, task_id: str, token: str, progress: float, message: str | None) -> bool:
        return self.store.set_progress(task_id, token, progress, message)

    def cancel(self, task_id: str) -> bool:
        return self.store.cancel(task_id)  # a pending task's message becomes a tombstone

    def get(self, task_id: str) -> dict[str, Any] | None:
        return self.store.get(task_id)

    def list(self, status: str | None, limit: int, offset: int) -> list[dict[str, Any]]:
        return self.store.list(status, limit, offset)

    def counts(self) -> dict[str, int]:
        return self.store.counts()

    def recent(self, seconds: float) -> tuple[int, int, float | None]:
        return self.store.recent(seconds)

    def size(self) -> int:
        """Pending tasks (the store's count: a canceled task's message is not counted)."""
        return self.store.size()

    def purge_finished(self, status: str, limit: int) -> int:
        return self.store.purge_finished(status, limit)  # finished tasks have no message left

    def known_queues(self) -> Sequence[str]:
        return self.store.known_queues()

    def register_worker(self, worker_id: str, info_json: str, ttl: float) -> bool:
        return self.store.register_worker(worker_id, info_json, ttl)

    def unregister_worker(self, worker_id: str) -> None:
        self.store.unregister_worker(worker_id)

    def list_workers(self) -> Sequence[str]:
        return self.store.list_workers()

    def request_stop(self, worker_id: str | None) -> int:
        return self.store.request_stop(worker_id)
