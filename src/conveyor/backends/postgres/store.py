"""One queue's transitions on PostgreSQL: each call is one server-side function call.

The rules live in ``schema`` (PL/pgSQL mirroring the SQLite store's statements); this
module only packs arguments and unpacks the JSON each function returns. Claims take rows
with ``FOR UPDATE SKIP LOCKED`` in (priority desc, ready time, sequence) order, so
concurrent consumers of unkeyed tasks never wait on one another.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from ...lifecycle import Event, Op, TaskStatus, fail_event
from ..base import (
    Claimed,
    ClaimResult,
    ClaimSpec,
    Enqueued,
    Head,
    LeaseState,
    NewTask,
    Outcome,
    Preempt,
    QueueStore,
    Settled,
    StoreConfig,
    Ticket,
)
from . import events_sql
from .connection import Database
from .schema import aged_index
from .wake import Listener, hush

_RETENTION_CLAIMS, _RETENTION_SECONDS = 1000, 60.0


def _priority(value: Any) -> int:
    """The AMQP priority of a stored priority."""
    try:
        return max(0, min(int(value), 255))
    except (TypeError, ValueError):
        return 0


def _backoff_text(value: float | str | None) -> str | None:
    """``retry_backoff`` as stored: a number's text, or a list of delays as its JSON."""
    if value is None or isinstance(value, str):
        return value
    return repr(float(value))


def _claimed(item: dict[str, Any]) -> Claimed:
    return Claimed(
        task_id=item["id"], token=item["token"], attempts=int(item["attempts"]),
        priority=item["priority"], data_json=item["data"], type=item["type"],
        max_retries=item["max_retries"], retry_backoff=item["retry_backoff"],
        process_timeout=item["process_timeout"], created_at=item["created_at"],
        steps_json=item["steps"],
    )  # fmt: skip


def _claim_result(found: dict[str, Any] | None) -> ClaimResult:
    if found is None:
        return ClaimResult([])
    claimed = [_claimed(item) for item in found.get("claimed") or []]
    hint = found.get("hint")
    return ClaimResult(
        claimed, None if hint is None else float(hint), found.get("unclaimed"),
        bool(found.get("skipped")),
    )  # fmt: skip


