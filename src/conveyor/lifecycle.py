"""The task lifecycle, written once: statuses, event names, dead-letter reasons, the rules.

Every backend implements this table — the Redis Lua scripts, the SQL of the SQLite store —
and nothing else defines a transition. Names reach Lua through a header generated from this
module (:func:`lua_header`) and SQL through f-strings over these constants, so no backend
retypes a status or an event name. ``tests/test_transitions.py`` walks :data:`TRANSITIONS`
on every backend, and the README's lifecycle section is this table in prose.

The timeouts, and which applies when:

* ``queue_timeout`` bounds the wait before a task's *first* start: it counts from the
  moment the task became ready (its push, its due time if delayed, or its re-drive) and is
  cleared when a consumer first claims it. A task that was started once — then handed
  back, retried or redelivered after a lost lease — is never timed out by it. Expired
  tasks are marked ``timeout`` by any claim that meets them and by the sweep every worker
  runs in its maintenance pass; a reader (``get_task``, ``list_tasks``) shows an expired
  waiting task as ``timeout`` even when no worker runs (see :func:`effective_status`).
* ``visibility_timeout`` is the lease: a claimed task whose lease is not renewed in time
  is taken back (see the lease-expiry rules below). On RabbitMQ the lease is the unacked
  delivery instead, and it ends when the consumer's connection does.
* ``process_timeout`` (and a pipeline's step limits) is a hard limit the worker enforces
  by killing the step's process; the outcome is a failure with reason ``timeout``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class TaskStatus(StrEnum):
    """Where a task is in its lifecycle."""

    SCHEDULED = "scheduled"
    PENDING = "pending"
    PROCESSING = "processing"
    SUCCESS = "success"
    FAILED = "failed"
    CANCELED = "canceled"
    TIMEOUT = "timeout"


#: A task in one of these states is "live": pushing its id again is refused.
ACTIVE_STATUSES = frozenset({TaskStatus.SCHEDULED, TaskStatus.PENDING, TaskStatus.PROCESSING})
#: Terminal states; a task leaves them only through an explicit retry (re-drive).
FINISHED_STATUSES = frozenset(
    {TaskStatus.SUCCESS, TaskStatus.FAILED, TaskStatus.CANCELED, TaskStatus.TIMEOUT}
)
#: Finished states a re-drive (``retry``) may start again: everything but success.
REDRIVABLE_STATUSES = frozenset({TaskStatus.FAILED, TaskStatus.CANCELED, TaskStatus.TIMEOUT})
#: Waiting states ``queue_timeout`` applies to (before the first start).
WAITING_STATUSES = frozenset({TaskStatus.SCHEDULED, TaskStatus.PENDING})


class Event(StrEnum):
    """What happened to a task: one per transition, in its history (and the event stream)."""

    PUSHED = "pushed"  # stored, ready now
    SCHEDULED = "scheduled"  # stored with a delay or eta
    DUE = "due"  # a scheduled task became ready
    STARTED = "started"  # claimed with a lease (attempts + 1)
    PULLED = "pulled"  # claimed at-most-once (consumed, never redelivered)
    REDELIVERED = "redelivered"  # RabbitMQ: claimed again after its holder's connection died
    PROGRESS = "progress"  # not kept in history: the record's progress field has it
    CHECKPOINT = "checkpoint"  # not kept in history: the record's steps field has it
    LEASE_EXPIRED = "lease_expired"  # its holder stopped renewing: back in line
    RETRYING = "retrying"  # failed, tries left: back in line (after the backoff delay)
    INTERRUPTED = "interrupted"  # handed back (shutdown): keeps its place and its attempt
    PREEMPTED = "preempted"  # yielded at a step boundary to a more urgent task
    SUCCEEDED = "succeeded"
    FAILED = "failed"  # a consumer gave up on it (no tries left, a permanent error, ...)
    DEAD_LETTERED = "dead_lettered"  # the backend gave up on it (poison, malformed, missing)
    CANCEL_REQUESTED = "cancel_requested"  # asked while it runs: it stops between steps
    CANCELED = "canceled"
    TIMEOUT = "timeout"  # not started within its queue_timeout
    REDRIVEN = "redriven"  # a finished task started over by ``retry``
    REPUBLISHED = "republished"  # RabbitMQ: its message was published again (lost confirm)
    PARKED = "parked"  # met by a claim while its concurrency key is full: set aside


#: Events that change only a field, not the status: not appended to the stored history.
UNRECORDED_EVENTS = frozenset({Event.PROGRESS, Event.CHECKPOINT})

#: History written by earlier versions used other names; readers translate them.
LEGACY_EVENTS = {
    "reserved": Event.STARTED,
    "retry_scheduled": Event.RETRYING,
    "requeued": Event.RETRYING,
    "dead": Event.DEAD_LETTERED,
    "retried": Event.REDRIVEN,
}


class DeadReason(StrEnum):
    """Why a task is in the dead-letter list (status ``failed``): its ``dead_reason``.

    The worker may add reasons of its own (a step's failure reason); these are the ones the
    backends and the worker use.
    """

    POISON = "poison"  # delivered max_deliveries times, each lease lost (the holder died)
    MALFORMED = "malformed"  # the stored record cannot be read
    MISSING = "missing"  # an index names an id with no record
    ERROR = "error"  # the task raised and has no tries left
    CRASHED = "crashed"  # the step's process died
    TIME_LIMIT = "timeout"  # a hard time limit killed it
    SHUTDOWN = "shutdown"  # interrupted by a shutdown with shutdown_mode fail
    UNKNOWN_PIPELINE = "unknown_pipeline"
    INVALID_DATA = "invalid_data"
    PERMANENT = "permanent"  # a step raised PermanentError (or a type it does not retry on)


#: Reasons the backend itself gives up on a task (not a consumer's failure): a FAIL with one
#: of them is recorded as ``dead_lettered``, wherever it was decided (the manager
#: dead-letters a record it cannot decode after the store handed it out).
BACKEND_DEAD_REASONS = frozenset({DeadReason.POISON, DeadReason.MALFORMED, DeadReason.MISSING})


def fail_event(status: str, reason: str | None) -> Event:
    """The history event of a FAIL outcome: canceled, dead_lettered or failed."""
    if status == TaskStatus.CANCELED:
        return Event.CANCELED
    return Event.DEAD_LETTERED if reason in BACKEND_DEAD_REASONS else Event.FAILED


class Op(StrEnum):
    """The operations of the transition table (a store's atomic transitions)."""

    PUSH = "push"
    DUE = "due"  # time passes a scheduled task's due time
    CLAIM = "claim"
    ACK = "ack"
    NACK = "nack"  # a counted delivery back in line, now or after a delay
    HAND_BACK = "hand_back"  # nack(count_attempt=False): shutdown, preemption
    FAIL = "fail"
    CANCEL = "cancel"
    RETRY = "retry"  # re-drive
    LEASE_EXPIRY = "lease_expiry"
    QUEUE_TIMEOUT = "queue_timeout"  # time passes expire_at of a never-started task
    EXTEND = "extend"
    CHECKPOINT = "checkpoint"
    PROGRESS = "progress"
    PREEMPT = "preempt"  # yield a running task at a step boundary and claim the urgent one


S, E, R = TaskStatus, Event, DeadReason

#: The guards of the PREEMPT rows (the store checks them in this order).
PREEMPT_CANCELED = "a cancel was asked while it ran: it stops between steps instead"
PREEMPT_NO_URGENT = "no ready task of at least min_priority (another worker took it)"
PREEMPT_MAXED = "preemptions >= max_preemptions: it runs to the end"
PREEMPT_YIELDS = (
    "preemptions + 1, attempts - 1, steps kept; the urgent task is claimed in the same step"
)


@dataclass(frozen=True, slots=True)
class Rule:
    """One row of the table: ``op`` on a task in ``state`` (when ``guard`` holds).

    ``to`` None means the operation is refused: nothing changes and it returns False.
    ``place`` says where a task that goes back in line stands: ``back`` of its priority
    band (a new place), ``kept`` (its original place), or ``due`` (the back of its band
    once its delay has passed). ``parked``: out of the line, on its concurrency key's
    parked list, until a task of that key leaves ``processing``; then it is re-admitted at
    the place it had (see ``conveyor.keylimits``).
    """

    state: TaskStatus
    op: Op
    to: TaskStatus | None
    event: Event | None = None
    guard: str = ""
    reason: DeadReason | None = None
    place: str = ""


#: The transition table. A (state, op) pair missing from it is refused (returns False).
#: Guards are checked in the order listed: the first matching row applies.
TRANSITIONS: tuple[Rule, ...] = (
    # -- entering ---------------------------------------------------------------------------
    Rule(S.SUCCESS, Op.PUSH, S.PENDING, E.PUSHED, "the id is pushed again: a fresh record"),
    Rule(S.FAILED, Op.PUSH, S.PENDING, E.PUSHED, "the id is pushed again: a fresh record"),
    Rule(S.CANCELED, Op.PUSH, S.PENDING, E.PUSHED, "the id is pushed again: a fresh record"),
    Rule(S.TIMEOUT, Op.PUSH, S.PENDING, E.PUSHED, "the id is pushed again: a fresh record"),
    Rule(S.SCHEDULED, Op.PUSH, None, None, "a live id: the push returns False"),
    Rule(S.PENDING, Op.PUSH, None, None, "a live id: the push returns False"),
    Rule(S.PROCESSING, Op.PUSH, None, None, "a live id: the push returns False"),
    Rule(S.SCHEDULED, Op.DUE, S.PENDING, E.DUE, "", place="due"),
    # -- waiting ----------------------------------------------------------------------------
    Rule(S.PENDING, Op.CLAIM, S.TIMEOUT, E.TIMEOUT, "its queue_timeout passed: skipped"),
    Rule(S.PENDING, Op.CLAIM, S.FAILED, E.DEAD_LETTERED, "the record is unreadable", R.MALFORMED),
    Rule(
        S.PENDING,
        Op.CLAIM,
        S.PENDING,
        E.PARKED,
        "its concurrency key is full: parked, the claim goes on",
        place="parked",
    ),
    Rule(S.PENDING, Op.CLAIM, S.PROCESSING, E.STARTED, "attempts + 1, a new fencing token"),
    Rule(S.PENDING, Op.QUEUE_TIMEOUT, S.TIMEOUT, E.TIMEOUT, "never started"),
    Rule(S.SCHEDULED, Op.QUEUE_TIMEOUT, S.TIMEOUT, E.TIMEOUT, "never started"),
    Rule(S.PENDING, Op.CANCEL, S.CANCELED, E.CANCELED),
    Rule(S.SCHEDULED, Op.CANCEL, S.CANCELED, E.CANCELED),
    Rule(S.PENDING, Op.FAIL, S.FAILED, E.FAILED, "by id (an operator): any state"),
    Rule(S.SCHEDULED, Op.FAIL, S.FAILED, E.FAILED, "by id (an operator): any state"),
    # -- running ----------------------------------------------------------------------------
    Rule(S.PROCESSING, Op.ACK, S.SUCCESS, E.SUCCEEDED, "with the holder's token"),
    Rule(S.PROCESSING, Op.NACK, S.CANCELED, E.CANCELED, "a cancel was asked while it ran"),
    Rule(S.PROCESSING, Op.NACK, S.SCHEDULED, E.RETRYING, "with a delay", place="due"),
    Rule(S.PROCESSING, Op.NACK, S.PENDING, E.RETRYING, "no delay", place="back"),
    Rule(S.PROCESSING, Op.HAND_BACK, S.CANCELED, E.CANCELED, "a cancel was asked while it ran"),
    Rule(S.PROCESSING, Op.HAND_BACK, S.PENDING, E.INTERRUPTED, "attempts - 1", place="kept"),
    Rule(S.PROCESSING, Op.FAIL, S.FAILED, E.FAILED, "with the holder's token, or by id"),
    Rule(
        S.PROCESSING,
        Op.CANCEL,
        S.PROCESSING,
        E.CANCEL_REQUESTED,
        "flagged: its worker stops between steps",
    ),
    Rule(S.PROCESSING, Op.LEASE_EXPIRY, S.CANCELED, E.CANCELED, "a cancel was asked while it ran"),
    Rule(
        S.PROCESSING,
        Op.LEASE_EXPIRY,
        S.FAILED,
        E.DEAD_LETTERED,
        "expiries + 1 >= max_deliveries",
        R.POISON,
    ),
    Rule(S.PROCESSING, Op.LEASE_EXPIRY, S.PENDING, E.LEASE_EXPIRED, "expiries + 1", place="kept"),
    Rule(S.PROCESSING, Op.EXTEND, S.PROCESSING, None, "with the holder's token"),
    Rule(S.PROCESSING, Op.CHECKPOINT, S.PROCESSING, E.CHECKPOINT, "with the holder's token"),
    Rule(S.PROCESSING, Op.PROGRESS, S.PROCESSING, E.PROGRESS, "with the holder's token"),
    # Preemption: one step yields the running task and claims the urgent one for the same
    # worker, so two busy workers never both yield for one urgent task.
    Rule(S.PROCESSING, Op.PREEMPT, None, None, PREEMPT_CANCELED),
    Rule(S.PROCESSING, Op.PREEMPT, None, None, PREEMPT_NO_URGENT),
    Rule(S.PROCESSING, Op.PREEMPT, None, None, PREEMPT_MAXED),
    Rule(S.PROCESSING, Op.PREEMPT, S.PENDING, E.PREEMPTED, PREEMPT_YIELDS, place="kept"),
    # -- finished ---------------------------------------------------------------------------
    Rule(S.FAILED, Op.RETRY, S.PENDING, E.REDRIVEN, "attempts and expiries reset", place="back"),
    Rule(S.CANCELED, Op.RETRY, S.PENDING, E.REDRIVEN, "attempts and expiries reset", place="back"),
    Rule(S.TIMEOUT, Op.RETRY, S.PENDING, E.REDRIVEN, "attempts and expiries reset", place="back"),
    Rule(S.SUCCESS, Op.FAIL, S.FAILED, E.FAILED, "by id (an operator): any state"),
    Rule(S.CANCELED, Op.FAIL, S.FAILED, E.FAILED, "by id (an operator): any state"),
    Rule(S.TIMEOUT, Op.FAIL, S.FAILED, E.FAILED, "by id (an operator): any state"),
    Rule(S.FAILED, Op.FAIL, S.FAILED, E.FAILED, "by id (an operator): any state"),
)


def rules_for(state: TaskStatus, op: Op) -> tuple[Rule, ...]:
    """The rows for one (state, op) pair, in guard order; empty when the pair is refused."""
    return tuple(rule for rule in TRANSITIONS if rule.state is state and rule.op is op)


def effective_status(status: str, expire_at: float | None, now: float) -> str:
    """What a reader shows: a waiting task past its queue_timeout is ``timeout`` already,
    even before a claim or a sweep has written it (no worker may be running)."""
    if expire_at is not None and status in WAITING_STATUSES and now > expire_at:
        return TaskStatus.TIMEOUT.value
    return status


#: Priorities share a sorted-set score with a sequence number: ``-(priority * BAND) + seq``.
#: 2^40 leaves room for 10^12 tasks per band and keeps scores exact below 2^53 up to
#: priority 255.
PRIORITY_BAND = 1 << 40


def _lua_table(name: str, values: list[tuple[str, str]]) -> str:
    body = ", ".join(f"{key} = '{value}'" for key, value in values)
    return f"local {name} = {{{body}}}"


def lua_header() -> str:
    """Lua constants generated from this module: every script starts with them, so no
    status, event or reason is ever retyped in Lua."""
    sets = {
        "FINISHED": FINISHED_STATUSES,
        "LIVE": ACTIVE_STATUSES,
        "REDRIVABLE": REDRIVABLE_STATUSES,
        "WAITING": WAITING_STATUSES,
    }
    lines = [
        "-- Generated from conveyor/lifecycle.py when the scripts are loaded: do not edit.",
        _lua_table("ST", [(s.name, s.value) for s in TaskStatus]),
        _lua_table("EV", [(e.name, e.value) for e in Event]),
        _lua_table("DR", [(r.name, r.value) for r in DeadReason]),
        _lua_table("OP", [(o.name, o.value) for o in Op]),
        *(
            f"local {name} = {{{', '.join(f'{s.value} = true' for s in sorted(members))}}}"
            for name, members in sets.items()
        ),
        "local BACKEND_REASONS = {"
        + ", ".join(f"{r.value} = true" for r in sorted(BACKEND_DEAD_REASONS))
        + "}",
        "local UNRECORDED = {"
        + ", ".join(f"{e.value} = true" for e in sorted(UNRECORDED_EVENTS))
        + "}",
        f"local PRIORITY_BAND = {PRIORITY_BAND}",
    ]
    return "\n".join(lines) + "\n"
