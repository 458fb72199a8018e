"""Fetching: one loop per queue, so queues on different masters are fetched concurrently
and a slow or dead shard holds up no other.

A loop takes concurrency slots (shared among the queues by weight, see
:mod:`clusterq.priority`), dequeues up to that many tasks in one script call, and starts
each. An idle loop sends nothing: it waits for a wake-up (:mod:`clusterq.worker.wakeups`)
or for the earliest scheduled/retry task it knows of to be due; while its subscription
is being made (at start, after a failover) it dequeues every ``poll_interval``. Without
wake-ups (no sharded pub/sub, or turned off), it blocks on the server instead
(``BLMOVE`` of the pending list onto itself, on a connection of its own), which wakes
within milliseconds of an enqueue and at least every ``poll_interval``. When
the queue's master cannot be reached, the loop reports the queue unavailable and probes
the master without holding any slot; when a dequeue works again, it reports the queue
resumed (and on which node).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable

from clusterq.broker.facade import Broker
from clusterq.cluster.changes import TopologyEvent
from clusterq.cluster.connection import format_addr
from clusterq.cluster.routing import backoff
from clusterq.events import QueueResumed, QueueUnavailable
from clusterq.priority import Capacity
from clusterq.worker.runner import Runner
from clusterq.worker.state import Held, QueueState, RunState, WorkerSettings
from clusterq.worker.supervise import LoopFactory
from clusterq.worker.wakeups import Wakeups

log = logging.getLogger("clusterq.worker")

#: Seconds a probe of an unavailable queue's master may take.
PROBE_TIMEOUT = 2.0
#: Seconds at most between two looks at a queue whose concurrency cap is reached (a
#: task of the queue ending in this worker, or a wake-up, looks again at once).
CONCURRENCY_RECHECK = 1.0


class Fetcher:
    """The fetch loops of one worker."""

    def __init__(
        self,
        broker: Broker,
        settings: WorkerSettings,
        capacity: Capacity,
        runner: Runner,
        run_state: RunState,
        emit: Callable[[TopologyEvent], None],
        next_token: Callable[[], str],
        wakeups: Wakeups,
    ) -> None:
        self.broker = broker
        self.wakeups = wakeups
        self.settings = settings
        self.capacity = capacity
        self.runner = runner
        self.run_state = run_state
        self.emit = emit
        self.next_token = next_token
        #: Tasks running now (their handlers).
        self.running: set[asyncio.Task[None]] = set()
        #: The queues fetched from, by name and in order (shared with the worker), and
        #: how a loop is started (the worker's supervisor).
        self.queues: dict[str, QueueState] = {}
        self.all_queues: list[QueueState] = []
        self.supervise: Callable[[str, LoopFactory, Callable[[], bool]], None] | None = None
        #: Tasks this worker may still take (None: no limit); when it reaches 0 the
        #: loops stop taking and ``on_spent`` is called once (recycling a process).
        self.budget: int | None = None
        self.on_spent: Callable[[], None] | None = None

    def serve(self, name: str, weight: float) -> None:
        """Fetch from queue ``name`` (a plain queue or a partition) with ``weight``."""
        self.capacity.weights[name] = weight
        if name in self.queues:
            return
        assert self.supervise is not None
        backend = self.broker.backend
        q = self.queues[name] = QueueState(name, backend.keys.queue(name))
        self.all_queues.append(q)
        backend.note_queues([name])
        self.wakeups.add(q)
        fetching = lambda: not self.run_state.stopping and not q.retired  # noqa: E731
        self.supervise(f"fetch:{name}", functools.partial(self.loop, q), fetching)

    def retire(self, name: str) -> None:
        """Stop fetching from ``name`` (a drained partition, retired)."""
        q = self.queues.get(name)
        if q is None or q.retired:
            return
        q.retired = True
        q.wake.set()
        if q.waiting is not None:
            q.waiting.cancel()

    def _node(self, q: QueueState) -> str:
        return format_addr(self.broker.backend.master_addr(q.qk.slot))

    async def loop(self, q: QueueState) -> None:
        """Fetch from ``q`` until the worker stops."""
        failures = 0
        outage_since = 0.0
        while not self.run_state.stopping and not q.retired:
            if failures:
                # Degraded: probe the master without holding any concurrency, so that a
                # dead or frozen shard never takes slots from the healthy ones.
                try:  # bounded: a probe that hangs (a half-open connection) is a failure
                    await asyncio.wait_for(self.broker.probe(q.qk), PROBE_TIMEOUT)
                except Exception:
                    failures += 1
                    await self._sleep(backoff(failures, base=0.02, cap=0.25))
                    continue
            granted = await self.capacity.acquire(q.name, self._wanted())
            if granted == 0:
                break
            if self.budget is not None:
                if self.budget <= 0:  # spent: wait for the stop (recycling) to come
                    self.capacity.release(granted)
                    q.wake.clear()
                    await self._wait_woken(q, None)
                    continue
                take = min(granted, self.budget)
                self.capacity.release(granted - take)
                granted = take
                self.budget -= granted
            token = self.next_token()
            q.wake.clear()  # a wake-up from here on is for what this dequeue may miss
            try:
                got = await self.broker.dequeue(q.qk, granted, self.settings.lease_ms, token)
            except Exception as exc:
                self.capacity.release(granted)
                self._refund(granted)
                if not failures:
                    outage_since = time.monotonic()
                    self.emit(QueueUnavailable(q.name, self._node(q), str(exc)))
                failures += 1
                await self._sleep(backoff(failures, base=0.02, cap=0.25))
                continue
            if failures:
                self.emit(QueueResumed(q.name, self._node(q), time.monotonic() - outage_since))
                failures = 0
            if got.orphans:
                log.warning(
                    "queue %s: dropped %d pending ids without a record", q.name, got.orphans
                )
            self.capacity.release(granted - len(got.tasks))
            self._refund(granted - len(got.tasks))
            if got.tasks:
                q.sweep_due = True
            for task_id, raw in got.tasks:
                running = asyncio.create_task(self.runner.execute(q, task_id, token, raw))
                q.held[task_id] = Held(token, run=running)
                self.running.add(running)
                running.add_done_callback(self.running.discard)
            # Kept until the next dequeue, so that a slot freed while it is on its way
            # wakes the loop (see QueueState.slot_freed).
            q.flow_limited = got.limited
            if got.limited is not None:
                # Tasks wait, but the queue's limits let none start yet: wait for the next
                # token or the hold's end (a timer), or for a slot (a task of the queue
                # ending here, a wake-up, or a look once a second), sending nothing.
                q.held_back[got.limited] = q.held_back.get(got.limited, 0) + 1
                until = got.next_due
                if until is None:
                    until = time.time() + CONCURRENCY_RECHECK
                await self._wait_woken(q, until)
            elif got.paused:
                if self.wakeups.covers(q):  # the survey wakes it once it has work again
                    await self._wait_woken(q, None)
                else:
                    await self._sleep(min(1.0, self.settings.poll_interval * 10))
            elif not got.tasks:
                q.next_due = got.next_due
                if self.wakeups.covers(q):
                    await self._wait_woken(q, got.next_due)
                elif self.wakeups.active:
                    # Its subscription is being made (at start, after a failover): look
                    # again within poll_interval, over the shared connection.
                    soon = time.time() + self.settings.poll_interval
                    await self._wait_woken(q, min(got.next_due or soon, soon))
                else:
                    await self._wait_for_work(q, got.next_due)

    def _wanted(self) -> int:
        if self.budget is None:
            return self.settings.batch_size
        return max(1, min(self.settings.batch_size, self.budget))

    def _refund(self, count: int) -> None:
        """Give back budget reserved for tasks a dequeue did not return; call
        ``on_spent`` once nothing is left and nothing is reserved."""
        if self.budget is None:
            return
        self.budget += count
        if self.budget <= 0 and self.on_spent is not None:
            spent, self.on_spent = self.on_spent, None
            spent()

    async def _sleep(self, seconds: float) -> None:
        if not self.run_state.stopping:
            await asyncio.sleep(seconds)

    async def _wait_woken(self, q: QueueState, next_due: float | None) -> None:
        """Wait, sending nothing, for a wake-up (which the survey also gives when it
        finds an earlier due time) or until ``next_due``."""
        if q.wake.is_set() or self.run_state.stopping or q.retired:
            return
        timer = None
        if next_due is not None:
            wait = next_due - time.time()
            if wait <= 0.001:
                return
            timer = asyncio.get_running_loop().call_later(wait, q.wake.set)
        try:
            await q.wake.wait()
        finally:
            if timer is not None:
                timer.cancel()

    async def _wait_for_work(self, q: QueueState, next_due: float | None) -> None:
        """Block on the server until the pending list has an id, or until the next
        scheduled/retry task is due, or ``poll_interval`` at most."""
        wait = self.settings.poll_interval
        if next_due is not None:
            wait = min(wait, next_due - time.time())
        if wait <= 0.001 or self.run_state.stopping:
            return
        q.waiting = asyncio.ensure_future(self.broker.wait_for_pending(q.qk, wait))
        try:
            await q.waiting
        except asyncio.CancelledError:
            if not self.run_state.stopping:
                raise
        except Exception as exc:
            log.debug("queue %s: wait failed (%s)", q.name, exc)
            await self._sleep(backoff(1, base=0.05, cap=0.5))
        finally:
            q.waiting = None

    def stop(self, queues: list[QueueState]) -> None:
        """Make every fetch loop end (a loop blocked on the server is woken by
        cancelling its wait); the caller awaits the loops."""
        self.capacity.close()
        for q in queues:
            q.wake.set()
            if q.waiting is not None:
                q.waiting.cancel()
