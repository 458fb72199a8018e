"""manage: an operator's delete / archive / run-now / cancel of tasks (``manage.lua``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from clusterq.broker.script import LuaScript
from clusterq.keys import QueueKeys

SCRIPT = LuaScript("manage")

Action = Literal["delete", "archive", "run", "cancel"]
ACTIONS: tuple[Action, ...] = ("delete", "archive", "run", "cancel")


@dataclass(frozen=True)
class Target:
    """One task to act on, and its unique lock (released when the task is deleted)."""

    id: str
    unique_key: str | None = None
    #: Where the caller saw it in the pending list: an index from the tail (-1 the
    #: oldest); 0 when not known (the script searches the list).
    position: int = 0


def build(
    qk: QueueKeys,
    action: Action,
    targets: Sequence[Target],
    *,
    state: str = "",
    task_type: str = "",
    force: bool = False,
) -> tuple[list[str], list[Any]]:
    """``state``/``task_type``: act only on tasks that are in that state / of that type
    when the script reaches them ('' for any). ``force``: delete active tasks too."""
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {', '.join(ACTIONS)}, got {action!r}")
    keys = [
        qk.tasks,
        qk.pending,
        qk.scheduled,
        qk.retry,
        qk.active,
        qk.archived,
        qk.completed,
        qk.results,
        qk.leases,
        qk.cancel,
        qk.wake,
        qk.fair,
        qk.evcfg,
        qk.events,
    ]
    args: list[Any] = [action, state, task_type, 1 if force else 0]
    for target in targets:
        index = 0
        # A lock named by a record is used only if it is one of this queue's own keys.
        if target.unique_key is not None and target.unique_key.startswith(qk.base + ":u:"):
            keys.append(target.unique_key)
            index = len(keys)
        args += [target.id, index, target.position]
    return keys, args


def parse(reply: Sequence[Any]) -> list[str]:
    """One status per target: ``ok``, ``missing``, ``state:<state>``, ``type``, ``active``."""
    return [v.decode() if isinstance(v, bytes) else str(v) for v in reply]
