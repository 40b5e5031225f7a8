"""A test from the transition table: every (state, op) pair of ``conveyor.lifecycle``, on
every backend, generated from ``TRANSITIONS`` itself.

For every row of the table, and for every (state, op) pair the table leaves out (those are
refused: the call returns False or None and the record does not change at all), a *case*
drives one task, ``x``, into the row's state with the row's guard condition, applies the op
through the public ``QueueManager`` API and checks:

* the value the call returned;
* the stored status (``get_task``);
* the last history event (``rule.event``; an op without an event, or with a field-only
  event such as progress, leaves the history as it was);
* ``dead_reason`` (``rule.reason``; an operator's FAIL stores the reason it was given);
* the effect the guard text names (attempts + 1, attempts - 1, reset, a fresh record...);
* where a task that goes back in line stands (``rule.place``): ``x`` is reserved against
  ``a``, a task of the same priority pushed after ``x`` but before the op, and ``b``, pushed
  after the op. ``back``: a, x, b. ``kept``: x, a, b. ``due``: ``a`` is pushed before the due
  time and ``b`` after it but before any sweep (the due time decides, not whichever call
  happened to promote the task): a, x, b;
* a task that ends finished is not handed out again.

A row added to the table is tested at once when its guard is one :data:`GUARDS` knows; a row
with a guard it does not know fails, asking for its setup to be taught here.

How each op is applied (``p`` produces and inspects, ``h`` holds the task, ``o`` is another
consumer; "the message" is the holder's for a processing task, otherwise a stale message
from an earlier reservation of the same task)::

    PUSH           p.push("x", new data)
    DUE            x was pushed with a short delay: wait past it, o.sweep()
    CLAIM          o.reserve(timeout=0)
    ACK            h.ack(message)
    NACK           h.nack(message), or h.nack(message, delay) for the guard "with a delay"
    HAND_BACK      h.nack(message, count_attempt=False)
    FAIL           h.fail(message, reason=...), or p.fail("x", reason=...) for "by id"
    CANCEL         p.cancel("x")
    RETRY          p.retry("x")
    LEASE_EXPIRY   h's visibility_timeout is short: wait past the lease, o.sweep()
    QUEUE_TIMEOUT  x was pushed with a short queue_timeout: wait past it, o.sweep()
    EXTEND         h.extend(message, 60) on a short lease, then wait past the short lease and
                   o.sweep(): the task must still be held
    CHECKPOINT     h.checkpoint(message, steps)
    PROGRESS       h.set_progress(message, 0.5, note)
    PREEMPT        p.push("u", priority + 5) (unless the guard says none is ready), then
                   h.preempt(message, steps, min_priority=priority + 1): returns u's message
                   when x yielded (u is then held by h), else None

RabbitMQ's lease is the unacked delivery, not a timer. There LEASE_EXPIRY is: the broker
closes h's connection (``close_rabbitmq_connection``), and ``o.reserve`` takes the
redelivery over. The expiry and the next claim are so one step: a task that goes back in line
is at once processing again, its history ending ``lease_expired, redelivered``, and its
place is checked by that reserve taking it ahead of ``a``. Every other op runs on RabbitMQ
unchanged.

Beyond the table, a guard that does not hold is refused too: a stale token (the task is held
by another consumer now) for every op that needs the holder's, and ``queue_timeout`` on a
waiting task that was started once.

Each case runs on a queue (and SQLite file) of its own, many at once in threads (each case has
its own managers: they are not thread-safe). Waits are short (0.3 s) with 0.2 s margins. A
case that depends on a step happening *before* a deadline, on a machine too slow for that,
is played again with every duration doubled, then quadrupled, instead of failing. One case::

    CONVEYOR_TRANSITION=processing-nack pytest tests/test_transitions.py -k sqlite

Below the table test, the cases a deliberately broken copy once got past are named one by
one (a cancel while processing, dead letters past ``result_ttl``, a hand-back's place, a
stale extend), and a real worker process keeps a 1.5 s lease through a 5 s step.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from conftest import (
    DEFAULT_BACKENDS,
    Helper,
    _delete_redis_keys,
    backend_params,
    close_rabbitmq_connection,
    delete_rabbitmq_queues,
    rabbitmq_url,
    redis_admin,
    sleep_until,
    wait_until,
)
from conveyor import Message, QueueManager, TaskRecord, TaskStatus
from conveyor.backends import sqlite_path_from_url
from conveyor.lifecycle import (
    FINISHED_STATUSES,
    PREEMPT_CANCELED,
    PREEMPT_MAXED,
    PREEMPT_NO_URGENT,
    PREEMPT_YIELDS,
    TRANSITIONS,
    UNRECORDED_EVENTS,
    Event,
    Op,
    Rule,
)
from helpers.pipelines import runs

S = TaskStatus


@pytest.fixture(params=backend_params(*dict.fromkeys((*DEFAULT_BACKENDS, "postgres"))))
def backend_name(request: pytest.FixtureRequest) -> str:
    """The default backends and PostgreSQL (a backend of its own, not only a task store)."""
    return str(request.param)


MakeQueue = Callable[..., QueueManager]

SHORT = 0.3  # a lease, delay or queue_timeout that is meant to run out
MARGIN = 0.2  # kept between a deadline and anything that must happen before or after it
LONG = 60.0  # a lease, delay or queue_timeout that must not run out during a case
SCALES = (1.0, 2.0, 4.0)  # a case too slow to judge is played again, its durations scaled
THREADS = 12
X, A, B = "x", "a", "b"
U = "u"  # the urgent task a preemption claims
PRIORITY = 5
REASON = "operator"  # the reason an operator's FAIL gives
STEPS = {"first": {"done": True}}
NEW_DATA = {"n": 2}

#: Ops that present a message (a token). FAIL does too unless it is by id.
MESSAGE_OPS = frozenset(
    {Op.ACK, Op.NACK, Op.HAND_BACK, Op.FAIL, Op.EXTEND, Op.CHECKPOINT, Op.PROGRESS, Op.PREEMPT}
)

# The conditions a case sets up before its op.
CANCEL_ASKED = "cancel asked"  # cancel() while it runs
EXPIRED = "expired"  # pushed with a short queue_timeout that has passed
DAMAGED = "damaged"  # its stored priority is not a number: the store cannot read it
DELAY = "delay"  # nack with a delay
POISON = "poison"  # max_deliveries=1: the first lost lease makes it poison
BY_ID = "by id"  # FAIL by task id, not with a message
STALE = "stale"  # the message's token is not the current holder's
STARTED = "started"  # pushed with a queue_timeout, started once, back in line
KEY_FULL = "key full"  # x has a concurrency key (limit 1) whose one slot another task holds
KEY = {"concurrency_key": "k", "max_concurrency": 1}
HOLDER = "k1"  # the task holding the key's slot
MAXED = "maxed"  # preempt with max_preemptions=0
UNKNOWN = "unknown guard"

#: Guard text of a table row -> the condition sets to test it under (one case each).
GUARDS: dict[str, tuple[frozenset[str], ...]] = {
    "": (frozenset(),),
    "the id is pushed again: a fresh record": (frozenset(),),
    "a live id: the push returns False": (frozenset(),),
    "its queue_timeout passed: skipped": (frozenset({EXPIRED}),),
    "the record is unreadable": (frozenset({DAMAGED}),),
    "attempts + 1, a new fencing token": (frozenset(),),
    "never started": (frozenset(),),
    "by id (an operator): any state": (frozenset({BY_ID}),),
    "with the holder's token": (frozenset(),),
    "with the holder's token, or by id": (frozenset(), frozenset({BY_ID})),
    "a cancel was asked while it ran": (frozenset({CANCEL_ASKED}),),
    "with a delay": (frozenset({DELAY}),),
    "no delay": (frozenset(),),
    "attempts - 1": (frozenset(),),
    "flagged: its worker stops between steps": (frozenset(),),
    "expiries + 1 >= max_deliveries": (frozenset({POISON}),),
    "expiries + 1": (frozenset(),),
    "attempts and expiries reset": (frozenset(),),
    "its concurrency key is full: parked, the claim goes on": (frozenset({KEY_FULL}),),
    PREEMPT_CANCELED: (frozenset({CANCEL_ASKED}),),
    PREEMPT_NO_URGENT: (frozenset(),),
    PREEMPT_MAXED: (frozenset({MAXED}),),
    PREEMPT_YIELDS: (frozenset(),),
}


# -- the cases --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One (state, op) under some conditions; ``rule`` None means it must be refused."""

    state: TaskStatus
    op: Op
    rule: Rule | None
    given: frozenset[str] = frozenset()
    why: str = ""

    @property
    def refused(self) -> bool:
        return self.rule is None or self.rule.to is None

    @property
    def place(self) -> str:
        return self.rule.place if self.rule is not None else ""

    @property
    def name(self) -> str:
        conditions = f" [{', '.join(sorted(self.given))}]" if self.given else ""
        to = "refused" if self.rule is None or self.rule.to is None else self.rule.to.value
        return f"{self.state.value}-{self.op.value}{conditions} -> {to}"


