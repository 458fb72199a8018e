"""A worker with middleware: every task timed and logged, whatever its handler.

clusterq worker examples.middleware:router --queues images
"""

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from clusterq import Router, Task

log = logging.getLogger("example.timing")
router = Router()
#: (task type, seconds, ok) of the latest tasks, for whoever wants to look.
TIMINGS: list[tuple[str, float, bool]] = []


async def timing(task: Task, call_next: Callable[[Task], Awaitable[Any]]) -> Any:
    started = time.perf_counter()
    ok = False
    try:
        result = await call_next(task)
        ok = True
        return result
    finally:
        seconds = time.perf_counter() - started
        TIMINGS.append((task.type, seconds, ok))
        del TIMINGS[:-1000]
        log.info("%s %s in %.1f ms (%s)", task.type, task.id, seconds * 1000,
                 "ok" if ok else "failed")  # fmt: skip


router.use(timing)


@router.task("images:resize")
async def resize(task: Task) -> dict[str, object]:
    return {"src": task.payload["src"], "width": 128}
