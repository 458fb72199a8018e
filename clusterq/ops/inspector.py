"""Read-only views for operators: queues (sizes, counters, latency, history, where they
live), their tasks (listed by state, one inspected), and the live workers.

The CLI, the dashboard and the metrics exporter render what this module returns;
scripts can use it directly. :mod:`clusterq.ops.admin` adds the actions.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import redis

from clusterq.broker import limits as limits_script
from clusterq.cluster.backend import Backend
from clusterq.cluster.connection import DEFAULT_URL, Mode, RedisURL
from clusterq.cluster.topology import Topology
from clusterq.errors import ClusterqError, InvalidName, TaskNotFound
from clusterq.keys import (
    DEFAULT_PREFIX,
    QueueKeys,
    parse_fair_member,
    validate_queue_name,
    validate_task_id,
)
from clusterq.limits import Limits
from clusterq.ops.eventsinfo import InspectorEvents
from clusterq.ops.groupinfo import QueueGroups, read_groups
from clusterq.ops.queueinfo import (
    HISTORY_MINUTES,
    Minute,
    NodeTotals,
    QueueDetail,
    QueueInfo,
    Summary,
    count_commands,
    history_from_stats,
    read_counts,
    stored_meta,
)
from clusterq.ops.streaminfo import (
    StreamPartitionInfo,
    read_stream_layouts,
    stream_partitions,
)
from clusterq.partitions import Layout, Layouts, partition_marks
from clusterq.streams import StreamLayout
from clusterq.task import STATES, TaskInfo, TaskState
from clusterq.taskinfo import info_commands, info_values, task_info
from clusterq.worker.announce import WorkerAnnouncement, parse_announcements
from clusterq.workflow import WorkflowInfo, read_workflow

__all__ = [
    "HISTORY_MINUTES",
    "MAX_PAGE",
    "Inspector",
    "Minute",
    "NodeTotals",
    "QueueDetail",
    "QueueInfo",
    "Summary",
    "TaskDetail",
    "WorkerInfo",
    "history_from_stats",
    "parse_state",
    "stored_meta",
]

#: How long one queue's counts may take (through retries) before it is shown as an error.
DEFAULT_INSPECT_TIMEOUT = 3.0
#: Records read per call when counting a queue's tasks by type.
SCAN_BATCH = 500
#: The most tasks one listing returns.
MAX_PAGE = 1000


_Self = TypeVar("_Self", bound="Inspector")

#: A live worker, as it last announced itself (kept under its old name).
WorkerInfo = WorkerAnnouncement


@dataclass(frozen=True)
class TaskDetail:
    """One task, as ``task inspect`` shows it: what :class:`TaskInfo` says, and for an
    active task which worker holds it (the fencing token) and until when."""

    info: TaskInfo
    lease_token: str | None = None
    lease_expires: float | None = None

    @property
    def worker(self) -> str | None:
        """The id of the worker that holds the task (tokens are ``id:run:seq``)."""
        if self.lease_token is None:
            return None
        return self.lease_token.rsplit(":", 2)[0]

    def to_dict(self) -> dict[str, Any]:
        out = self.info.to_dict()
        out["lease_token"] = self.lease_token
        out["lease_expires"] = self.lease_expires
        out["worker"] = self.worker
        return out


class Inspector(InspectorEvents):
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
        self._layouts = Layouts()

    # ------------------------------------------------------------------ partitioned queues

    def layouts(self) -> dict[str, Layout]:
        """The declarations of the partitioned queues, by name (read at most every
        LAYOUT_TTL seconds)."""
        if self._layouts.due():
            key = self.keys.layouts
            entries = self.backend.execute_key(key, lambda c: c.hgetall(key), timeout=self.timeout)
            self._layouts.loaded(entries)
        return dict(self._layouts.by_name)

    def members(self, name: str) -> tuple[str, ...]:
        """The queues behind ``name``: a partitioned queue's members, or ``(name,)``."""
        validate_queue_name(name)
        layout = self.layouts().get(name)
        return layout.members if layout is not None else (name,)

    def limits(self, queue: str) -> Limits | None:
        """The limits declared on ``queue`` (None: none); see :mod:`clusterq.limits`."""
        return limits_script.load(self.backend, self.members(queue)[0])

    def groups(self, queue: str) -> list[QueueGroups]:
        """The fair groups of ``queue`` (one entry per partition of a partitioned
        queue): tasks waiting and running per group, when each may start its next."""
        return [
            read_groups(self.backend, member, self.keys.queue(member), timeout=self.timeout)
            for member in self.members(queue)
        ]

    def close(self) -> None:
        if self._owns_backend:
            self.backend.close()

    def __enter__(self: _Self) -> _Self:
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
        """Location and counts of one queue (registered or not). A key holding what
        clusterq does not write (another type, a counter that is not a number) is this
        queue's ``error``, naming the key; what could be read is still shown."""
        validate_queue_name(name)
        qk = self.keys.queue(name)
        commands = count_commands(qk)

        def counts(client: Any) -> list[Any]:
            return list(client.fast_pipeline(commands))

        try:
            values = self.backend.execute(qk.slot, counts, timeout=self.timeout)
        except (ClusterqError, redis.RedisError) as exc:
            return self._located(name, error=str(exc))
        fields, problems = read_counts(qk, values)
        try:
            oldest = values[-1] if not isinstance(values[-1], Exception) else None
            fields["latency"] = self._latency(qk, oldest)
            first = values[-2] if isinstance(values[-2], list) and values[-2] else None
            parsed = parse_fair_member(first[0]) if first else None
            if parsed and parsed[1]:  # the first group's oldest (groups in name order)
                fields["latency"] = max(fields["latency"], time.time() - parsed[1] / 1000.0)
        except (ClusterqError, redis.RedisError) as exc:
            problems.append(f"{qk.tasks}: {exc}")
        # Located after the counts: the map may have changed while the call retried.
        return self._located(name, **fields, error="; ".join(problems) or None)

    def _latency(self, qk: QueueKeys, oldest: bytes | None) -> float:
        """Seconds since the oldest pending task (the list's right end) was enqueued."""
        if oldest is None:
            return 0.0
        raw = self.backend.execute(
            qk.slot, lambda c: c.hget(qk.tasks, oldest), timeout=self.timeout
        )
        enqueued = stored_meta(raw).get("e")
        if not isinstance(enqueued, int) or enqueued <= 0:
            return 0.0
        return max(0.0, time.time() - enqueued / 1000.0)

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
        """:meth:`queue` for each registered queue (or each of ``names``); partitioned
        queues with all their partitions, each marked (``partition_of``)."""
        chosen = set(names) if names is not None else set(self.queue_names())
        marks = partition_marks(self.layouts().values(), chosen, every=names is None)
        ordered = sorted(chosen)
        self.backend.note_queues(ordered)
        return [replace(self.queue(name), **marks.get(name, {})) for name in ordered]

    def stats(self) -> Summary:
        """Every queue, the sums per master that owns them, and the live workers."""
        queues = self.queues()
        by_node: dict[str, dict[str, Any]] = {}
        for q in queues:
            if q.error or q.master is None:
                continue
            totals = by_node.setdefault(q.master, {"master": q.master, "queues": 0})
            totals["queues"] += 1
            for name in ("pending", "active", "scheduled", "retry", "archived", "processed",
                         "failed"):  # fmt: skip
                totals[name] = totals.get(name, 0) + getattr(q, name)
            totals["latency"] = max(totals.get("latency", 0.0), q.latency)
        workers = self.workers()
        return Summary(
            nodes=[NodeTotals(**by_node[addr]) for addr in sorted(by_node)],
            queues=queues,
            workers=len(workers),
            running=sum(w.active for w in workers),
            concurrency=sum(w.concurrency for w in workers),
        )

    # ------------------------------------------------------------------ streams

    def stream_layouts(self) -> dict[str, StreamLayout]:
        """Every declared stream, by name."""
        return read_stream_layouts(self.backend, self.timeout)

    def streams(self, names: Iterable[str] | None = None) -> list[StreamPartitionInfo]:
        """Each partition of each stream (or of ``names``): node, length, groups."""
        return stream_partitions(self.backend, names, self.timeout)

    # ------------------------------------------------------------------ one queue, closer

    def queue_detail(self, name: str, *, types: bool = False) -> QueueDetail:
        """:meth:`queue`, the memory its keys use, its per-minute history and, with
        ``types``, its tasks counted by type (read in batches of :data:`SCAN_BATCH`)."""
        info = self.queue(name)
        qk = self.keys.queue(name)
        return QueueDetail(
            info=info,
            memory=self._memory(qk),
            history=self.history(name),
            types=self._types(qk) if types else None,
        )

    def history(self, name: str) -> list[Minute]:
        """Processed and failed per minute for the last :data:`HISTORY_MINUTES` minutes,
        oldest first; minutes without activity are left out."""
        qk = self.keys.queue(name)
        fields = self.backend.execute_key(
            qk.stats, lambda c: c.hgetall(qk.stats), timeout=self.timeout
        )
        return history_from_stats(fields, time.time())

    def _memory(self, qk: QueueKeys) -> int | None:
        def usage(client: redis.Redis) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for key in qk.all_keys():
                pipe.memory_usage(key, samples=5)
            return pipe.execute(raise_on_error=False)

        try:
            values = self.backend.execute(qk.slot, usage, timeout=self.timeout)
        except redis.ResponseError:
            return None
        if any(isinstance(v, Exception) for v in values):
            return None  # MEMORY not allowed for this user
        return sum(int(v or 0) for v in values)

    def _types(self, qk: QueueKeys) -> dict[str, int]:
        counts: dict[str, int] = {}
        completed = set(self._zset_ids(qk.completed))
        cursor = 0
        while True:

            def scan(client: redis.Redis, at: int = cursor) -> Any:
                return client.hscan(qk.tasks, at, count=SCAN_BATCH)

            cursor, batch = self.backend.execute(qk.slot, scan, timeout=self.timeout)
            for task_id, raw in batch.items():
                if task_id in completed:
                    continue
                kind = stored_meta(raw).get("t")
                label = kind if isinstance(kind, str) else "(unreadable)"
                counts[label] = counts.get(label, 0) + 1
            if int(cursor) == 0:
                return dict(sorted(counts.items()))

    def _zset_ids(self, key: str) -> list[bytes]:
        ids: list[bytes] = []
        start = 0
        while True:

            def page(client: redis.Redis, at: int = start) -> Any:
                return client.zrange(key, at, at + SCAN_BATCH - 1)

            batch = self.backend.execute_key(key, page, timeout=self.timeout)
            ids += batch
            if len(batch) < SCAN_BATCH:
                return ids
            start += SCAN_BATCH

    # ------------------------------------------------------------------ tasks

    def task_ids(
        self,
        queue: str,
        state: TaskState | str,
        *,
        offset: int = 0,
        limit: int = 20,
        newest_first: bool = False,
    ) -> list[str]:
        """Ids of the tasks in ``state``, oldest first (pending: next to run first;
        scheduled/retry: due first) unless ``newest_first``; one page."""
        chosen = parse_state(state)
        if offset < 0 or not 1 <= limit <= MAX_PAGE:
            raise ValueError(f"offset must be >= 0 and limit 1..{MAX_PAGE}")
        qk = self.keys.queue(queue)
        end = offset + limit - 1
        if chosen == TaskState.PENDING:
            fn: Any = functools.partial(_pending_page, qk, offset, end, newest_first)
        else:
            key = getattr(qk, chosen.value)
            fn = lambda c: c.zrange(key, offset, end, desc=newest_first)  # noqa: E731
        ids = self.backend.execute(qk.slot, fn, timeout=self.timeout)
        return [i.decode(errors="replace") if isinstance(i, bytes) else str(i) for i in ids]

    def tasks(
        self,
        queue: str,
        state: TaskState | str,
        *,
        offset: int = 0,
        limit: int = 20,
        newest_first: bool = False,
    ) -> list[TaskInfo]:
        """One page of the tasks in ``state`` (see :meth:`task_ids`), each as a
        :class:`TaskInfo`; a task that left the state meanwhile is left out. For a
        partitioned queue, the page runs over its partitions one after the other."""
        out = []
        members = self.members(queue)
        if len(members) == 1:
            pages = [(queue, offset, limit)]
        else:  # read offset + limit from each, then cut the page out of the whole
            pages = [(m, 0, min(MAX_PAGE, offset + limit)) for m in members]
        for member, start, count in pages:
            for task_id in self.task_ids(
                member, state, offset=start, limit=count, newest_first=newest_first
            ):
                try:
                    out.append(self._task(member, task_id).info)
                except (TaskNotFound, ValueError):
                    continue
        return out if len(members) == 1 else out[offset : offset + limit]

    def task(self, queue: str, task_id: str) -> TaskDetail:
        """One task: its record, payload, state, retries, last error, result, and for an
        active task the lease's token (which worker) and expiry. Raises
        :class:`TaskNotFound`."""
        validate_task_id(task_id)
        members = self.members(queue)
        for member in members[:-1]:  # a partitioned queue: the partition that has it
            try:
                return self._task(member, task_id)
            except TaskNotFound:
                continue
        try:
            return self._task(members[-1], task_id)
        except TaskNotFound:
            if len(members) == 1:
                raise
            raise TaskNotFound(
                f"no task {task_id!r} in partitioned queue {queue!r} ({len(members)} queues)"
            ) from None

    def _task(self, queue: str, task_id: str) -> TaskDetail:
        qk = self.keys.queue(queue)
        commands = [*info_commands(qk, task_id), ("HGET", qk.leases, task_id)]

        def read(client: redis.Redis) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)  # type: ignore[no-untyped-call]
            return pipe.execute(raise_on_error=False)

        values = info_values(self.backend.execute(qk.slot, read, timeout=self.timeout))
        info = task_info(queue, task_id, values[:-1])
        token = values[-1]
        return TaskDetail(
            info=info,
            lease_token=token.decode(errors="replace") if isinstance(token, bytes) else token,
            lease_expires=info.next_process_at if info.state == TaskState.ACTIVE else None,
        )

    # ------------------------------------------------------------------ workflows

    def workflow(self, workflow_id: str) -> WorkflowInfo:
        """A workflow's status, result and each step's state (``workflow inspect``)."""
        return read_workflow(self.backend, workflow_id, self.timeout)


def parse_state(state: TaskState | str) -> TaskState:
    chosen = STATES.get(str(state))
    if chosen is None:
        raise ValueError(f"state must be one of {', '.join(STATES)}, got {state!r}")
    return chosen


def _pending_page(qk: QueueKeys, offset: int, end: int, newest_first: bool, c: Any) -> list[Any]:
    """Ids ``offset..end`` of the pending tasks: the pending list's (producers push on
    the left, workers take from the right), then those waiting in fair groups (group by
    group, each oldest first)."""
    size = int(c.llen(qk.pending))
    ids: list[Any] = []
    if offset < size:
        if newest_first:
            ids = list(c.lrange(qk.pending, offset, end))
        else:
            ids = list(reversed(c.lrange(qk.pending, -end - 1, -offset - 1)))
    if end >= size:
        members = c.zrange(qk.fair, max(0, offset - size), end - size, desc=newest_first)
        ids += [parsed[2] for parsed in map(parse_fair_member, members) if parsed]
    return ids