def all_cases() -> list[Case]:
    """Every row under each of its guard's conditions, every pair the table leaves out, and
    the guards that do not hold (stale tokens, queue_timeout after a start)."""
    cases = []
    for rule in TRANSITIONS:
        variants = GUARDS.get(rule.guard, (frozenset({UNKNOWN}),))
        cases += [Case(rule.state, rule.op, rule, given, rule.guard) for given in variants]
    in_table = {(rule.state, rule.op) for rule in TRANSITIONS}
    cases += [
        Case(state, op, None, why="not in the table")
        for state in TaskStatus
        for op in Op
        if (state, op) not in in_table
    ]
    cases += [
        Case(state, op, None, frozenset({STALE}), "a stale token")
        for op in sorted(MESSAGE_OPS)
        for state in TaskStatus
        if state is S.PROCESSING or op is Op.FAIL
    ]
    cases += [
        Case(state, Op.QUEUE_TIMEOUT, None, frozenset({STARTED}), "started once")
        for state in (S.PENDING, S.SCHEDULED)
    ]
    wanted = os.environ.get("CONVEYOR_TRANSITION")
    if wanted:
        cases = [case for case in cases if case.name.startswith(wanted)]
    return cases


def test_the_cases_cover_every_pair_and_every_row() -> None:
    cases = all_cases() if not os.environ.get("CONVEYOR_TRANSITION") else []
    if not cases:
        pytest.skip("CONVEYOR_TRANSITION narrows the cases")
    pairs = {(case.state, case.op) for case in cases}
    assert len(pairs) == len(TaskStatus) * len(Op)
    assert {case.rule for case in cases if case.rule is not None} == set(TRANSITIONS)
    unknown = [case.rule for case in cases if UNKNOWN in case.given]
    assert not unknown, f"guards GUARDS does not know (teach it their setup): {unknown}"


