"""What ``clusterq queue inspect`` and :meth:`Inspector.groups` show of a queue's fair
groups (``enqueue(..., group=...)``): how many tasks each has waiting, how many it runs
against its cap, and when it may start its next task (read-only).

The groups with tasks waiting (or limiter state still in force) are the members of the
queue's ``turns`` set; their tasks are ranges of its ``fair`` set, their state fields of
its ``groups`` hash (see ``broker/dequeue.lua``). Tasks still in the pending list have
not been sorted into their groups yet: they are counted as ``unsorted``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from clusterq.cluster.backend import Backend
from clusterq.keys import QueueKeys

#: Groups read per queue at most (those whose turn comes first).
MAX_GROUPS = 1000


@dataclass(frozen=True)
class GroupInfo:
    """One fair group of one queue (a partition, for a partitioned queue)."""

    group: str
    queue: str
    #: Tasks waiting in the group.
    waiting: int
    #: Tasks of the group running now, where the queue caps groups (else None).
    running: int | None
    #: Unix time (s) at which the group may start its next task: its turn, or the end
    #: of what holds it back (its rate, its cap, a hold).
    next_turn: float
    #: Unix time (s) until which a handler's ``RateLimited(scope="group")`` holds it.
    held_until: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "group": self.group,
            "queue": self.queue,
            "waiting": self.waiting,
            "running": self.running,
            "next_turn": self.next_turn,
            "held_until": self.held_until,
        }


@dataclass(frozen=True)
class QueueGroups:
    """The fair groups of one queue."""

    queue: str
    groups: list[GroupInfo] = field(default_factory=list)
    #: Pending tasks not sorted into their groups yet (the next dequeue does it).
    unsorted: int = 0
    #: More groups than :data:`MAX_GROUPS` wait: only the first were read.
    truncated: bool = False


def read_groups(backend: Backend, queue: str, qk: QueueKeys, *, timeout: float) -> QueueGroups:
    """The groups of queue ``queue`` (keys ``qk``), in the order of their turns, in two
    round trips to its master."""

    def first(client: Any) -> list[Any]:
        pipe = client.pipeline(transaction=False)
        pipe.zrange(qk.turns, 0, MAX_GROUPS, withscores=True)
        pipe.llen(qk.pending)
        pipe.hget(qk.limits, "gc")
        return list(pipe.execute())

    turns, unsorted, cap = backend.execute(qk.slot, first, timeout=timeout)
    truncated = len(turns) > MAX_GROUPS
    turns = turns[:MAX_GROUPS]
    names = [(name if isinstance(name, bytes) else str(name).encode()) for name, _ in turns]

    def second(client: Any) -> list[Any]:
        pipe = client.pipeline(transaction=False)
        for name in names:
            pipe.zlexcount(qk.fair, b"[" + name + b"\0", b"(" + name + b"\1")
            pipe.hmget(qk.groups, b"h:" + name, b"a:" + name)
        return list(pipe.execute())

    replies = backend.execute(qk.slot, second, timeout=timeout) if names else []
    running_ids = [
        (replies[2 * i + 1][1] or b"").split() if cap is not None else [] for i in range(len(names))
    ]
    live: set[bytes] = set()
    every_id = sorted({i for ids in running_ids for i in ids})
    if every_id:

        def active(client: Any) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for task_id in every_id:
                pipe.zscore(qk.active, task_id)
            return list(pipe.execute())

        scores = backend.execute(qk.slot, active, timeout=timeout)
        live = {task_id for task_id, score in zip(every_id, scores, strict=True) if score}
    now = time.time()
    groups = []
    for i, (name, (_, score)) in enumerate(zip(names, turns, strict=True)):
        waiting, (hold, _) = replies[2 * i], replies[2 * i + 1]
        held = _seconds(hold)
        groups.append(
            GroupInfo(
                group=name.decode(errors="replace"),
                queue=queue,
                waiting=int(waiting),
                running=len(set(running_ids[i]) & live) if cap is not None else None,
                next_turn=float(score) / 1000.0,
                held_until=held if held is not None and held > now else None,
            )
        )
    return QueueGroups(queue, groups, int(unsorted or 0), truncated)


def group_label(group: str) -> str:
    """How a group is shown: its name; ``(no group)`` for the ungrouped tasks of a fair
    queue, ``(type T)`` for those of type T in a queue with caps per task type (their
    group is ``{T``: no group's name has a brace)."""
    if not group:
        return "(no group)"
    if group.startswith("{"):
        return f"(type {group[1:]})"
    return group


def _seconds(raw: Any) -> float | None:
    try:
        return float(raw) / 1000.0 if raw is not None else None
    except ValueError:
        return None
