"""Wake-ups: what lets an idle queue cost (almost) nothing.

An idle fetch loop does not poll its queue. It waits on an in-process event that is set
when:

- a message arrives on the queue's shard channel (``<prefix>:{queue}:wake``): the
  scripts that make the pending list non-empty, or a scheduled/retry task the earliest
  due, publish one there (``SPUBLISH``, Redis >= 7.0 and Valkey). One connection per
  node carries the subscriptions of all of this worker's queues on that node;
- the earliest scheduled/retry task it knows of is due (kept in memory: from its last
  dequeue, from wake-ups, from the survey);
- the survey, one script call per node every ``survey_interval`` for all of this
  worker's queues there, finds a queue with pending tasks (a wake-up that was lost),
  an earlier due time, or something for the recoverer to sweep (an expired lease, an
  ended retention, an archive over its limits).

No wake-up is lost for longer than one survey period: a subscription starts before the
survey that follows it, and a loop waits only after a dequeue that found nothing, made
after the subscription was confirmed. When a subscription ends (a connection breaks, a
failover demotes the node, a reshard moves the slot: the server then says
``sunsubscribe``), the queue's loop is woken at once and goes back to today's blocking
wait (``BLMOVE``, at most ``poll_interval``), which also drives the failover handling;
the subscription is made again on the slot's master within a second or so, followed by a
survey of those queues.

Without sharded pub/sub (Redis < 7.0), with ``wakeups=False``, or for a user the ACL does
not let subscribe, every queue is served the old way, and the worker says so at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence

import redis

from clusterq.broker.facade import Broker
from clusterq.broker.survey import Look
from clusterq.cluster.connection import Addr, format_addr
from clusterq.cluster.subscriber import Subscriber
from clusterq.worker.state import QueueState, RunState, WorkerSettings

log = logging.getLogger("clusterq.worker")

#: Queues per survey call (bounds the script's time on the server: ~1 ms per 300).
SURVEY_BATCH = 300


def sharded_pubsub(redis_version: str) -> bool:
    """Whether a server of that ``redis_version`` (Valkey reports 7.2.4) has SSUBSCRIBE,
    SPUBLISH and script flags."""
    try:
        return int(redis_version.split(".")[0]) >= 7
    except ValueError:
        return False


class Wakeups:
    """The wake-ups of one worker's queues (see the module's text)."""

    def __init__(
        self,
        broker: Broker,
        settings: WorkerSettings,
        run_state: RunState,
        queues: Callable[[], Sequence[QueueState]],
    ) -> None:
        self.broker = broker
        self.settings = settings
        self.run_state = run_state
        self.queues = queues
        #: Whether wake-ups are used at all (decided by :meth:`start`), and why not.
        self.active = False
        self.why_not = "not started"
        self._by_channel: dict[bytes, QueueState] = {}
        #: Queue name -> the node its confirmed subscription is on.
        self._on: dict[str, Addr] = {}
        self._subscribers: dict[Addr, Subscriber] = {}
        self._replan = asyncio.Event()
        broker.backend.subscribe(self._on_topology)
        #: Counters for tests and metrics.
        self.messages = 0
        self.surveys = 0
        self.dropped = 0

    # ------------------------------------------------------------------ state

    def covers(self, q: QueueState) -> bool:
        """Whether a wake-up for ``q`` would reach this worker now."""
        return self.active and q.name in self._on

    def add(self, q: QueueState) -> None:
        """A queue to serve (at start, or a partition that appeared)."""
        self._by_channel[q.qk.wake.encode()] = q
        self._replan.set()

    async def start(self) -> str:
        """Decide whether wake-ups can be used; returns a line saying how idle queues are
        served, for the worker's start log."""
        if not self.settings.wakeups:
            self.why_not = "wakeups=False"
        else:
            info = await self.broker.backend.execute(0, lambda c: c.info("server"), timeout=2.0)
            version = str(info.get("redis_version", "0"))
            self.active = sharded_pubsub(version)
            self.why_not = "" if self.active else f"Redis {version} has no sharded pub/sub (< 7.0)"
        return self.describe()

    def describe(self) -> str:
        if self.active:
            return (
                f"idle queues wait for wake-ups (sharded pub/sub), surveyed every "
                f"{self.settings.survey_interval:g}s"
            )
        return f"idle queues are polled every {self.settings.poll_interval:g}s ({self.why_not})"

    def _disable(self, why: str) -> None:
        if not self.active:
            return
        self.active = False
        self.why_not = why
        log.warning("wake-ups off: %s", self.describe())
        self._on.clear()
        for q in self.queues():
            q.wake.set()  # back to polling at once

    # ------------------------------------------------------------------ callbacks

    def _on_message(self, channel: bytes) -> None:
        self.messages += 1
        q = self._by_channel.get(channel)
        if q is not None:
            q.wake.set()

    def _on_dropped(self, addr: Addr, channels: list[bytes], reason: str) -> None:
        """Subscriptions ended that were not asked to: wake their loops (they poll until
        the subscription is back, then a survey catches what came meanwhile)."""
        self.dropped += len(channels)
        for channel in channels:
            q = self._by_channel.get(channel)
            if q is not None and self._on.get(q.name) == addr:
                del self._on[q.name]
                q.wake.set()
        if not self.run_state.closing:
            log.info(
                "wake-ups: %d subscription(s) on %s ended (%s); subscribing again",
                len(channels),
                format_addr(addr),
                reason,
            )
            self.broker.backend.refresh_soon()
            self._replan.set()

    def _on_topology(self, _topology: object, _events: object) -> None:
        """The map changed: a subscription on a node that no longer serves its queue's
        slot (a failover the old master did not report, cut off from the others) is
        given up, and made again where the slot is now."""
        backend = self.broker.backend
        moved = []
        for q in self.queues():
            addr = self._on.get(q.name)
            with contextlib.suppress(Exception):
                if addr is not None and backend.master_addr(q.qk.slot) != addr:
                    moved.append(q)
        for q in moved:
            del self._on[q.name]
            q.wake.set()
        if moved:
            self._replan.set()

    # ------------------------------------------------------------------ loop

    async def loop(self) -> None:
        """Subscribe what is not, survey every ``survey_interval``; until closing."""
        interval = self.settings.survey_interval
        next_survey = time.monotonic()
        while not self.run_state.closing and self.active:
            self._replan.clear()
            await self._subscribe_missing()
            now = time.monotonic()
            if now >= next_survey:
                await self._survey([q for q in self.queues() if self.covers(q)])
                next_survey = now + interval
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(
                    self._replan.wait(), max(0.0, next_survey - time.monotonic())
                )

    async def _subscribe_missing(self) -> None:
        backend = self.broker.backend
        groups: dict[Addr, list[QueueState]] = defaultdict(list)
        for q in self.queues():
            if not q.retired and q.name not in self._on:
                try:
                    groups[backend.master_addr(q.qk.slot)].append(q)
                except Exception:  # no master known for the slot now: later
                    continue
        if groups:
            await asyncio.gather(*(self._subscribe(addr, qs) for addr, qs in groups.items()))
        for addr, subscriber in list(self._subscribers.items()):
            if not subscriber.channels and addr not in groups:
                subscriber.close()  # holds nothing (its node is no master of ours now)
                del self._subscribers[addr]

    async def _subscribe(self, addr: Addr, qs: list[QueueState]) -> None:
        subscriber = self._subscribers.get(addr)
        if subscriber is None or subscriber.closed:
            endpoint = self.broker.backend.node(addr).lane.endpoint
            subscriber = Subscriber(
                endpoint,
                self._on_message,
                lambda channels, reason: self._on_dropped(addr, channels, reason),
            )
            self._subscribers[addr] = subscriber
        try:
            refused = await subscriber.subscribe([q.qk.wake.encode() for q in qs])
        except (redis.RedisError, OSError) as exc:
            log.debug("wake-ups: cannot subscribe on %s (%s)", format_addr(addr), exc)
            return
        for error in refused.values():
            if str(error).startswith("NOPERM") or "permission" in str(error):
                self._disable(
                    f"the user may not subscribe to the queues' channels ({error}); allow "
                    f"them with the ACL rule '&{self.broker.backend.keys.prefix}:*'"
                )
                return
        if refused:
            log.debug("wake-ups: %s refused %d channel(s)", format_addr(addr), len(refused))
            self.broker.backend.refresh_soon()
        fresh = []
        for q in qs:
            if q.qk.wake.encode() in subscriber.channels:
                self._on[q.name] = addr
                fresh.append(q)
        # What was enqueued before the subscription started sent its wake-up to no one.
        await self._survey(fresh)

    async def _survey(self, qs: Sequence[QueueState]) -> None:
        groups: dict[Addr, list[QueueState]] = defaultdict(list)
        for q in qs:
            addr = self._on.get(q.name)
            if addr is not None:
                groups[addr].append(q)
        calls = [
            self._survey_some(group[i : i + SURVEY_BATCH])
            for group in groups.values()
            for i in range(0, len(group), SURVEY_BATCH)
        ]
        await asyncio.gather(*calls)

    async def _survey_some(self, qs: list[QueueState]) -> None:
        self.surveys += 1
        try:
            looks = await self.broker.survey(
                [q.qk for q in qs],
                archive_max_size=self.settings.archive_max_size,
                archive_max_age_ms=int(self.settings.archive_max_age * 1000),
                timeout=0,
            )
        except Exception as exc:
            log.debug("wake-ups: survey failed (%s); waking its %d queues", exc, len(qs))
            for q in qs:
                q.wake.set()
            return
        for q, look in zip(qs, looks, strict=True):
            self._note(q, look)

    def _note(self, q: QueueState, look: Look) -> None:
        if not look.known:  # moved meanwhile, or keys not clusterq's: let the loop see
            q.wake.set()
            self.broker.backend.refresh_soon()
            return
        if look.sweep:
            q.sweep_due = True
        if look.ready:
            q.wake.set()
        due = look.next_due
        if due is not None and (q.next_due is None or due < q.next_due - 0.0005):
            q.next_due = due
            q.wake.set()

    def close(self) -> None:
        self.active = False
        for subscriber in self._subscribers.values():
            subscriber.close()
        self._subscribers.clear()
        self._on.clear()