# -- one case on one backend ------------------------------------------------------------------


class TooLateError(Exception):
    """A step meant to happen before a deadline happened after it: the case cannot judge."""


@dataclass
class Window:
    """A moment known to lie between ``lo`` and ``hi`` (clock readings around a call)."""

    lo: float
    hi: float

    def plus(self, seconds: float) -> Window:
        return Window(self.lo + seconds, self.hi + seconds)


def case_url(backend: str, backend_url: str, directory: Path) -> str:
    """A URL of the case's own: its own SQLite file (or task store), the shared Redis."""
    directory.mkdir(parents=True)
    if backend == "sqlite":
        return f"sqlite:///{directory}/q.db"
    if backend == "rabbitmq":
        return rabbitmq_url(directory)
    return backend_url


def damage(url: str, queue_name: str, task_id: str) -> None:
    """Make a stored record unreadable (its priority not a number), in whatever keeps it."""
    if url.startswith("amqp"):
        url = parse_qs(urlsplit(url).query)["task_store"][0]
    if url.startswith("postgres"):
        import psycopg

        # Columns are typed: a damaged record is one whose data is not JSON any more.
        with psycopg.connect(url.split("?", 1)[0], autocommit=True) as conn:
            changed = conn.execute(
                "UPDATE conveyor.tasks SET data = '{not json' WHERE queue = %s AND id = %s",
                (queue_name, task_id),
            ).rowcount
        assert changed == 1
        return
    if url.startswith("sqlite"):
        with closing(sqlite3.connect(sqlite_path_from_url(url), timeout=10)) as db, db:
            changed = db.execute(
                "UPDATE tasks SET priority = 'not a number' WHERE queue = ? AND id = ?",
                (queue_name, task_id),
            ).rowcount
        assert changed == 1
        return
    with closing(redis_admin(url)) as client:  # a cluster's too
        key = f"conveyor:{{{queue_name}}}:task:{task_id}"
        assert client.exists(key) == 1
        client.hset(key, "priority", "not a number")


class Run:
    """One play of a case: a fresh queue, its managers, and what the drive left behind."""

    def __init__(self, backend: str, url: str, case: Case, scale: float) -> None:
        self.backend, self.url, self.case = backend, url, case
        self.queue_name = f"tt-{uuid.uuid4().hex[:10]}"
        self.short, self.margin = SHORT * scale, MARGIN * scale
        self.managers: list[QueueManager] = []
        self.deliveries = 1 if POISON in case.given else 5
        short_lease = case.op in (Op.LEASE_EXPIRY, Op.EXTEND)
        self.p = self.open()
        self.h = self.open(visibility_timeout=self.short if short_lease else LONG)
        self.o = self.open()
        self.message: Message | None = None  # the holder's
        self.stale: Message | None = None  # an earlier holder's
        self.due: Window | None = None
        self.expire: Window | None = None
        self.lease: Window | None = None
        self.with_queue_timeout = False
        self.holder: Message | None = None  # the task holding x's key's slot (KEY_FULL)

    def open(self, visibility_timeout: float = LONG) -> QueueManager:
        manager = QueueManager.from_url(
            self.url, queue_name=self.queue_name, visibility_timeout=visibility_timeout,
            max_deliveries=self.deliveries,
        )  # fmt: skip
        self.managers.append(manager)
        return manager

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.p.clear()
        for manager in self.managers:
            with contextlib.suppress(Exception):
                manager.close()
        if self.backend == "redis":
            _delete_redis_keys(self.url, self.queue_name)
        if self.backend == "rabbitmq":
            delete_rabbitmq_queues(self.queue_name)

    @contextmanager
    def before(
        self, deadline: Window | Callable[[], Window | None] | None, what: str
    ) -> Iterator[None]:
        """Steps that must finish before ``deadline``: if they did not, the case is too slow
        to judge (TooLateError), whatever they returned."""
        try:
            yield
        except AssertionError:
            self._check_in_time(deadline, what)
            raise
        self._check_in_time(deadline, what)

    def _check_in_time(
        self, deadline: Window | Callable[[], Window | None] | None, what: str
    ) -> None:
        if callable(deadline):
            deadline = deadline()
        late = deadline is not None and time.time() > deadline.lo - self.margin
        if late:
            raise TooLateError(f"{what} finished after its deadline")

    def window(self, call: Callable[[], Any]) -> tuple[Any, Window]:
        """Call; return its value and the window around the call."""
        lo = time.time()
        value = call()
        return value, Window(lo, time.time())

    def push_x(
        self, delay: float | None = None, queue_timeout: float | None = None, **options: Any
    ) -> None:
        stored, at = self.window(
            lambda: self.p.push(
                X, {"n": 1}, PRIORITY, delay=delay, queue_timeout=queue_timeout, **options
            )
        )
        assert stored is True, "push x"
        ready = at.plus(delay or 0.0)
        if delay:
            self.due = ready
        if queue_timeout:
            self.with_queue_timeout = True
            self.expire = ready.plus(queue_timeout)

    def push(self, task_id: str) -> None:
        assert self.p.push(task_id, {"n": task_id}, PRIORITY) is True, f"push {task_id}"

    def take(self, manager: QueueManager) -> Message:
        """Reserve x (the head of the queue) with ``manager``; note its lease."""
        lo = time.time()
        message = manager.reserve(timeout=2)
        assert message is not None and message.task_id == X, f"reserve gave {message}"
        self.lease = Window(lo, time.time()).plus(manager.visibility_timeout)
        return message

    def wait_past(self, moment: Window | None) -> None:
        if moment is not None:
            sleep_until(moment.hi + self.margin)

    def get(self) -> TaskRecord:
        record = self.p.get_task(X)
        assert record is not None, "x has no record"
        return record


