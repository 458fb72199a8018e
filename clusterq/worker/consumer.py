"""Stream consumers inside a worker (see :mod:`clusterq.streams`).

One :class:`StreamConsumer` per ``stream:group`` the worker serves; the consumer's name
in the group is the worker's id. Its loops (supervised like the fetch loops):

- unordered: one read loop per partition (``XREADGROUP ... >`` with a bounded ``BLOCK``,
  over the partition master's pooled connections); the events of a batch are handled
  concurrently and acked together. A claim loop per partition renews the idle time of
  events still being handled, and claims events that stayed pending longer than the
  lease (their consumer died, or their handler failed): ``XPENDING ... IDLE`` then
  ``XCLAIM``, so it knows each event's delivery count; an event delivered
  ``max_deliveries`` times goes to the dead-letter stream.
- ordered (:class:`~clusterq.worker.ordered.OrderedConsumer`): one owner per partition
  at a time, events handled one by one in stream order; a renewal loop per partition
  keeps its lease.

Both check the group's lag every few seconds (a loop of its own) and warn when trimming
(``maxlen``) dropped events the group had not read yet. Every loop that talks to a
partition's master is that partition's own, so a dead or frozen master holds up only
its own partitions.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from clusterq import tracing
from clusterq.broker import stream as stream_script
from clusterq.cluster.abackend import AsyncBackend
from clusterq.cluster.routing import backoff
from clusterq.keys import StreamKeys
from clusterq.partitions import LAYOUT_TTL
from clusterq.serialization import reply_text
from clusterq.streams import ConsumerSpec, Event, StreamLayout, decode_event, trimmed_unread
from clusterq.worker.announce import parse_announcements
from clusterq.worker.state import RunState
from clusterq.worker.supervise import LoopFactory

log = logging.getLogger("clusterq.worker")

#: Milliseconds a read blocks on the server (below the node clients' socket timeout).
BLOCK_MS = 500
#: Seconds between checks of a group's lag against trimming.
LAG_CHECK_INTERVAL = 5.0
#: A group whose lag reaches this share of the stream's maxlen is warned about.
RISK = 0.9
#: Events a read or a claim takes at once.
BATCH = 50
#: Seconds a consumer of a worker no longer alive stays in a group (holding nothing
#: pending) before it is removed; and seconds between the looks for such consumers.
FORGET_AFTER = 3600.0
FORGET_CHECK_INTERVAL = 60.0


@dataclass
class ConsumerStats:
    handled: int = 0
    failed: int = 0
    dead: int = 0
    claimed: int = 0
    #: Events trimmed from a partition before this consumer's group read them.
    trimmed_unread: int = 0


class StreamConsumer:
    """This worker as a consumer of one stream for one group."""

    def __init__(
        self,
        backend: AsyncBackend,
        spec: ConsumerSpec,
        name: str,
        *,
        lease: float,
        run_state: RunState,
        stats: ConsumerStats,
    ) -> None:
        self.backend = backend
        self.spec = spec
        self.layout: StreamLayout | None = None
        self.name = name
        self.lease_ms = max(1, int(lease * 1000))
        self.lease = lease
        self.run_state = run_state
        self.stats = stats
        self.group = spec.group
        self.parts: list[StreamKeys] = []
        self.members_key = backend.keys.stream_consumers(spec.stream, spec.group)
        #: Event ids being handled now, per partition (their idle time is renewed).
        self.inflight: list[set[str]] = []
        #: Ordered: the partitions assigned to this consumer, and the tokens it holds.
        self.assigned: set[int] = set()
        self.tokens: dict[int, str] = {}
        #: Ordered: until when (monotonic) each held lease is surely still ours.
        self.valid_until: dict[int, float] = {}
        self._errors: dict[str, str] = {}
        self._trimmed: list[int] = []
        #: Partitions whose lag came close to the stream's maxlen (warned once).
        self._at_risk: set[int] = set()
        self.maxlen: int | None = None
        self._lag_checked = 0.0
        self._forget_checked = 0.0
        self._stopped = False

    @property
    def label(self) -> str:
        return self.spec.label

    def _running(self) -> bool:
        return not self.run_state.stopping and not self._stopped

    def starting(self) -> bool:
        """True until its loops run (the start loop is restarted if it fails)."""
        return self.layout is None and self._running()

    async def partition_loop(self, index: int) -> None:
        """Read and handle the events of partition ``index`` until the worker stops."""
        raise NotImplementedError

    async def partition_side_loop(self, index: int) -> None:
        """What else partition ``index`` needs (claims, or its lease's renewals)."""
        raise NotImplementedError

    async def side_loop(self) -> None:
        """The consumer's loop that is no partition's: the lag checks (and membership)."""
        while self._running():
            await self._check_lag()
            await self._forget_gone()
            await asyncio.sleep(self.lease / 4)

    # ------------------------------------------------------------------ start and stop

    async def start(
        self, supervise: Callable[[str, LoopFactory, Callable[[], bool]], None]
    ) -> None:
        """Wait until the stream is declared (warning once), create the group on every
        partition (from the oldest retained event), then start the loops."""
        key, warned = self.backend.keys.streams, False
        layout = None
        while self._running():
            raw = await self.backend.execute_key(key, lambda c: c.hget(key, self.spec.stream))
            if raw is not None:
                layout = StreamLayout.from_json(raw)
                break
            if not warned:
                log.warning("%s: stream %r is not declared yet; waiting for it", self.label,
                            self.spec.stream)  # fmt: skip
                warned = True
            await asyncio.sleep(LAYOUT_TTL)
        if layout is None:
            return
        self.parts = [self.backend.keys.stream(p) for p in layout.partitions]
        self.maxlen = layout.maxlen
        self.inflight = [set() for _ in self.parts]
        self._trimmed = [0 for _ in self.parts]
        for sk in self.parts:
            await self._create_group(sk)
        await self._check_lag()  # before the first read jumps over a gap left by trimming
        running = self._running
        for index in range(len(self.parts)):
            loop = functools.partial(self.partition_loop, index)
            supervise(f"fetch:stream:{self.label}:{index}", loop, running)
            side = functools.partial(self.partition_side_loop, index)
            supervise(f"stream:{self.label}:side:{index}", side, running)
        supervise(f"stream:{self.label}:side", self.side_loop, running)
        self.layout = layout
        log.info(
            "consumer %s of %s: %d partitions%s",
            self.name,
            self.label,
            len(self.parts),
            " (ordered)" if self.spec.ordered else "",
        )

    async def _create_group(self, sk: StreamKeys) -> None:
        async def create(client: Any) -> None:
            try:
                await client.xgroup_create(sk.events, self.group, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

        await self.backend.execute(sk.slot, create)

    async def stop(self) -> None:
        """Leave the group's membership and hand back owned partitions (ordered), so that
        the other consumers take them over at once."""
        self._stopped = True
        for index, token in list(self.tokens.items()):
            await self._script(self.parts[index], stream_script.release, token, quiet=True)
        self.tokens.clear()
        if self.spec.ordered:
            key, name = self.members_key, self.name
            try:
                await self.backend.execute_key(key, lambda c: c.hdel(key, name), timeout=2.0)
            except Exception as exc:
                log.warning("consumer %s: could not leave %s: %s", name, self.label, exc)

    # ------------------------------------------------------------------ handling

    async def _call(self, event: Event) -> None:
        if tracing.enabled():
            with tracing.consuming(self.backend, event, self.parts[event.partition].slot):
                await self._invoke(event)
        else:
            await self._invoke(event)

    async def _invoke(self, event: Event) -> None:
        handler = self.spec.handler
        if inspect.iscoroutinefunction(handler):
            await handler(event)
        else:
            result = await asyncio.to_thread(handler, event)
            if inspect.isawaitable(result):
                await result

    async def _handle(self, index: int, event_id: Any, fields: Any, deliveries: int) -> bool:
        """Run the handler on one entry; True when the entry is settled: handled, or not
        an event of ours (not JSON, no payload) and moved to the dead letters at once."""
        sk = self.parts[index]
        eid = event_id.decode() if isinstance(event_id, bytes) else str(event_id)
        if fields is None:  # trimmed while pending: nothing left to handle
            return True
        try:
            event = decode_event(self.spec.stream, index, self.group, eid, fields, deliveries)
        except Exception as exc:
            log.error("%s: event %s of %s is unreadable: %s", self.label, eid, sk.events, exc)
            await self._dead(index, eid, f"unreadable: {exc}")
            return True
        self.inflight[index].add(eid)
        try:
            await self._call(event)
        except Exception as exc:
            self.stats.failed += 1
            self._errors[eid] = f"{type(exc).__name__}: {exc}"
            if len(self._errors) > 10_000:
                self._errors.pop(next(iter(self._errors)))
            log.warning(
                "%s: event %s failed (delivery %d of %d)",
                self.label,
                eid,
                deliveries,
                self.spec.max_deliveries,
                exc_info=True,
            )
            return False
        finally:
            self.inflight[index].discard(eid)
        self.stats.handled += 1
        self._errors.pop(eid, None)
        return True

    async def _dead(self, index: int, event_id: str, reason: str) -> None:
        await self._script(self.parts[index], stream_script.dead, event_id, reason)
        self.stats.dead += 1
        log.error("%s: event %s moved to %s (%s)", self.label, event_id, self.parts[index].dead,
                  reason)  # fmt: skip

    async def _script(self, sk: StreamKeys, build: Any, *args: Any, quiet: bool = False) -> Any:
        script_keys, argv = build(sk, self.group, *args)
        try:
            return await self.backend.run_script(stream_script.SCRIPT, sk.slot, script_keys, argv)
        except Exception:
            if not quiet:
                raise
            return None

    async def _unavailable(self, index: int, failures: int, exc: Exception) -> int:
        """A read of partition ``index`` failed: say so once per outage, back off; returns
        the failures so far."""
        if not failures:
            log.warning("%s: partition %d unavailable: %s", self.label, index, exc)
        await asyncio.sleep(backoff(failures + 1, base=0.05, cap=0.5))
        return failures + 1

    async def _read(self, sk: StreamKeys, since: str, block: int | None) -> list[Any]:
        async def read(client: Any) -> Any:
            return await client.xreadgroup(
                self.group, self.name, {sk.events: since}, count=BATCH, block=block
            )

        reply = await self.backend.execute(sk.slot, read, timeout=0)
        return list(reply[0][1]) if reply else []

    # ------------------------------------------------------------------ lag

    async def _forget_gone(self) -> None:
        """Remove from the group, on every partition, the consumers of workers that are
        no longer alive (no announcement), once they hold nothing pending and have been
        idle :data:`FORGET_AFTER` (each worker start adds one; nothing else removes them)."""
        now = time.monotonic()
        if now - self._forget_checked < FORGET_CHECK_INTERVAL:
            return
        self._forget_checked = now
        try:
            workers = self.backend.keys.workers
            entries = await self.backend.execute_key(workers, lambda c: c.hgetall(workers))
        except Exception as exc:
            log.debug("%s: live workers not read (%s): no consumer forgotten", self.label, exc)
            return
        alive = {w.id for w in parse_announcements(entries)} | {self.name}
        idle_ms = int(FORGET_AFTER * 1000)
        for sk in self.parts:
            try:
                gone = await self._gone_consumers(sk, alive, idle_ms)
                if gone:
                    removed = await self._script(sk, stream_script.forget, idle_ms, gone)
                    for name in removed or []:
                        log.info("%s: consumer %s (gone) removed from the group", self.label,
                                 reply_text(name))  # fmt: skip
            except Exception as exc:
                log.debug("%s: gone consumers of %s not removed: %s", self.label, sk.events, exc)

    async def _gone_consumers(self, sk: StreamKeys, alive: set[str], idle_ms: int) -> list[str]:
        async def read(client: Any) -> Any:
            return await client.xinfo_consumers(sk.events, self.group)

        consumers = await self.backend.execute(sk.slot, read)
        out = []
        for consumer in consumers:
            name = reply_text(consumer.get("name"))
            pending, idle = int(consumer.get("pending", 0)), int(consumer.get("idle", 0))
            if name not in alive and pending == 0 and idle >= idle_ms:
                out.append(name)
        return out

    async def _check_lag(self) -> None:
        """Warn when trimming dropped events this group had not read yet."""
        now = time.monotonic()
        if now - self._lag_checked < LAG_CHECK_INTERVAL:
            return
        self._lag_checked = now
        maxlen = self.maxlen
        for index, sk in enumerate(self.parts):
            try:
                unread_trimmed, lag = await group_state(self.backend, sk, self.group)
            except Exception as exc:
                log.debug("%s: lag check of partition %d failed: %s", self.label, index, exc)
                continue
            at_risk = maxlen is not None and lag is not None and lag >= RISK * maxlen
            if at_risk and index not in self._at_risk:
                log.warning(
                    "%s: the group lags %d events behind on partition %d, which keeps about "
                    "%d: unread events will be trimmed (raise maxlen, or add consumers)",
                    self.label,
                    lag,
                    index,
                    maxlen,
                )
            if at_risk:
                self._at_risk.add(index)
            else:
                self._at_risk.discard(index)
            before, self._trimmed[index] = self._trimmed[index], unread_trimmed
            if unread_trimmed and unread_trimmed != before:
                # the same gap grown, or (after a read jumped the last one) a new gap
                new = unread_trimmed - before if unread_trimmed > before else unread_trimmed
                self.stats.trimmed_unread += new
                log.warning(
                    "%s: %d events of partition %d were trimmed before the group read them "
                    "(raise the stream's maxlen, or add consumers)",
                    self.label,
                    unread_trimmed,
                    index,
                )


class UnorderedConsumer(StreamConsumer):
    """Any consumer of the group may handle any event; a batch is handled concurrently."""

    async def partition_loop(self, index: int) -> None:
        sk = self.parts[index]
        failures = 0
        while self._running():
            try:
                entries = await self._read(sk, ">", BLOCK_MS)
            except Exception as exc:
                failures = await self._unavailable(index, failures, exc)
                continue
            if failures:
                log.info("%s: partition %d resumed", self.label, index)
                failures = 0
            if entries:
                await self._handle_batch(index, entries, {})

    async def _handle_batch(
        self, index: int, entries: list[Any], deliveries: dict[str, int]
    ) -> None:
        outcomes = await asyncio.gather(
            *(
                self._handle(index, eid, fields, deliveries.get(reply_text(eid), 1))
                for eid, fields in entries
            )
        )
        done = [reply_text(eid) for (eid, _), ok in zip(entries, outcomes, strict=True) if ok]
        if done:
            await self._script(self.parts[index], stream_script.ack, None, done)

    async def partition_side_loop(self, index: int) -> None:
        while self._running():
            await asyncio.sleep(self.lease / 2)
            if not self._running():
                return
            try:
                await self._renew_inflight(index)
                await self._claim(index)
            except Exception as exc:
                log.warning("%s: claim on partition %d failed: %s", self.label, index, exc)

    async def _renew_inflight(self, index: int) -> None:
        """Reset the idle time of events still being handled (so nobody claims them)."""
        ids = list(self.inflight[index])
        if not ids:
            return
        sk = self.parts[index]

        async def touch(client: Any) -> Any:
            return await client.xclaim(sk.events, self.group, self.name, 0, ids, justid=True)

        await self.backend.execute(sk.slot, touch)

    async def _claim(self, index: int) -> None:
        """Take over events pending longer than the lease; dead-letter the worn-out ones."""
        sk = self.parts[index]

        async def pending(client: Any) -> Any:
            return await client.xpending_range(
                sk.events, self.group, min="-", max="+", count=BATCH, idle=self.lease_ms
            )

        stale = await self.backend.execute(sk.slot, pending)
        take: dict[str, int] = {}
        for entry in stale:
            eid = reply_text(entry["message_id"])
            times = int(entry["times_delivered"])
            if times >= self.spec.max_deliveries:
                reason = self._errors.pop(eid, None) or "no success"
                await self._dead(index, eid, f"delivered {times} times: {reason}")
            else:
                take[eid] = times + 1
        if not take:
            return

        async def claim(client: Any) -> Any:
            return await client.xclaim(sk.events, self.group, self.name, self.lease_ms, list(take))

        entries = [e for e in await self.backend.execute(sk.slot, claim) if e and e[1] is not None]
        if entries:
            self.stats.claimed += len(entries)
            log.warning("%s: claimed %d stale events of partition %d", self.label, len(entries),
                        index)  # fmt: skip
            await self._handle_batch(index, entries, take)


async def group_state(backend: AsyncBackend, sk: StreamKeys, group: str) -> tuple[int, int | None]:
    """Of ``group`` on one partition: the events trimmed before it read them (see
    :func:`~clusterq.streams.trimmed_unread`), and its lag (None when Redis cannot say)."""

    async def read(client: Any) -> Any:
        return await client.xinfo_stream(sk.events), await client.xinfo_groups(sk.events)

    info, groups = await backend.execute(sk.slot, read)
    lag = next((g.get("lag") for g in groups if reply_text(g.get("name")) == group), None)
    return trimmed_unread(info, groups, group), None if lag is None else int(lag)
