"""The ledger an outage test ends with: what was pushed, what ran, what the queue says.

Tasks carry ``{"ledger": path}`` (``ops_pipeline`` appends ``task_id attempt pid`` when a
run finishes). At the end, ``lost`` are pushed tasks the queue does not hold as
``success``; ``duplicates`` are tasks whose step finished more than once (a late ack was
refused, or an ack lost with the server's last second of writes): at-least-once allows
them, so they are counted and printed, not failed.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from conveyor import QueueManager, TaskStatus


@dataclass(frozen=True)
class LedgerResult:
    pushed: int
    succeeded: int
    lost: list[str]
    duplicated: dict[str, int]  # task id -> finished runs (> 1)
    runs: int

    @property
    def extra_runs(self) -> int:
        return sum(self.duplicated.values()) - len(self.duplicated)

    def line(self, label: str) -> str:
        return (
            f"ledger [{label}]: pushed={self.pushed} succeeded={self.succeeded} "
            f"lost={len(self.lost)} duplicates={len(self.duplicated)} "
            f"(extra runs {self.extra_runs}) runs={self.runs}"
            + (f" lost ids: {self.lost[:10]}" if self.lost else "")
        )


def runs(path: Path) -> Counter[str]:
    """Finished runs per task id, as the pipeline recorded them."""
    if not path.exists():
        return Counter()
    return Counter(line.split()[0] for line in path.read_text().splitlines() if line.strip())


def check(queue: QueueManager, ids: Collection[str], path: Path, label: str) -> LedgerResult:
    """Compare the ledger with the queue's records; print the result line and return it."""
    done = {
        record.id for record in queue.list_tasks(status=TaskStatus.SUCCESS, limit=len(ids) + 100)
    }
    counted = runs(path)
    result = LedgerResult(
        pushed=len(ids),
        succeeded=len(done & set(ids)),
        lost=sorted(set(ids) - done),
        duplicated={task_id: n for task_id, n in counted.items() if n > 1},
        runs=sum(counted.values()),
    )
    print(result.line(label))
    return result