def drive(run: Run) -> None:
    """Bring x into the case's state under its conditions."""
    case, given = run.case, run.case.given
    state, op = case.state, case.op
    uses_message = op in MESSAGE_OPS and BY_ID not in given
    # A task that is not held is given a stale message (or a past lease) by holding it once.
    held_once = state is not S.PROCESSING and (uses_message or op is Op.LEASE_EXPIRY)
    timed = op is Op.QUEUE_TIMEOUT or EXPIRED in given or STARTED in given
    queue_timeout = run.short if timed else None
    a_first = case.place in ("back", "kept")

    if state is S.SCHEDULED:
        if held_once or STARTED in given:
            run.push_x(queue_timeout=queue_timeout)
            with run.before(run.expire, "reserve before the queue_timeout"):
                run.stale = run.take(run.h)
            assert run.h.nack(run.stale, delay=LONG) is True
        else:
            short = op in (Op.DUE, Op.QUEUE_TIMEOUT)
            run.push_x(delay=run.short if short else LONG, queue_timeout=queue_timeout)
            if case.place == "due":
                with run.before(run.due, "push a before x is due"):
                    run.push(A)
    elif state is S.PENDING and KEY_FULL in given:
        assert run.p.push(HOLDER, {"n": HOLDER}, PRIORITY, **KEY) is True
        run.holder = run.h.reserve(timeout=2)
        assert run.holder is not None and run.holder.task_id == HOLDER, "reserve the holder"
        run.push_x(**KEY)
    elif state is S.PENDING:
        run.push_x(queue_timeout=queue_timeout)
        if a_first:
            run.push(A)
        if held_once or STARTED in given:
            with run.before(run.expire, "reserve before the queue_timeout"):
                run.stale = run.take(run.h)
            assert run.h.nack(run.stale) is True
        if DAMAGED in given:
            damage(run.url, run.queue_name, X)
    elif state is S.PROCESSING:
        run.push_x(queue_timeout=queue_timeout)
        if a_first:
            run.push(A)
        with run.before(run.expire, "reserve before the queue_timeout"):
            run.message = run.take(run.h)
        if STALE in given:
            assert run.h.nack(run.message, count_attempt=False) is True
            run.stale, run.message = run.message, run.take(run.open())
        if CANCEL_ASKED in given:
            assert run.p.cancel(X) is True
    elif state in (S.SUCCESS, S.FAILED):
        run.push_x(queue_timeout=queue_timeout)
        if a_first:
            run.push(A)
        with run.before(run.expire, "reserve before the queue_timeout"):
            run.stale = run.take(run.h)
        if state is S.SUCCESS:
            assert run.h.ack(run.stale, result="first") is True
        else:
            assert run.h.fail(run.stale, reason="error") is True
    elif state is S.CANCELED:
        run.push_x(queue_timeout=queue_timeout)
        if a_first:
            run.push(A)
        with run.before(run.expire, "cancel before the queue_timeout"):
            if held_once:
                run.stale = run.take(run.h)
                assert run.p.cancel(X) is True
                assert run.h.nack(run.stale) is True  # canceled while it ran: canceled
            else:
                assert run.p.cancel(X) is True
    elif state is S.TIMEOUT:
        run.push_x(queue_timeout=run.short)
        if a_first:
            run.push(A)
        if held_once:  # started tasks never time out: fail it, then re-drive it
            with run.before(run.expire, "reserve before the queue_timeout"):
                run.stale = run.take(run.h)
            assert run.h.fail(run.stale) is True
            _, at = run.window(lambda: run.p.retry(X))
            run.expire = at.plus(run.short)
        run.wait_past(run.expire)
        run.p.sweep()
    else:
        raise AssertionError(f"no drive into {state}: teach drive() in {__file__}")


