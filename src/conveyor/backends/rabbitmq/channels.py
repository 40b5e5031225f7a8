"""One AMQP connection owned by one I/O thread: its lifecycle, reconnects and call hand-off.

pika's connections are not thread-safe, and a ``BlockingConnection`` only answers
heartbeats while its owner calls into it: a consumer busy for longer than two heartbeat
intervals is dropped by the broker and its ack fails (pika #418, #564, #930, #1104). The
maintainers' answer is one thread that owns the connection and pumps I/O, with other
threads handing work to it through ``add_callback_threadsafe``. That is this class: a
``SelectConnection`` runs its ioloop in a daemon thread, so heartbeats flow whatever the
caller does (a worker waiting on a 15-minute step, a script between ``reserve`` and
``ack``); the caller posts a closure to the loop and waits for its answer (``_call``).

When the connection drops, the thread reconnects with backoff (0.1 s doubling to 1 s, so a
broker that is back is used again within about a second). A call made meanwhile waits up
to ``connect_timeout`` and then raises ``BrokerUnavailableError``; a worker treats that as
an outage and asks again, the link keeps reconnecting underneath. A broker that goes
silent without closing anything (a black-holed connection, a paused node) is noticed by
the AMQP heartbeat: 10 s unless the URL sets ``heartbeat``, so within 15-30 s (pika checks
every heartbeat + 5 s) instead of the 60 s brokers propose; callers give up sooner, after
``connect_timeout``.
Every unacked delivery of the lost channel is requeued by the broker; the channel epoch
goes up, so a late ack of such a delivery is dropped instead of settling a different
message on the new channel (delivery tags are per channel).

Two channels: ``pub`` in confirm mode (mandatory publishes), and ``sub`` for
``basic.get``, the doorbell consumers, acks and declarations. One connection serves every
queue of a server in this process; each queue is declared on first use on a connection
(and again after ``purge`` deleted it). ``link.Link`` adds the operations; this class knows
nothing about what they mean.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import pika
from loguru import logger
from pika.adapters.select_connection import IOLoop, SelectConnection

from ...errors import BackendError, BrokerUnavailableError
from .calls import Call, LinkLostError
from .topology import BrokerUrl, Topology, channel_error, connect_error

_MAX_BACKOFF = 1.0  # the longest pause between attempts to reconnect
#: AMQP heartbeat (seconds) when the URL sets none; the broker's lower proposal wins.
DEFAULT_HEARTBEAT = 10
Start = Callable[[Call], None]


def _heartbeat(connection: Any, proposed: int) -> int:
    """DEFAULT_HEARTBEAT, or the broker's proposal if lower (0, "none", becomes ours)."""
    return min(proposed, DEFAULT_HEARTBEAT) if proposed else DEFAULT_HEARTBEAT


