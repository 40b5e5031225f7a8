"""The key names of one queue: all share the hash tag ``{queue}``, so every script touches
one Redis Cluster slot, and they reach the scripts through KEYS in this order (the layout
documented at the top of ``lua/_lifecycle.lua``)."""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class QueueKeys:
    tag: str
    all: tuple[str, ...]

    @classmethod
    def for_queue(cls, queue_name: str) -> QueueKeys:
        tag = f"conveyor:{{{queue_name}}}"
        names = (
            "pending", "delayed", "leases", "task:", "seq", "wake", "done:success",
            "done:failed", "done:canceled", "done:timeout", "pulled", "publishing", "expiring",
            "layout", "preemptions", "parked", "keyrun:", "events", "counters",
        )  # fmt: skip
        return cls(tag, tuple(f"{tag}:{name}" for name in names))

    @property
    def pending(self) -> str:
        return self.all[0]

    @property
    def delayed(self) -> str:
        return self.all[1]

    @property
    def leases(self) -> str:
        return self.all[2]

    @property
    def wake(self) -> str:
        return self.all[5]

    @property
    def pulled(self) -> str:
        return self.all[10]

    @property
    def layout(self) -> str:
        return self.all[13]

    @property
    def preemptions(self) -> str:
        return self.all[14]

    @property
    def parked(self) -> str:
        """Every task set aside because its concurrency key was full (per-key limits)."""
        return self.all[15]

    @property
    def events(self) -> str:
        """The queue's event stream (XADD MAXLEN ~ by every transition)."""
        return self.all[17]

    @property
    def counters(self) -> str:
        """The queue's monotonic counters: one field per event name, never decremented."""
        return self.all[18]

    def task(self, task_id: str) -> str:
        return f"{self.all[3]}{task_id}"

    def done(self, status: str) -> str:
        return f"{self.tag}:done:{status}"

    def index(self, status: str) -> str:
        """The index holding tasks of a status (processing: the leased ones)."""
        by_status = {"pending": self.pending, "scheduled": self.delayed, "processing": self.leases}
        return by_status.get(status) or self.done(status)

    @property
    def pattern(self) -> str:
        """A SCAN pattern matching every key of the queue (glob characters escaped)."""
        return re.sub(r"([*?\[\]\\])", r"\\\1", f"{self.tag}:") + "*"
