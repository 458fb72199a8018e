"""Task states and the task record.

A task lives in one queue's slot: a hash ``<prefix>:{queue}:t:<id>`` (the record) plus
membership in exactly one state structure of that queue (see :mod:`clusterq.keys`).

Record fields (short names keep a small pending task small in memory):

=========  =============================================================
type       task type (routes it to a handler)
payload    encoded payload
codec      "json" or "msgpack"
state      pending | scheduled | active | retry | archived | completed
enq        enqueued at (ms, server clock)
maxr       how many retries after the first attempt
retried    retries so far
att        attempts started; also the fencing token of the current lease
tmo        timeout of one attempt (ms), optional
dl         deadline (ms since epoch), optional
uq         key of the unique lock, optional
ret        how long to keep the task after success (ms), optional
err        last error; ``errat`` when (ms)
res        encoded result of a completed task
done       completed at (ms)
=========  =============================================================
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import Enum
from typing import Any


class TaskState(str, Enum):
    PENDING = "pending"
    SCHEDULED = "scheduled"
    ACTIVE = "active"
    RETRY = "retry"
    ARCHIVED = "archived"
    COMPLETED = "completed"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class TaskInfo:
    """What is known about one task."""

    id: str
    queue: str
    type: str
    state: TaskState
    payload: Any = None
    max_retry: int = 0
    retried: int = 0
    attempts: int = 0
    enqueued_at: float | None = None
    next_process_at: float | None = None
    timeout: float | None = None
    deadline: float | None = None
    last_error: str | None = None
    last_failed_at: float | None = None
    completed_at: float | None = None
    result: Any = None
    #: True when enqueue found a task with this id already there (an idempotent retry).
    already_enqueued: bool = False

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["state"] = self.state.value
        return out


def ms_to_s(value: Any) -> float | None:
    """A record's millisecond field as seconds (float), or None when absent."""
    if value is None or value == b"" or value == "":
        return None
    return int(value) / 1000.0
