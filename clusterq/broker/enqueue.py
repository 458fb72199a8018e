"""enqueue: new tasks -> pending or scheduled (``enqueue.lua``), several per call."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from clusterq.broker.script import Call, LuaScript
from clusterq.keys import QueueKeys
from clusterq.wire import AsyncNodeClient, NodeClient

SCRIPT = LuaScript("enqueue")

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


def call(qk: QueueKeys, tasks: Sequence[NewTask], *, durable: bool = False) -> Call:
    """One script call for ``tasks``, which all belong to queue ``qk``.

    When every task has a freshly drawn id, no unique lock and the same delay, the call
    is a fresh one (no existence checks on the server, two arguments per task);
    :func:`attempt` turns it into a checked one for a retry.
    """
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
    ]
    first = tasks[0]
    delay, due = first.delay_ms, first.due_ms
    if all(
        t.fresh and t.unique_key is None and t.delay_ms == delay and t.due_ms == due for t in tasks
    ):
        args: list[Any] = [int(durable), 1, max(0, delay), max(0, due)]
        for task in tasks:
            args += (task.id, task.record)
        return SCRIPT, keys, args
    args = [int(durable), 0]
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


def attempt(call: Call, number: int) -> Call:
    """The call to send on attempt ``number`` (1 = first). A later attempt may follow one
    that ran but whose reply was lost, so it always checks for existing tasks."""
    script, keys, args = call
    if number == 1 or args[1] != 1:
        return call
    durable, _, delay, due = args[:4]
    checked: list[Any] = [durable, 0]
    for i in range(4, len(args), 2):
        checked += (args[i], delay, due, 0, 1, args[i + 1])
    return script, keys, checked


class Attempts:
    """The calls of one pipeline, counted: :func:`attempt` for each time they are sent.

    Its ``next`` (or ``run``/``arun`` for a single call) is what a backend retries."""

    __slots__ = ("calls", "number")

    def __init__(self, calls: list[Call]) -> None:
        self.calls = calls
        self.number = 0

    def next(self) -> list[Call]:
        self.number += 1
        if self.number == 1:
            return self.calls
        return [attempt(call, self.number) for call in self.calls]

    def run(self, client: NodeClient) -> Any:
        ((script, keys, args),) = self.next()
        return script.call(client, keys, args)

    async def arun(self, client: AsyncNodeClient) -> Any:
        ((script, keys, args),) = self.next()
        return await script.acall(client, keys, args)


#: The outcome of a task created pending (shared: outcomes are read, never changed).
CREATED = EnqueueOutcome(created=True, state="pending")
_SCHEDULED = EnqueueOutcome(created=True, state="scheduled")


def parse(reply: Sequence[Any], count: int) -> list[EnqueueOutcome]:
    """One outcome per task of a call of ``count`` tasks (outcomes are shared: read only)."""
    if reply and reply[0] == b"fresh":
        return [CREATED if reply[1] == b"pending" else _SCHEDULED] * count
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
