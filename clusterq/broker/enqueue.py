"""enqueue: new tasks -> pending or scheduled (``enqueue.lua``), several per call.

New tasks with fresh ids that are due now skip that script's checks on their first
attempt: the small ``push.lua`` writes them (see :func:`call`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from clusterq.broker.script import LuaScript, Step, arun_one, run_one
from clusterq.cluster.wire import AsyncNodeClient, NodeClient
from clusterq.keys import QueueKeys

SCRIPT = LuaScript("enqueue")
PUSH = LuaScript("push", prelude=False)

#: Tasks per script call; Lua's unpack() is limited to a few thousand values.
MAX_BATCH = 500


@dataclass(slots=True)
class NewTask:
    """One task to enqueue, already validated and encoded."""

    id: str
    record: bytes
    delay_ms: int = 0
    due_ms: int = 0
    unique_key: str | None = None
    unique_ttl_ms: int = 0
    #: The id was drawn at random by the client just now (not given by the caller).
    fresh: bool = False


@dataclass(slots=True)
class EnqueueOutcome:
    created: bool
    state: str
    #: The id of the task holding the unique lock, when the enqueue was refused for it.
    duplicate_of: str | None = None


def call(qk: QueueKeys, tasks: Sequence[NewTask], *, durable: bool = False, first: bool) -> Step:
    """What to send for ``tasks``, which all belong to queue ``qk``.

    On the ``first`` attempt, tasks that all have freshly drawn ids (no task can have
    one), no unique lock and no delay need no check on the server: ``push.lua`` writes
    them (HSET, LPUSH, and a wake-up when the queue was empty; ~3 µs of server time more
    than ``MULTI HSET LPUSH EXEC``, which cannot decide whether to wake, a third of what
    ``enqueue.lua`` costs). Anything else, and every retry (the first attempt may have
    run, its reply lost), goes through ``enqueue.lua``, which checks for existing tasks.
    Durable calls use it too (its ``durable`` flag makes even a call that creates
    nothing write, for ``WAIT`` to count).
    """
    if first and not durable:
        pairs: list[Any] = []
        for t in tasks:
            if not t.fresh or t.unique_key is not None or t.delay_ms > 0 or t.due_ms > 0:
                break
            pairs += (t.id, t.record)
        else:
            return PUSH, [qk.tasks, qk.pending, qk.wake], pairs
    keys = [
        qk.tasks,
        qk.pending,
        qk.scheduled,
        qk.retry,
        qk.active,
        qk.archived,
        qk.completed,
        qk.stats,
        qk.done,
        qk.wake,
    ]
    args: list[Any] = [int(durable)]
    for task in tasks:
        index = 0
        if task.unique_key is not None:
            keys.append(task.unique_key)
            index = len(keys)
        args += (
            task.id,
            max(0, task.delay_ms),
            max(0, task.due_ms),
            index,
            max(1, task.unique_ttl_ms),
            task.record,
        )
    return SCRIPT, keys, args


class Attempts:
    """The steps that enqueue some groups of tasks, built anew for each attempt (see
    :func:`call`); ``sent`` holds those of the latest, which the replies answer.

    Its ``next`` (or ``run``/``arun`` for a single group) is what a backend retries."""

    __slots__ = ("durable", "groups", "number", "sent")

    def __init__(self, groups: list[tuple[QueueKeys, list[NewTask]]], *, durable: bool) -> None:
        self.groups = groups
        self.durable = durable
        self.number = 0
        self.sent: list[Step] = []

    def next(self) -> list[Step]:
        self.number += 1
        first = self.number == 1
        self.sent = [
            call(qk, tasks, durable=self.durable, first=first) for qk, tasks in self.groups
        ]
        return self.sent

    def run(self, client: NodeClient) -> Any:
        (step,) = self.next()
        return run_one(client, step)

    async def arun(self, client: AsyncNodeClient) -> Any:
        (step,) = self.next()
        return await arun_one(client, step)


#: The outcome of a task created pending (shared: outcomes are read, never changed).
CREATED = EnqueueOutcome(created=True, state="pending")


def created_as_sent(step: Step) -> bool:
    """Whether ``step`` creates all its tasks pending, as the client guessed (a push)."""
    return step[0] is PUSH


def parse(step: Step, reply: Any, count: int) -> list[EnqueueOutcome]:
    """One outcome per task of a step for ``count`` tasks (outcomes are shared: read only)."""
    if created_as_sent(step):
        return [CREATED] * count
    out = []
    for i in range(0, len(reply), 2):
        code = reply[i]
        detail = reply[i + 1]
        if code == 1 and detail == b"pending":
            out.append(CREATED)
            continue
        text = detail.decode() if isinstance(detail, bytes) else str(detail)
        if code == -1:
            out.append(EnqueueOutcome(created=False, state="", duplicate_of=text))
        else:
            out.append(EnqueueOutcome(created=int(code) == 1, state=text))
    return out
