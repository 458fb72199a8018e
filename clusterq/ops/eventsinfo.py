"""What ``clusterq events`` and ``task inspect`` read of a queue's lifecycle events (see
:mod:`clusterq.taskevents`): the events of a queue (a partitioned queue's merged) and the
timeline of one task."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from clusterq.cluster.backend import Backend
from clusterq.taskevents import TaskEvent, events_cap, read


class _Inspector(Protocol):
    backend: Backend

    def members(self, name: str) -> tuple[str, ...]: ...


class InspectorEvents:
    """The lifecycle-event views of :class:`~clusterq.ops.inspector.Inspector`."""

    def events(
        self: _Inspector,
        queue: str,
        *,
        task_id: str | None = None,
        follow: bool = False,
        since: float | str | None = None,
        count: int | None = None,
    ) -> Iterator[TaskEvent]:
        """``queue``'s lifecycle events (a partitioned queue's merged in time order); see
        :func:`clusterq.taskevents.read`."""
        members = self.members(queue)
        return read(self.backend, members, task_id=task_id, follow=follow, since=since, count=count)

    def events_on(self: _Inspector, queue: str) -> bool:
        """Whether ``queue``'s events are on (of a partitioned queue: of any partition)."""
        return any(events_cap(self.backend, member) for member in self.members(queue))

    def timeline(self: _Inspector, queue: str, task_id: str) -> list[TaskEvent] | None:
        """One task's events, oldest first (those still in the capped stream); None when
        the events of the queue (of every partition) are off."""
        if not InspectorEvents.events_on(self, queue):
            return None
        return list(read(self.backend, self.members(queue), task_id=task_id))
