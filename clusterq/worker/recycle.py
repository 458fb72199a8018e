"""When a worker process should end and be replaced by a fresh one.

Three limits, each checked where it costs least:

- ``max_tasks``: the fetch loops take at most that many tasks in all (a budget reserved
  before each dequeue, so never one more); the last ones finish, then the worker stops.
- ``max_memory_mb``: the process's resident memory (``/proc/self/statm``), read after a
  task ends (every ``MEMORY_CHECK_TASKS`` tasks or ``MEMORY_CHECK_SECONDS``, whichever
  comes first); above the limit the worker
  takes nothing more, lets what it holds finish, and stops.
- ``kill_after``: a plain-function handler still running that long after its timeout
  was reached. Its attempt was already counted as a timeout (retried or archived per
  its policy); a thread cannot be stopped, so its process must go: the worker stops
  taking tasks, lets the others it holds finish (``shutdown_timeout``; what is left is
  handed back to its queue, no retry spent), and exits, killing the thread.

Each emits :class:`~clusterq.events.WorkerLeaving` (logged; the supervisor of
``--processes`` starts the replacement at once) and stops the worker gracefully. The
process then exits with :data:`EXIT_REPLACE`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from clusterq.events import TopologyEvent, WorkerLeaving

log = logging.getLogger("clusterq.worker")

#: Exit status of a worker process that stopped to be replaced (EX_TEMPFAIL).
EXIT_REPLACE = 75
#: The resident memory is read after a task ends when this many tasks ended since the
#: last read, or this many seconds passed (a read costs ~10 µs).
MEMORY_CHECK_TASKS = 10
MEMORY_CHECK_SECONDS = 0.1


@dataclass(frozen=True)
class ProcessLimits:
    """Limits after which a worker process is replaced (None: no limit)."""

    max_tasks: int | None = None
    max_memory_mb: float | None = None
    #: Seconds a plain-function handler may run on past its timeout before its process
    #: is replaced (None: it keeps its concurrency slot until it returns).
    kill_after: float | None = None

    def __post_init__(self) -> None:
        if self.max_tasks is not None and (
            isinstance(self.max_tasks, bool)
            or not isinstance(self.max_tasks, int)
            or self.max_tasks < 1
        ):
            raise ValueError(f"max_tasks_per_process must be 1 or more, got {self.max_tasks!r}")
        for option, value in (
            ("max_memory_per_process", self.max_memory_mb),
            ("kill_after", self.kill_after),
        ):
            if value is not None and not (
                isinstance(value, int | float) and math.isfinite(value) and value > 0
            ):
                raise ValueError(f"{option} must be a number above 0, got {value!r}")
        if self.max_memory_mb is not None and resident_mb() is None:
            raise ValueError(
                "max_memory_per_process needs /proc/self/statm (Linux): "
                "this system does not say a process's resident memory"
            )

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.max_tasks, self.max_memory_mb, self.kill_after))


def resident_mb() -> float | None:
    """This process's resident memory in MiB, or None where /proc does not say."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class Recycler:
    """Watches one worker against its :class:`ProcessLimits`."""

    def __init__(
        self,
        worker_id: str,
        limits: ProcessLimits,
        emit: Callable[[TopologyEvent], None],
        stop: Callable[[], Any],
    ) -> None:
        self.worker_id = worker_id
        self.limits = limits
        self.emit = emit
        self.stop = stop
        #: Why the worker is leaving (None: it is not).
        self.reason: str | None = None
        self._memory_checked = 0.0
        self._tasks_unchecked = 0
        self.stopping: asyncio.Future[Any] | None = None

    def attach(self, fetcher: Any, runner: Any) -> None:
        """Set the fetcher's budget and watch each task's end (before fetching starts)."""
        limits = self.limits
        if limits.max_tasks is not None:
            fetcher.budget = limits.max_tasks
            fetcher.on_spent = lambda: self.leave(
                f"it took its {limits.max_tasks} tasks (max tasks per process)", "max_tasks"
            )
        if limits.max_memory_mb is not None:
            observe = runner.observe

            def after_task(queue: str, task_type: str, seconds: float, ok: bool) -> None:
                if observe is not None:
                    observe(queue, task_type, seconds, ok)
                self.check_memory()

            runner.observe = after_task

    def check_memory(self) -> None:
        limit = self.limits.max_memory_mb
        if limit is None:
            return
        self._tasks_unchecked += 1
        now = time.monotonic()
        if (
            self._tasks_unchecked < MEMORY_CHECK_TASKS
            and now - self._memory_checked < MEMORY_CHECK_SECONDS
        ):
            return
        self._memory_checked, self._tasks_unchecked = now, 0
        rss = resident_mb()
        if rss is not None and rss > limit:
            self.leave(f"its memory ({rss:.0f} MiB) passed the limit ({limit:g} MiB)", "memory")

    async def watch_stuck(self, abandoned: dict[str, float], stopping: Callable[[], bool]) -> None:
        """Leave once a sync handler abandoned after its timeout runs on ``kill_after``."""
        kill_after = self.limits.kill_after
        assert kill_after is not None
        while not stopping():  # runs on after leaving, until the stop begins
            now = time.monotonic()
            for task_id, since in list(abandoned.items()):
                if self.reason is None and now - since >= kill_after:
                    self.leave(
                        f"task {task_id}: its handler (a plain function) still ran "
                        f"{kill_after:g}s after its timeout",
                        "hard_timeout",
                    )
            await asyncio.sleep(min(0.1, kill_after / 4))

    def leave(self, reason: str, cause: str) -> None:
        """Say why and stop the worker gracefully (once)."""
        if self.reason is not None:
            return
        self.reason = reason
        self.emit(WorkerLeaving(self.worker_id, reason, cause))
        self.stopping = asyncio.ensure_future(self.stop())
