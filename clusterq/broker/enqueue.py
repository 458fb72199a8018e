"""enqueue: new tasks -> pending or scheduled (``enqueue.lua``), several per call."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from clusterq.broker.script import LuaScript
from clusterq.keys import QueueKeys

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


@dataclass(slots=True)
class EnqueueOutcome:
    created: bool
    state: str
    #: The id of the task holding the unique lock, when the enqueue was refused for it.
    duplicate_of: str | None = None


def build(
    qk: QueueKeys, tasks: Sequence[NewTask], *, durable: bool = False
) -> tuple[list[str], list[Any]]:
    """KEYS and ARGV for one call; all ``tasks`` belong to queue ``qk``."""
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
    args: list[Any] = [int(durable)]
    for task in tasks:
        index = 0
        if task.unique_key is not None:
            keys.append(task.unique_key)
            index = len(keys)
        args += [
            task.id,
            max(0, task.delay_ms),
            max(0, task.due_ms),
            index,
            max(1, task.unique_ttl_ms),
            task.record,
        ]
    return keys, args


_CREATED = EnqueueOutcome(created=True, state="pending")


def parse(reply: Sequence[Any]) -> list[EnqueueOutcome]:
    out = []
    for i in range(0, len(reply), 2):
        code = reply[i]
        detail = reply[i + 1]
        if code == 1 and detail == b"pending":
            out.append(_CREATED)  # shared: outcomes are read, never changed
            continue
        text = detail.decode() if isinstance(detail, bytes) else str(detail)
        if code == -1:
            out.append(EnqueueOutcome(created=False, state="", duplicate_of=text))
        else:
            out.append(EnqueueOutcome(created=int(code) == 1, state=text))
    return out
