"""The RabbitMQ backend: broker priorities and acks for delivery, a task store for state.

Design (the decisions the issue left open, and why):

* **Order comes from the broker.** One durable classic queue per Conveyor queue,
  ``conveyor.<queue>``, declared with ``x-max-priority`` = ``max_priority`` and a
  dead-letter route to ``conveyor.<queue>.dead``; persistent messages carry the task's
  priority; publishes are mandatory and confirmed (``push`` returns once the broker has the
  message, ``push_many`` waits for the confirms of the whole batch once).
* **One message per reserve, none buffered.** ``reserve`` takes the head of the queue with
  ``basic.get`` and manual ack, so a worker holds exactly as many unacked messages as it
  runs tasks (prefetch = concurrency) and none waits in a client buffer. A consumer with
  prefetch N keeps up to N messages it is not running yet; they were the head when the
  broker sent them, so a more urgent task pushed afterwards waits behind all of them (with
  prefetch 100, a priority-10 task can wait behind 99 priority-0 ones). While the queue is
  empty, ``wait`` subscribes a consumer with prefetch 1 as a doorbell: the message it
  receives is the next one handed out, and it is cancelled when the wait ends, so an idle
  ``QueueManager`` holds nothing. A worker, which also waits on its children and its
  signals, gets the same doorbell as a pipe (``doorbell``) that the delivery writes to.
  A slot kept for urgent work gets none (any message would ring it, and ring it again once
  given back): it polls the task store's head, and a message below its floor that the
  broker hands it (one a doorbell took earlier, or the head while the urgent message is
  with another consumer) goes back to its place.
* **State lives in a task store**: any backend whose table row says it can keep records
  (``task_store=sqlite:///...`` or ``redis://...``; default ``sqlite:///conveyor-rabbitmq.db``),
  used through its public seams only, in *broker mode* (``StoreConfig.broker_leases``): the
  store does not reap leases by time and promotes due tasks only when asked (``due``), so
  each gets published. A message is a ticket ``{"id", "ticket", "copy"}`` (JSON, never
  pickle); the store honours only a live task's current ticket, once, which makes duplicate
  copies, cancel tombstones and stale tickets harmless. A task's ticket changes whenever it
  gets a new place in line (due, a counted nack, a re-drive): a nack publishes the new
  ticket at the back of its band and acks the old message; a hand-back requeues the held
  message, which keeps its place.
* **Delays stay in the store.** ``delay``/``eta`` and ``nack(delay)`` keep the task
  ``scheduled`` in the store; a consumer publishes it when due, claiming the publication
  atomically in the store first (so two consumers never publish one task twice), in due
  order. Chosen over TTL queues because a per-message TTL expires only at the head of its
  queue (a 60 s message blocks a 1 s one behind it), so exact delays would need a queue per
  delay value; the store already has an ordered due index, and ``cancel``, ``scheduled``
  counts and re-drives then work as on the other backends. The cost: a due task is published
  by a running consumer (as with Celery's ``eta``), within 0.25 s of its due time (an idle
  worker: when the earliest task it knows of is due, and at least once per ``idle_block``).
* **The lease is the unacked delivery.** It ends when the consumer's channel or connection
  closes (the broker requeues the message, flagged redelivered), not after
  ``visibility_timeout``: a consumer that stays connected keeps its tasks, ``extend`` reports
  whether its channel still holds the delivery, and a hung but connected consumer is only
  cut off by the broker's ``consumer_timeout`` (30 min by default). The copy a running
  task was claimed with, redelivered, means its holder died: the store counts the expiry (poison at
  ``max_deliveries``) and mints a new fencing token, so the old holder's late ack is refused
  by the store, and its delivery tag, from a closed channel, is dropped, never acked.
* **A worker's child settles its own success** (worker/direct.py) when the task store can
  be used from a forked child (Redis): it opens a link of its own, acks its task in the
  store and claims the next with ``basic.get`` on its own channel, which then holds that
  delivery (its lease). The worker still settles everything else, and acks the deliveries
  it claimed once the child says it settled them.
* **Heartbeats flow while a task runs**: the connection is owned by an I/O thread
  (``channels``; the maintainers' advice in pika #418, #564, #930, #1104), which also
  reconnects with backoff; calls cross to it through ``add_callback_threadsafe``.
* **Refusing what the broker would cut short**: a task whose ``process_timeout`` (or a
  pipeline whose hard limit) is above ``consumer_timeout`` is refused, naming both values.
  The broker's value cannot be read over AMQP: Conveyor assumes RabbitMQ's default of
  1,800 s unless the URL says otherwise (``?consumer_timeout=<seconds>``).
"""

from .server import RabbitMQServer

__all__ = ["RabbitMQServer"]
