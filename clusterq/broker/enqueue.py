"""enqueue: new tasks -> pending or scheduled (``enqueue.lua``), several per call.

New tasks with fresh ids that are due now skip that script's checks on their first
attempt: the small ``push.lua`` writes them (see :func:`call`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis

from clusterq.broker.script import LuaScript, Step, arun_one, run_one
from clusterq.cluster.wire import AsyncNodeClient, NodeClient
from clusterq.keys import QueueKeys

SCRIPT = LuaScript("enqueue")
PUSH = LuaScript("push", shared=("_events",))

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
    #: In a fair group: ``enqueue.lua`` turns the queue's fair serving on.
    grouped: bool = False


@dataclass(slots=True)
class EnqueueOutcome:
    created: bool
    state: str
    #: The id of the task holding the unique lock, when the enqueue was refused for it.
    duplicate_of: str | None = None


def pushable(task: NewTask) -> bool:
    """Whether ``push.lua`` may write ``task`` on a first attempt (see :func:`call`)."""
    return (
        task.fresh
        and task.unique_key is None
        and task.delay_ms <= 0
        and task.due_ms <= 0
        and not task.grouped
    )


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
            if not pushable(t):
                break
            pairs += (t.id, t.record)
        else:
            return PUSH, [qk.tasks, qk.pending, qk.wake, qk.evcfg, qk.events], pairs
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
        qk.turns,
        qk.fair,
        qk.evcfg,
        qk.events,
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


class One:
    """The attempts of one task's enqueue without durability (what ``Client.enqueue``
    sends), for a backend to call (``one(client)``, or ``one.arun``) and retry: as
    :class:`Attempts` for one group of one task, with less built per call. The first
    attempt of a pushable task is ``push.lua``'s ``EVALSHA``, its arguments given in
    place; any other attempt goes through ``enqueue.lua``.

    ``pushed``: whether the latest attempt was a push (its reply: the task was created,
    pending), None before the first; ``sent``: the step of the latest attempt, None
    after a push."""

    __slots__ = ("pushed", "qk", "sent", "task")

    def __init__(self, qk: QueueKeys, task: NewTask) -> None:
        self.qk = qk
        self.task = task
        self.pushed: bool | None = None
        self.sent: Step | None = None

    def _push(self) -> tuple[Any, ...] | None:
        """The first attempt's ``push.lua`` call for a task that needs no checks; None
        when ``enqueue.lua`` must decide (a retry, a given id, a lock, a delay)."""
        task = self.task
        if self.pushed is not None or not pushable(task):
            return None
        self.pushed = True
        qk = self.qk
        return (
            "EVALSHA", PUSH.sha, 5, qk.tasks, qk.pending, qk.wake, qk.evcfg, qk.events, task.id,
            task.record,
        )  # fmt: skip

    def __call__(self, client: NodeClient) -> Any:
        command = self._push()
        if command is not None:
            try:
                return client.fast(*command)
            except redis.exceptions.NoScriptError:  # it did not run: loaded, sent again
                client.fast("SCRIPT", "LOAD", PUSH.source)
                return client.fast(*command)
        return run_one(client, self._checked())

    async def arun(self, client: AsyncNodeClient) -> Any:
        command = self._push()
        if command is not None:
            try:
                return await client.fast(*command)
            except redis.exceptions.NoScriptError:  # it did not run: loaded, sent again
                await client.fast("SCRIPT", "LOAD", PUSH.source)
                return await client.fast(*command)
        return await arun_one(client, self._checked())

    def _checked(self) -> Step:
        """The step of an attempt through ``enqueue.lua``: a retry (the first may have
        run, its reply lost), or a task that needs the checks."""
        self.pushed = False
        self.sent = call(self.qk, [self.task], first=False)
        return self.sent


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