def apply(run: Run) -> Any:
    """Apply the case's op through the public API; return what the call returned."""
    case, given, op = run.case, run.case.given, run.case.op
    message = run.stale if run.case.state is not S.PROCESSING or STALE in given else run.message
    rabbitmq = run.backend == "rabbitmq"
    if op is Op.PUSH:
        return run.p.push(X, NEW_DATA, PRIORITY)
    if op is Op.DUE:
        run.wait_past(run.due)
        if case.place == "due":
            run.push(B)  # after the due time, before any sweep
        return run.o.sweep()
    if op is Op.CLAIM:
        if EXPIRED in given:
            run.wait_past(run.expire)
        return run.o.reserve(timeout=0)
    if op is Op.CANCEL:
        return run.p.cancel(X)
    if op is Op.RETRY:
        result, at = run.window(lambda: run.p.retry(X))
        if run.with_queue_timeout:
            run.expire = at.plus(run.short)  # a re-drive's queue_timeout counts from now
        return result
    if op is Op.QUEUE_TIMEOUT:
        run.wait_past(run.expire)
        return run.o.sweep()
    if op is Op.LEASE_EXPIRY:
        if not rabbitmq:
            run.wait_past(run.lease)
            return run.o.sweep()
        close_rabbitmq_connection(run.h)
        if case.state is not S.PROCESSING:
            return run.o.sweep()

        def taken_over() -> Any:
            message = run.o.reserve(timeout=0.2)
            return message or (run.get().status != S.PROCESSING and "settled")

        found = wait_until(taken_over, 10, message="the broker to redeliver x")
        return found if isinstance(found, Message) else None
    if op is Op.FAIL and BY_ID in given:
        return run.p.fail(X, reason=REASON)
    assert message is not None, f"{case.name}: no message to present"
    holder = run.h
    if op is Op.ACK:
        return holder.ack(message, result="done")
    if op is Op.NACK:
        if DELAY in given:
            result, at = run.window(lambda: holder.nack(message, delay=run.short))
            run.due = at.plus(run.short)
            return result
        return holder.nack(message)
    if op is Op.HAND_BACK:
        return holder.nack(message, count_attempt=False)
    if op is Op.FAIL:
        return holder.fail(message, reason=REASON)
    if op is Op.EXTEND:
        result = holder.extend(message, seconds=LONG)
        if case.state is S.PROCESSING and STALE not in given:
            run.wait_past(run.lease)  # past the lease it had: extended, it is still held
            run.o.sweep()
        return result
    if op is Op.CHECKPOINT:
        return holder.checkpoint(message, STEPS)
    if op is Op.PROGRESS:
        return holder.set_progress(message, 0.5, "half way")
    if op is Op.PREEMPT:
        if case.why != PREEMPT_NO_URGENT:
            assert run.p.push(U, {"n": U}, PRIORITY + 5) is True, "push u"
        yielded, urgent = holder.preempt(
            message, STEPS, min_priority=PRIORITY + 1,
            max_preemptions=0 if MAXED in given else 3,
        )  # fmt: skip
        assert yielded is (urgent is not None), f"yielded {yielded} but claimed {urgent}"
        return urgent
    raise AssertionError(f"no way to apply {op}: teach apply() in {__file__}")


def events(record: TaskRecord) -> list[str]:
    return [event.event for event in record.history]


#: What a guard's text says the transition does to the record, beyond its status.
EFFECTS: dict[str, Callable[[TaskRecord, TaskRecord], str | None]] = {
    "attempts + 1, a new fencing token": lambda before, after: (
        None if after.attempts == before.attempts + 1 else "attempts did not go up by 1"
    ),
    "attempts - 1": lambda before, after: (
        None if after.attempts == before.attempts - 1 else "attempts did not go down by 1"
    ),
    PREEMPT_YIELDS: lambda before, after: (
        None
        if after.attempts == before.attempts - 1
        and after.steps == STEPS
        and after.preemptions == before.preemptions + 1
        and after.history[-1].note == f"preempted by {U}"
        else f"not yielded as the row says: {after!r}"
    ),
    "attempts and expiries reset": lambda before, after: (
        None if after.attempts == 0 else "attempts were not reset"
    ),
    "the id is pushed again: a fresh record": lambda before, after: (
        None
        if (after.attempts, after.data, after.result, after.error) == (0, NEW_DATA, None, None)
        and events(after) == [Event.PUSHED]
        else "not a fresh record"
    ),
    "flagged: its worker stops between steps": lambda before, after: (
        None if after.cancel_requested else "cancel_requested is not set"
    ),
}