class PostgresStore(QueueStore):
    """The transitions of one queue in a server's schema."""

    has_doorbell = True

    def __init__(
        self, database: Database, listener: Listener, queue_name: str, config: StoreConfig
    ) -> None:
        self.queue_name = queue_name
        self._database = database
        self._listener = listener
        self._config = config
        self._broker = config.broker_leases
        self._s = database.schema
        self._seen = listener.mark(queue_name)
        self._bell: tuple[int, int] | None = None
        self._claims, self._retained = 0, float("-inf")
        self._aging = config.aging_interval
        if self._aging is not None:
            database.reads(aged_index(self._s, self._aging), ())

    # -- producing --------------------------------------------------------------------------

    def enqueue(self, tasks: Sequence[NewTask]) -> Enqueued:
        if not tasks:
            return Enqueued([], [])
        self._maybe_retain()  # also trims the event log when nothing claims
        found = self._database.call(
            f"""SELECT {self._s}.enqueue(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s,
                %s, %s, %s)""",
            (
                self.queue_name, [t.task_id for t in tasks], [t.type for t in tasks],
                [t.priority for t in tasks], [t.data_json for t in tasks],
                [float(t.delay) for t in tasks], [t.max_retries for t in tasks],
                [_backoff_text(t.retry_backoff) for t in tasks],
                [t.queue_timeout for t in tasks], [t.process_timeout for t in tasks],
                self._broker, self._config.publish_grace,
                [t.concurrency_key for t in tasks], [t.max_concurrency for t in tasks],
                [t.unique for t in tasks],
            ),
        )  # fmt: skip
        stored = [bool(item[0]) for item in found]
        tickets = [
            Ticket(task.task_id, int(item[1]), task.priority)
            for task, item in zip(tasks, found, strict=True)
            if item[0] and task.delay <= 0
        ]
        return Enqueued(stored, tickets if self._broker else [])

    # -- claiming ---------------------------------------------------------------------------

    def _claim_args(self, spec: ClaimSpec) -> tuple[Any, ...]:
        return (
            spec.count, spec.lease, spec.max_deliveries, spec.consumer, spec.min_priority,
            self._broker, self._aging,
        )  # fmt: skip

    def claim(self, spec: ClaimSpec) -> ClaimResult:
        self._maybe_retain()  # first: if it fails, nothing has been claimed yet
        self._seen = self._listener.mark(self.queue_name)
        if spec.ticket is not None:
            ticket = spec.ticket
            found = self._database.call(
                f"SELECT {self._s}.claim_ticket(%s, %s, %s, %s, %s, %s, %s, %s)",
                (self.queue_name, ticket.task_id, ticket.number, ticket.copy,
                 ticket.redelivered, spec.lease, spec.max_deliveries, spec.consumer),
            )  # fmt: skip
            return _claim_result(found)
        found = self._database.call(
            f"SELECT {self._s}.claim(%s, %s, %s, %s, %s, %s, %s, %s)",
            (self.queue_name, *self._claim_args(spec)),
        )
        return _claim_result(found)

    # -- settling ---------------------------------------------------------------------------

    def settle(
        self, outcomes: Sequence[Outcome], then: ClaimSpec | None = None
    ) -> tuple[list[Settled], ClaimResult | None]:
        for outcome in outcomes:
            if outcome.op not in _SETTLING:
                raise ValueError(f"settle: {outcome.op} is not an outcome")
        if then is not None:
            if then.ticket is not None:  # a ticket claim is its own call
                settled, _ = self.settle(outcomes)
                return settled, self.claim(then)
            self._maybe_retain()
            self._seen = self._listener.mark(self.queue_name)
        claim = then or ClaimSpec(None, 0)
        packed = json.dumps([
            {"op": o.op.value, "id": o.task_id, "token": o.token, "payload": o.payload,
             "delay": float(o.delay), "reason": o.reason, "fraction": float(o.fraction),
             "status": o.status.value, "event": _event(o)}
            for o in outcomes
        ])  # fmt: skip
        found = self._database.call(
            f"SELECT {self._s}.settle(%s, %s::jsonb, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            (self.queue_name, packed, self._broker, self._config.publish_grace,
             then is not None, *self._claim_args(claim)[:5], self._aging),
        )  # fmt: skip
        pairs = zip(outcomes, found["settled"], strict=True)
        settled = [self._settled(outcome, item) for outcome, item in pairs]
        claimed = _claim_result(found["claim"]) if then is not None else None
        return settled, claimed

    @staticmethod
    def _settled(outcome: Outcome, item: list[Any]) -> Settled:
        status = item[0]
        if len(item) > 1 and item[1] is not None:
            return Settled(status, Ticket(outcome.task_id, int(item[1]), _priority(item[2])))
        return Settled(status)

    # -- preemption -------------------------------------------------------------------------

    def head(self) -> Head | None:
        row = self._database.reads(
            f"SELECT id, priority, ready_at FROM {self._s}.pick(%s, %s, false)",
            (self.queue_name, self._aging),
        )[0]
        if row[0] is None:
            return None
        return Head(str(row[0]), int(row[1]), float(row[2] or 0.0))

    def preempt(self, yielded: Preempt, spec: ClaimSpec) -> tuple[Settled, ClaimResult]:
        ticket = spec.ticket
        found = self._database.call(
            f"""SELECT {self._s}.preempt(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s,
                %s)""",
            (self.queue_name, yielded.task_id, yielded.token, yielded.steps_json,
             yielded.min_priority, yielded.max_preemptions,
             None if ticket is None else ticket.task_id,
             None if ticket is None else ticket.number,
             None if ticket is None else ticket.copy, spec.lease, spec.consumer,
             self._broker, self._aging),
        )  # fmt: skip
        return Settled(found["status"]), _claim_result(found)

    def renew(self, leases: Sequence[tuple[str, str]], seconds: float | None) -> list[LeaseState]:
        if not leases:
            return []
        ids, tokens = [task_id for task_id, _ in leases], [token for _, token in leases]
        s = self._s
        if seconds is None:
            rows = self._database.reads(
                f"""SELECT id, token, status, cancel_requested FROM {s}.tasks
                WHERE queue = %s AND id = ANY(%s)""",
                (self.queue_name, ids),
            )
        else:
            rows = self._database.rows(
                f"""WITH held AS (SELECT * FROM unnest(%s::text[], %s::text[]) AS h(id, token)),
                extended AS (UPDATE {s}.tasks t SET lease_until = {s}.now_s() + %s,
                    updated_at = {s}.now_s() FROM held WHERE t.queue = %s AND t.id = held.id
                    AND t.token = held.token AND t.status = '{TaskStatus.PROCESSING}'
                    AND t.lease_until IS NOT NULL RETURNING t.id)
                SELECT id, token, status, cancel_requested FROM {s}.tasks
                WHERE queue = %s AND id = ANY(%s)""",
                (ids, tokens, float(seconds), self.queue_name, self.queue_name, ids),
            )
        found = {row[0]: row for row in rows}
        states = []
        for task_id, token in leases:
            row = found.get(task_id)
            if row is None or row[1] != token or row[2] != TaskStatus.PROCESSING:
                states.append(LeaseState(False))
            else:
                states.append(LeaseState(True, bool(row[3])))
        return states

    # -- cancel, re-drive, broker tickets -----------------------------------------------------

    def cancel(self, task_id: str) -> bool:
        return bool(
            self._database.call(f"SELECT {self._s}.cancel(%s, %s)", (self.queue_name, task_id))
        )

    def retry(self, task_id: str) -> Ticket | None:
        found = self._database.call(
            f"SELECT {self._s}.redrive(%s, %s, %s, %s)",
            (self.queue_name, task_id, self._broker, self._config.publish_grace),
        )
        if found is None:
            return None
        return Ticket(task_id, int(found[0]), _priority(found[1]))

    def due(self, limit: int) -> tuple[list[Ticket], float | None]:
        found = self._database.call(
            f"SELECT {self._s}.due(%s, %s, %s)",
            (self.queue_name, limit, self._config.publish_grace),
        )
        tickets = [Ticket(str(i), int(n), _priority(p)) for i, n, p in found["tickets"]]
        upcoming = found.get("next")
        return tickets, None if upcoming is None else float(upcoming)

    def published(self, tickets: Sequence[Ticket]) -> None:
        if not tickets:
            return
        self._database.rows(
            f"""UPDATE {self._s}.tasks t SET publish_by = NULL FROM unnest(%s::text[],
            %s::bigint[]) AS p(id, ticket) WHERE t.queue = %s AND t.id = p.id
            AND t.ticket = p.ticket RETURNING t.id""",
            ([t.task_id for t in tickets], [t.number for t in tickets], self.queue_name),
        )

    # -- upkeep and purging -----------------------------------------------------------------

    def sweep(self) -> None:
        self._database.call(
            f"SELECT {self._s}.sweep(%s, %s, %s)",
            (self.queue_name, self._config.max_deliveries, self._broker),
        )
        self._maybe_retain(force=True)

    def _maybe_retain(self, *, force: bool = False) -> None:
        """Delete old finished rows now and then; failed rows stay as the dead-letter list.
        Pulled tasks (processing, no lease) are consumed: forgotten after result_ttl too."""
        self._claims += 1
        stale = time.monotonic() - self._retained >= _RETENTION_SECONDS
        if (not force and self._claims < _RETENTION_CLAIMS and not stale) or (force and not stale):
            return
        self._claims, self._retained = 0, time.monotonic()
        S = TaskStatus  # noqa: N806 (the lifecycle's short name, as in the SQL modules)
        self._database.rows(
            f"""WITH gone AS (DELETE FROM {self._s}.tasks WHERE (queue, id) IN (
                SELECT queue, id FROM {self._s}.tasks WHERE queue = %(q)s
                AND ((status IN ('{S.SUCCESS}', '{S.CANCELED}', '{S.TIMEOUT}')
                    AND finished_at < {self._s}.now_s() - %(ttl)s)
                OR (status = '{S.PROCESSING}' AND lease_until IS NULL
                    AND started_at < {self._s}.now_s() - %(ttl)s))
                LIMIT 10000 FOR UPDATE SKIP LOCKED) RETURNING 1) SELECT count(*) FROM gone""",
            {"q": self.queue_name, "ttl": self._config.result_ttl},  # type: ignore[arg-type]
        )
        events_sql.trim(self._database, self.queue_name)

    def purge(self) -> int:
        return int(
            self._database.call(
                f"""WITH gone AS (DELETE FROM {self._s}.tasks WHERE queue = %s RETURNING status)
                SELECT count(*) FILTER (WHERE status = '{TaskStatus.PENDING}') FROM gone""",
                (self.queue_name,),
            )
        )

    def purge_finished(self, status: str, limit: int) -> int:
        return int(
            self._database.call(
                f"""WITH gone AS (DELETE FROM {self._s}.tasks WHERE (queue, id) IN (
                    SELECT queue, id FROM {self._s}.tasks WHERE queue = %s AND status = %s
                    ORDER BY finished_at LIMIT %s) RETURNING 1) SELECT count(*) FROM gone""",
                (self.queue_name, status, limit),
            )
        )

    def wait(self, timeout: float) -> None:
        """Until a NOTIFY names this queue (or the listener reconnects), at most ``timeout``;
        the manager bounds it by the claim's ``wait_hint`` (next due task, lease, timeout)."""
        self._listener.wait(self.queue_name, self._seen, timeout)
        self._seen = self._listener.mark(self.queue_name)

    def doorbell(self, seconds: float) -> int | None:
        if self._bell is None:
            self._bell = self._listener.open_bell(self.queue_name)
        self._listener.ring_if_changed(self.queue_name, self._seen, self._bell)
        return self._bell[0]

    def heard_doorbell(self) -> None:
        if self._bell is not None:
            hush(self._bell)

    def close(self) -> None:
        if self._bell is not None:
            self._listener.close_bell(self.queue_name, self._bell)
            self._bell = None


_SETTLING = frozenset({Op.ACK, Op.NACK, Op.HAND_BACK, Op.FAIL, Op.CHECKPOINT, Op.PROGRESS})


def _event(outcome: Outcome) -> str:
    """The history event an outcome records where the function cannot tell alone."""
    if outcome.op is Op.FAIL:
        return fail_event(outcome.status, outcome.reason).value
    if outcome.op is Op.NACK:
        return Event.RETRYING.value
    if outcome.op is Op.HAND_BACK:
        return Event.INTERRUPTED.value
    return ""
