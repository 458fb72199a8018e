"""The threads that run plain ``def`` handlers.

A worker runs its event loop in one thread and its sync handlers in long-lived threads,
at most one per concurrency slot, started when first needed and kept. What a sync task
costs is mostly not Python but the GIL changing hands: every time a thread blocks (a
socket call, a lock) another one takes it, and the loop, which feeds every handler,
waits behind each thread that wants it too. So:

- No executor: the loop hands a :class:`Job` to an idle thread directly (the one idle
  since the shortest time, likeliest to still be warm), or leaves it in a queue that
  the threads awake take from as they finish, before going to sleep. With
  :data:`EAGER` threads awake, a new job waits for one of them: short handlers (a
  command to Redis, some computing) run on a few threads, which keeps the GIL with
  few contenders. While jobs wait, the loop looks every :data:`PATIENCE` seconds at
  how much CPU the process used meanwhile: under :data:`BUSY` of one CPU, the threads
  awake are waiting (I/O, ``sleep``, a lock), and as many threads again are woken.
  Handlers that block thus get a thread each within a few milliseconds, up to the
  concurrency, as before.
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

#: Threads awake (running a job or about to take the next) beyond which a new job waits
#: for one of them instead of waking another.
EAGER = 4
#: Seconds between looks at jobs waiting for a thread.
PATIENCE = 0.002
#: When the process used less than this share of one CPU since the last look while jobs
#: waited, the threads awake are taken to be blocked and as many again are woken.
BUSY = 0.5


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
    ) -> None:
        self.size = size
        self.name = name
        self.on_return = on_return
        self.eager = eager
        self.patience = patience
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
        #: A settling of ``_returned`` is scheduled on the loop already.
        self._wake_sent = False
        self._closed = False
        # On the loop only:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        #: When the timer was set: (time.monotonic(), time.process_time()).
        self._since = (0.0, 0.0)

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
        sleeper = None
        with self._lock:
            if self._closed:
                raise RuntimeError("the worker's handler threads are closed")
            if self._awake >= self.eager:
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
            with self._lock:
                self._returned.append(job)
                wake_loop = not self._wake_sent
                self._wake_sent = True
                if self._pending:
                    job = self._pending.popleft()
                else:
                    job = None
                    self._awake -= 1
                    if not self._closed:
                        self._idle.append(sleeper)
            if wake_loop:
                assert self._loop is not None
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                    self._loop.call_soon_threadsafe(self._settle)
            if job is None and not self._closed:
                sleeper.wake.acquire()
                job, sleeper.job = sleeper.job, None

    # ------------------------------------------------------------------ on the loop

    def _check(self) -> None:
        """Jobs wait: if the threads awake are blocked, wake (or start) as many again
        (one per waiting job at most); look again in ``patience`` while jobs wait."""
        self._timer = None
        woken: list[_Sleeper] = []
        starting: list[Job] = []
        with self._lock:
            if not self._pending:
                return
            if self._idling():
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
        assert self._loop is not None
        self._since = (time.monotonic(), time.process_time())
        self._timer = self._loop.call_later(self.patience, self._check)

    def _idling(self) -> bool:
        """This process used less than :data:`BUSY` of one CPU since the last look: the
        threads awake are waiting (on I/O, a lock, a sleep), not running Python."""
        wall, cpu = self._since
        return time.process_time() - cpu < (time.monotonic() - wall) * BUSY

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