def check(run: Run, before: TaskRecord, result: Any, after: TaskRecord) -> list[str]:
    """What differs from what the case's rule says (empty: the transition is right)."""
    case, rule = run.case, run.case.rule
    problems: list[str] = []
    takeover = run.backend == "rabbitmq" and case.op is Op.LEASE_EXPIRY
    if case.refused:
        timed = (Op.CLAIM, Op.DUE, Op.QUEUE_TIMEOUT, Op.LEASE_EXPIRY, Op.PREEMPT)
        wanted: Any = None if case.op in timed else False
        if result is not wanted:
            problems.append(f"returned {result!r}, not {wanted!r}")
        if after.model_dump() != before.model_dump():
            problems.append(f"the record changed:\n  before {before!r}\n  after  {after!r}")
        return problems
    assert rule is not None and rule.to is not None
    goes_on = takeover and rule.to is S.PENDING  # the takeover reserve holds it again
    if case.op is Op.CLAIM or goes_on:
        if rule.to is S.PROCESSING or goes_on:
            ok = isinstance(result, Message) and result.task_id == X
        else:
            ok = result is None
    elif case.op in (Op.DUE, Op.QUEUE_TIMEOUT, Op.LEASE_EXPIRY):
        ok = result is None
    elif case.op is Op.PREEMPT:
        ok = isinstance(result, Message) and result.task_id == U
    else:
        ok = result is True
    if not ok:
        problems.append(f"returned {result!r}")
    wanted_status = S.PROCESSING if goes_on else rule.to
    if after.status != wanted_status:
        problems.append(f"status {after.status.value}, not {wanted_status.value}")
    if goes_on:
        if events(after)[-2:] != [Event.LEASE_EXPIRED, Event.REDELIVERED]:
            problems.append(f"history ends {events(after)[-2:]}, not lease_expired, redelivered")
    elif rule.event is None or rule.event in UNRECORDED_EVENTS:
        if events(after) != events(before):
            problems.append(f"history {events(before)} became {events(after)}")
    elif not after.history or after.history[-1].event != rule.event:
        problems.append(f"last event {events(after)[-1:]}, not {rule.event.value}")
    reason = rule.reason.value if rule.reason else REASON if case.op is Op.FAIL else None
    if after.dead_reason != reason:
        problems.append(f"dead_reason {after.dead_reason!r}, not {reason!r}")
    effect = EFFECTS.get(rule.guard)
    if effect is not None and (problem := effect(before, after)):
        problems.append(problem)
    if case.op is Op.CHECKPOINT and after.steps != STEPS:
        problems.append(f"steps {after.steps}, not {STEPS}")
    if case.op is Op.PROGRESS and (after.progress, after.progress_message) != (0.5, "half way"):
        problems.append(f"progress {after.progress} {after.progress_message!r}")
    if case.op is Op.ACK and after.result != "done":
        problems.append(f"result {after.result!r}")
    return problems


def check_place(run: Run, result: Any) -> list[str]:
    """Reserve x against a (pushed before the op) and b (after it): the rule's place."""
    place = run.case.place
    if place == "parked":  # b, pushed after x, passes it; x runs once the slot is freed
        run.push(B)
        first = run.o.reserve(timeout=2)
        assert run.holder is not None and run.h.ack(run.holder) is True
        second = run.o.reserve(timeout=2)
        taken = [m.task_id if m is not None else "nothing" for m in (first, second)]
        return [] if taken == [B, X] else [f"place parked: reserved {taken}, not [b, x]"]
    held_x = isinstance(result, Message) and run.case.op is not Op.PREEMPT  # PREEMPT: u
    taken: list[str] = [result.task_id] if held_x else []
    deadline = run.expire if run.with_queue_timeout and run.case.op is Op.RETRY else None
    with run.before(deadline, "reserve the re-driven task before its queue_timeout"):
        if place == "due" and run.case.op is Op.NACK:
            with run.before(run.due, "push a before x is due"):
                run.push(A)
            run.wait_past(run.due)
            run.push(B)  # after the due time, before any sweep
        elif place in ("back", "kept"):
            run.push(B)
        while len(taken) < 3:
            message = run.o.reserve(timeout=2)
            taken.append(message.task_id if message is not None else "nothing")
    wanted = [X, A, B] if place == "kept" else [A, X, B]
    return [] if taken == wanted else [f"place {place}: reserved {taken}, not {wanted}"]


def play_once(run: Run) -> list[str]:
    case = run.case
    if UNKNOWN in case.given:
        return [f"guard {case.why!r} unknown: teach GUARDS in {__file__} how to set it up"]
    # A reader shows a waiting task past its queue_timeout as timeout: the drive and the
    # snapshot must be done before it passes (the deadline is known once the drive ran).
    waiting = case.state in (S.PENDING, S.SCHEDULED)
    with run.before(lambda: run.expire if waiting else None, "drive"):
        drive(run)
        before = run.get()
        assert before.status == case.state, f"drive reached {before.status.value}"
    result = apply(run)
    after = run.get()
    problems = check(run, before, result, after)
    if not problems and case.place:
        problems += check_place(run, result)
    if not problems and after.status in FINISHED_STATUSES:
        again = run.o.reserve(timeout=0)
        if again is not None and again.task_id == X:
            problems.append(f"finished as {after.status.value}, then handed out again")
    return problems


def play(backend: str, backend_url: str, directory: Path, case: Case) -> str | None:
    """Play a case (again, slower, while it is too slow to judge); None when it passes."""
    if backend == "rabbitmq" and KEY_FULL in case.given:
        return None  # RabbitMQ refuses keyed pushes (test_flow_control checks the refusal)
    late = ""
    for scale in SCALES:
        url = case_url(backend, backend_url, directory / f"{scale:g}")
        run = Run(backend, url, case, scale)
        try:
            problems = play_once(run)
        except TooLateError as exc:
            late = str(exc)
            continue
        except AssertionError as exc:
            where = traceback.extract_tb(exc.__traceback__)[-1]
            return f"{str(exc).splitlines()[0]} (line {where.lineno}: {where.line})"
        except Exception:
            return traceback.format_exc(limit=-3)
        finally:
            run.close()
        return "; ".join(problems) or None
    return f"too slow to judge even with durations x{SCALES[-1]:g}: {late}"


