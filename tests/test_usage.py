"""The memory limit reads /proc at most every half second, not after every task."""

from __future__ import annotations

import time

import pytest

from conveyor.worker import usage
from conveyor.worker.options import WorkerOptions


def test_memory_is_read_again_only_when_the_last_reading_is_old(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reads: list[int] = []

    def fake_resident_mb(child_pids: object) -> float:
        reads.append(1)
        return 500.0

    monkeypatch.setattr(usage, "resident_mb", fake_resident_mb)
    usage._last_reading.clear()
    options = WorkerOptions(memory_mb=100)
    for _ in range(50):
        assert usage.recycling_reason(options, 0, time.time(), [1, 2]) == "memory 500 MB >= 100 MB"
    assert len(reads) == 1
    usage.recycling_reason(options, 0, time.time(), [1, 3])  # another child: read again
    assert len(reads) == 2
    usage.recycling_reason(options, 0, time.time(), [1, 2])
    assert len(reads) == 3, "a different set of processes must not reuse a reading"