class Channels:
    """A connection, its two channels and the thread that owns them."""

    def __init__(self, url: BrokerUrl, *, connect_timeout: float, name: str) -> None:
        self.safe_url, self.name = url.safe_url, name
        self._connect_timeout = connect_timeout
        self._params = pika.URLParameters(url.pika_url)
        self._params.client_properties = {"connection_name": name, "product": "conveyor"}
        self._params.socket_timeout = connect_timeout
        self._params.stack_timeout = connect_timeout * 2
        if self._params.heartbeat is None:  # the URL did not say: not the broker's 60 s
            self._params.heartbeat = _heartbeat
        #: Connections re-established after a loss (0 while the first one lives).
        self.reconnects = 0
        self._loop = IOLoop()
        self._closed = False
        self._pid = os.getpid()
        # Touched by the I/O thread only (callers merely read the ints and flags).
        self._conn: SelectConnection | None = None
        self._pub: Any = None
        self._sub: Any = None
        self._epoch = 0
        self._ready = self._closing = self._ever_connected = False
        self._declared: set[str] = set()  # queues declared on this connection
        self._declaring: Topology | None = None  # for the error of a failed declare
        self._fresh = False  # the connection being opened replaces a lost one
        self._down_since: float | None = time.monotonic()
        self._error: BaseException | None = None
        self._failures = 0
        self._waiting: list[tuple[Call, Start, Topology | None]] = []  # run once ready
        self._sub_calls: list[Call] = []  # answered on the sub channel: fail if it closes
        self._thread = threading.Thread(target=self._run, name=f"conveyor-amqp:{name}", daemon=True)
        self._thread.start()
        self._post(self._connect)

    def close(self) -> None:
        """Close the connection (unacked deliveries return to the queue) and stop the thread."""
        if self._closed:
            return
        self._closed = True
        self._post(self._shutdown)
        self._thread.join(timeout=max(5.0, self._connect_timeout))

    # -- hand-off from the caller's thread ---------------------------------------------------

    def _post(self, fn: Callable[[], None]) -> None:
        if self._thread.is_alive():
            self._loop.add_callback_threadsafe(fn)

    def _call(
        self, start: Start, deadline: float | None = None, topology: Topology | None = None
    ) -> Any:
        """Run ``start`` on the I/O thread once connected and declared; wait for its answer.

        Gives up after ``deadline`` (monotonic), or after ``connect_timeout`` without a
        connection, raising BrokerUnavailableError with the last connection error. May raise
        LinkLostError (the connection or channel closed meanwhile): callers retry.
        """
        return self._await(self._submit(start, topology), deadline)

    def _submit(
        self, start: Start, topology: Topology | None = None, call: Call | None = None
    ) -> Call:
        """Hand ``start`` to the I/O thread; ``_await`` its answer (the caller may work
        meanwhile)."""
        if self._closed:
            raise BackendError(f"the RabbitMQ link to {self.safe_url} is closed")
        if os.getpid() != self._pid:  # the I/O thread did not come along through fork()
            raise BackendError(
                f"this RabbitMQ connection ({self.safe_url}) was opened in process {self._pid}; "
                "a forked child must open its own QueueManager"
            )
        call = call or Call()
        self._post(lambda: self._when_ready(call, start, topology))
        return call

    def _await(self, call: Call, deadline: float | None = None) -> Any:
        deadline = deadline or time.monotonic() + self._connect_timeout
        while not call.wait(min(0.25, max(deadline - time.monotonic(), 0.0))):
            now, down = time.monotonic(), self._down_since
            gave_up = now >= deadline or (down is not None and now - down > self._connect_timeout)
            if gave_up and call.abandon():
                reason = f": {self._error}" if self._error else ""
                raise BrokerUnavailableError(
                    f"RabbitMQ at {self.safe_url} did not answer in time{reason}"
                )
        return call.result()

    def _retrying(
        self, start: Start, deadline: float | None = None, topology: Topology | None = None
    ) -> Any:
        """``_call`` again after a lost connection or channel, until the deadline."""
        deadline = deadline or time.monotonic() + self._connect_timeout
        while True:
            try:
                return self._call(start, deadline, topology)
            except LinkLostError:
                continue

    # -- the I/O thread: lifecycle -----------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                self._loop.start()
                break
            except Exception:  # a bug in a callback must not kill the connection's thread
                logger.exception("RabbitMQ I/O thread for {}: unexpected error", self.safe_url)
        self._loop.close()

    def _connect(self) -> None:
        if self._closing:
            return
        self._fresh = self._ever_connected
        self._conn = SelectConnection(
            self._params,
            on_open_callback=lambda conn: conn.channel(on_open_callback=self._on_pub_open),
            on_open_error_callback=self._on_open_error,
            on_close_callback=self._on_closed,
            custom_ioloop=self._loop,
        )
        self._conn.add_on_connection_blocked_callback(self._on_blocked)
        self._conn.add_on_connection_unblocked_callback(lambda *_: setattr(self, "_error", None))

    def _on_blocked(self, conn: Any, frame: Any) -> None:
        """A resource alarm: publishes wait; a push that times out says why."""
        reason = getattr(frame.method, "reason", "") or "a resource alarm"
        self._error = BrokerUnavailableError(
            f"RabbitMQ at {self.safe_url} is blocking publishers ({reason}); free memory or "
            "disk on the broker"
        )
        logger.warning("{}", self._error)

    def _on_pub_open(self, channel: Any) -> None:
        self._pub = channel
        channel.add_on_close_callback(self._on_pub_closed)
        self._pub_opened(channel)
        channel.confirm_delivery(
            self._on_confirm,
            callback=lambda _: self._open_sub() if self._sub is None else self._on_ready(),
        )

    def _open_sub(self) -> None:
        if self._conn is not None and self._conn.is_open:
            self._conn.channel(on_open_callback=self._on_sub_open)

    def _on_sub_open(self, channel: Any) -> None:
        self._sub = channel
        channel.add_on_close_callback(self._on_sub_closed)
        self._sub_opened(channel)
        channel.basic_qos(prefetch_count=1, callback=lambda _: self._on_ready())

    def _on_ready(self) -> None:
        if self._fresh:
            self._fresh = False
            self.reconnects += 1
            logger.info("RabbitMQ connection to {} re-established", self.safe_url)
        self._ready, self._ever_connected, self._down_since = True, True, None
        self._failures, self._error = 0, None
        waiting, self._waiting = self._waiting, []
        for call, start, topology in waiting:
            self._when_ready(call, start, topology)

    def _on_open_error(self, conn: Any, exc: BaseException) -> None:
        self._conn, self._error = None, connect_error(self.safe_url, exc)
        if not self._ever_connected:  # the first connection: say so at once, do not wait
            self._fail_waiting(self._error)
        self._reconnect_later()

    def _on_closed(self, conn: Any, reason: BaseException) -> None:
        self._conn = self._pub = self._sub = None
        self._declared = set()
        self._sub_lost(LinkLostError(str(reason)))
        self._pub_lost(LinkLostError(str(reason)))
        if not self._closing:
            logger.warning(
                "RabbitMQ connection to {} lost ({}); reconnecting", self.safe_url, reason
            )
        self._reconnect_later()

    def _reconnect_later(self) -> None:
        if self._closing:
            self._fail_waiting(BackendError(f"the RabbitMQ link to {self.safe_url} is closed"))
            self._loop.stop()
            return
        self._ready = False
        self._down_since = self._down_since or time.monotonic()
        delay = min(_MAX_BACKOFF, 0.1 * 2 ** min(self._failures, 6)) * random.uniform(0.5, 1.0)
        self._failures += 1
        self._loop.call_later(delay, self._connect)

    def _on_sub_closed(self, channel: Any, reason: BaseException) -> None:
        if channel is not self._sub:
            return
        self._sub, self._declared = None, set()
        failure = self._channel_failure(reason)
        calls, self._sub_calls = self._sub_calls, []
        for call in calls:
            call.fail(failure)
        self._sub_lost(failure)
        self._reopen(self._open_sub)

    def _on_pub_closed(self, channel: Any, reason: BaseException) -> None:
        if channel is not self._pub:
            return
        self._pub = None
        self._pub_lost(self._channel_failure(reason))
        conn = self._conn
        self._reopen(lambda: conn.channel(on_open_callback=self._on_pub_open) if conn else None)

    def _channel_failure(self, reason: BaseException) -> BaseException:
        """Declaration and permission errors are the caller's to see; the rest is retried."""
        text = str(getattr(reason, "reply_text", "") or reason)
        code = getattr(reason, "reply_code", None)
        if self._declaring is not None and (
            code == 403 or (code == 406 and "inequivalent arg" in text)
        ):
            return channel_error(self.safe_url, self._declaring, reason)
        if code is not None and self._conn is not None and self._conn.is_open:
            # e.g. 406 "delivery acknowledgement timed out" (consumer_timeout), 404 queue gone
            logger.warning("RabbitMQ at {} closed a channel: {} {}", self.safe_url, code, text)
        return LinkLostError(text)

    def _reopen(self, open_channel: Callable[[], None]) -> None:
        if self._conn is not None and self._conn.is_open and not self._closing:
            self._ready = False
            self._down_since = self._down_since or time.monotonic()
            open_channel()

    def _fail_waiting(self, error: BaseException) -> None:
        waiting, self._waiting = self._waiting, []
        for call, _, _ in waiting:
            call.fail(error)

    def _shutdown(self) -> None:
        self._before_close()
        self._closing = True
        if self._conn is not None and not self._conn.is_closed:
            try:
                self._conn.close()  # _on_closed (or _on_open_error) stops the loop
                return
            except pika.exceptions.AMQPError:
                pass
        self._reconnect_later()  # stops the loop

    def _when_ready(self, call: Call, start: Start, topology: Topology | None = None) -> None:
        if call.abandoned:
            return
        if self._closing:
            call.fail(BackendError(f"the RabbitMQ link to {self.safe_url} is closed"))
        elif not self._ready:
            self._waiting.append((call, start, topology))
        elif topology is not None and topology.queue not in self._declared:
            self._declare(call, start, topology)
        else:
            try:
                start(call)
            except Exception as exc:  # pika refused the call: the channel is closing
                call.fail(LinkLostError(repr(exc)))

    def _declare(self, call: Call, start: Start, topology: Topology) -> None:
        """Declare a queue and its dead queue (lazily: again after ``purge`` deleted them),
        then run."""

        def declared(_: Any) -> None:
            self._declared.add(topology.queue)
            self._declaring = None
            self._answered(call)
            self._when_ready(call, start, topology)

        self._declaring = topology
        self._sub_calls.append(call)
        self._sub.queue_declare(
            topology.queue, durable=True, arguments=topology.queue_arguments(),
            callback=lambda _: self._sub.queue_declare(
                topology.dead, durable=True, callback=declared
            ),
        )  # fmt: skip

    def _answered(self, call: Call) -> None:
        if call in self._sub_calls:
            self._sub_calls.remove(call)

    # -- for Link: what it adds to each channel, and what it loses with them ------------------

    def _before_close(self) -> None:
        """The connection is about to close on purpose: settle what can be settled."""

    def _pub_opened(self, channel: Any) -> None:
        """A new pub channel is open (before confirm mode is on)."""

    def _sub_opened(self, channel: Any) -> None:
        """A new sub channel is open."""

    def _on_confirm(self, frame: Any) -> None:
        """The broker confirmed (ack or nack) publishes on the pub channel."""

    def _sub_lost(self, error: BaseException) -> None:
        """The sub channel is gone, with its deliveries: fail what waited on it."""

    def _pub_lost(self, error: BaseException) -> None:
        """The pub channel is gone: unconfirmed publishes are to be retried."""
