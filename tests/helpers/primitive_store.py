"""A store, its records and its registry called one primitive at a time, for tests that
exercise one backend's storage directly (ordering, leases, damage) below QueueManager."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from conveyor.backends import (
    Claimed,
    ClaimSpec,
    NewTask,
    Outcome,
    StoreConfig,
    open_server,
)
from conveyor.lifecycle import Op, TaskStatus


@dataclass(frozen=True)
class OneClaim:
    """What a single claim found: a task or None, and the wait hint."""

    claimed: Claimed | None
    wait_hint: float | None


class PrimitiveStore:
    """One queue of a server, one call per primitive (each is one atomic step)."""

    def __init__(self, url: str, queue_name: str, *, result_ttl: float = 7 * 24 * 3600) -> None:
        self.server = open_server(url)
        self.store = self.server.store(queue_name, StoreConfig(result_ttl=result_ttl))
        self.records = self.server.records(queue_name)

    def enqueue(self, tasks: Sequence[NewTask]) -> list[bool]:
        return self.store.enqueue(tasks).stored

    def claim(self, lease: float | None, max_deliveries: int, consumer: str = "") -> OneClaim:
        result = self.store.claim(ClaimSpec(lease, max_deliveries, consumer))
        return OneClaim(result.claimed[0] if result.claimed else None, result.wait_hint)

    def _settle(self, outcome: Outcome) -> bool:
        return self.store.settle([outcome])[0][0].status is not None

    def ack(self, task_id: str, token: str, result_json: str | None) -> bool:
        return self._settle(Outcome(Op.ACK, task_id, token, result_json))

    def nack(
        self, task_id: str, token: str, delay: float, error_json: str | None, count_attempt: bool
    ) -> bool:
        op = Op.NACK if count_attempt else Op.HAND_BACK
        return self._settle(Outcome(op, task_id, token, error_json, delay=delay))

    def fail(
        self, task_id: str, token: str | None, reason: str, error_json: str | None,
        *, status: str = "failed",
    ) -> bool:  # fmt: skip
        outcome = Outcome(Op.FAIL, task_id, token, error_json, reason=reason,
                          status=TaskStatus(status))  # fmt: skip
        return self._settle(outcome)

    def extend(self, task_id: str, token: str, seconds: float) -> bool:
        return self.store.renew([(task_id, token)], seconds)[0].held

    def set_progress(self, task_id: str, token: str, fraction: float, note: str | None) -> bool:
        return self._settle(Outcome(Op.PROGRESS, task_id, token, note, fraction=fraction))

    def cancel(self, task_id: str) -> bool:
        return self.store.cancel(task_id)

    def retry(self, task_id: str) -> bool:
        return self.store.retry(task_id) is not None

    def wait(self, timeout: float) -> None:
        self.store.wait(timeout)

    def purge(self) -> int:
        return self.store.purge()

    def get(self, task_id: str) -> dict[str, Any] | None:
        return self.records.get(task_id)

    def list(self, status: str | None, limit: int, offset: int) -> list[dict[str, Any]]:
        return self.records.list(status, limit, offset)

    def counts(self) -> dict[str, int]:
        return self.records.counts()

    def recent(self, seconds: float) -> tuple[int, int, float | None]:
        return self.records.recent(seconds)

    def size(self) -> int:
        return self.records.size()

    def ping(self) -> None:
        self.server.ping()

    def close(self) -> None:
        self.store.close()
        self.server.close()
