"""The threads that run plain ``def`` handlers.

A worker runs its event loop in one thread and its sync handlers in a pool of long-lived
threads, at most one per concurrency slot, started as they are needed and kept. The loop
hands each one a :class:`Job` through one in-process queue; a thread that finishes a job
puts it on a list and wakes the loop only if no wake-up is on its way already: the loop
then settles every job finished meanwhile at once (their futures, the runner's
bookkeeping). Under load that is one ``call_soon_threadsafe`` per batch of finished
handlers rather than one per handler (what ``loop.run_in_executor`` and
``asyncio.wrap_future`` cost: a ``concurrent.futures.Future``, its lock and condition,
and a wake-up of the loop per task).

Each job runs in the context (:mod:`contextvars`) it was given: the handler sees what
the task running it saw (``current_worker()``, variables a middleware set).

The threads are daemon threads: a handler still running when the process exits is cut
off there (its task was failed after its timeout, handed back at the worker's stop, or
its lease expires: it runs again).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import queue
import threading
from collections.abc import Callable
from typing import Any


class Job:
    """One call of a sync handler: ``fn(arg)`` in ``context``."""

    __slots__ = (
        "abandoned",
        "arg",
        "context",
        "error",
        "fn",
        "future",
        "key",
        "result",
        "returned",
    )

    def __init__(
        self,
        fn: Callable[[Any], Any],
        arg: Any,
        context: contextvars.Context,
        future: asyncio.Future[Any],
    ) -> None:
        self.fn = fn
        self.arg = arg
        self.context = context
        #: Resolved on the loop once the function returned (or raised).
        self.future = future
        self.result: Any = None
        self.error: BaseException | None = None
        #: The function returned (seen on the loop: set when the job is settled).
        self.returned = False
        #: ``time.monotonic()`` when the loop stopped waiting for it (a timeout, a
        #: cancel), while its thread ran on; None if it was not abandoned.
        self.abandoned: float | None = None
        #: What the submitter knows it by (the runner: the attempt's task id and token).
        self.key: Any = None

    def done(self) -> bool:
        """The function returned (``concurrent.futures.Future``'s name for it)."""
        return self.returned


class HandlerThreads:
    """Up to ``size`` threads running :class:`Job` s for one event loop.

    ``on_return(job)`` is called on the loop for each job whose function returned, after
    its future was resolved (unless the future was cancelled: an abandoned job).
    """

    def __init__(
        self,
        size: int,
        on_return: Callable[[Job], None] = lambda _job: None,
        *,
        name: str = "clusterq-task",
    ) -> None:
        self.size = size
        self.name = name
        self.on_return = on_return
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        #: Jobs whose function returned, not yet settled on the loop.
        self._returned: list[Job] = []
        self._lock = threading.Lock()
        #: A settling of ``_returned`` is scheduled on the loop already.
        self._wake_sent = False
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Jobs submitted and not yet settled (on the loop only).
        self._outstanding = 0
        self._closed = False

    @property
    def started(self) -> int:
        """Threads started so far."""
        return len(self._threads)

    def submit(self, fn: Callable[[Any], Any], arg: Any, context: contextvars.Context) -> Job:
        """Run ``context.run(fn, arg)`` in a thread; on the loop only. Await
        ``job.future`` for its result."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        if self._closed:
            raise RuntimeError("the worker's handler threads are closed")
        job = Job(fn, arg, context, loop.create_future())
        self._outstanding += 1
        if self._outstanding > len(self._threads) and len(self._threads) < self.size:
            self._start_thread()
        self._jobs.put(job)
        return job

    def close(self) -> None:
        """Let every thread end once it is idle (a running handler runs on); jobs not
        yet started are dropped (their futures are cancelled). On the loop only."""
        self._closed = True
        while True:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.future.cancel()
                job.returned = True  # it never will: done with it
                self._outstanding -= 1
                self.on_return(job)
        for _ in self._threads:
            self._jobs.put(None)

    # ------------------------------------------------------------------ threads

    def _start_thread(self) -> None:
        thread = threading.Thread(
            target=self._work, name=f"{self.name}-{len(self._threads)}", daemon=True
        )
        self._threads.append(thread)
        thread.start()

    def _work(self) -> None:
        take = self._jobs.get
        while True:
            job = take()
            if job is None:
                return
            if not job.future.cancelled():  # else given up before it started: not run
                try:
                    job.result = job.context.run(job.fn, job.arg)
                except StopIteration as exc:  # a future cannot hold one
                    job.error = RuntimeError(f"the handler raised StopIteration: {exc}")
                except BaseException as exc:
                    job.error = exc
            job.arg = None  # nothing of the task kept past its run
            with self._lock:
                self._returned.append(job)
                if self._wake_sent:
                    continue
                self._wake_sent = True
            assert self._loop is not None
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                self._loop.call_soon_threadsafe(self._settle)

    # ------------------------------------------------------------------ on the loop

    def _settle(self) -> None:
        with self._lock:
            returned, self._returned = self._returned, []
            self._wake_sent = False
        self._outstanding -= len(returned)
        for job in returned:
            job.returned = True
            future = job.future
            if not future.done():
                if job.error is None:
                    future.set_result(job.result)
                else:
                    future.set_exception(job.error)
            job.result = job.error = None
            self.on_return(job)
