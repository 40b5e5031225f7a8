"""Seeded random scripts of ``QueueManager`` operations on a coarse virtual timeline.

``test_differential.py`` plays one script on several backends and compares what each
returns. This module only builds scripts: which public operation happens at which tick,
with which arguments. It talks to no backend.

The timeline is what makes a script safe to replay on a slow, loaded machine. Operations
happen at whole ticks. Every duration a script sets ends between two ticks: delays, nack
delays, leases and extends are whole ticks plus a half, so they end at ``k + 0.5``; queue
timeouts are whole ticks plus a quarter, so they end at ``k + 0.25`` when counted from a push
(at a tick) and at ``k + 0.75`` when counted from a due time (at a half tick). Every timing
decision a backend takes (is it due, is the lease over, has it waited too long) is therefore
taken at least a quarter tick away from the time it depends on. Two due times at the same
half tick would still be ordered by jitter alone, so the generator never creates two from
different ticks.

The model inside is a rough sketch of the agreed lifecycle, used only to choose operations
that mean something (settle a message that is probably held, retry a task that probably
failed). The test never checks a backend against it, only backends against each other, so
the model may be wrong without making the test wrong.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field
from typing import Any

#: Leases that run out this many times dead-letter the task as poison (small: reached often).
MAX_DELIVERIES = 2
#: The operations that act on a message returned by an earlier reserve (its ``ref``).
MESSAGE_OPS = frozenset({"ack", "nack", "handback", "fail", "extend"})
LIVE = frozenset({"scheduled", "pending", "processing"})
RETRYABLE = frozenset({"failed", "timeout", "canceled"})

_DELAYS = (0.5, 1.5, 2.5, 3.5)  # ticks: due at half ticks
_NACK_DELAYS = (0.5, 1.5, 2.5)
_QUEUE_TIMEOUTS = (0.25, 1.25, 2.25, 3.25)  # ticks: deadlines at quarter ticks
_EXTENDS = (0.5, 1.5, 2.5)
_LEASES = (1.5, 2.5)


@dataclass(frozen=True, slots=True)
class Op:
    """One public-API call at a tick. Durations are in ticks (the player scales them)."""

    step: int
    tick: int
    kind: str  # push reserve ack nack handback fail extend cancel retry fail_id inspect
    task: str | None = None  # the task id of push, cancel, retry, fail_id, inspect
    ref: int | None = None  # the step of the reserve whose message a MESSAGE_OPS op uses
    priority: int = 0
    delay: float | None = None  # push delay or nack delay (0: none)
    queue_timeout: float | None = None
    max_retries: int | None = None
    seconds: float | None = None  # extend: None renews for the visibility timeout

    def describe(self, tick_seconds: float) -> str:
        """The call as a developer would write it, with durations in seconds."""

        def secs(ticks: float) -> str:
            return f"{ticks * tick_seconds:g}s"

        message = f"<message of step {self.ref}>"
        if self.kind == "push":
            text = f"push({self.task!r}, priority={self.priority}"
            if self.delay is not None:
                text += f", delay={secs(self.delay)}"
            if self.queue_timeout is not None:
                text += f", queue_timeout={secs(self.queue_timeout)}"
            if self.max_retries is not None:
                text += f", max_retries={self.max_retries}"
            return text + ")"
        if self.kind == "reserve":
            return "reserve(timeout=0)"
        if self.kind == "nack":
            return f"nack({message}, delay={secs(self.delay or 0)})"
        if self.kind == "handback":
            return f"nack({message}, count_attempt=False)"
        if self.kind == "extend":
            seconds = "" if self.seconds is None else f", seconds={secs(self.seconds)}"
            return f"extend({message}{seconds})"
        if self.kind in MESSAGE_OPS:
            return f"{self.kind}({message})"
        if self.kind == "fail_id":
            return f"fail({self.task!r})  # by id"
        if self.kind == "inspect":
            return f"get_task({self.task!r})"
        return f"{self.kind}({self.task!r})"


@dataclass(frozen=True, slots=True)
class Script:
    """A whole script: its operations, then a final ``get_task`` of every id at ``end_tick``.

    ``lease`` is the visibility timeout in ticks; None means longer than the script (no
    lease ever runs out: the script RabbitMQ is compared on, whose lease is its delivery).
    """

    seed: int
    lease: float | None
    ops: tuple[Op, ...]
    end_tick: int

    @property
    def label(self) -> str:
        return "with lease expiry" if self.lease is not None else "without lease expiry"

    def task_ids(self) -> list[str]:
        """Every id the script pushes, in the order first pushed."""
        return list(dict.fromkeys(op.task for op in self.ops if op.kind == "push" and op.task))


@dataclass(slots=True)
class _Task:
    priority: int
    status: str
    place: tuple[float, int] = (math.inf, 0)  # (time it became ready, tie-break)
    due: float | None = None
    queue_timeout: float | None = None
    started: bool = False
    holder: int | None = None
    lease_until: float | None = None
    expiries: int = 0
    cancel_requested: bool = False


@dataclass
class _Model:
    """A sketch of the agreed lifecycle, in ticks: enough to choose sensible operations."""

    lease: float | None
    tasks: dict[str, _Task] = field(default_factory=dict)
    held: dict[int, str] = field(default_factory=dict)  # reserve step -> task id
    stale: dict[int, str] = field(default_factory=dict)  # messages settled or lost
    _order: itertools.count[int] = field(default_factory=itertools.count)

    def place(self, at: float) -> tuple[float, int]:
        return (at, next(self._order))

    def push(self, op: Op, now: float) -> None:
        assert op.task is not None
        old = self.tasks.get(op.task)
        if old is not None and old.status in LIVE:
            return
        task = _Task(op.priority, "pending", queue_timeout=op.queue_timeout)
        if op.delay is not None:
            task.status, task.due = "scheduled", now + op.delay
        else:
            task.place = self.place(now)
        self.tasks[op.task] = task

    def _release(self, task: _Task) -> None:
        if task.holder is not None:
            self.stale[task.holder] = self.held.pop(task.holder)
        task.holder = task.lease_until = None

    def _advance(self, now: float) -> None:
        """What a claim does first: promote due tasks, reap expired leases."""
        due = sorted(
            (task.due, task_id)
            for task_id, task in self.tasks.items()
            if task.status == "scheduled" and task.due is not None and task.due <= now
        )
        for at, task_id in due:
            task = self.tasks[task_id]
            task.status, task.place, task.due = "pending", self.place(at), None
        for task in self.tasks.values():
            lease_until = task.lease_until
            if task.status == "processing" and lease_until is not None and lease_until < now:
                task.expiries += 1
                self._release(task)
                if task.cancel_requested:
                    task.status = "canceled"
                elif task.expiries >= MAX_DELIVERIES:
                    task.status = "failed"
                else:
                    task.status = "pending"

    def reserve(self, step: int, now: float) -> None:
        self._advance(now)
        ready = sorted(
            (item for item in self.tasks.items() if item[1].status == "pending"),
            key=lambda item: (-item[1].priority, item[1].place),
        )
        for task_id, task in ready:
            limit = task.queue_timeout
            if limit is not None and not task.started and now > task.place[0] + limit:
                task.status = "timeout"
                continue
            task.status, task.started, task.holder = "processing", True, step
            task.lease_until = None if self.lease is None else now + self.lease
            self.held[step] = task_id
            return

    def settle(self, op: Op, now: float) -> None:
        task_id = self.held.get(op.ref) if op.ref is not None else None
        if task_id is None:
            return
        task = self.tasks[task_id]
        if op.kind == "extend":
            if task.lease_until is not None:
                task.lease_until = now + (op.seconds if op.seconds is not None else self.lease or 0)
            return
        self._release(task)
        if op.kind == "ack":
            task.status = "success"
        elif op.kind == "fail":
            task.status = "failed"
        elif task.cancel_requested:
            task.status = "canceled"
        elif op.kind == "handback":
            task.status = "pending"
        elif op.delay:
            task.status, task.due = "scheduled", now + op.delay
        else:
            task.status, task.place = "pending", self.place(now)

    def by_id(self, op: Op, now: float) -> None:
        task = self.tasks.get(op.task or "")
        if task is None:
            return
        if op.kind == "cancel":
            if task.status in ("scheduled", "pending"):
                task.status = "canceled"
            elif task.status == "processing":
                task.cancel_requested = True
        elif op.kind == "retry" and task.status in RETRYABLE:
            task.status, task.place, task.started = "pending", self.place(now), False
            task.expiries, task.cancel_requested = 0, False
        elif op.kind == "fail_id":
            self._release(task)
            task.status = "failed"

    def ids_with(self, statuses: frozenset[str]) -> list[str]:
        return [task_id for task_id, task in self.tasks.items() if task.status in statuses]

    def last_deadline(self) -> float:
        """The latest due time or lease end the model knows of (0 if none)."""
        times = [task.due for task in self.tasks.values() if task.due is not None]
        times += [task.lease_until for task in self.tasks.values() if task.lease_until]
        return max(times, default=0.0)


class _Generator:
    def __init__(self, seed: int, lease_expiry: bool) -> None:
        kind = "leases" if lease_expiry else "no-lease-expiry"
        self.rng = random.Random(f"conveyor-differential-{seed}-{kind}")
        self.seed, self.lease_expiry = seed, lease_expiry
        self.model = _Model(self.rng.choice(_LEASES) if lease_expiry else None)
        # A few priority bands per script, so same-priority (FIFO) decisions are common.
        self.bands = self.rng.sample(range(11), self.rng.randint(1, 3))
        self.ops: list[Op] = []
        self.ids: list[str] = []
        self.due_slots: dict[float, int] = {}  # half tick -> the tick that scheduled it
        self.tick = 1

    def add(self, kind: str, **fields: Any) -> None:
        op = Op(step=len(self.ops), tick=self.tick, kind=kind, **fields)
        self.ops.append(op)
        now = float(self.tick)
        if kind == "push":
            self.model.push(op, now)
        elif kind == "reserve":
            self.model.reserve(op.step, now)
        elif kind in MESSAGE_OPS:
            self.model.settle(op, now)
        else:
            self.model.by_id(op, now)

    def free_delay(self, choices: tuple[float, ...]) -> float | None:
        """A delay whose due time no other tick uses (None if every one is taken)."""
        for delay in self.rng.sample(choices, len(choices)):
            owner = self.due_slots.get(self.tick + delay)
            if owner is None or owner == self.tick:
                self.due_slots[self.tick + delay] = self.tick
                return delay
        return None

    def push(self) -> None:
        rng = self.rng
        if self.ids and rng.random() < 0.12:
            task_id = rng.choice(self.ids)  # a live duplicate (refused) or a finished id
        else:
            task_id = f"t{len(self.ids):02d}"
            self.ids.append(task_id)
        priority = rng.choice(self.bands) if rng.random() < 0.85 else rng.randint(0, 10)
        delay = self.free_delay(_DELAYS) if rng.random() < 0.45 else None
        timeout = rng.choice(_QUEUE_TIMEOUTS) if rng.random() < 0.3 else None
        retries = rng.randint(0, 3) if rng.random() < 0.2 else None
        self.add(
            "push",
            task=task_id,
            priority=priority,
            delay=delay,
            queue_timeout=timeout,
            max_retries=retries,
        )

    def on_message(self, kind: str, ref: int) -> None:
        if kind == "nack":
            delay = self.free_delay(_NACK_DELAYS) if self.rng.random() < 0.5 else None
            self.add("nack", ref=ref, delay=delay or 0.0)
        elif kind == "extend":
            seconds = None
            if self.lease_expiry and self.rng.random() < 0.5:
                seconds = self.rng.choice(_EXTENDS)
            self.add("extend", ref=ref, seconds=seconds)
        else:
            self.add(kind, ref=ref)

    def step(self) -> None:
        """Choose and add one operation, weighted by what the model thinks is possible."""
        model, rng = self.model, self.rng
        held, stale = list(model.held), list(model.stale)
        retryable = model.ids_with(RETRYABLE)
        weights = {
            "push": 3.0 if len(self.ids) < 10 else 0.7,
            "reserve": 3.0,
            "ack": 1.5 if held else 0.0,
            "nack": 1.5 if held else 0.0,
            "handback": 0.8 if held else 0.0,
            "fail": 0.6 if held else 0.0,
            "extend": 1.0 if held else 0.0,
            "stale": 0.6 if stale else 0.0,
            "cancel": 0.7 if self.ids else 0.0,
            "retry": (1.2 if retryable else 0.2) if self.ids else 0.0,
            "fail_id": 0.25 if self.ids else 0.0,
            "inspect": 0.8 if self.ids else 0.0,
        }
        kind = rng.choices(list(weights), list(weights.values()))[0]
        if kind == "push":
            self.push()
        elif kind == "reserve":
            self.add("reserve")
        elif kind == "stale":  # a message whose lease is probably lost or already settled
            stale_kind = rng.choices(("extend", "ack", "nack", "fail"), (6, 2, 1, 1))[0]
            self.on_message(stale_kind, rng.choice(stale))
        elif kind in MESSAGE_OPS:
            self.on_message(kind, rng.choice(held))
        elif kind == "retry" and retryable and rng.random() < 0.75:
            self.add("retry", task=rng.choice(retryable))
        elif kind == "cancel" and rng.random() < 0.7 and model.ids_with(LIVE):
            self.add("cancel", task=rng.choice(model.ids_with(LIVE)))
        else:
            self.add(kind, task=rng.choice(self.ids))

    def build(self) -> Script:
        rng = self.rng
        for _ in range(rng.randint(10, 13)):
            for _ in range(rng.choice((1, 2, 2, 3, 3))):
                self.step()
            # Waits: a gap of several ticks lets delays come due and leases run out.
            self.tick += rng.choices((1, 2, 3), (5, 3, 2) if self.lease_expiry else (6, 3, 1))[0]
        # Drain: wait past every due time the model knows of, then reserve a few times.
        self.tick = max(self.tick, math.floor(self.model.last_deadline()) + 1)
        for _ in range(rng.randint(2, 4)):
            self.add("reserve")
        return Script(self.seed, self.model.lease, tuple(self.ops), self.tick + 1)


def generate(seed: int, *, lease_expiry: bool) -> Script:
    """The script of ``seed``; ``lease_expiry`` False: no lease ever runs out (RabbitMQ)."""
    return _Generator(seed, lease_expiry).build()
