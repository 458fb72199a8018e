"""Plain ``def`` handlers: the worker's handler threads, what a handler sees there
(``current_worker()``, a middleware's context variables, a blocking backend), and what
happens to one that runs too long (abandoned: ``Runner.abandoned``, its slot kept until
it returns; ``WorkerSettings.hard_timeout``). Against real servers; no timing asserted.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from clusterq import AsyncClient, Router, Task, TaskFailed, TaskState, Worker, current_worker
from clusterq.cluster.backend import Backend
from clusterq.worker.runner import Runner
from tests.helpers import await_for, running_worker

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


def _runner(worker: Worker) -> Runner:
    runner = worker._runner
    assert runner is not None
    return runner


def _blocking_backend() -> Backend:
    """What ``current_worker().sync_backend`` gives a sync handler."""
    return current_worker().sync_backend


def test_sync_handlers_see_the_worker_and_the_middlewares_context(url: str, prefix: str) -> None:
    router = Router()
    seen: list[tuple[str, bool, str, str]] = []

    async def tag(task: Task, call_next: Callable[[Task], Awaitable[Any]]) -> Any:
        REQUEST_ID.set(f"req-{task.payload['n']}")
        return await call_next(task)

    router.use(tag)

    @router.task("who")
    def who(task: Task) -> int:
        worker = current_worker()
        seen.append((task.id, isinstance(worker, Worker), REQUEST_ID.get(), worker.id))
        return int(task.payload["n"]) * 2

    async def scenario() -> None:
        client = await AsyncClient.connect(url, prefix=prefix)
        infos = [await client.enqueue("who", {"n": n}, retention=60) for n in range(20)]
        async with running_worker(url, router, prefix=prefix, concurrency=4) as worker:
            results = [await client.result(info, timeout=20) for info in infos]
            runner = _runner(worker)
            assert runner.threads.started <= 4  # one per slot at most, kept
            assert runner._threads == {} and runner.abandoned == {}
        await client.aclose()
        assert results == [n * 2 for n in range(20)]
        assert sorted(tag for _, _, tag, _ in seen) == sorted(f"req-{n}" for n in range(20))
        assert all(is_worker and name == worker.id for _, is_worker, _, name in seen)

    asyncio.run(scenario())


def test_as_many_sync_handlers_run_at_once_as_the_concurrency(url: str, prefix: str) -> None:
    router = Router()
    concurrency = 6
    together = threading.Barrier(concurrency, timeout=20)

    @router.task("meet")
    def meet(task: Task) -> int:
        return together.wait()  # broken (an error) unless all run at the same time

    async def scenario() -> None:
        client = await AsyncClient.connect(url, prefix=prefix)
        infos = [await client.enqueue("meet", None, retention=60) for _ in range(concurrency)]
        async with running_worker(url, router, prefix=prefix, concurrency=concurrency):
            results = [await client.result(info, timeout=30) for info in infos]
        await client.aclose()
        assert sorted(results) == list(range(concurrency))

    asyncio.run(scenario())


def test_a_sync_handler_gets_a_blocking_backend_closed_with_the_worker(
    url: str, prefix: str
) -> None:
    router = Router()
    threads: set[str] = set()

    @router.task("bump")
    def bump(task: Task) -> int:
        threads.add(threading.current_thread().name)
        backend = _blocking_backend()
        key = backend.keys.bench("sync", task.payload["counter"])[0]
        return int(backend.execute_key(key, lambda c: c.incr(key)))

    async def scenario() -> None:
        client = await AsyncClient.connect(url, prefix=prefix)
        infos = [
            await client.enqueue("bump", {"counter": "q1" if n % 2 else "q2"}, retention=60)
            for n in range(40)
        ]
        async with running_worker(url, router, prefix=prefix, concurrency=8) as worker:
            results = [await client.result(info, timeout=20) for info in infos]
            runner = _runner(worker)
            assert runner.blocking.connected
            backend = runner.sync_backend
            assert backend.mode == worker.backend.mode  # type: ignore[union-attr]
            assert backend.keys.prefix == prefix
        assert not runner.blocking.connected  # closed with the worker
        with pytest.raises(RuntimeError, match="closed"):
            runner.sync_backend  # noqa: B018
        await client.aclose()
        assert sorted(results) == sorted([*range(1, 21), *range(1, 21)])
        assert threads and all(name.startswith("clusterq-task") for name in threads)

    asyncio.run(scenario())


def test_current_worker_sync_backend(standalone: Any, prefix: str) -> None:
    router = Router()

    @router.task("ping")
    def ping(task: Task) -> bool:
        backend = current_worker().sync_backend  # type: ignore[attr-defined]
        assert isinstance(backend, Backend)
        return bool(backend.execute(0, lambda c: c.ping()))

    async def scenario() -> None:
        client = await AsyncClient.connect(standalone.seed_url, prefix=prefix)
        info = await client.enqueue("ping", None, retention=60)
        async with running_worker(standalone.seed_url, router, prefix=prefix):
            assert await client.result(info, timeout=20) is True
        await client.aclose()

    asyncio.run(scenario())


def test_a_sync_handler_past_its_timeout_is_abandoned_until_it_returns(
    url: str, prefix: str
) -> None:
    router = Router()
    started, release = threading.Event(), threading.Event()
    returned: list[str] = []

    @router.task("stuck")
    def stuck(task: Task) -> None:
        started.set()
        release.wait(60)
        returned.append(task.id)

    async def scenario() -> None:
        client = await AsyncClient.connect(url, prefix=prefix)
        info = await client.enqueue("stuck", None, timeout=0.2, max_retry=0)
        async with running_worker(url, router, prefix=prefix, concurrency=2) as worker:
            runner = _runner(worker)
            with pytest.raises(TaskFailed, match=r"timeout: the task ran longer than 0\.2s"):
                await client.result(info, timeout=20)
            assert not release.is_set() and started.is_set()
            since = runner.abandoned[info.id]
            assert since <= time.monotonic()
            assert info.id in runner._threads and not runner._threads[info.id].done()
            await await_for(lambda: worker.active == 1, 10, "only the stuck slot taken")
            release.set()
            await await_for(lambda: not runner.abandoned, 20, "the thread to return")
            await await_for(lambda: worker.active == 0, 10, "its slot back")
            assert runner._threads == {} and returned == [info.id]
            assert (await client.info(info)).state == TaskState.ARCHIVED
        await client.aclose()

    asyncio.run(scenario())


def test_a_retried_task_abandoned_twice_is_listed_until_both_threads_return(
    standalone: Any, prefix: str
) -> None:
    """Two attempts of one task abandoned, both threads still running: the task stays in
    ``abandoned`` (since the first) until the last returns; each keeps its slot."""
    router = Router()
    release = threading.Event()
    attempts: list[str] = []

    @router.task("stuck")
    def stuck(task: Task) -> None:
        attempts.append(task.attempt)
        release.wait(60)

    async def scenario() -> None:
        url = standalone.seed_url
        client = await AsyncClient.connect(url, prefix=prefix)
        info = await client.enqueue("stuck", None, timeout=0.2, max_retry=1)
        retry = {"retry_policy": lambda *_: 0.0}
        async with running_worker(url, router, prefix=prefix, concurrency=3, **retry) as worker:
            runner = _runner(worker)
            with pytest.raises(TaskFailed, match="timeout"):
                await client.result(info, timeout=20)
            await await_for(lambda: len(attempts) == 2, 10, "both attempts to start")
            first = runner.abandoned[info.id]
            await await_for(lambda: worker.active == 2, 10, "two slots kept")
            release.set()
            await await_for(lambda: not runner.abandoned, 20, "both threads to return")
            await await_for(lambda: worker.active == 0, 10, "both slots back")
            assert len(set(attempts)) == 2 and first <= time.monotonic()
        await client.aclose()

    asyncio.run(scenario())


def test_hard_timeout_limits_sync_handlers_without_a_timeout_only(url: str, prefix: str) -> None:
    router = Router()
    release = threading.Event()
    woken = asyncio.Event()

    @router.task("sync_forever")
    def sync_forever(task: Task) -> str:
        release.wait(60)
        return "done"

    @router.task("sync_own_timeout")
    def sync_own_timeout(task: Task) -> str:
        release.wait(60)
        return "in time"

    @router.task("async_slow")
    async def async_slow(task: Task) -> str:
        await woken.wait()
        return "not limited"

    async def scenario() -> None:
        client = await AsyncClient.connect(url, prefix=prefix)
        forever = await client.enqueue("sync_forever", None, max_retry=0)
        own = await client.enqueue("sync_own_timeout", None, timeout=60, retention=60)
        slow = await client.enqueue("async_slow", None, retention=60)
        worker = Worker(url, router, prefix=prefix, concurrency=4, lease=1.0, recover_interval=0.2)
        worker.settings.hard_timeout = 0.3
        await worker.start()
        try:
            with pytest.raises(TaskFailed, match=r"timeout: the task ran longer than 0\.3s"):
                await client.result(forever, timeout=20)
            # both others ran past 0.3 s: neither was cut off
            assert (await client.info(own)).state == TaskState.ACTIVE
            assert (await client.info(slow)).state == TaskState.ACTIVE
            assert forever.id in _runner(worker).abandoned
            release.set()
            woken.set()
            assert await client.result(own, timeout=20) == "in time"
            assert await client.result(slow, timeout=20) == "not limited"
            await await_for(lambda: not _runner(worker).abandoned, 20, "the thread to return")
        finally:
            await worker.stop()
        await client.aclose()

    asyncio.run(scenario())


def test_a_handler_raising_fails_its_attempt(standalone: Any, prefix: str) -> None:
    router = Router()

    @router.task("broken")
    def broken(task: Task) -> None:
        raise ValueError("no such thing")

    @router.task("stops")
    def stops(task: Task) -> None:
        raise StopIteration("odd")  # an asyncio future cannot hold it: must not hang

    async def scenario() -> None:
        client = await AsyncClient.connect(standalone.seed_url, prefix=prefix)
        a = await client.enqueue("broken", None, max_retry=0)
        b = await client.enqueue("stops", None, max_retry=0)
        async with running_worker(standalone.seed_url, router, prefix=prefix):
            with pytest.raises(TaskFailed, match="ValueError: no such thing"):
                await client.result(a, timeout=20)
            with pytest.raises(TaskFailed, match="StopIteration"):
                await client.result(b, timeout=20)
        await client.aclose()

    asyncio.run(scenario())


def test_many_sync_tasks_each_run_once_on_few_threads(url: str, prefix: str) -> None:
    router = Router()
    seen: list[str] = []
    lock = threading.Lock()

    @router.task("count")
    def count(task: Task) -> None:
        with lock:
            seen.append(task.id)

    async def scenario() -> None:
        client = await AsyncClient.connect(url, prefix=prefix)
        ids = [
            info.id for info in await client.enqueue_many([("count", {"n": n}) for n in range(500)])
        ]
        async with running_worker(url, router, prefix=prefix, concurrency=10) as worker:
            await await_for(lambda: len(seen) >= 500, 60, "every task to run")
            await await_for(lambda: worker.stats.processed == 500, 20, "every ack")
            assert _runner(worker).threads.started <= 10
        await client.aclose()
        assert sorted(seen) == sorted(ids)

    asyncio.run(scenario())


@pytest.mark.parametrize("work", ["incr-sync", "cpu"])
def test_bench_e2e_with_sync_handlers(url: str, prefix: str, work: str) -> None:
    from clusterq.tools.bench import run_bench
    from clusterq.tools.bench_report import BenchSettings

    settings = BenchSettings(url=url, prefix=prefix, tasks=300, work=work, baseline=False)  # type: ignore[arg-type]
    (row,) = run_bench(settings, ["e2e"]).rows  # incr-sync: raises unless 300 INCRs counted
    assert row.scenario == f"e2e {work}" and row.rate is not None and row.rate > 0


def test_the_cpu_work_is_calibrated_once() -> None:
    from clusterq.tools import bench_handlers

    loops = bench_handlers._loops_per_task()
    assert loops > 0 and bench_handlers._loops_per_task() == loops


def test_handler_threads_grow_for_blocked_jobs_and_drop_waiting_ones_at_close() -> None:
    """The pool's own rules, without a worker: jobs beyond ``eager`` wait for the threads
    awake; blocked ones get more threads (up to ``size``); ``close`` drops what waits."""
    from clusterq.worker.threads import HandlerThreads, Job

    async def scenario() -> None:
        returned: list[Job] = []
        pool = HandlerThreads(3, returned.append, eager=1, patience=0.001)
        together = threading.Barrier(3, timeout=20)
        context = contextvars.copy_context  # one each: a context runs in one thread at once
        jobs = [pool.submit(lambda _: together.wait(), None, context()) for _ in range(3)]
        assert sorted(await asyncio.gather(*(job.future for job in jobs))) == [0, 1, 2]
        assert pool.started == 3 and all(job.done() for job in jobs)
        release = threading.Event()
        begun: list[int] = []

        def hold(n: int) -> bool:
            begun.append(n)
            return release.wait(20)

        running = [pool.submit(hold, n, context()) for n in range(3)]
        await await_for(lambda: len(begun) == 3, 20, "a thread for each (woken by the timer)")
        waiting = pool.submit(lambda _: "never", None, context())  # every thread is taken
        pool.close()
        assert waiting.future.cancelled() and waiting.done() and waiting in returned
        release.set()
        assert await asyncio.gather(*(job.future for job in running)) == [True] * 3
        with pytest.raises(RuntimeError, match="closed"):
            pool.submit(lambda _: None, None, context())

    asyncio.run(scenario())


def test_busy_handler_threads_run_short_jobs_on_few_threads() -> None:
    """While the process is busy, jobs beyond ``eager`` wait for the threads awake, and
    a thread with another job to run leaves its results for up to ``lazy`` (it wakes the
    loop when none is left): every job completes, on one thread."""
    from clusterq.worker.threads import HandlerThreads

    async def scenario() -> None:
        pool = HandlerThreads(8, eager=1, patience=60)  # no growth: never blocked here
        pool._busy = True  # as measured under load
        pool._sampled = (float("inf"), 0.0)  # and not measured again here
        jobs = [pool.submit(lambda n: n * 2, n, contextvars.copy_context()) for n in range(200)]
        assert await asyncio.gather(*(job.future for job in jobs)) == [n * 2 for n in range(200)]
        assert pool.started == 1  # the others waited for it
        pool.close()

    asyncio.run(scenario())