def test_every_transition_of_the_table(backend_name: str, backend_url: str, tmp_path: Path) -> None:
    """Every case at once, in threads; every failing case is listed, not just the first."""
    cases = all_cases()
    started = time.monotonic()
    with ThreadPoolExecutor(THREADS) as pool:
        outcomes = list(
            pool.map(
                lambda item: play(backend_name, backend_url, tmp_path / str(item[0]), item[1]),
                enumerate(cases),
            )
        )
    failed = [f"{case.name}: {outcome}" for case, outcome in zip(cases, outcomes, strict=True)
              if outcome]  # fmt: skip
    if failed:
        pytest.fail(
            f"{len(failed)} of {len(cases)} cases failed on {backend_name} "
            f"({time.monotonic() - started:.1f}s):\n" + "\n".join(failed),
            pytrace=False,
        )


# -- the cases a deliberately broken copy got past, named one by one --------------------------


def ids_with(queue: QueueManager, status: str) -> set[str]:
    return {record.id for record in queue.list_tasks(status, limit=1000)}


def lose_lease(backend: str, holder: QueueManager, other: QueueManager, lease_end: float) -> Any:
    """Let ``holder``'s lease run out and ``other`` notice: past the lease and a sweep, or on
    RabbitMQ the broker closing the holder's connection and ``other`` taking the delivery
    over (or dropping it). Returns what ``other`` reserved, if anything."""
    if backend != "rabbitmq":
        sleep_until(lease_end + MARGIN)
        other.sweep()
        return None
    close_rabbitmq_connection(holder)

    def taken_over() -> Any:
        message = other.reserve(timeout=0.2)
        record = other.get_task(X)
        return message or (record is not None and record.status != S.PROCESSING and "settled")

    found = wait_until(taken_over, 10, message="the broker to redeliver x")
    return found if isinstance(found, Message) else None


@pytest.mark.parametrize("how", ["nack", "nack with a delay", "hand back", "lease runs out"])
def test_a_task_canceled_while_processing_ends_canceled_and_is_never_redelivered(
    how: str, backend_name: str, make_queue: MakeQueue
) -> None:
    holder = make_queue(visibility_timeout=SHORT if how == "lease runs out" else LONG)
    other = make_queue()
    assert holder.push(X, {"n": 1}, PRIORITY)
    message = holder.reserve(timeout=2)
    assert message is not None and message.task_id == X
    lease_end = time.time() + SHORT
    assert holder.cancel(X) is True
    record = other.get_task(X)
    assert record is not None and record.status == S.PROCESSING and record.cancel_requested

    if how == "nack":
        assert holder.nack(message) is True
    elif how == "nack with a delay":
        assert holder.nack(message, delay=SHORT) is True
    elif how == "hand back":
        assert holder.nack(message, count_attempt=False) is True
    else:
        assert lose_lease(backend_name, holder, other, lease_end) is None

    record = other.get_task(X)
    assert record is not None
    assert record.status == S.CANCELED, events(record)
    assert events(record)[-1] == Event.CANCELED and record.dead_reason is None
    if how in ("nack with a delay", "lease runs out"):  # past the delay, or another lease
        sleep_until(time.time() + SHORT + MARGIN)
    other.sweep()
    assert other.reserve(timeout=0.2) is None
    record = other.get_task(X)
    assert record is not None and record.status == S.CANCELED and record.attempts == 1
    assert events(record).count(Event.CANCELED) == 1, events(record)


def test_a_failed_record_outlives_result_ttl_while_a_succeeded_one_is_forgotten(
    make_queue: MakeQueue,
) -> None:
    queue = make_queue(result_ttl=0.5)  # Redis expires keys in whole seconds: 1 s here
    assert queue.push_many([("ok", 1, 9), ("dead", 2, 5), ("pulled", 3, 1)]) == [True] * 3
    ok = queue.reserve(timeout=2)
    assert ok is not None and ok.task_id == "ok" and queue.ack(ok)
    dead = queue.reserve(timeout=2)
    assert dead is not None and dead.task_id == "dead" and queue.fail(dead)
    # A pulled task is kept only for result_ttl until it settles: failing it must keep it.
    pulled = queue.pull(timeout=2)
    assert pulled is not None and pulled.task_id == "pulled" and queue.fail(pulled)
    sleep_until(time.time() + 1.0 + MARGIN)
    fresh = make_queue(result_ttl=0.5)  # a new store applies retention at its first sweep
    fresh.sweep()

    assert fresh.get_task("ok") is None, "a success record outlived result_ttl"
    assert "ok" not in ids_with(fresh, "success")
    for task_id in ("dead", "pulled"):
        record = fresh.get_task(task_id)
        assert record is not None, f"the dead-lettered {task_id} was forgotten after result_ttl"
        assert record.status == S.FAILED and record.dead_reason == "error"
    assert ids_with(fresh, "failed") == {"dead", "pulled"}


