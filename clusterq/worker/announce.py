"""A worker's announcement: who it is, what it serves, its counters and its recent queue
events, written every ANNOUNCE_INTERVAL (and at once after a queue event) as one field
of ``<prefix>:workers``, with an expiry. :class:`WorkerAnnouncement` is the one shape,
written here and read by ``clusterq worker ls``, the drills and the worker processes
that tools start; entries that do not parse, or whose expiry passed, are not live.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from clusterq.broker import timeline as timeline_script
from clusterq.cluster.abackend import AsyncBackend
from clusterq.cluster.changes import TopologyEvent
from clusterq.events import QueueResumed, QueueUnavailable, timeline_record
from clusterq.slots import keyslot
from clusterq.worker.state import RunState

log = logging.getLogger("clusterq.worker")

ANNOUNCE_INTERVAL = 2.0
ANNOUNCE_TTL = 10.0
#: Queue events (unavailable / resumed) an announcement carries, newest last.
RECENT_EVENTS = 20
#: Announcements that expired this long ago are deleted (workers that were killed).
FORGET_AFTER = 60.0
#: How often an announcer looks whether its worker went idle with new counts.
IDLE_CHECK = 0.25
#: No worker announces an expiry further ahead than this.
MAX_AHEAD = 2 * ANNOUNCE_TTL


@dataclass(frozen=True)
class WorkerAnnouncement:
    """A worker as it last announced itself."""

    id: str
    host: str
    pid: int
    queues: dict[str, int]
    concurrency: int
    started: float | None
    #: Handlers running when the announcement was written.
    active: int
    processed: int
    failed: int
    expires: float
    strict_priority: bool = False
    #: Times one of the worker's loops stopped and was started again.
    loop_restarts: int = 0
    #: When this announcement was written (unix time).
    at: float = 0.0
    #: Recent queue events: ``{"event", "queue", "node", "at", "outage"?}``, newest last.
    events: tuple[dict[str, Any], ...] = field(default_factory=tuple)
    #: The stream consumers it runs (``stream:group``).
    streams: tuple[str, ...] = ()
    #: For one of the processes of ``worker run --processes N``: its supervisor's id and
    #: its number there (0..N-1); None for a worker on its own.
    supervisor: str | None = None
    process: int | None = None

    def live(self, now: float | None = None) -> bool:
        """Not expired, and not claiming an expiry further ahead than a worker writes
        (an entry that does is not a worker's: it would otherwise be listed for ever)."""
        now = time.time() if now is None else now
        return now < self.expires <= now + MAX_AHEAD

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["events"] = list(self.events)
        out["streams"] = list(self.streams)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, raw: str | bytes) -> WorkerAnnouncement | None:
        """The announcement in ``raw``, or None if it is not one."""
        try:
            data = json.loads(raw)
            known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
            known["events"] = tuple(e for e in known.get("events", ()) if isinstance(e, dict))
            known["streams"] = tuple(str(x) for x in known.get("streams", ()))
            announcement = cls(**known)
            float(announcement.expires)
        except (ValueError, KeyError, TypeError):
            return None
        return announcement


def parse_announcements(
    entries: Mapping[Any, Any], *, live_only: bool = True
) -> list[WorkerAnnouncement]:
    """Announcements from the ``workers`` hash (field -> JSON), by id; bad ones skipped."""
    now = time.time()
    out = []
    for raw in entries.values():
        announcement = WorkerAnnouncement.from_json(raw)
        if announcement is not None and (announcement.live(now) or not live_only):
            out.append(announcement)
    return sorted(out, key=lambda a: a.id)


async def read_announcements(
    backend: AsyncBackend, *, live_only: bool = True
) -> list[WorkerAnnouncement]:
    key = backend.keys.workers
    entries = await backend.execute_key(key, lambda c: c.hgetall(key))
    return parse_announcements(entries, live_only=live_only)


def event_record(event: TopologyEvent) -> dict[str, Any] | None:
    """What an announcement keeps of a worker event (queue events only)."""
    if isinstance(event, QueueUnavailable):
        return {"event": event.kind, "queue": event.queue, "node": event.node, "at": event.at}
    if isinstance(event, QueueResumed):
        return {
            "event": event.kind,
            "queue": event.queue,
            "node": event.node,
            "at": event.at,
            "outage": round(event.outage, 3),
        }
    return None


