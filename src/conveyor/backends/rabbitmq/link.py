"""The broker operations the backend needs, each run on the connection's I/O thread.

``publish`` waits once for the confirms of a whole batch; ``get`` takes the head of the
queue; ``wait`` rings a doorbell consumer while the queue is empty; ``ack``/``reject`` are
fire-and-forget and dropped when their channel has closed since (see ``channels``).
"""

from __future__ import annotations

import contextlib
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache, partial
from typing import Any, NamedTuple

import pika

from .calls import Call, Delivery, LinkLostError, Outgoing
from .channels import Channels
from .topology import BrokerUrl, Topology

_ACK_DELAY = 0.02  # seconds an ack may wait to be sent with others


class Publishing(NamedTuple):
    """A publish in flight: its call, and the messages to send again if the call is lost."""

    call: Call
    messages: list[Outgoing]


@dataclass(slots=True)
class _Batch:
    """Published messages waiting for confirms; resolves with those to publish again."""

    call: Call
    waiting: int
    again: list[Outgoing] = field(default_factory=list)


@lru_cache(maxsize=256)
def _properties(priority: int) -> pika.BasicProperties:
    """Persistent, JSON, with the task's priority (one immutable object per priority)."""
    return pika.BasicProperties(delivery_mode=2, priority=priority, content_type="application/json")


def _connected(call: Call) -> None:
    call.resolve(None)


