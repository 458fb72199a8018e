"""Running one task: decode its record, find its handler, call it through the router's
middleware with its timeout or deadline, and hand the outcome to
:class:`~clusterq.worker.outcomes.Outcomes`.

An ``async def`` handler past its timeout is cancelled. A plain function runs in one of
the worker's handler threads (:mod:`clusterq.worker.threads`) and cannot be interrupted:
it is abandoned (its result ignored; :attr:`Runner.abandoned` says since when), the
attempt counts as failed, and its concurrency slot stays taken until the function
returns. With ``hard_timeout`` set (:class:`~clusterq.worker.state.WorkerSettings`), a
plain function's attempt whose task has no timeout of its own gets that one.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from clusterq import tracing
from clusterq.cluster.backend import Backend
from clusterq.priority import Capacity
from clusterq.retry import RateLimited, RetryIn, SkipRetry
from clusterq.router import CallNext, Handler, Router, is_async
from clusterq.serialization import (
    PayloadError,
    encode_limited,
    get_codec,
    json_bytes,
    too_large,
)
from clusterq.task import NO_HEADERS, Record, Task
from clusterq.worker.blocking import BlockingBackend
from clusterq.worker.outcomes import Outcomes
from clusterq.worker.progress import ProgressWriter
from clusterq.worker.state import Outcome, QueueState, WorkerSettings
from clusterq.worker.threads import HandlerThreads, Job
from clusterq.workflow import AsyncWorkflows

log = logging.getLogger("clusterq.worker")


class Runner:
    """Runs tasks of one worker; owns its thread pool and each handler's middleware chain."""

    def __init__(
        self,
        router: Router,
        settings: WorkerSettings,
        capacity: Capacity,
        outcomes: Outcomes,
        stopping: Callable[[], bool] = lambda: False,
        *,
        observe: Callable[[str, str, float, bool], None] | None = None,
    ) -> None:
        self.stopping = stopping
        #: Advances workflows after their steps (set by the worker).
        self.workflows: AsyncWorkflows | None = None
        #: ``observe(queue, type, seconds, ok)`` after each attempt (metrics), if given.
        self.observe = observe
        self.router = router
        self.settings = settings
        self.capacity = capacity
        self.outcomes = outcomes
        #: The threads of sync handlers: one per concurrency slot at most, kept.
        self.threads = HandlerThreads(settings.concurrency, self._returned)
        #: handler id -> (its middleware chain, whether it is a plain function)
        self._chains: dict[int, tuple[Callable[[Task], Awaitable[Any]], bool]] = {}
        #: Sync handlers still running in a thread, by task id (the latest attempt's, if
        #: an abandoned one of an earlier attempt runs too); ``job.done()`` once returned.
        self._threads: dict[str, Job] = {}
        #: Sync handlers abandoned (their attempt failed: a timeout, an operator's
        #: cancel, a stop) whose threads still run: task id -> ``time.monotonic()`` when
        #: it was abandoned (the earliest, if several attempts of it still run). An entry
        #: goes once its thread returns.
        self.abandoned: dict[str, float] = {}
        #: Abandoned jobs still running, by attempt (task id, fencing token); and the
        #: attempts whose concurrency slot they hold (released when the last returns).
        self._strays: dict[tuple[str, str], list[Job]] = {}
        self._kept: set[tuple[str, str]] = set()
        #: The blocking backend of sync handlers (:mod:`clusterq.worker.blocking`).
        self.blocking = BlockingBackend()
        #: Writes what handlers report with ``task.progress()``.
        self.progress = ProgressWriter(outcomes.broker, lambda: self.sync_backend)

    @property
    def sync_backend(self) -> Backend:
        """A blocking :class:`~clusterq.cluster.backend.Backend` for sync handlers,
        connected on first use (see :mod:`clusterq.worker.blocking`)."""
        return self.blocking.get(self.outcomes.broker.backend)

    def close(self) -> None:
        """Let the handler threads end (running handlers run on); close the sync backend."""
        self.threads.close()
        self.blocking.close()

    async def execute(self, q: QueueState, task_id: str, token: str, raw: bytes) -> None:
        """Run one task taken under ``token``; releases its concurrency slot when done
        (or, for an abandoned sync handler, when its thread returns)."""
        record: Record | None = None
        try:
            try:
                record = Record.decode(raw)
            except Exception as exc:
                unreadable = Outcome(False, error=f"unreadable record: {exc}", archive=True)
                await self.outcomes.fail(q, task_id, token, None, unreadable)
                return
            if tracing.enabled():
                outcome = await self._traced(q, task_id, record, token)
            else:
                outcome = await self._attempt(q, task_id, record, token)
            if outcome.ok:
                self.outcomes.ack(q, task_id, token, record, outcome.result)
            else:
                await self.outcomes.fail(q, task_id, token, record, outcome)
        except asyncio.CancelledError:
            held = q.held.get(task_id)
            current = asyncio.current_task()
            if held is None or not held.cancelled or current is None or self.stopping():
                raise  # stopping: leave the task held; stop() returns it to the queue
            # An operator cancelled it: archived, no retry (a sync handler's thread runs
            # on; its slot stays taken until it returns).
            uncancel = getattr(current, "uncancel", None)  # Python >= 3.11
            if uncancel is not None:
                uncancel()
            log.warning(
                "queue %s: task %s cancelled by an operator",
                q.name,
                task_id,
                extra={"event": {"event": "task_cancelled", "queue": q.name, "task": task_id}},
            )
            cancelled = Outcome(False, error="cancelled by an operator", archive=True)
            await self.outcomes.fail(q, task_id, token, record, cancelled)
        except Exception:
            log.exception("queue %s: internal error handling task %s", q.name, task_id)
            held = q.held.pop(task_id, None)
            if held is not None:
                held.done = True  # no heartbeat: the lease expires, the recoverer retries it
        finally:
            if self._strays and (task_id, token) in self._strays:
                # An abandoned sync handler still runs: its slot is released when it
                # returns.
                self._kept.add((task_id, token))
            else:
                self.capacity.release(1)

    async def _attempt(self, q: QueueState, task_id: str, record: Record, token: str) -> Outcome:
        """The handler's call, and a workflow step's advance after it."""
        began = time.perf_counter()
        outcome = await self.call(q, task_id, record, token)
        if self.observe is not None:
            self.observe(q.name, record.type, time.perf_counter() - began, outcome.ok)
        if outcome.ok and record.workflow is not None:
            outcome = await self._advance(q, task_id, record, outcome)
        return outcome

    async def _traced(self, q: QueueState, task_id: str, record: Record, token: str) -> Outcome:
        """:meth:`_attempt` in its CONSUMER span (see :mod:`clusterq.tracing`)."""
        backend = self.outcomes.broker.backend
        attempt = record.retried
        started = tracing.start_consumer(
            backend, q.name, q.qk.slot, task_id, record.type, attempt, record.headers
        )
        outcome: Outcome | None = None
        try:
            outcome = await self._attempt(q, task_id, record, token)
            return outcome
        finally:
            if outcome is None:
                tracing.end_consumer(started, None)
            else:
                tracing.end_consumer(
                    started,
                    outcome.ok,
                    error=outcome.error,
                    exception=outcome.exception,
                    archive=outcome.archive or attempt >= record.max_retry,
                    attempt=attempt,
                )

    async def _advance(
        self, q: QueueState, task_id: str, record: Record, outcome: Outcome
    ) -> Outcome:
        """Record a workflow step's result and enqueue what follows, before the ack: a
        crash in between runs the step again, and advancing again changes nothing. If
        the workflow cannot be advanced, the attempt fails (and is retried)."""
        if self.workflows is None:
            return outcome
        assert record.workflow is not None and record.step is not None
        level: Any = record.workflow_durability or "none"
        try:
            advanced = await self.workflows.step_done(
                record.workflow, record.step, outcome.workflow_result, level
            )
        except Exception as exc:
            error = f"workflow {record.workflow}: the step's result was not recorded: {exc}"
            return Outcome(False, error=error, exception=exc)
        if not advanced:
            log.warning(
                "queue %s: task %s: its workflow %s is gone (ended and expired); "
                "nothing to advance",
                q.name,
                task_id,
                record.workflow,
            )
        return outcome

    async def call(self, q: QueueState, task_id: str, record: Record, token: str) -> Outcome:
        """Call the handler of ``record``'s type and say how the attempt ended."""
        handler = self.router.resolve(record.type)
        if handler is None:
            return Outcome(
                False, error=f"no handler registered for task type {record.type!r}", no_handler=True
            )
        try:
            codec = get_codec(record.codec)
            payload = codec.decode(record.payload)
        except PayloadError as exc:
            return Outcome(False, error=str(exc), archive=True)
        call, sync = self._chain(handler)
        timeout = record.timeout_ms / 1000 if record.timeout_ms else None
        if timeout is None and sync:
            timeout = self.settings.hard_timeout
        if record.deadline_ms is not None:
            left = record.deadline_ms / 1000 - time.time()
            if left <= 0:
                return Outcome(
                    False, error="deadline passed before the task could start", archive=True
                )
            timeout = left if timeout is None else min(timeout, left)
        task = _new_task(
            task_id,
            record.type,
            payload,
            q.name,
            record.retried,
            record.max_retry,
            record.timeout_ms / 1000 if record.timeout_ms else None,
            record.deadline_ms / 1000 if record.deadline_ms is not None else None,
            record.enqueued_ms / 1000 if record.enqueued_ms else None,
            token,
            record.parent_results,
            record.workflow,
            record.group,
            record.headers or NO_HEADERS,
        )
        try:
            if timeout is None:
                result = await call(task)
            else:
                result = await _with_timeout(call(task), timeout)
        except _TimedOut as exc:
            past_deadline = (
                record.deadline_ms is not None and time.time() * 1000 >= record.deadline_ms
            )
            what = "deadline" if past_deadline else "timeout"
            return Outcome(
                False, error=f"{what}: the task ran longer than {timeout:.3g}s", exception=exc
            )
        except SkipRetry as exc:
            return Outcome(False, error=f"SkipRetry: {exc}", exception=exc, archive=True)
        except RetryIn as exc:
            return Outcome(False, error=f"RetryIn: {exc}", exception=exc, retry_in=exc.seconds)
        except RateLimited as exc:
            return Outcome(
                False,
                error=f"RateLimited: {exc}",
                exception=exc,
                retry_in=exc.retry_in,
                rate_limited=True,
                hold="" if exc.scope == "task" else exc.scope,
            )
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            return Outcome(False, error=error, exception=exc, traceback=True)
        step_result = b"null"
        if record.workflow is not None:
            # The work is done; running it again would repeat its effects: a result that
            # cannot be kept archives the task (and fails the workflow), visibly.
            try:
                step_result = json_bytes(result)
            except (TypeError, ValueError) as exc:
                error = f"a workflow step's result must be JSON: {exc}"
                return Outcome(False, error=error, archive=True)
            limit = self.settings.max_result_bytes
            if len(step_result) > limit:
                error = f"result not stored: {too_large(len(step_result), limit, 'result')}"
                return Outcome(False, error=error, archive=True)
        if not record.retention_ms:
            return Outcome(True, workflow_result=step_result)
        try:
            kept = encode_limited(codec, result, self.settings.max_result_bytes, "result")
        except PayloadError as exc:
            return Outcome(False, error=f"result not stored: {exc}", archive=True)
        return Outcome(True, result=kept, workflow_result=step_result)

    def _chain(self, handler: Handler) -> tuple[Callable[[Task], Awaitable[Any]], bool]:
        """The handler wrapped in the middleware, and whether it is a plain function."""
        known = self._chains.get(id(handler))
        if known is not None:
            return known
        sync = not is_async(handler)
        chain: Callable[[Task], Awaitable[Any]] = (
            functools.partial(self._in_thread, handler) if sync else handler
        )
        for middleware in reversed(self.router.middleware):
            chain = _wrap(middleware, chain)
        self._chains[id(handler)] = chain, sync
        return chain, sync

    async def _in_thread(self, handler: Handler, task: Task) -> Any:
        """Run ``handler(task)`` in a handler thread, in a copy of this context (what the
        handler sees: ``current_worker()``, variables a middleware set). If the wait is
        cancelled (a timeout, an operator's cancel, a stop), the thread runs on: the job
        is abandoned, and holds the attempt's concurrency slot until it returns."""
        job = self.threads.submit(handler, task, contextvars.copy_context())
        job.key = (task.id, task.attempt)
        self._threads[task.id] = job
        try:
            return await job.future
        finally:
            if not job.returned:
                self._abandon(job)

    def _abandon(self, job: Job) -> None:
        job.abandoned = now = time.monotonic()
        task_id, _ = attempt = job.key
        self.abandoned.setdefault(task_id, now)
        self._strays.setdefault(attempt, []).append(job)

    def _returned(self, job: Job) -> None:
        """On the loop: a handler thread's function returned."""
        task_id, _ = attempt = job.key
        if self._threads.get(task_id) is job:
            del self._threads[task_id]
        if job.abandoned is None:
            return
        strays = self._strays.get(attempt, [])
        if job in strays:
            strays.remove(job)
        if not strays:
            self._strays.pop(attempt, None)
            if attempt in self._kept:  # the attempt is over: its slot was left to us
                self._kept.discard(attempt)
                self.capacity.release(1)
        since = [
            stray.abandoned
            for (other, _), jobs in self._strays.items()
            if other == task_id
            for stray in jobs
            if stray.abandoned is not None
        ]
        if since:
            self.abandoned[task_id] = min(since)
        else:
            self.abandoned.pop(task_id, None)


