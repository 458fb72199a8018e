"""dequeue: pending -> active with a lease (``dequeue.lua``)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from clusterq.broker.script import LuaScript
from clusterq.keys import QueueKeys

SCRIPT = LuaScript("dequeue")


#: Why a dequeue took nothing although tasks wait: the queue's limits (``limited``).
RATE, CONCURRENCY, HOLD, GROUP = "rate", "concurrency", "hold", "group"
_LIMITED = {2: RATE, 3: CONCURRENCY, 4: HOLD, 5: GROUP}


@dataclass(frozen=True)
class Dequeued:
    paused: bool = False
    #: Unix time (s) the earliest scheduled/retry task is due, when nothing was taken;
    #: when ``limited`` is "rate" or "hold", when the next task may start.
    next_due: float | None = None
    #: Tasks wait, but the queue's limits let none start now: "rate", "concurrency"
    #: (until a task of the queue ends), "hold" (a handler's ``RateLimited``) or "group"
    #: (every fair group with tasks is held back by its own limits until ``next_due``).
    limited: str | None = None
    #: Ids that were pending without a record (dropped by the script; worth a warning).
    orphans: int = 0
    #: (task id, raw record) pairs now active under the caller's token.
    tasks: list[tuple[str, bytes]] = field(default_factory=list)


def build(
    qk: QueueKeys, count: int, lease_ms: int, token: str, forward_limit: int = 100
) -> tuple[list[str], list[Any]]:
    keys = [
        qk.pending, qk.active, qk.scheduled, qk.retry, qk.tasks, qk.leases, qk.paused, qk.wake,
        qk.limits, qk.fair, qk.turns, qk.groups, qk.evcfg, qk.events,
    ]  # fmt: skip
    return keys, [count, lease_ms, token, forward_limit]


def parse(reply: Sequence[Any]) -> Dequeued:
    status, next_due, orphans = int(reply[0]), int(reply[1]), int(reply[2])
    tasks = [
        (reply[i].decode() if isinstance(reply[i], bytes) else str(reply[i]), reply[i + 1])
        for i in range(3, len(reply), 2)
    ]
    limited = _LIMITED.get(status)
    if limited is not None and next_due >= 0:
        next_due += int(time.time() * 1000)  # the script said how long from now
    return Dequeued(
        paused=status == 0,
        limited=limited,
        next_due=next_due / 1000.0 if next_due >= 0 else None,
        orphans=orphans,
        tasks=tasks,
    )