class Link(Channels):
    """The connection of one backend to RabbitMQ, for one Conveyor queue.

    Construction connects and declares the queues, or raises the conveyor error that says
    why not (broker down, credentials, a queue declared with other arguments).
    """

    def __init__(
        self, url: BrokerUrl, topology: Topology, *, connect_timeout: float, name: str
    ) -> None:
        # The I/O thread's own state (set before the thread starts).
        self._next_tag, self._unconfirmed = 1, dict[int, tuple[_Batch, Outgoing]]()
        self._get_call: Call | None = None
        self._stash: deque[Delivery] = deque()  # delivered but not handed out yet
        self._doorbell: str | None = None  # consumer tag of the doorbell consumer
        self._rung: list[Call] = []  # callers waiting on the doorbell
        # Acks are sent in batches, _ACK_DELAY after the first one waiting: no thread hand-off
        # per ack, and a basic.get is not queued behind an ack on a worker's hot path.
        self._acks: deque[Delivery] = deque()
        self._flush_armed = False
        super().__init__(url, topology, connect_timeout=connect_timeout, name=name)
        try:
            self._call(_connected)  # connected and declared, or raise
        except BaseException:
            self.close()
            raise

    # -- the caller's side -------------------------------------------------------------------

    def publish(
        self, messages: Sequence[Outgoing], again: Callable[[Outgoing], Outgoing] | None = None
    ) -> None:
        """Publish persistent messages and return once the broker confirmed every one.

        Messages the broker returned (queue deleted meanwhile) or nacked are published again
        after declaring the queue, and those unconfirmed when the connection or channel was
        lost on the new one. A message may so reach the queue twice: the backend drops the
        extra copy when it meets it. ``again`` turns a message into the one to publish next
        time (the backend makes each copy distinguishable).
        """
        self.publish_wait(self.publish_start(messages), again)

    def publish_start(self, messages: Sequence[Outgoing]) -> Publishing:
        """Start publishing; the caller may work (e.g. stage the next batch) meanwhile."""
        todo = list(messages)
        return Publishing(self._submit(partial(self._start_publish, messages=todo)), todo)

    def publish_wait(
        self, publishing: Publishing, again: Callable[[Outgoing], Outgoing] | None = None
    ) -> None:
        """Wait for ``publish_start``'s confirms; publish again what needs it (see publish)."""
        deadline = time.monotonic() + max(30.0, self._connect_timeout)
        call, todo = publishing
        while True:
            with contextlib.suppress(LinkLostError):  # then all of them again
                todo = self._await(call, deadline)
            if not todo:
                return
            if again is not None:
                todo = [again(message) for message in todo]
            call = self._submit(partial(self._start_publish, messages=todo))

    def get(self) -> Delivery | None:
        """The head of the queue (``basic.get``, manual ack), or None when it is empty."""
        delivery: Delivery | None = self._retrying(self._start_get)
        return delivery

    def wait(self, timeout: float) -> None:
        """Block until a message may be ready, or ``timeout`` seconds.

        A consumer (prefetch 1) is subscribed for the wait only; a message it receives is
        kept for the next ``get``, and the consumer is cancelled when the wait ends, so no
        message sits in this process while the caller is not asking for one.
        """
        call = Call()
        self._post(lambda: self._when_ready(call, self._start_wait))
        call.wait(max(timeout, 0.0))
        self._post(lambda: self._end_wait(call))

    def ack(self, delivery: Delivery) -> None:
        """Settle a delivery (no answer awaited; sent within _ACK_DELAY seconds); dropped if
        its channel has closed since (the broker requeued it)."""
        self._acks.append(delivery)  # first: see _flush_acks for the order that matters
        if not self._flush_armed:
            self._flush_armed = True
            self._post(lambda: self._loop.call_later(_ACK_DELAY, self._flush_acks))

    def reject(self, delivery: Delivery, *, requeue: bool) -> None:
        """Requeue a delivery, or (``requeue`` False) dead-letter it to the dead queue."""
        self._post(lambda: self._settle(delivery, requeue))

    def holds(self, delivery: Delivery) -> bool:
        """Is the delivery still ours? False once its channel closed (the broker requeued it)."""
        return delivery.epoch == self._epoch and self._sub is not None

    def purge(self) -> None:
        """Delete both queues (ready and unacked messages); they are declared again on use."""
        self._retrying(self._start_purge)

    def ready_count(self) -> int:
        """Messages ready in the work queue (a passive declare; also proves the link works)."""
        count: int = self._retrying(self._start_count)
        return count

    # -- the I/O thread ----------------------------------------------------------------------

    def _pub_opened(self, channel: Any) -> None:
        self._next_tag = 1  # confirm tags count per channel
        channel.add_on_return_callback(self._on_return)

    def _sub_opened(self, channel: Any) -> None:
        channel.add_on_cancel_callback(lambda _: self._doorbell_gone())
        channel.add_callback(self._on_get_empty, [pika.spec.Basic.GetEmpty], one_shot=False)

    def _sub_lost(self, error: BaseException) -> None:
        self._epoch += 1
        self._doorbell = None
        self._stash.clear()  # unacked on the dead channel: the broker has requeued them
        get_call, self._get_call = self._get_call, None
        rung, self._rung = self._rung, []
        for call in [*rung, *([get_call] if get_call else [])]:
            call.fail(error)

    def _pub_lost(self, error: BaseException) -> None:
        """Unconfirmed messages are published again (those already confirmed are not): a
        message whose confirm was lost may so reach the queue twice; see ``store``."""
        unconfirmed, self._unconfirmed = self._unconfirmed, {}
        batches: dict[int, _Batch] = {}
        for batch, message in unconfirmed.values():
            batch.again.append(message)
            batches[id(batch)] = batch
        for batch in batches.values():
            batch.call.resolve(batch.again)

    def _start_publish(self, call: Call, messages: list[Outgoing]) -> None:
        batch = _Batch(call, len(messages))
        publish, queue = self._pub.basic_publish, self.topology.queue
        for message in messages:
            publish("", queue, message.body, _properties(message.priority), mandatory=True)
            self._unconfirmed[self._next_tag] = (batch, message)
            self._next_tag += 1
        if not messages:
            call.resolve([])

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        acked = isinstance(method, pika.spec.Basic.Ack)
        tags = [method.delivery_tag]
        if method.multiple:
            tags = [tag for tag in self._unconfirmed if tag <= method.delivery_tag]
        for tag in tags:
            entry = self._unconfirmed.pop(tag, None)
            if entry is None:
                continue
            batch, message = entry
            if not acked:
                batch.again.append(message)
            batch.waiting -= 1
            if batch.waiting == 0:
                batch.call.resolve(batch.again)

    def _on_return(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        # Unroutable: the queue was deleted (by clear() elsewhere). Its confirm follows.
        self._declared = False
        for batch, message in self._unconfirmed.values():
            if message.body == body:  # a ticket's body names its task: unique
                batch.again.append(message)
                return

    def _before_close(self) -> None:
        self._flush_acks()

    def _flush_acks(self) -> None:
        # Disarm before taking: an ack appended after the loop ends then arms a new flush.
        self._flush_armed = False
        while self._acks:
            self._settle(self._acks.popleft(), None)

    def _start_get(self, call: Call) -> None:
        if self._stash:
            call.resolve(self._stash.popleft())
            return
        busy = self._get_call is not None  # an abandoned get is still in flight: adopt it
        self._get_call = call
        if not busy:
            self._sub.basic_get(self.topology.queue, self._on_get_ok, auto_ack=False)

    def _on_get_ok(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        delivery = Delivery(self._epoch, method.delivery_tag, bool(method.redelivered), body)
        call, self._get_call = self._get_call, None
        if call is None or not call.resolve(delivery):
            self._stash.append(delivery)  # its caller gave up: hand it to the next one

    def _on_get_empty(self, frame: Any) -> None:
        call, self._get_call = self._get_call, None
        if call is not None:
            call.resolve(None)

    def _start_wait(self, call: Call) -> None:
        if self._stash:
            call.resolve(None)
            return
        self._rung.append(call)
        if self._doorbell is None:
            self._doorbell = self._sub.basic_consume(
                self.topology.queue, self._on_doorbell, auto_ack=False
            )

    def _on_doorbell(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        redelivered = bool(method.redelivered)
        self._stash.append(Delivery(self._epoch, method.delivery_tag, redelivered, body))
        self._doorbell_gone(cancel=True)

    def _doorbell_gone(self, *, cancel: bool = False) -> None:
        if cancel and self._doorbell is not None and self._sub is not None:
            self._sub.basic_cancel(self._doorbell)
        self._doorbell = None
        rung, self._rung = self._rung, []
        for call in rung:
            call.resolve(None)

    def _end_wait(self, call: Call) -> None:
        call.abandon()
        if call in self._rung:
            self._rung.remove(call)
        if not self._rung and self._doorbell is not None:
            self._doorbell_gone(cancel=self._sub is not None and self._sub.is_open)

    def _settle(self, delivery: Delivery, requeue: bool | None) -> None:
        if delivery.epoch != self._epoch or self._sub is None or not self._sub.is_open:
            return  # its channel closed: the broker requeued it, and the tag means nothing now
        if requeue is None:
            self._sub.basic_ack(delivery.tag)
        else:
            self._sub.basic_reject(delivery.tag, requeue=requeue)

    def _start_purge(self, call: Call) -> None:
        if self._doorbell is not None:
            self._doorbell_gone(cancel=True)
        while self._stash:
            self._sub.basic_ack(self._stash.popleft().tag)
        self._sub_calls.append(call)

        def deleted(_: Any) -> None:
            self._declared = False
            self._answered(call)
            call.resolve(None)

        self._sub.queue_delete(
            self.topology.queue,
            callback=lambda _: self._sub.queue_delete(self.topology.dead, callback=deleted),
        )

    def _start_count(self, call: Call) -> None:
        self._sub_calls.append(call)

        def counted(frame: Any) -> None:
            self._answered(call)
            call.resolve(int(frame.method.message_count))

        self._sub.queue_declare(self.topology.queue, passive=True, callback=counted)
