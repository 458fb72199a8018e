"""An operator's actions on queues and tasks: pause and resume a queue, delete, archive
or run tasks (one by one, or in bulk by state and type), purge a state, remove a queue.

Every action runs on the queue's own master in bounded batches (:data:`BATCH` tasks per
script call; nothing reads a whole queue at once), and each task is checked by the script
at the moment it is acted on, so an action is safe while workers are busy: an active task
(one a worker holds under a lease) is never deleted or moved, except by ``remove_queue``
with ``force``, after which that worker's acknowledgement is refused by the fencing rules
(its lease is gone) rather than resurrecting the task.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis

from clusterq.broker import limits as limits_script
from clusterq.broker import manage
from clusterq.errors import ClusterqError
from clusterq.keys import QueueKeys, validate_task_id
from clusterq.limits import LimitOptions, Limits
from clusterq.ops.inspector import Inspector, parse_state, stored_meta
from clusterq.task import TaskState
from clusterq.taskevents import DEFAULT_MAXLEN, set_events

if TYPE_CHECKING:
    from typing_extensions import Unpack

#: Tasks per script call in bulk actions.
BATCH = 200

#: ``progress(done, total)`` after each batch of a bulk action.
Progress = Callable[[int, int], None]


class QueueNotEmpty(ClusterqError):
    """``remove_queue`` without ``force`` on a queue that still holds tasks."""


@dataclass
class BulkResult:
    """What a bulk action did: tasks acted on, and tasks looked at but left alone (of
    another type, in another state by the time the script reached them, or active)."""

    done: int = 0
    skipped: int = 0
    statuses: dict[str, int] = field(default_factory=dict)

    def add(self, statuses: Iterable[str]) -> None:
        for status in statuses:
            self.statuses[status] = self.statuses.get(status, 0) + 1
            if status == "ok":
                self.done += 1
            else:
                self.skipped += 1


class Admin(Inspector):
    """:class:`Inspector` with the actions an operator takes. On a partitioned queue
    each action applies to all its partitions (see :meth:`Inspector.members`)."""

    # ------------------------------------------------------------------ queues

    def pause(self, queue: str) -> None:
        """Stop workers taking tasks from ``queue`` (each worker notices at its next
        fetch; tasks already running finish). Enqueues still work."""
        for member in self.members(queue):
            paused = self.keys.queue(member).paused
            self.backend.call(paused, "SET", paused, "1", timeout=self.timeout)

    def unpause(self, queue: str) -> None:
        for member in self.members(queue):
            qk = self.keys.queue(member)
            self.backend.call(qk.paused, "DEL", qk.paused, timeout=self.timeout)
            # Wake the waiting workers now (else their survey finds out within a second);
            # best effort: Redis < 7 has no SPUBLISH, an ACL may not allow it.
            with contextlib.suppress(redis.RedisError, ClusterqError):
                self.backend.call(qk.wake, "SPUBLISH", qk.wake, "", timeout=self.timeout)

    def set_limits(self, queue: str, **options: Unpack[LimitOptions]) -> Limits | None:
        """See :meth:`clusterq.Client.set_limits`."""
        limits, layout = Limits.of(**options), self.layouts().get(queue)
        parts = len(layout.queues) if layout else 1
        limits_script.store(self.backend, self.members(queue), limits, parts)
        return limits.declared

    def purge(
        self, queue: str, state: TaskState | str, *, progress: Progress | None = None
    ) -> BulkResult:
        """Delete every task in ``state`` (not ``active``: cancel those, or stop the
        workers first)."""
        return self.act_all("delete", queue, state, progress=progress)

    def remove_queue(self, queue: str, *, force: bool = False) -> BulkResult:
        """Delete the queue's keys and take it out of the registry. Refused with
        :class:`QueueNotEmpty` while it holds tasks (completed ones aside) unless
        ``force``: then every task is deleted first, active ones included. A partitioned
        queue is removed with all its partitions, and its declaration."""
        members = self.members(queue)
        if len(members) > 1:
            infos = [self.queue(m) for m in members]
            held = sum(i.size for i in infos)
            if held and not force:
                raise QueueNotEmpty(
                    f"partitioned queue {queue!r} still holds {held} task(s) in its "
                    f"{len(members)} queues; remove it with force to delete them"
                )
            result = BulkResult()
            for member in members:
                part = self._remove_one(member, force=True)
                result.done += part.done
                result.skipped += part.skipped
            key = self.keys.layouts
            self.backend.execute_key(key, lambda c: c.hdel(key, queue), timeout=self.timeout)
            return result
        return self._remove_one(queue, force=force)

    def _remove_one(self, queue: str, *, force: bool) -> BulkResult:
        qk = self.keys.queue(queue)
        info = self.queue(queue)
        if info.error:
            raise ClusterqError(f"queue {queue!r}: {info.error}")
        result = BulkResult()
        if info.size and not force:
            raise QueueNotEmpty(
                f"queue {queue!r} still holds {info.size} task(s) (pending {info.pending}, "
                f"active {info.active}, scheduled {info.scheduled}, retry {info.retry}, "
                f"archived {info.archived}); remove it with force to delete them"
            )
        for state in TaskState:
            self._act_all_in(queue, "delete", state, result, None, None, True)
        self.backend.execute(qk.slot, lambda c: c.delete(*qk.all_keys()), timeout=self.timeout)
        registry = self.keys.queues
        self.backend.execute_key(registry, lambda c: c.srem(registry, queue), timeout=self.timeout)
        return result

    def set_events(self, queue: str, on: bool, maxlen: int = DEFAULT_MAXLEN) -> list[str]:
        """Turn ``queue``'s lifecycle events on or off (each partition of a partitioned
        queue); returns the queues changed (see :mod:`clusterq.taskevents`)."""
        members = self.members(queue)
        set_events(self.backend, members, on, maxlen)
        return list(members)

    # ------------------------------------------------------------------ tasks

    def delete(self, queue: str, task_ids: Sequence[str]) -> dict[str, str]:
        """Delete tasks (any state but active); per id: ``ok`` or why not."""
        return self.act("delete", queue, task_ids)

    def archive(self, queue: str, task_ids: Sequence[str]) -> dict[str, str]:
        """Move pending, scheduled or retry tasks to the archive."""
        return self.act("archive", queue, task_ids)

    def run(self, queue: str, task_ids: Sequence[str]) -> dict[str, str]:
        """Make scheduled, retry or archived tasks pending now. An archived task gets one
        more attempt (its retries were used up)."""
        return self.act("run", queue, task_ids)

    def cancel(self, queue: str, task_ids: Sequence[str]) -> dict[str, str]:
        """Ask the workers that run these active tasks to cancel them: each is told at
        its next lease renewal (a quarter of the lease, 2.5 s by default); an ``async``
        handler is cancelled, a plain function's result is thrown away when it returns;
        either way the task is archived with the error "cancelled by an operator".
        Per id: ``ok`` (asked), or why not (``state:<state>`` when not active)."""
        return self.act("cancel", queue, task_ids)

    def act(self, action: manage.Action, queue: str, task_ids: Sequence[str]) -> dict[str, str]:
        """``action`` on each of ``task_ids``; per id: ``ok``, ``missing``,
        ``state:<state>`` (the action does not apply to that state), or ``active``."""
        ids = [validate_task_id(task_id) for task_id in task_ids]
        out: dict[str, str] = {}
        for member in self.members(queue):  # a partitioned queue: each id where it is
            qk = self.keys.queue(member)
            missing = [i for i in ids if out.get(i, "missing") == "missing"]
            for start in range(0, len(missing), BATCH):
                batch = missing[start : start + BATCH]
                for task_id, status in zip(batch, self._apply(qk, action, batch), strict=True):
                    out[task_id] = status
        return {task_id: out[task_id] for task_id in ids}

    def act_all(
        self,
        action: manage.Action,
        queue: str,
        state: TaskState | str,
        *,
        task_type: str | None = None,
        progress: Progress | None = None,
        force: bool = False,
    ) -> BulkResult:
        """``action`` on every task in ``state`` (of ``task_type`` if given), in batches.

        Walks the state from its oldest end; the tasks it leaves alone (another type)
        are stepped over, and it stops after as many tasks as the state held when it
        began, so tasks arriving meanwhile cannot keep it going."""
        chosen = parse_state(state)
        if chosen == TaskState.ACTIVE and not force:
            raise ValueError(
                "active tasks are held by workers: they cannot be deleted, archived or run "
                "(cancel them, or remove the queue with force)"
            )
        result = BulkResult()
        for member in self.members(queue):  # a partitioned queue: each partition
            self._act_all_in(member, action, chosen, result, task_type, progress, force)
        return result

    def _act_all_in(
        self,
        queue: str,
        action: manage.Action,
        chosen: TaskState,
        result: BulkResult,
        task_type: str | None,
        progress: Progress | None,
        force: bool,
    ) -> None:
        qk = self.keys.queue(queue)
        total = self._size(qk, chosen)
        offset = seen = 0
        while seen < total:
            ids = self.task_ids(queue, chosen, offset=offset, limit=min(BATCH, total - seen))
            if not ids:
                break
            # where each is in a pending list, from its oldest end (the listing's order)
            positions = (
                [-(offset + k + 1) for k in range(len(ids))]
                if chosen == TaskState.PENDING
                else None
            )
            statuses = self._apply(
                qk,
                action,
                ids,
                state=chosen.value,
                task_type=task_type or "",
                force=force,
                positions=positions,
            )
            result.add(statuses)
            seen += len(ids)
            # what was left alone is still there: step over it next time
            offset += sum(1 for s in statuses if s in ("type", "active"))
            if progress is not None:
                progress(seen, total)

    def _size(self, qk: QueueKeys, state: TaskState) -> int:
        if state == TaskState.PENDING:
            fn: Any = lambda c: c.llen(qk.pending) + c.zcard(qk.fair)  # noqa: E731
        else:
            key = getattr(qk, state.value)
            fn = lambda c: c.zcard(key)  # noqa: E731
        return int(self.backend.execute(qk.slot, fn, timeout=self.timeout))

    def _apply(
        self,
        qk: QueueKeys,
        action: manage.Action,
        ids: Sequence[str],
        *,
        state: str = "",
        task_type: str = "",
        force: bool = False,
        positions: Sequence[int] | None = None,
    ) -> list[str]:
        records = self.backend.execute(
            qk.slot, lambda c: c.hmget(qk.tasks, list(ids)), timeout=self.timeout
        )
        targets = []
        for n, (task_id, raw) in enumerate(zip(ids, records, strict=True)):
            lock = stored_meta(raw).get("u")
            position = positions[n] if positions is not None else 0
            targets.append(
                manage.Target(task_id, lock if isinstance(lock, str) else None, position)
            )
        keys, args = manage.build(
            qk, action, targets, state=state, task_type=task_type, force=force
        )

        def call(client: Any) -> Any:
            return manage.SCRIPT.call(client, keys, args)

        try:
            return manage.parse(self.backend.execute(qk.slot, call, timeout=self.timeout))
        except redis.ResponseError as exc:
            raise ClusterqError(f"queue {qk.queue!r}: {action} failed: {exc}") from None


class AsyncAdmin:
    """The asyncio twin of :class:`Admin`: the same methods, awaited. Each call runs the
    sync one in a worker thread (``asyncio.to_thread``), so a slow or failing master
    never blocks the event loop; calls are serialised (one backend, used by one thread
    at a time)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.admin = Admin(*args, **kwargs)
        self._lock = asyncio.Lock()

    async def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        async with self._lock:
            return await asyncio.to_thread(getattr(self.admin, name), *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.admin, name)
        if not callable(attr) or name.startswith("_"):
            return attr

        async def call(*args: Any, **kwargs: Any) -> Any:
            return await self._call(name, *args, **kwargs)

        call.__name__ = name
        call.__doc__ = attr.__doc__
        return call

    async def aclose(self) -> None:
        await self._call("close")

    async def __aenter__(self) -> AsyncAdmin:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
