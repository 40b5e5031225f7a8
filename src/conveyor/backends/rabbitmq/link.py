"""The broker operations the backend needs, each run on the connection's I/O thread.

``publish`` waits once for the confirms of a whole batch; ``get`` takes the head of a
queue; ``wait`` rings a doorbell consumer while a queue is empty; ``ack``/``reject`` are
fire-and-forget and dropped when their channel has closed since (see ``channels``). One
link serves every queue of a server: each operation names the queue's topology.
"""

from __future__ import annotations

import contextlib
import os
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
    """The connection of a process to one RabbitMQ server, shared by its queues.

    Construction connects, or raises the conveyor error that says why not (broker down,
    credentials); a queue is declared on its first use (a queue declared with other
    arguments raises then).
    """

    def __init__(self, url: BrokerUrl, *, connect_timeout: float, name: str) -> None:
        self.url = url
        # The I/O thread's own state (set before the thread starts).
        self._next_tag, self._unconfirmed = 1, dict[int, tuple[_Batch, Outgoing]]()
        # basic.get answers carry no queue name: one get is in flight at a time, the rest
        # wait their turn here (a call abandoned by its caller still holds its place).
        self._gets: deque[tuple[Call, str]] = deque()
        self._get_busy = False
        self._stash: dict[str, deque[Delivery]] = {}  # delivered but not handed out yet
        self._doorbells: dict[str, str] = {}  # queue -> consumer tag of its doorbell
        self._rung: dict[str, list[Call]] = {}  # queue -> callers waiting on its doorbell
        # Acks are sent in batches, _ACK_DELAY after the first one waiting: no thread hand-off
        # per ack, and a basic.get is not queued behind an ack on a worker's hot path.
        self._acks: deque[Delivery] = deque()
        self._flush_armed = False
        super().__init__(url, connect_timeout=connect_timeout, name=name)
        try:
            self._call(_connected)  # connected and declared, or raise
        except BaseException:
            self.close()
            raise

    def for_this_process(self) -> Link:
        """A new link to the same broker, for a forked child: this one's I/O thread stayed
        in the parent, and its connection and delivery tags are the parent's."""
        return Link(
            self.url, connect_timeout=self._connect_timeout,
            name=f"{self.name} child pid {os.getpid()}",
        )  # fmt: skip

    # -- the caller's side -------------------------------------------------------------------

    def publish(
        self,
        topology: Topology,
        messages: Sequence[Outgoing],
        again: Callable[[Outgoing], Outgoing] | None = None,
    ) -> None:
        """Publish persistent messages and return once the broker confirmed every one.

        Messages the broker returned (queue deleted meanwhile) or nacked are published again
        after declaring the queue, and those unconfirmed when the connection or channel was
        lost on the new one. A message may so reach the queue twice: the backend drops the
        extra copy when it meets it. ``again`` turns a message into the one to publish next
        time (the backend makes each copy distinguishable).
        """
        self.publish_wait(topology, self.publish_start(topology, messages), again)

    def publish_start(self, topology: Topology, messages: Sequence[Outgoing]) -> Publishing:
        """Start publishing; the caller may work (e.g. stage the next batch) meanwhile."""
        todo = list(messages)
        start = partial(self._start_publish, queue=topology.queue, messages=todo)
        return Publishing(self._submit(start, topology), todo)

    def publish_wait(
        self,
        topology: Topology,
        publishing: Publishing,
        again: Callable[[Outgoing], Outgoing] | None = None,
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
            start = partial(self._start_publish, queue=topology.queue, messages=todo)
            call = self._submit(start, topology)

    def get(self, topology: Topology) -> Delivery | None:
        """The head of a queue (``basic.get``, manual ack), or None when it is empty."""
        start = partial(self._start_get, queue=topology.queue)
        delivery: Delivery | None = self._retrying(start, topology=topology)
        return delivery

    def wait(self, topology: Topology, timeout: float) -> None:
        """Block until a message may be ready, or ``timeout`` seconds.

        A consumer (prefetch 1) is subscribed for the wait only; a message it receives is
        kept for the next ``get``, and the consumer is cancelled when the wait ends, so no
        message sits in this process while the caller is not asking for one.
        """
        call, queue = Call(), topology.queue
        self._post(lambda: self._when_ready(call, partial(self._start_wait, queue=queue), topology))
        call.wait(max(timeout, 0.0))
        self._post(lambda: self._end_wait(call, queue))

    def doorbell(self, topology: Topology) -> Doorbell:
        """A pipe that ``wait``'s consumer rings, for a caller that waits on other things
        too (a worker also watches its children and its signals)."""
        return Doorbell(self, topology)

    def ring_on_message(self, topology: Topology, ring: int) -> Call:
        start = partial(self._start_wait, queue=topology.queue)
        return self._submit(start, topology, Call(ring))

    def stop_ringing(self, call: Call, topology: Topology) -> None:
        self._post(lambda: self._end_wait(call, topology.queue))

    def give_back(self, topology: Topology) -> None:
        """Requeue what a doorbell received and nobody took (the caller will not claim it
        soon): it keeps its place in line, and other consumers can have it."""
        self._post(lambda: self._give_back(topology.queue))

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

    def purge(self, topology: Topology) -> None:
        """Delete a queue and its dead queue (ready and unacked messages); they are declared
        again on use."""
        self._retrying(partial(self._start_purge, topology=topology), topology=topology)

    def ready_count(self, topology: Topology) -> int:
        """Messages ready in a work queue (a passive declare; also proves the link works)."""
        start = partial(self._start_count, queue=topology.queue)
        count: int = self._retrying(start, topology=topology)
        return count

    def declare(self, topology: Topology) -> None:
        """Declare a queue now (not at its first use), so a queue that exists with other
        arguments is a ConfigError when the queue is opened."""
        self._retrying(_connected, topology=topology)

    def ping(self) -> None:
        """Return once connected; raise BrokerUnavailableError after connect_timeout."""
        self._retrying(_connected)

    # -- the I/O thread ----------------------------------------------------------------------

    def _pub_opened(self, channel: Any) -> None:
        self._next_tag = 1  # confirm tags count per channel
        channel.add_on_return_callback(self._on_return)

    def _sub_opened(self, channel: Any) -> None:
        channel.add_on_cancel_callback(self._on_consumer_cancelled)
        channel.add_callback(self._on_get_empty, [pika.spec.Basic.GetEmpty], one_shot=False)

    def _sub_lost(self, error: BaseException) -> None:
        self._epoch += 1
        self._doorbells.clear()
        self._stash.clear()  # unacked on the dead channel: the broker has requeued them
        gets, self._gets, self._get_busy = self._gets, deque(), False
        rung, self._rung = self._rung, {}
        for call in [*(c for calls in rung.values() for c in calls), *(c for c, _ in gets)]:
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

    def _start_publish(self, call: Call, queue: str, messages: list[Outgoing]) -> None:
        batch = _Batch(call, len(messages))
        publish = self._pub.basic_publish
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
        self._declared.discard(method.routing_key)
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

    def _start_get(self, call: Call, queue: str) -> None:
        stash = self._stash.get(queue)
        if stash:
            call.resolve(stash.popleft())
            return
        self._gets.append((call, queue))
        self._next_get()

    def _next_get(self) -> None:
        if not self._get_busy and self._gets and self._sub is not None:
            self._get_busy = True
            self._sub.basic_get(self._gets[0][1], self._on_get_ok, auto_ack=False)

    def _on_get_ok(self, channel: Any, method: Any, properties: Any, body: bytes) -> None:
        call, queue = self._gets.popleft()
        self._get_busy = False
        delivery = Delivery(
            self._epoch, method.delivery_tag, bool(method.redelivered), body, queue,
            properties.priority or 0,
        )  # fmt: skip
        if not call.resolve(delivery):
            self._stash.setdefault(queue, deque()).append(delivery)  # its caller gave up
        self._next_get()

    def _on_get_empty(self, frame: Any) -> None:
        if self._gets:
            call, _ = self._gets.popleft()
            call.resolve(None)
        self._get_busy = False
        self._next_get()

    def _start_wait(self, call: Call, queue: str) -> None:
        if self._stash.get(queue):
            call.resolve(None)
            return
        self._rung.setdefault(queue, []).append(call)
        if queue not in self._doorbells:
            self._doorbells[queue] = self._sub.basic_consume(
                queue, partial(self._on_doorbell, queue), auto_ack=False
            )

    def _on_doorbell(
        self, queue: str, channel: Any, method: Any, properties: Any, body: bytes
    ) -> None:
        redelivered = bool(method.redelivered)
        delivery = Delivery(
            self._epoch, method.delivery_tag, redelivered, body, queue, properties.priority or 0
        )
        self._stash.setdefault(queue, deque()).append(delivery)
        self._doorbell_gone(queue, cancel=True)

    def _doorbell_gone(self, queue: str, *, cancel: bool = False) -> None:
        tag = self._doorbells.pop(queue, None)
        if cancel and tag is not None and self._sub is not None:
            self._sub.basic_cancel(tag)
        for call in self._rung.pop(queue, []):
            call.resolve(None)

    def _on_consumer_cancelled(self, frame: Any) -> None:
        """The broker cancelled a doorbell (its queue was deleted): ring it."""
        tag = getattr(frame.method, "consumer_tag", None)
        for queue, doorbell in list(self._doorbells.items()):
            if doorbell == tag:
                self._doorbell_gone(queue)

    def _end_wait(self, call: Call, queue: str) -> None:
        call.abandon()
        rung = self._rung.get(queue, [])
        if call in rung:
            rung.remove(call)
        if not rung and queue in self._doorbells:
            self._doorbell_gone(queue, cancel=self._sub is not None and self._sub.is_open)

    def _give_back(self, queue: str) -> None:
        stash = self._stash.pop(queue, deque())
        while stash:
            self._settle(stash.popleft(), True)

    def _settle(self, delivery: Delivery, requeue: bool | None) -> None:
        if delivery.epoch != self._epoch or self._sub is None or not self._sub.is_open:
            return  # its channel closed: the broker requeued it, and the tag means nothing now
        if requeue is None:
            self._sub.basic_ack(delivery.tag)
        else:
            self._sub.basic_reject(delivery.tag, requeue=requeue)

    def _start_purge(self, call: Call, topology: Topology) -> None:
        if topology.queue in self._doorbells:
            self._doorbell_gone(topology.queue, cancel=True)
        stash = self._stash.pop(topology.queue, deque())
        while stash:
            self._sub.basic_ack(stash.popleft().tag)
        self._sub_calls.append(call)

        def deleted(_: Any) -> None:
            self._declared.discard(topology.queue)
            self._answered(call)
            call.resolve(None)

        self._sub.queue_delete(
            topology.queue,
            callback=lambda _: self._sub.queue_delete(topology.dead, callback=deleted),
        )

    def _start_count(self, call: Call, queue: str) -> None:
        self._sub_calls.append(call)

        def counted(frame: Any) -> None:
            self._answered(call)
            call.resolve(int(frame.method.message_count))

        self._sub.queue_declare(queue, passive=True, callback=counted)


class Doorbell:
    """A file descriptor that becomes readable when a queue may hold a message.

    While it is asked for (``fd``), a consumer with prefetch 1 is subscribed, as in
    ``Link.wait``: the message it receives is kept for the next ``get`` (so it is the head
    at the moment it was handed out), and the consumer is cancelled once it rang or is
    ``withdraw``n. A lost channel rings it too: the caller's next claim meets the outage.
    """

    def __init__(self, link: Link, topology: Topology) -> None:
        self._link, self._topology = link, topology
        self._pipe: tuple[int, int] | None = None
        self._call: Call | None = None
        self._asked = False  # a consumer was subscribed since the last withdraw

    def fd(self) -> int:
        if self._pipe is None:
            read_end, write_end = os.pipe()
            os.set_blocking(read_end, False)
            os.set_blocking(write_end, False)
            self._pipe = (read_end, write_end)
        if self._call is None:
            self._call = self._link.ring_on_message(self._topology, self._pipe[1])
            self._asked = True
        return self._pipe[0]

    def heard(self) -> None:
        """Empty the pipe; a doorbell that rang is subscribed again by the next ``fd``."""
        if self._pipe is not None:
            with contextlib.suppress(BlockingIOError):
                while os.read(self._pipe[0], 512):
                    pass
        if self._call is not None and self._call.settled():
            self._call = None

    def withdraw(self) -> None:
        """Cancel the consumer, and give back a message it received that was not claimed:
        the caller will not claim soon (its slots are busy, or it stops), and a message
        held here would wait, unacked, where no other consumer can have it."""
        call, self._call = self._call, None
        if not self._asked:
            return  # nothing subscribed since the last withdraw
        self._asked = False
        if call is not None and call.abandon():
            self._link.stop_ringing(call, self._topology)
        self._link.give_back(self._topology)
        self.heard()

    def close(self) -> None:
        self.withdraw()  # no write can follow an abandoned call: the pipe may go
        if self._pipe is not None:
            for end in self._pipe:
                os.close(end)
            self._pipe = None
