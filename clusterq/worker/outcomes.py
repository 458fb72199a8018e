"""What follows a handler: acks (batched per queue, sent while more pile up), failures
(to retry with the policy's delay, or to the archive), and, at shutdown, unfinished
tasks handed back to their queues. Every call carries the task's fencing token: a
worker that lost a lease changes nothing, and counts it in ``leases_lost``."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

from clusterq.broker import ack as ack_script
from clusterq.broker.ack import Ack
from clusterq.broker.facade import Broker
from clusterq.cluster.routing import backoff, classify
from clusterq.errors import ConnectionFailed
from clusterq.task import Record, Task
from clusterq.worker.state import (
    MAX_ERROR_LENGTH,
    Outcome,
    QueueState,
    WorkerSettings,
    WorkerStats,
)
from clusterq.workflow import AsyncWorkflows

log = logging.getLogger("clusterq.worker")

ACK_BATCH = 200


class Outcomes:
    """Acks, failures and hand-backs of one worker."""

    def __init__(self, broker: Broker, settings: WorkerSettings, stats: WorkerStats) -> None:
        #: Told when a workflow step is archived for good (set by the worker).
        self.workflows: AsyncWorkflows | None = None
        self.broker = broker
        self.settings = settings
        self.stats = stats

    # ------------------------------------------------------------------ success

    def ack(self, q: QueueState, task_id: str, token: str, record: Record, result: bytes) -> None:
        """Queue the ack of a finished task; one flusher per queue sends them in batches."""
        held = q.held.get(task_id)
        if held is not None:
            held.done = True
        self.stats.succeeded += 1
        q.acks.append(Ack(task_id, token, record.retention_ms or 0, result, record.unique_key))
        if q.flusher is None or q.flusher.done():
            q.flusher = asyncio.create_task(self.flush(q))

    async def flush(self, q: QueueState) -> None:
        failures = 0
        remember_ms = int(self.settings.dedup_window * 1000)
        while q.acks:
            batch = q.acks[:ACK_BATCH]
            del q.acks[:ACK_BATCH]
            try:
                applied = await self.broker.ack(q.qk, batch, remember_ms=remember_ms)
            except Exception as exc:
                if classify(exc) == "fatal" and not isinstance(exc, ConnectionFailed):
                    # Not a failover: the same batch would fail again, for ever. Set it
                    # aside; the leases expire and the tasks are recovered.
                    log.exception("queue %s: %d acks refused; dropped", q.name, len(batch))
                    for one in batch:
                        q.held.pop(one.id, None)
                    continue
                q.acks[:0] = batch
                failures += 1
                log.warning("queue %s: %d acks failed (%s); retrying", q.name, len(batch), exc)
                await asyncio.sleep(backoff(failures, base=0.05, cap=1.0))
                continue
            failures = 0
            q.slot_freed()
            for one, status in zip(batch, applied, strict=True):
                held = q.held.pop(one.id, None)
                if status == ack_script.ACKED:
                    self.stats.processed += 1  # counted once the server took the ack
                elif status == ack_script.GONE:
                    log.warning(
                        "queue %s: ack of task %s ignored: the task is gone (deleted by an "
                        "operator, or its queue removed)",
                        q.name,
                        one.id,
                    )
                else:
                    if held is None or not held.lost:  # the heartbeat counted it already
                        self.stats.leases_lost += 1
                    log.warning(
                        "queue %s: ack of task %s ignored: its lease was taken over "
                        "(it may run again)",
                        q.name,
                        one.id,
                    )

    async def flush_all(self, queues: list[QueueState], timeout: float) -> None:
        """Send every ack still waiting (at shutdown), for ``timeout`` at most."""
        for q in queues:
            if q.acks and (q.flusher is None or q.flusher.done()):
                q.flusher = asyncio.create_task(self.flush(q))
        flushers = [q.flusher for q in queues if q.flusher is not None]
        if flushers:
            _, late = await asyncio.wait(flushers, timeout=timeout)
            for flusher in late:
                flusher.cancel()

    # ------------------------------------------------------------------ failure

    async def fail(
        self, q: QueueState, task_id: str, token: str, record: Record | None, outcome: Outcome
    ) -> None:
        """Record a failed attempt: to retry after the policy's delay, or archived (no
        retries left, ``archive`` asked, or a record that cannot be read)."""
        held = q.held.get(task_id)
        if held is not None:
            held.done = True
        error = outcome.error[:MAX_ERROR_LENGTH]
        now_ms = int(time.time() * 1000)
        meta, delay = self.failed_meta(
            record, error, now_ms, outcome, task_id=task_id, queue=q.name
        )
        if outcome.rate_limited:
            self.stats.rate_limited += 1
        try:
            result = await self.broker.fail(
                q.qk,
                task_id,
                token,
                meta,
                retry_in_ms=_ms(delay),
                count_failure=not outcome.rate_limited,
                hold_ms=(_ms(delay) or 0) if outcome.hold else 0,
                hold_scope=outcome.hold or "queue",
            )
        except Exception as exc:
            log.error(
                "queue %s: could not record the failure of task %s (%s); it stays active "
                "until its lease expires, then lease recovery records it",
                q.name,
                task_id,
                exc,
            )
            q.held.pop(task_id, None)
            return
        q.held.pop(task_id, None)
        q.slot_freed()
        if result == "gone":
            log.warning(
                "queue %s: failure of task %s ignored: the task is gone (deleted by an "
                "operator, or its queue removed)",
                q.name,
                task_id,
            )
        elif result == "stale":
            if held is None or not held.lost:  # the heartbeat counted it already
                self.stats.leases_lost += 1
            log.warning(
                "queue %s: failure of task %s ignored: its lease was taken over", q.name, task_id
            )
        elif result == "archived":
            self.stats.failed += 1
            self.stats.archived += 1
            await self.workflow_failed(q, task_id, record, error)
            log.warning(
                "queue %s: task %s (%s) archived: %s",
                q.name,
                task_id,
                record.type if record else "?",
                error,
                exc_info=_traceback(outcome),
            )
        elif outcome.rate_limited:
            log.info(
                "queue %s: task %s rate limited, again in %.3gs%s (no retry spent)",
                q.name,
                task_id,
                delay,
                f", the {outcome.hold} held back meanwhile" if outcome.hold else "",
            )
        else:
            self.stats.failed += 1
            log.info(
                "queue %s: task %s failed, retry in %.3gs: %s",
                q.name,
                task_id,
                delay,
                error,
                exc_info=_traceback(outcome),
            )

    async def workflow_failed(
        self, q: QueueState, task_id: str, record: Record | None, error: str
    ) -> None:
        """Tell the workflow of a step archived for good (by its worker, or by lease
        recovery): the workflow fails, and its on_error step is enqueued."""
        if record is None or record.workflow is None or self.workflows is None:
            return
        level: Any = record.workflow_durability or "none"
        try:
            await self.workflows.step_failed(record.workflow, record.step or "", error, level)
        except Exception:
            # The step stays archived; running it again (`clusterq task run`) retells it.
            log.exception(
                "queue %s: task %s was archived but its workflow %s could not be told",
                q.name,
                task_id,
                record.workflow,
            )

    def failed_meta(
        self,
        record: Record | None,
        error: str,
        now_ms: int,
        outcome: Outcome,
        *,
        task_id: str = "",
        queue: str = "",
    ) -> tuple[bytes, float | None]:
        """The record's new meta after a failed attempt, and the delay before the next
        one (None: archive). A record that could not be read is archived as it is."""
        if record is None:
            return Record.unreadable_meta(error, now_ms), None
        try:
            delay = self.retry_delay(record, outcome, task_id=task_id, queue=queue)
        except Exception as exc:
            # The policy itself failed: keep the task visible (archived), with both errors.
            log.exception("retry policy failed for a task of type %r; archiving it", record.type)
            error = f"{error}; the retry policy failed: {type(exc).__name__}: {exc}"
            delay = None
        # ``retried`` counts retries: an attempt that is not retried does not add one
        # (max_retry=4 runs five times and ends with retried=4); nor does a rate-limited
        # one.
        count = delay is not None and not outcome.rate_limited
        failed = record.failed(error[:MAX_ERROR_LENGTH], now_ms, count=count)
        return failed.meta(), delay

    def retry_delay(
        self, record: Record, outcome: Outcome, *, task_id: str = "", queue: str = ""
    ) -> float | None:
        """Seconds until the next attempt, or None to archive. The policy sees the task
        (without its payload) and the error of the attempt."""
        if outcome.rate_limited and outcome.retry_in is not None:
            return outcome.retry_in  # no retry spent: whatever retries are left
        if outcome.archive or record.retried >= record.max_retry:
            return None
        if outcome.no_handler and record.retried >= self.settings.no_handler_retries:
            return None
        if outcome.retry_in is not None:
            return outcome.retry_in
        task = Task(
            id=task_id,
            type=record.type,
            payload=None,
            queue=queue,
            retry_count=record.retried,
            max_retry=record.max_retry,
        )
        error = outcome.exception or RuntimeError(outcome.error)
        delay = float(self.settings.retry_policy(record.retried, error, task))
        if not math.isfinite(delay):
            raise ValueError(f"the retry policy gave {delay!r} seconds")
        return max(0.0, delay)

    # ------------------------------------------------------------------ shutdown

    async def return_unfinished(self, queues: list[QueueState]) -> None:
        """Hand tasks still held back to their queues (no retry used)."""
        for q in queues:
            unfinished = q.unfinished()
            if not unfinished:
                continue
            try:
                n = await self.broker.requeue(q.qk, unfinished)
                self.stats.returned += n
                log.info("queue %s: returned %d unfinished tasks", q.name, n)
            except Exception as exc:
                log.warning(
                    "queue %s: could not return %d tasks (%s); their leases will expire",
                    q.name,
                    len(unfinished),
                    exc,
                )
            for task_id, _ in unfinished:
                q.held.pop(task_id, None)


def _ms(seconds: float | None) -> int | None:
    return None if seconds is None else int(seconds * 1000)


def _traceback(outcome: Outcome) -> BaseException | None:
    """The handler's own exception, for the log line's traceback."""
    return outcome.exception if outcome.traceback else None
