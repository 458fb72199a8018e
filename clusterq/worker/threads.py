"""The threads that run plain ``def`` handlers.

A worker runs its event loop in one thread and its sync handlers in long-lived threads,
at most one per concurrency slot, started when first needed and kept. What a sync task
costs is mostly not Python but the GIL changing hands: each blocking call of a handler
(redis-py makes five syscalls per command) lets another thread take the GIL, on another
CPU, and the loop, which feeds every handler, waits behind each thread that wants it
too. So:

- No executor: the loop hands a :class:`Job` to an idle thread directly (the one idle
  since the shortest time), or leaves it in a queue that the threads awake take from as
  they finish, before going to sleep.
- While the process is busy (it used :data:`BUSY` of a CPU or more, measured every
  :data:`SAMPLE` seconds while jobs come in), a new job waits for one of the
  :data:`EAGER` threads awake instead of waking another, and a thread that has another
  job to run leaves its finished ones for up to :data:`LAZY` seconds before waking the
  loop: short handlers run on a couple of threads, and the loop settles them in larger
  batches, meeting the threads less often on the GIL. Not busy (handlers that mostly
  wait), each job wakes a thread and each result the loop, as before.
- While jobs wait, the loop looks every :data:`PATIENCE` seconds: if the process used
  under :data:`IDLE` of a CPU meanwhile, the threads awake are blocked (I/O, ``sleep``,
  a lock) and as many again are woken, up to the concurrency.
- Results go back in batches: a thread that finishes puts its job on a list and wakes
  the loop only if no wake-up is on its way already; the loop then settles every job
  finished meanwhile (their futures, the runner's bookkeeping). That is one
  ``call_soon_threadsafe`` per batch instead of, per task, what ``run_in_executor`` /
  ``asyncio.wrap_future`` cost (a ``concurrent.futures.Future`` with its lock and
  condition, and a wake-up of the loop).

Each job runs in the context (:mod:`contextvars`) it was given: the handler sees what
the task running it saw (``current_worker()``, variables a middleware set). A job whose
future was cancelled before a thread took it is not run.

The threads are daemon threads: a handler still running when the process exits is cut
off there (its task was failed after its timeout, handed back at the worker's stop, or
its lease expires: it runs again).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import threading
import time
from collections.abc import Callable
from typing import Any

#: Seconds between two measures of how busy the process is (while jobs come in).
SAMPLE = 0.01
#: The process is busy when it used at least this share of one CPU since the last measure.
BUSY = 0.75
#: While the process is busy: threads awake (running a job or about to take the next)
#: beyond which a new job waits for one of them instead of waking another.
EAGER = 2
#: While the process is busy: seconds a finished job may wait for the next one to finish
#: before its thread wakes the loop (it does at once when no job waits for a thread).
LAZY = 0.002
#: Seconds between looks at jobs waiting for a thread.
PATIENCE = 0.002
#: When the process used less than this share of one CPU since the last look while jobs
#: waited, the threads awake are taken to be blocked and as many again are woken.
IDLE = 0.5


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


class _Sleeper:
    """An idle thread's bed: it sleeps on ``wake`` (a lock held while it sleeps) until
    given ``job`` (None: end)."""

    __slots__ = ("job", "wake")

    def __init__(self) -> None:
        self.wake = threading.Lock()
        self.wake.acquire()
        self.job: Job | None = None


class HandlerThreads:
    """Up to ``size`` threads running :class:`Job` s for one event loop (see the module).

    ``on_return(job)`` is called on the loop for each job whose function returned (or
    that was dropped by :meth:`close`), after its future was resolved (unless the future
    was cancelled: an abandoned job).
    """

    def __init__(
        self,
        size: int,
        on_return: Callable[[Job], None] = lambda _job: None,
        *,
        name: str = "clusterq-task",
        eager: int = EAGER,
        patience: float = PATIENCE,
        lazy: float = LAZY,
    ) -> None:
        self.size = size
        self.name = name
        self.on_return = on_return
        self.eager = eager
        self.patience = patience
        self.lazy = lazy
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        # Under the lock:
        #: Jobs waiting for a thread, oldest first.
        self._pending: collections.deque[Job] = collections.deque()
        #: Idle threads, the one idle since the shortest time last.
        self._idle: list[_Sleeper] = []
        #: Threads awake: running a job, or about to look for the next.
        self._awake = 0
        #: Jobs whose function returned, not yet settled on the loop.
        self._returned: list[Job] = []
        #: When the first of ``_returned`` returned (``time.monotonic()``).
        self._first_returned = 0.0
        #: A settling of ``_returned`` is scheduled on the loop already.
        self._wake_sent = False
        self._closed = False
        #: The process was busy at the last measure (set on the loop, read anywhere).
        self._busy = False
        # On the loop only:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        #: When the timer was set: (time.monotonic(), time.process_time()).
        self._since = (0.0, 0.0)
        #: The last measure of how busy the process is: (time.monotonic(),
        #: time.process_time()).
        self._sampled = (0.0, 0.0)

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
        job = Job(fn, arg, context, loop.create_future())
        now = time.monotonic()
        if now - self._sampled[0] >= SAMPLE:
            self._measure(now)
        sleeper = None
        with self._lock:
            if self._closed:
                raise RuntimeError("the worker's handler threads are closed")
            if self._busy and self._awake >= self.eager:
                # The threads awake take it as they finish theirs (the timer wakes
                # more if they are blocked).
                self._pending.append(job)
                wait = True
            elif self._idle:
                sleeper = self._idle.pop()
                sleeper.job = job
                self._awake += 1
                wait = False
            elif len(self._threads) < self.size:
                self._awake += 1
                wait = False
            else:  # every thread runs (a slot is free: one will be soon)
                self._pending.append(job)
                wait = True
        if wait:
            if self._timer is None:
                self._since = (time.monotonic(), time.process_time())
                self._timer = loop.call_later(self.patience, self._check)
        elif sleeper is not None:
            sleeper.wake.release()
        else:
            self._start_thread(job)
        return job

    def close(self) -> None:
        """Let every thread end once it is idle (a running handler runs on); jobs not
        yet started are dropped (their futures are cancelled). On the loop only."""
        with self._lock:
            self._closed = True
            dropped, self._pending = list(self._pending), collections.deque()
            idle, self._idle = self._idle, []
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for sleeper in idle:
            sleeper.job = None
            sleeper.wake.release()
        for job in dropped:
            job.future.cancel()
            job.returned = True  # it never will: done with it
            self.on_return(job)

    # ------------------------------------------------------------------ threads

    def _start_thread(self, job: Job) -> None:
        thread = threading.Thread(
            target=self._work, args=(job,), name=f"{self.name}-{len(self._threads)}", daemon=True
        )
        self._threads.append(thread)
        thread.start()

    def _work(self, first: Job) -> None:
        sleeper = _Sleeper()
        job: Job | None = first
        while job is not None:
            if not job.future.cancelled():  # else given up before it started: not run
                try:
                    job.result = job.context.run(job.fn, job.arg)
                except StopIteration as exc:  # a future cannot hold one
                    job.error = RuntimeError(f"the handler raised StopIteration: {exc}")
                except BaseException as exc:
                    job.error = exc
            job.arg = None  # nothing of the task kept past its run
            now = time.monotonic()
            with self._lock:
                if not self._returned:
                    self._first_returned = now
                self._returned.append(job)
                if self._pending:
                    job = self._pending.popleft()
                else:
                    job = None
                    self._awake -= 1
                    if not self._closed:
                        self._idle.append(sleeper)
                # Busy, the loop is not woken while this thread has another job, for
                # ``lazy`` at most: it then settles more at once, and fights the
                # threads for the GIL less often.
                wake_loop = not self._wake_sent and (
                    job is None or not self._busy or now - self._first_returned >= self.lazy
                )
                if wake_loop:
                    self._wake_sent = True
            if wake_loop:
                assert self._loop is not None
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                    self._loop.call_soon_threadsafe(self._settle)
            if job is None and not self._closed:
                sleeper.wake.acquire()
                job, sleeper.job = sleeper.job, None

    # ------------------------------------------------------------------ on the loop

    def _check(self) -> None:
        """While jobs wait for a thread: settle jobs that busy threads left finished, and
        if the threads awake are blocked, wake (or start) as many again (one per waiting
        job at most); look again in ``patience`` while jobs wait."""
        self._timer = None
        woken: list[_Sleeper] = []
        starting: list[Job] = []
        with self._lock:
            late = bool(self._returned) and not self._wake_sent
            waiting = bool(self._pending)
            if waiting and self._idling():
                more = max(1, self._awake)  # as many again
                while self._pending and more:
                    more -= 1
                    if self._idle:
                        sleeper = self._idle.pop()
                        sleeper.job = self._pending.popleft()
                        woken.append(sleeper)
                    elif len(self._threads) + len(starting) < self.size:
                        starting.append(self._pending.popleft())
                    else:
                        break
                    self._awake += 1
        for sleeper in woken:
            sleeper.wake.release()
        for job in starting:
            self._start_thread(job)
        if late:
            self._settle()
        if waiting:
            assert self._loop is not None
            self._since = (time.monotonic(), time.process_time())
            self._timer = self._loop.call_later(self.patience, self._check)

    def _idling(self) -> bool:
        """This process used less than :data:`IDLE` of one CPU since the last look: the
        threads awake are waiting (on I/O, a lock, a sleep), not running Python."""
        wall, cpu = self._since
        return time.process_time() - cpu < (time.monotonic() - wall) * IDLE

    def _measure(self, now: float) -> None:
        """Whether the process used :data:`BUSY` of one CPU or more since the last
        measure (one every :data:`SAMPLE` seconds at most, when a job comes in)."""
        wall, cpu = self._sampled
        used = time.process_time()
        self._busy = used - cpu >= (now - wall) * BUSY and now - wall < 10 * SAMPLE
        self._sampled = (now, used)

    def _settle(self) -> None:
        with self._lock:
            returned, self._returned = self._returned, []
            self._wake_sent = False
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
