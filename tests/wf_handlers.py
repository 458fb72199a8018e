"""Handlers for workflow tests run in worker processes: each delivery is counted in a
hash named by the payload, so the test can count runs after killing a worker."""

from __future__ import annotations

import asyncio
from typing import Any

from clusterq import Router, Task, current_worker

router = Router()


async def _count(task: Task, log: str) -> None:
    backend = current_worker().backend
    assert backend is not None
    await backend.call(log, "HINCRBY", log, task.id, 1)


@router.task("wf:slow")
async def slow(task: Task) -> int:
    payload: dict[str, Any] = task.payload
    await _count(task, payload["log"])
    await asyncio.sleep(payload["sleep"])
    return int(payload["n"])


@router.task("wf:sum")
async def total(task: Task) -> int:
    await _count(task, task.payload["log"])
    return sum(task.parent_results or [])
