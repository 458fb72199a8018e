"""Recovery and housekeeping: every ``recover_interval`` (with jitter) the worker sweeps
each of its queues (retention of completed tasks, archive trimming by size and age, the
dedup window of deleted ids) and takes back the tasks whose lease expired, those of a
worker that crashed or was cut off, for another attempt (or the archive, when no
retries are left). A lease renewed meanwhile wins: recovery only applies to a lease that
is still expired on the server.

A queue that wake-ups cover (:mod:`clusterq.worker.wakeups`) is swept only when there is
something to sweep for: it had work since its last sweep, or the survey saw something
(an expired lease, an ended retention, an archive over its limits).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time

from clusterq.broker.facade import Broker
from clusterq.task import Record
from clusterq.worker.outcomes import Outcomes
from clusterq.worker.state import (
    MAX_ERROR_LENGTH,
    Outcome,
    Persistent,
    QueueState,
    RunState,
    WorkerSettings,
    WorkerStats,
)
from clusterq.worker.wakeups import Wakeups

log = logging.getLogger("clusterq.worker")

LEASE_EXPIRED = (
    "lease expired: the worker running the task stopped renewing it (crashed or cut off)"
)


class Recoverer:
    """The sweeps of one worker."""

    def __init__(
        self,
        broker: Broker,
        settings: WorkerSettings,
        stats: WorkerStats,
        outcomes: Outcomes,
        run_state: RunState,
        wakeups: Wakeups,
    ) -> None:
        self.wakeups = wakeups
        self.broker = broker
        self.settings = settings
        self.stats = stats
        self.outcomes = outcomes
        self.run_state = run_state
        self.sweeps = Persistent(log, "the sweep")
        self.recoveries = Persistent(log, "recovery of expired leases")

    async def loop(self, queues: list[QueueState]) -> None:
        while not self.run_state.closing:
            await asyncio.sleep(self.settings.recover_interval * (0.75 + 0.5 * random.random()))
            due = [q for q in queues if q.sweep_due or q.held or not self.wakeups.covers(q)]
            await asyncio.gather(*(self.sweep(q) for q in due))

    async def sweep(self, q: QueueState) -> None:
        self.stats.sweeps += 1
        q.sweep_due = bool(q.held)  # once more after they finish (cancel requests...)
        try:
            swept = await self.broker.sweep(
                q.qk,
                archive_max_size=self.settings.archive_max_size,
                archive_max_age_ms=int(self.settings.archive_max_age * 1000),
                timeout=self.settings.recover_interval,
            )
        except Exception as exc:
            self.sweeps.failed(f"queue {q.name}", exc)
            return
        self.sweeps.worked(f"queue {q.name}")
        for task_id, token, raw in swept.expired:
            mine = q.held.get(task_id)
            if mine is not None and mine.token == token:
                continue  # still running here; the heartbeat renews it
            try:
                await self.recover(q, task_id, token, raw)
            except Exception as exc:
                # One bad record must not stop the recovery of every other one.
                log.exception("queue %s: could not recover task %s", q.name, task_id)
                await self.quarantine(q, task_id, token, f"recovery failed: {exc!r}")

    async def quarantine(self, q: QueueState, task_id: str, token: str, reason: str) -> None:
        """Archive a task that cannot be handled, with the reason, so that nobody meets
        it again (its payload is kept for inspection)."""
        meta = Record.unreadable_meta(reason[:MAX_ERROR_LENGTH], int(time.time() * 1000))
        try:
            await self.broker.fail(
                q.qk, task_id, token, meta, retry_in_ms=None, only_if_expired=True
            )
        except Exception:
            log.exception("queue %s: could not archive task %s either", q.name, task_id)
        else:
            log.error("queue %s: task %s archived: %s", q.name, task_id, reason)

    async def recover(self, q: QueueState, task_id: str, token: str, raw: bytes) -> None:
        """Take back a task whose lease (``token``) expired."""
        now_ms = int(time.time() * 1000)
        error = LEASE_EXPIRED
        try:
            record: Record | None = Record.decode(raw)
        except Exception as exc:
            record, error = None, f"{LEASE_EXPIRED}; unreadable record: {exc}"
        outcome = Outcome(False, error=error)
        meta, delay = self.outcomes.failed_meta(
            record, error, now_ms, outcome, task_id=task_id, queue=q.name
        )
        try:
            result = await self.broker.fail(
                q.qk,
                task_id,
                token,
                meta,
                retry_in_ms=None if delay is None else int(delay * 1000),
                only_if_expired=True,
            )
        except Exception as exc:
            self.recoveries.failed(f"queue {q.name}", exc)
            return
        self.recoveries.worked(f"queue {q.name}")
        if result == "archived":
            await self.outcomes.workflow_failed(q, task_id, record, error)
        if result not in ("stale", "gone"):
            self.stats.recovered += 1
            log.warning(
                "queue %s: recovered task %s from an expired lease (%s)",
                q.name,
                task_id,
                result,
                extra={
                    "event": {
                        "event": "lease_recovered",
                        "queue": q.name,
                        "task": task_id,
                        "to": result,
                    }
                },
            )
