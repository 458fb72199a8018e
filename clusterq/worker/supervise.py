"""Keeping a worker's loops alive. Each loop (a queue's fetch loop, the heartbeat, the
recoverer, the announcer) runs as a supervised task: if it ends or raises while the
worker still needs it, that is reported — logged with its traceback, counted in
``loop_restarts``, sent to subscribers as :class:`~clusterq.events.LoopStopped` — and the
loop is started again after a short pause. Nothing stops silently."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from clusterq.cluster.changes import TopologyEvent
from clusterq.events import LoopStopped
from clusterq.worker.state import WorkerStats

log = logging.getLogger("clusterq.worker")

#: Seconds before a loop that stopped is started again.
RESTART_DELAY = 1.0

LoopFactory = Callable[[], Coroutine[Any, Any, None]]


class Supervisor:
    """Starts named loops and starts them again when they stop while still ``needed``."""

    def __init__(
        self,
        stats: WorkerStats,
        emit: Callable[[TopologyEvent], None],
        restart_delay: float = RESTART_DELAY,
    ) -> None:
        self.stats = stats
        self.emit = emit
        self.restart_delay = restart_delay
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self._needed: dict[str, Callable[[], bool]] = {}

    def start(self, name: str, factory: LoopFactory, needed: Callable[[], bool]) -> None:
        """Run ``factory()`` as loop ``name`` for as long as ``needed()`` says."""
        self._needed[name] = needed
        task = asyncio.create_task(factory(), name=name)
        self.tasks[name] = task
        task.add_done_callback(lambda done: self._ended(name, factory, done))

    def _ended(self, name: str, factory: LoopFactory, task: asyncio.Task[None]) -> None:
        if not self._needed[name]() or self.tasks.get(name) is not task:
            return
        # Cancelled while still needed is a stop like any other (nothing here cancels a
        # loop the worker still needs): reported and restarted, never silent.
        error = None if task.cancelled() else task.exception()
        if task.cancelled():
            what = "it was cancelled"
        else:
            what = f"{type(error).__name__}: {error}" if error is not None else "it returned"
        log.error("worker loop %s stopped (%s)", name, what, exc_info=error)
        self.stats.loop_restarts += 1
        self.emit(LoopStopped(name, what))

        def restart() -> None:
            if self._needed[name]() and self.tasks.get(name) is task:
                self.start(name, factory, self._needed[name])

        asyncio.get_running_loop().call_later(self.restart_delay, restart)

    async def wait(self, prefix: str) -> None:
        """Wait for the loops whose names start with ``prefix`` to end."""
        running = [t for n, t in self.tasks.items() if n.startswith(prefix)]
        await asyncio.gather(*running, return_exceptions=True)

    def running(self, prefix: str = "") -> set[asyncio.Task[None]]:
        return {t for n, t in self.tasks.items() if n.startswith(prefix) and not t.done()}