class Announcer:
    """Writes a worker's announcement until it closes; deletes it on a graceful stop."""

    def __init__(
        self,
        backend: AsyncBackend,
        worker_id: str,
        describe: Callable[[], dict[str, Any]],
        run_state: RunState,
    ) -> None:
        self.backend = backend
        self.worker_id = worker_id
        self.describe = describe
        self.run_state = run_state
        self.events: list[dict[str, Any]] = []
        #: Events not yet in the failover timeline (kept through a failed write).
        self.timeline: list[tuple[str, str]] = []
        self._wake = asyncio.Event()

    def note(self, event: TopologyEvent) -> None:
        """Keep an event for the failover timeline, and a queue event for the next
        announcement; make that one soon."""
        self.timeline.append(timeline_record(event))
        del self.timeline[: -RECENT_EVENTS * 5]
        self._wake.set()
        record = event_record(event)
        if record is not None:
            self.events.append(record)
            del self.events[:-RECENT_EVENTS]

    def announcement(self) -> WorkerAnnouncement:
        now = time.time()
        return WorkerAnnouncement(
            id=self.worker_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            expires=now + ANNOUNCE_TTL,
            at=now,
            events=tuple(self.events),
            **self.describe(),
        )

    async def loop(self) -> None:
        workers = self.backend.keys.workers
        rounds = 0
        while not self.run_state.closing:
            rounds += 1
            if rounds % 30 == 1:
                await self._forget_dead(workers)
            data = self.announcement().to_json()

            async def publish(client: Any, data: str = data) -> Any:
                pipe = client.pipeline(transaction=False)
                pipe.hset(workers, self.worker_id, data)
                pipe.expire(workers, int(ANNOUNCE_TTL * 6))  # gone if no worker is left
                return await pipe.execute()

            try:
                await self.backend.execute_key(workers, publish, timeout=ANNOUNCE_INTERVAL)
            except Exception as exc:
                log.debug("announce failed (%s)", exc)
            await self._record_timeline()
            self._wake.clear()
            published = self._counts()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._next(published), ANNOUNCE_INTERVAL)

    async def _record_timeline(self) -> None:
        """Write the events noted since into the failover timeline (each once, whoever
        saw it first); kept for the next round if the timeline's master is down."""
        records = list(self.timeline)
        if not records:
            return
        keys, args = timeline_script.build(self.backend.keys, records)
        try:
            await self.backend.run_script(
                timeline_script.SCRIPT, keyslot(keys[0]), keys, args, timeout=ANNOUNCE_INTERVAL
            )
        except Exception as exc:
            log.debug("failover timeline not written (%s); next round", exc)
            return
        del self.timeline[: len(records)]

    def _counts(self) -> tuple[Any, ...]:
        described = self.describe()
        return (described["active"], described["processed"], described["failed"])

    async def _next(self, published: tuple[Any, ...]) -> None:
        """Return at a queue event, or soon after the worker went idle with counts the
        last announcement did not have (so ``worker ls`` right after a batch of work
        shows what was done, not what was done two seconds before)."""
        last = published
        while not self._wake.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), IDLE_CHECK)
            counts = self._counts()
            # idle: nothing running and nothing done since the last look (a busy worker
            # between two batches is not idle), with counts not yet announced
            if counts != published and counts[0] == 0 and counts == last:
                return
            last = counts

    async def withdraw(self) -> None:
        """Remove this worker's announcement (graceful stop)."""
        workers = self.backend.keys.workers
        with contextlib.suppress(Exception):
            await self.backend.execute_key(
                workers, lambda c: c.hdel(workers, self.worker_id), timeout=2
            )

    async def _forget_dead(self, workers: str) -> None:
        """Remove announcements that expired a while ago (workers that were killed)."""
        try:
            entries = await self.backend.execute_key(
                workers, lambda c: c.hgetall(workers), timeout=1
            )
            now = time.time()
            dead = []
            for worker_id, raw in entries.items():
                announcement = WorkerAnnouncement.from_json(raw)
                if (
                    announcement is None
                    or announcement.expires < now - FORGET_AFTER
                    or announcement.expires > now + MAX_AHEAD
                ):
                    dead.append(worker_id)
            if dead:
                await self.backend.execute_key(workers, lambda c: c.hdel(workers, *dead), timeout=1)
        except Exception as exc:
            log.debug("could not clean up dead workers (%s)", exc)
