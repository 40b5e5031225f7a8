"""What readers show of the schedules registry: one entry per name, conflicts named.

Every scheduler writes the definition it runs under the schedule's name with a fingerprint;
two fingerprints under one name, both written within ``CONFLICT_WINDOW`` of the newest, mean
two hosts (or two deployments) run different schedules under one name: ``conveyor
schedules``, the API and ``doctor`` report it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from ..manager import QueueManager

#: Definitions seen within this many seconds of a name's newest one count as in use.
CONFLICT_WINDOW = 3600.0


def _float(value: Any) -> float | None:
    try:
        return None if value in (None, "") else float(value)
    except (TypeError, ValueError):
        return None


def schedule_entries(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Group registry rows by name: the newest definition, its runs, and any conflict."""
    by_name: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_name.setdefault(str(row["name"]), []).append(row)
    entries = []
    for name, group in sorted(by_name.items()):
        group.sort(key=lambda row: _float(row.get("seen_at")) or 0.0, reverse=True)
        newest = _float(group[0].get("seen_at")) or 0.0
        live = [r for r in group if (_float(r.get("seen_at")) or 0.0) >= newest - CONFLICT_WINDOW]
        try:
            definition = json.loads(group[0].get("definition") or "{}")
        except ValueError:
            definition = {}
        last_tick = _float(group[0].get("last_tick"))
        entries.append({
            "name": name,
            "cron": definition.get("cron"),
            "tz": definition.get("tz"),
            "queue": definition.get("queue"),
            "missed": definition.get("missed"),
            "next_run": _float(group[0].get("next_run")),
            "last_run": last_tick,
            "last_task": None if last_tick is None else f"cron:{name}:{round(last_tick)}",
            "last_status": None,
            "writers": sorted({str(r.get("writer")) for r in live}),
            "conflict": [
                {"fingerprint": r["fingerprint"], "writer": r.get("writer"),
                 "definition": r.get("definition")}
                for r in live
            ] if len({r["fingerprint"] for r in live}) > 1 else [],
        })  # fmt: skip
    return entries


def list_schedules(queue: QueueManager) -> list[dict[str, Any]]:
    """Every schedule on the queue's server, with the status of its last run's task."""
    entries = schedule_entries(queue.server.registry.schedules())
    for entry in entries:
        if entry["last_task"] and entry["queue"]:
            try:
                other = queue.for_queue(str(entry["queue"]))
            except Exception:  # a damaged queue name in the registry: shown without status
                continue
            with other:
                record = other.get_task(entry["last_task"])
            # No record: finished and forgotten past result_ttl (or deleted).
            entry["last_status"] = record.status.value if record else "forgotten"
    return entries


def conflicts(entries: Sequence[dict[str, Any]]) -> list[str]:
    """One line per name that has two definitions in use."""
    lines = []
    for entry in entries:
        if entry["conflict"]:
            writers = ", ".join(f"{c['writer']} ({c['fingerprint']})" for c in entry["conflict"])
            lines.append(
                f"schedule {entry['name']!r} has {len(entry['conflict'])} different "
                f"definitions in use: {writers}; give each its own name or deploy one "
                "definition everywhere"
            )
    return lines
