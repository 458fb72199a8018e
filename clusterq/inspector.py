"""Read-only views for operators: queues, their sizes and where they live.

The CLI renders what this module returns; scripts and dashboards can use it directly.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from clusterq.cluster.backend import Backend
from clusterq.cluster.connection import DEFAULT_URL, Mode, RedisURL
from clusterq.cluster.topology import Topology
from clusterq.errors import ClusterqError, InvalidName
from clusterq.keys import DEFAULT_PREFIX, validate_queue_name
from clusterq.worker.announce import WorkerAnnouncement, parse_announcements

#: How long one queue's counts may take (through retries) before it is shown as an error.
DEFAULT_INSPECT_TIMEOUT = 3.0


#: A live worker, as it last announced itself (kept under its old name).
WorkerInfo = WorkerAnnouncement


@dataclass(frozen=True)
class QueueInfo:
    """A queue's location in the cluster and the number of tasks in each state."""

    queue: str
    keyslot: int
    master: str | None
    master_id: str | None
    replicas: list[str] = field(default_factory=list)
    pending: int = 0
    scheduled: int = 0
    retry: int = 0
    active: int = 0
    archived: int = 0
    completed: int = 0
    paused: bool = False
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Inspector:
    """Look at queues and the cluster without changing anything."""

    def __init__(
        self,
        url: str | RedisURL = DEFAULT_URL,
        *,
        mode: Mode | None = None,
        prefix: str = DEFAULT_PREFIX,
        timeout: float = DEFAULT_INSPECT_TIMEOUT,
        backend: Backend | None = None,
    ) -> None:
        self.backend = backend or Backend(url, mode=mode, prefix=prefix, retry_timeout=timeout)
        self._owns_backend = backend is None
        self.keys = self.backend.keys
        self.timeout = timeout
        #: Registry entries that are not valid queue names, left out of the last listing.
        self.skipped: list[str] = []

    def close(self) -> None:
        if self._owns_backend:
            self.backend.close()

    def __enter__(self) -> Inspector:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def topology(self) -> Topology:
        return self.backend.topology

    def refresh(self) -> Topology:
        self.backend.refresh_topology()
        return self.backend.topology

    def queue_names(self) -> list[str]:
        """Every valid queue name in the registry, sorted. Entries that are not valid
        names (written by something else) are left out and kept in :attr:`skipped`."""
        members = self.backend.execute_key(
            self.keys.queues, lambda c: c.smembers(self.keys.queues), timeout=self.timeout
        )
        names, self.skipped = [], []
        for member in members:
            name = member.decode(errors="replace") if isinstance(member, bytes) else str(member)
            try:
                names.append(validate_queue_name(name))
            except InvalidName:
                self.skipped.append(name)
        return sorted(names)

    def queue(self, name: str) -> QueueInfo:
        """Location and counts of one queue (registered or not)."""
        validate_queue_name(name)
        qk = self.keys.queue(name)

        def counts(client: redis.Redis) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            pipe.llen(qk.pending)
            for key in (qk.scheduled, qk.retry, qk.active, qk.archived, qk.completed):
                pipe.zcard(key)
            pipe.exists(qk.paused)
            return pipe.execute()

        try:
            values = self.backend.execute(qk.slot, counts, timeout=self.timeout)
        except (ClusterqError, redis.RedisError) as exc:
            return self._located(name, error=str(exc))
        pending, scheduled, retry, active, archived, completed, paused = (int(v) for v in values)
        # Located after the counts: the map may have changed while the call retried.
        return self._located(
            name,
            pending=pending,
            scheduled=scheduled,
            retry=retry,
            active=active,
            archived=archived,
            completed=completed,
            paused=bool(paused),
        )

    def _located(self, name: str, **fields: Any) -> QueueInfo:
        location = self.topology.locate(name)
        return QueueInfo(
            queue=name,
            keyslot=location.keyslot,
            master=location.master.addr if location.master else None,
            master_id=location.master.id if location.master else None,
            replicas=[r.addr for r in location.replicas],
            **fields,
        )

    def workers(self) -> list[WorkerAnnouncement]:
        """Workers whose announcement has not expired, by id."""
        key = self.keys.workers
        entries = self.backend.execute_key(key, lambda c: c.hgetall(key), timeout=self.timeout)
        return parse_announcements(entries)

    def queues(self, names: Iterable[str] | None = None) -> list[QueueInfo]:
        """:meth:`queue` for each registered queue (or each of ``names``)."""
        chosen = sorted(names) if names is not None else self.queue_names()
        self.backend.note_queues(chosen)
        return [self.queue(name) for name in chosen]