def _new_task(
    task_id: str,
    task_type: str,
    payload: Any,
    queue: str,
    retry_count: int,
    max_retry: int,
    timeout: float | None,
    deadline: float | None,
    enqueued_at: float | None,
    attempt: str,
    parent_results: list[Any] | None,
    workflow: str | None,
    group: str | None,
    headers: Mapping[str, str],
) -> Task:
    """``Task(...)`` in a quarter of the time: a frozen dataclass sets each of its thirteen
    fields through ``object.__setattr__`` (~1.7 us a task on a small machine); here they
    go straight into the new instance's dict. Checked against ``Task`` at import."""
    task: Task = object.__new__(Task)
    fields = task.__dict__
    fields["id"] = task_id
    fields["type"] = task_type
    fields["payload"] = payload
    fields["queue"] = queue
    fields["retry_count"] = retry_count
    fields["max_retry"] = max_retry
    fields["timeout"] = timeout
    fields["deadline"] = deadline
    fields["enqueued_at"] = enqueued_at
    fields["attempt"] = attempt
    fields["parent_results"] = parent_results
    fields["workflow"] = workflow
    fields["group"] = group
    fields["headers"] = headers
    return task


_probe = _new_task("i", "t", None, "q", 0, 0, None, None, None, "a", None, None, None, NO_HEADERS)
if set(vars(_probe)) != {f.name for f in dataclasses.fields(Task)}:  # pragma: no cover
    raise ImportError("clusterq.task.Task changed: update clusterq.worker.runner._new_task")
del _probe


def _wrap(middleware: Any, call_next: CallNext) -> Callable[[Task], Awaitable[Any]]:
    async def call(task: Task) -> Any:
        return await middleware(task, call_next)

    return call


class _TimedOut(Exception):
    """Our timer fired (unlike a TimeoutError the handler raised itself)."""


async def _with_timeout(work: Awaitable[Any], seconds: float) -> Any:
    """Await ``work``; cancel it and raise :class:`_TimedOut` after ``seconds``."""
    running = asyncio.ensure_future(work)
    try:
        done, _ = await asyncio.wait({running}, timeout=seconds)
    except asyncio.CancelledError:
        running.cancel()
        raise
    if not done:
        running.cancel()
        with contextlib.suppress(BaseException):
            await running
        raise _TimedOut(f"ran longer than {seconds:.3g}s")
    return running.result()
