"""enqueue: new task -> pending or scheduled (``enqueue.lua``)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from clusterq.broker.script import LuaScript
from clusterq.keys import QueueKeys

SCRIPT = LuaScript("enqueue")


@dataclass(frozen=True)
class EnqueueOutcome:
    created: bool
    state: str
    #: The id of the task holding the unique lock, when the enqueue was refused for it.
    duplicate_of: str | None = None


def build(
    qk: QueueKeys,
    task_id: str,
    fields: Mapping[str, Any],
    *,
    delay_ms: int = 0,
    due_ms: int = 0,
    unique_key: str | None = None,
    unique_ttl_ms: int = 0,
) -> tuple[list[str], list[Any]]:
    keys = [qk.task(task_id), qk.pending, qk.scheduled]
    if unique_key is not None:
        keys.append(unique_key)
    args: list[Any] = [task_id, max(0, delay_ms), max(0, due_ms), unique_ttl_ms]
    for name, value in fields.items():
        args.extend((name, value))
    return keys, args


def parse(reply: Any) -> EnqueueOutcome:
    code, detail = int(reply[0]), reply[1]
    text = detail.decode() if isinstance(detail, bytes) else str(detail)
    if code == -1:
        return EnqueueOutcome(created=False, state="", duplicate_of=text)
    return EnqueueOutcome(created=code == 1, state=text)
