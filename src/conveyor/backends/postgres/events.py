"""A queue's event log on PostgreSQL: the ``events`` table the triggers fill (``events_sql``).

Reads go through the server's pool (autocommit: never inside a writer's transaction). A
blocked reader polls with one indexed query, every 5 ms at first, backing off to 50 ms
while nothing comes. Not LISTEN/NOTIFY: a NOTIFY in every transition would serialise the
commits of every worker (PostgreSQL takes one cluster-wide lock from a notifying
transaction's pre-commit to its end), and the claims must not wait on one another.
"""

from __future__ import annotations

import time
from typing import Any

from ..eventlog import EventLog, LiveEvent, reset_event
from . import events_sql
from .connection import Database

_POLL_SECONDS, _POLL_MAX = 0.005, 0.05
_START = "0-0"


def position(text: str | None) -> tuple[int, int]:
    """``"<tx>-<id>"`` as numbers; anything else (``""``, ``"0"``) is the log's start."""
    tx, _, number = (text or "").partition("-")
    try:
        return int(tx), int(number or 0)
    except ValueError:
        return 0, 0


def _text(where: tuple[int, int]) -> str:
    return f"{where[0]}-{where[1]}"


class PostgresEventLog(EventLog):
    def __init__(self, database: Database, queue_name: str) -> None:
        self.queue_name = queue_name
        self._database = database
        s = database.schema
        self._after, self._newest = events_sql.after_sql(s), events_sql.newest_sql(s)
        self._counters = events_sql.counters_sql(s)

    def _rows(self, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        return self._database.reads(sql, params)  # type: ignore[arg-type]

    def tail(self) -> str:
        newest, trimmed = self._rows(self._newest, {"q": self.queue_name})[0]
        return _text(max(position(newest), position(trimmed)))

    def read(self, after: str, count: int, block: float) -> list[LiveEvent]:
        where = position(after)
        deadline = time.monotonic() + max(block, 0)
        pause = _POLL_SECONDS
        while True:
            out = self._read(where, count)
            if out or time.monotonic() >= deadline:
                return out
            time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 2, _POLL_MAX)

    def _read(self, where: tuple[int, int], count: int) -> list[LiveEvent]:
        out: list[LiveEvent] = []
        rows = self._rows(
            self._after,
            {"q": self.queue_name, "tx": str(where[0]), "id": where[1], "n": max(1, count)},
        )
        trimmed = position(rows[0][0])
        if where < trimmed:  # events after `where` were trimmed away: say so, go on after
            where = trimmed
            out.append(reset_event(self.queue_name, time.time(), _text(where)))
        for row in rows:
            _, tx, number, queue, task_id, event, status, attempt, progress, at, worker, note = row
            if tx is None or (int(tx), int(number)) <= where:
                continue  # no event; or one that committed below the trim (the reset covers it)
            out.append(
                LiveEvent(
                    f"{tx}-{number}", str(queue), str(task_id), str(event), str(status or ""),
                    int(attempt or 0), float(progress or 0), float(at or 0),
                    worker or None, note,
                )
            )  # fmt: skip
        return out

    def counters(self) -> dict[str, int]:
        rows = self._rows(self._counters, {"q": self.queue_name})
        return {str(name): int(n) for name, n in rows}
