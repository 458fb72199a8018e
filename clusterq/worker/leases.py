"""Lease renewal (the heartbeat): every ``heartbeat_interval`` (a quarter of the lease by
default) the worker extends the lease of every task it holds, one call per queue, all
queues at once so that a frozen shard delays only its own renewals. A lease found taken
over is marked lost: the task's outcome will be refused and counted in ``leases_lost``.
The renewal also says which held tasks an operator asked to cancel; their handlers are
cancelled (see :meth:`~clusterq.worker.runner.Runner.execute`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from clusterq.broker.facade import Broker
from clusterq.worker.state import QueueState, RunState, WorkerSettings, WorkerStats

log = logging.getLogger("clusterq.worker")


class Leases:
    """The heartbeat of one worker."""

    def __init__(
        self,
        broker: Broker,
        settings: WorkerSettings,
        stats: WorkerStats,
        run_state: RunState,
        cancel: Callable[[QueueState, str], None],
    ) -> None:
        self.cancel = cancel
        self.broker = broker
        self.settings = settings
        self.stats = stats
        self.run_state = run_state

    async def loop(self, queues: list[QueueState]) -> None:
        while not self.run_state.closing:
            await asyncio.sleep(self.settings.heartbeat_interval)
            await asyncio.gather(*(self.renew(q) for q in queues if q.held))

    async def renew(self, q: QueueState) -> None:
        held = q.renewable()
        if not held:
            return
        try:
            renewed = await self.broker.extend(
                q.qk, self.settings.lease_ms, held, timeout=self.settings.heartbeat_interval
            )
        except Exception as exc:
            log.warning("queue %s: lease renewal failed (%s)", q.name, exc)
            return
        for task_id in renewed.cancelled:
            self.cancel(q, task_id)
        for task_id in renewed.lost:
            entry = q.held.get(task_id)
            if entry is not None and not entry.lost:
                entry.lost = True
                self.stats.leases_lost += 1
                log.warning(
                    "queue %s: lost the lease of task %s (another worker may run it)",
                    q.name,
                    task_id,
                )