def test_a_task_handed_back_at_shutdown_keeps_its_place_ahead_of_tasks_pushed_after_it(
    make_queue: MakeQueue,
) -> None:
    worker, producer = make_queue(), make_queue()
    assert producer.push(X, 0, PRIORITY) and producer.push(A, 1, PRIORITY)
    message = worker.reserve(timeout=2)
    assert message is not None and message.task_id == X
    assert producer.push(B, 2, PRIORITY)
    assert worker.nack(message, count_attempt=False) is True  # a shutdown hands it back
    assert producer.push("c", 3, PRIORITY)
    order = [producer.reserve(timeout=2) for _ in range(4)]
    wanted = [(X, 1), (A, 1), (B, 1), ("c", 1)]
    assert [(m.task_id, m.attempts) if m else None for m in order] == wanted
    record = producer.get_task(X)
    assert record is not None and events(record)[-2:] == [Event.INTERRUPTED, Event.STARTED]


@pytest.mark.parametrize("lost_by", ["hand back", "lease runs out"])
def test_a_stale_token_cannot_extend_a_lease(
    lost_by: str, backend_name: str, make_queue: MakeQueue
) -> None:
    """The first holder's token is stale once the task went to a second holder: its extend
    is refused, and the second holder's (short) lease still ends when it should."""
    first = make_queue(visibility_timeout=SHORT if lost_by == "lease runs out" else LONG)
    second = make_queue(visibility_timeout=SHORT)
    sweeper = make_queue()
    assert first.push(X, {"n": 1}, PRIORITY)
    old = first.reserve(timeout=2)
    assert old is not None
    if lost_by == "hand back":
        assert first.nack(old, count_attempt=False) is True
        new, holder = second.reserve(timeout=2), second
    else:
        new, holder = lose_lease(backend_name, first, sweeper, time.time() + SHORT), sweeper
        if new is None:  # SQLite, Redis: back in line (on RabbitMQ the sweeper took it over)
            new, holder = second.reserve(timeout=2), second
    lease_end = time.time() + SHORT
    assert new is not None and new.task_id == X and new.token != old.token

    assert first.extend(old, seconds=LONG) is False, "a stale token extended a lease"
    assert first.ack(old) is False
    record = sweeper.get_task(X)
    assert record is not None and record.status == S.PROCESSING
    assert record.attempts == new.attempts
    if backend_name == "rabbitmq":  # the lease is the delivery: still the new holder's
        assert holder.extend(new) is True and holder.ack(new) is True
        return
    sleep_until(lease_end + MARGIN)  # the new holder's short lease ends on time
    sweeper.sweep()
    record = sweeper.get_task(X)
    assert record is not None
    assert record.status == S.PENDING and events(record)[-1] == Event.LEASE_EXPIRED, events(record)
    assert holder.extend(new) is False


# -- lease renewal by a real worker ------------------------------------------------------------


# RabbitMQ's lease is the unacked delivery, which no timer ends: there is nothing to renew
# (tests/test_rabbitmq.py runs a 15 s task across 2 s heartbeats on one connection instead).
@pytest.mark.slow
@pytest.mark.parametrize("backend_name", backend_params("sqlite", "redis", "postgres"))
def test_a_worker_renews_its_lease_well_inside_the_visibility_timeout(
    make_queue: MakeQueue,
    spawn_helper: Callable[..., Helper],
    backend_url: str,
    queue_name: str,
    tmp_path: Path,
) -> None:
    """A 5 s step under a 1.5 s lease: the worker must renew it all along. Meanwhile this
    test sweeps and reserves ten times a second, so a lease that lapsed even once would be
    reaped and the task handed to this test (on RabbitMQ the lease is the delivery itself:
    the worker's connection must stay up through the step)."""
    queue = make_queue()
    assert queue.push("long", {"dir": str(tmp_path), "seconds": 5}, type="sleepy")
    worker = spawn_helper(
        "run_worker.py", "--url", backend_url, "--queue", queue_name,
        "--visibility-timeout", "1.5",
    )  # fmt: skip
    worker.expect("ready", timeout=30)
    wait_until(lambda: runs(tmp_path, "long", "start"), 30, message="the step to start")

    def finished() -> bool:
        stolen = queue.reserve(timeout=0)
        assert stolen is None, f"the lease lapsed: {stolen} was handed out again"
        queue.sweep()
        record = queue.get_task("long")
        return record is not None and record.status in FINISHED_STATUSES

    wait_until(finished, 30, interval=0.1, message="the long task to finish")
    record = queue.get_task("long")
    assert record is not None
    assert record.status == S.SUCCESS and record.attempts == 1, events(record)
    assert Event.LEASE_EXPIRED not in events(record), events(record)
    assert Event.REDELIVERED not in events(record), events(record)
    start, end = runs(tmp_path, "long", "start"), runs(tmp_path, "long", "end")
    assert len(start) == len(end) == 1 and end[0]["at"] - start[0]["at"] >= 4.9
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=20) == 0
