"""Finding tasks (the web UI's search): a task id across every queue, looked up in one
pipelined call per master; and a bounded filter within one queue by type, error text or
payload text, over at most ``per_state`` tasks of each state."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis

from clusterq.errors import ClusterqError, TaskNotFound
from clusterq.keys import validate_task_id
from clusterq.task import STATES, TaskInfo

if TYPE_CHECKING:
    from clusterq.ops.inspector import Inspector

#: Tasks of each state the filter looks at, by default.
DEFAULT_PER_STATE = 200


@dataclass
class Found:
    """Where a task id was found (each queue holding a task with that id, and the task),
    and the queues that could not be asked (queue: why)."""

    tasks: list[TaskInfo] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    #: How many queues were looked in.
    queues: int = 0


def find_task(inspector: Inspector, task_id: str, names: Iterable[str] | None = None) -> Found:
    """Every queue (or each of ``names``) holding a task ``task_id``: the queues are
    grouped by the master that owns their slot, and each master is asked about all its
    queues in one pipeline (``HEXISTS`` on each queue's records); a queue whose answer
    was an error (its slot moved meanwhile) is asked again on its own. The queues of a
    master that cannot be asked are in :attr:`Found.errors`, the others still looked in."""
    validate_task_id(task_id)
    chosen = sorted(names) if names is not None else inspector.queue_names()
    found = Found(queues=len(chosen))
    by_master: dict[Any, list[str]] = {}
    for name in chosen:
        try:
            master = inspector.backend.master_addr(inspector.keys.queue(name).slot)
        except ClusterqError as exc:  # no master owns its slot
            found.errors[name] = str(exc)
            continue
        by_master.setdefault(master, []).append(name)
    holding: list[str] = []
    for group in by_master.values():
        try:
            answers = _hexists_on_one_master(inspector, group, task_id)
        except (ClusterqError, redis.RedisError) as exc:  # that master is down or refused
            found.errors.update((name, str(exc)) for name in group)
            continue
        for name, answer in zip(group, answers, strict=True):
            if isinstance(answer, Exception):
                answer = _hexists_alone(inspector, name, task_id, found)
            if answer:
                holding.append(name)
    for name in holding:
        try:
            found.tasks.append(inspector.task(name, task_id).info)
        except TaskNotFound:
            continue  # deleted between the two reads
        except (ClusterqError, redis.RedisError) as exc:
            found.errors[name] = str(exc)
    return found


def _hexists_on_one_master(inspector: Inspector, group: Sequence[str], task_id: str) -> list[Any]:
    keys = [inspector.keys.queue(name).tasks for name in group]

    def ask(client: Any) -> list[Any]:
        pipe = client.pipeline(transaction=False)
        for key in keys:
            pipe.hexists(key, task_id)
        return list(pipe.execute(raise_on_error=False))

    slot = inspector.keys.queue(group[0]).slot
    return inspector.backend.execute(slot, ask, timeout=inspector.timeout)


def _hexists_alone(inspector: Inspector, name: str, task_id: str, found: Found) -> bool:
    key = inspector.keys.queue(name).tasks
    try:
        return bool(
            inspector.backend.execute_key(
                key, lambda c: c.hexists(key, task_id), timeout=inspector.timeout
            )
        )
    except (ClusterqError, redis.RedisError) as exc:
        found.errors[name] = str(exc)
        return False


@dataclass
class Filtered:
    """What :func:`filter_tasks` found, and how many tasks it looked at per state."""

    tasks: list[TaskInfo] = field(default_factory=list)
    looked: dict[str, int] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


def filter_tasks(
    inspector: Inspector,
    queue: str,
    *,
    task_type: str | None = None,
    error: str | None = None,
    text: str | None = None,
    per_state: int = DEFAULT_PER_STATE,
    states: Iterable[str] = STATES,
) -> Filtered:
    """The tasks of ``queue`` among the first ``per_state`` of each state (oldest first)
    whose type is ``task_type``, whose last error contains ``error`` and whose payload
    (as JSON) or headers contain ``text`` (both case-insensitive); each criterion left
    out (None or empty) matches every task."""
    error_needle = (error or "").casefold()
    text_needle = (text or "").casefold()
    out = Filtered()
    for state in states:
        try:
            page = inspector.tasks(queue, state, limit=per_state)
        except (ClusterqError, redis.RedisError) as exc:
            out.errors[state] = str(exc)
            continue
        out.looked[state] = len(page)
        for info in page:
            if task_type and info.type != task_type:
                continue
            if error_needle and error_needle not in (info.last_error or "").casefold():
                continue
            if text_needle and text_needle not in _searchable(info):
                continue
            out.tasks.append(info)
    return out


def _searchable(info: TaskInfo) -> str:
    """The payload and headers of ``info`` as one lower-case text."""
    payload = json.dumps(info.payload, ensure_ascii=False, default=repr)
    return (payload + " " + json.dumps(info.headers, ensure_ascii=False)).casefold()
