"""What a worker records after an attempt, a lease expiry, a shutdown or an outage: the
task's record (error, time, retries, next attempt), the worker's counters and its log
lines. On a standalone node and on the cluster; the outage on a server of its own."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from clusterq import AsyncClient, Router, SkipRetry, Task, TaskState, Worker
from clusterq.broker.facade import Broker
from clusterq.cluster.abackend import AsyncBackend
from clusterq.events import QueueResumed, QueueUnavailable
from clusterq.retry import fixed
from clusterq.tools import servers
from clusterq.tools.devcluster import LocalServer
from clusterq.worker.outcomes import Outcomes
from clusterq.worker.recoverer import LEASE_EXPIRED, Recoverer
from clusterq.worker.state import QueueState, RunState, WorkerSettings, WorkerStats
from clusterq.worker.wakeups import Wakeups
from tests.helpers import FAST, await_for, running_worker


def _lines(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name == "clusterq.worker")


def test_failures_are_recorded_counted_and_logged(
    url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="clusterq.worker")
    router = Router()

    @router.task("twice")
    async def twice(task: Task) -> str:
        if task.retry_count < 2:
            raise ValueError(f"try {task.retry_count}")
        return "third time"

    @router.task("never")
    async def never(task: Task) -> None:
        raise SkipRetry("bad input")

    asked: list[tuple[str, str, str]] = []

    def policy(retried: int, error: BaseException, task: Task) -> float:
        asked.append((task.id, task.queue, str(error)))
        return 0.0

    async def scenario() -> tuple[Any, Any, Worker]:
        client = await AsyncClient.connect(url, prefix=prefix)
        t0 = time.time()
        flaky = await client.enqueue("twice", None, retention=60)
        doomed = await client.enqueue("never", None, retention=60)
        async with running_worker(url, router, prefix=prefix, retry_policy=policy) as worker:
            assert await client.result(flaky, timeout=20) == "third time"
            await await_for(lambda: worker.stats.archived == 1, 20, "the archive")
            ok, archived = await client.info(flaky), await client.info(doomed)
            assert worker.active == 0
            # Every attempt's lease is let go: none is left held (and renewed) for ever.
            await await_for(lambda: worker.held == 0, 10, "no lease left held")
        await client.aclose()
        assert asked == [(flaky.id, "default", "try 0"), (flaky.id, "default", "try 1")]
        for info in (ok, archived):
            assert info.last_failed_at is not None
            assert t0 - 1 <= info.last_failed_at <= time.time() + 1
        return ok, archived, worker

    ok, archived, worker = asyncio.run(scenario())
    assert (ok.retried, ok.last_error, ok.state) == (2, "ValueError: try 1", TaskState.COMPLETED)
    assert archived.state == TaskState.ARCHIVED and archived.retried == 0
    stats = worker.stats
    assert (stats.processed, stats.failed, stats.archived, stats.leases_lost) == (1, 3, 1, 0)
    lines = _lines(caplog)
    assert f"queue default: task {ok.id} failed, retry in 0s: ValueError: try 0" in lines
    assert f"queue default: task {archived.id} (never) archived: SkipRetry: bad input" in lines
    skipped = [r for r in caplog.records if "SkipRetry: bad input" in r.getMessage()]
    assert skipped and skipped[0].exc_info is None  # our own signal: no traceback


def _recoverer(backend: AsyncBackend, **settings: Any) -> tuple[Recoverer, WorkerStats]:
    options = WorkerSettings(**settings)
    stats = WorkerStats()
    broker = Broker(backend)
    outcomes = Outcomes(broker, options, stats)
    state = RunState()
    wakeups = Wakeups(broker, options, state, list)
    return Recoverer(broker, options, stats, outcomes, state, wakeups), stats


def test_an_expired_lease_is_recovered_with_the_policys_delay(
    url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="clusterq.worker")

    async def scenario() -> None:
        client = await AsyncClient.connect(url, prefix=prefix)
        info = await client.enqueue("crashed", {"n": 1}, max_retry=3)
        backend = client.backend
        qk = backend.keys.queue("default")
        got = await Broker(backend).dequeue(qk, 1, 50, "gone-worker:1")  # a 50 ms lease
        [(task_id, raw)] = got.tasks
        asked: list[tuple[str, str, str]] = []

        def policy(retried: int, error: BaseException, task: Task) -> float:
            asked.append((task.id, task.queue, str(error)))
            return 60.0

        recoverer, stats = _recoverer(backend, retry_policy=policy, recover_interval=1.0)
        q = QueueState("default", qk)
        before = time.time()
        await await_for(lambda: _swept(recoverer, q, stats), 10, "the recovery")
        after = await client.info(info)
        await client.aclose()
        assert task_id == info.id and raw
        assert after.state == TaskState.RETRY and after.retried == 1
        assert after.last_error == LEASE_EXPIRED
        assert after.last_failed_at is not None
        assert before - 1 <= after.last_failed_at <= time.time() + 1
        assert after.next_process_at is not None
        assert before + 59 <= after.next_process_at <= time.time() + 61
        assert stats.recovered == 1 and stats.failed == 0  # not the handler's failure
        assert asked == [(info.id, "default", LEASE_EXPIRED)]
        assert f"queue default: recovered task {info.id} from an expired lease (retry)" in (
            _lines(caplog)
        )

    asyncio.run(scenario())


async def _swept(recoverer: Recoverer, q: QueueState, stats: WorkerStats) -> bool:
    await recoverer.sweep(q)
    return stats.recovered > 0


def test_recovery_leaves_a_lease_that_is_still_valid(url: str, prefix: str) -> None:
    """A sweep lists a lease as expired; by the time the recovery runs, its worker renewed
    it: the recovery is refused on the server and the task stays where it is."""

    async def scenario() -> None:
        client = await AsyncClient.connect(url, prefix=prefix)
        info = await client.enqueue("busy", None)
        backend = client.backend
        qk = backend.keys.queue("default")
        got = await Broker(backend).dequeue(qk, 1, 60_000, "alive-worker:1")
        [(task_id, raw)] = got.tasks
        recoverer, stats = _recoverer(backend)
        await recoverer.recover(QueueState("default", qk), task_id, "alive-worker:1", raw)
        still = await client.info(info)
        await client.aclose()
        assert still.state == TaskState.ACTIVE and still.retried == 0
        assert stats.recovered == 0

    asyncio.run(scenario())


def test_graceful_stop_returns_unfinished_tasks_without_a_retry(
    url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="clusterq.worker")
    started = asyncio.Event()
    router = Router()

    @router.task("long")
    async def long(task: Task) -> None:
        started.set()
        await asyncio.sleep(30)

    async def scenario() -> None:
        client = await AsyncClient.connect(url, prefix=prefix)
        info = await client.enqueue("long", None)
        worker = Worker(url, router, prefix=prefix, **{**FAST, "shutdown_timeout": 0.1})
        await worker.start()
        await asyncio.wait_for(started.wait(), 20)
        await worker.stop()
        back = await client.info(info)
        await client.aclose()
        assert back.state == TaskState.PENDING and back.retried == 0
        assert worker.stats.failed == 0 and worker.stats.processed == 0

    asyncio.run(scenario())
    assert "queue default: returned 1 unfinished tasks" in _lines(caplog)


def test_an_outage_is_reported_probed_and_followed_by_resumption(
    tmp_path: Path, server_bin: Path, prefix: str
) -> None:
    """A server of this test's own goes away (kill -9) and comes back on the same port:
    the worker says the queue is unavailable, probes without holding its slots, says
    when it resumed and where, and runs what was enqueued meanwhile."""
    port = servers.find_free_ports(1, with_bus=False)
    server = LocalServer(port, tmp_path / "own", server_bin=server_bin, die_with_parent=True)
    server.start()
    events: list[object] = []
    ran: list[str] = []
    router = Router()

    @router.task("t")
    async def t(task: Task) -> None:
        ran.append(task.id)

    async def scenario() -> None:
        worker = Worker(server.seed_url, router, prefix=prefix, **FAST)
        worker.subscribe(events.append)
        await worker.start()
        try:
            client = await AsyncClient.connect(server.seed_url, prefix=prefix)
            first = await client.enqueue("t", None)
            await await_for(lambda: first.id in ran, 10, "the first task")
            await client.aclose()
            pid = server.pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)  # the server this test started
            await await_for(
                lambda: any(isinstance(e, QueueUnavailable) for e in events), 15, "the outage"
            )
            assert worker.active == 0  # probing holds no slot
            await asyncio.to_thread(server.start)
            client = await AsyncClient.connect(server.seed_url, prefix=prefix)
            second = await client.enqueue("t", None)
            await await_for(lambda: second.id in ran, 20, "the task after the outage")
            await client.aclose()
        finally:
            await worker.stop()

    try:
        asyncio.run(scenario())
    finally:
        server.stop()
    resumed = [e for e in events if isinstance(e, QueueResumed)]
    assert resumed and resumed[0].queue == "default" and resumed[0].node == f"127.0.0.1:{port}"
    assert resumed[0].outage > 0


# ------------------------------------------------------------- retry delays (pure)


def _outcomes(**settings: Any) -> Outcomes:
    return Outcomes(None, WorkerSettings(**settings), WorkerStats())  # type: ignore[arg-type]


def test_retry_delay_asks_the_policy_with_the_task_and_its_error() -> None:
    from clusterq.task import Record
    from clusterq.worker.state import Outcome

    seen: list[tuple[int, BaseException, Task]] = []

    def policy(retried: int, error: BaseException, task: Task) -> float:
        seen.append((retried, error, task))
        return {0: 2.5, 1: -5.0}.get(retried, 1.0)

    outcomes = _outcomes(retry_policy=policy)
    record = Record("images:resize", b"{}", max_retry=4, retried=0)
    boom = ValueError("boom")
    first = Outcome(False, error="x", exception=boom)
    assert outcomes.retry_delay(record, first, task_id="t-1", queue="images") == 2.5
    retried, error, task = seen[0]
    assert (retried, error, task.id, task.queue, task.type, task.max_retry) == (
        0,
        boom,
        "t-1",
        "images",
        "images:resize",
        4,
    )
    again = Record("images:resize", b"{}", max_retry=4, retried=1)
    assert outcomes.retry_delay(again, Outcome(False, error="plain text")) == 0.0  # never < 0
    assert isinstance(seen[1][1], RuntimeError) and str(seen[1][1]) == "plain text"
    assert seen[1][2].retry_count == 1
    last = Record("t", b"", max_retry=4, retried=4)
    assert outcomes.retry_delay(last, Outcome(False, error="x")) is None  # retries used up
    assert outcomes.retry_delay(record, Outcome(False, archive=True)) is None
    assert outcomes.retry_delay(record, Outcome(False, retry_in=7.0)) == 7.0
    unknown = Outcome(False, error="no handler", no_handler=True)
    budget = _outcomes(retry_policy=policy, no_handler_retries=3)
    assert budget.retry_delay(Record("t", b"", max_retry=25, retried=2), unknown) == 1.0
    assert budget.retry_delay(Record("t", b"", max_retry=25, retried=3), unknown) is None


def test_failed_meta_archives_when_the_policy_fails() -> None:
    from clusterq.task import Record
    from clusterq.worker.state import Outcome

    def policy(retried: int, error: BaseException, task: Task) -> float:
        raise ZeroDivisionError("policy")

    outcomes = _outcomes(retry_policy=policy)
    record = Record("t", b"1", max_retry=3)
    meta, delay = outcomes.failed_meta(record, "Err: x", 1234, Outcome(False, error="Err: x"))
    assert delay is None
    failed = Record.decode(meta + b"\n1")
    assert failed.retried == 0 and failed.failed_ms == 1234  # archived: not a retry
    assert failed.last_error == "Err: x; the retry policy failed: ZeroDivisionError: policy"
    meta, delay = outcomes.failed_meta(None, "unreadable", 99, Outcome(False))
    assert delay is None and Record.decode(meta + b"\n").last_error == "unreadable"


# ------------------------------------------------------------- pickup and acks


@pytest.mark.parametrize("wakeups", [True, False])
def test_an_idle_worker_does_not_poll(standalone: Any, prefix: str, wakeups: bool) -> None:
    """Idle pickup waits on the server, never polls: subscribed to the queue's shard
    channel (wake-ups), or without them blocked in a BLMOVE on the pending list."""
    import redis

    probe = redis.Redis(host="127.0.0.1", port=standalone.port, socket_timeout=5)
    channel = f"{prefix}:{{default}}:wake"

    def waiting() -> bool:
        clients = probe.execute_command("CLIENT", "LIST").decode().splitlines()
        blocked = any("cmd=blmove" in c and " flags=b " in c for c in clients)
        if wakeups:
            subscribed = channel.encode() in probe.execute_command("PUBSUB", "SHARDCHANNELS")
            return subscribed and not blocked
        return blocked

    async def scenario() -> None:
        async with running_worker(
            standalone.seed_url, Router(), prefix=prefix, poll_interval=5, wakeups=wakeups
        ):
            await await_for(waiting, 10, "the worker waiting on the server")

    try:
        asyncio.run(scenario())
    finally:
        probe.close()


def _own_server(tmp_path: Path, server_bin: Path, durable: bool = False) -> LocalServer:
    port = servers.find_free_ports(1, with_bus=False)
    extra = ["appendonly yes", "appendfsync always"] if durable else []
    server = LocalServer(
        port, tmp_path / "own", server_bin=server_bin, extra_config=extra, die_with_parent=True
    )
    server.start()
    return server


def test_an_ack_sent_during_an_outage_lands_when_the_server_is_back(
    tmp_path: Path, server_bin: Path, prefix: str
) -> None:
    server = _own_server(tmp_path, server_bin, durable=True)
    release = asyncio.Event()
    runs: list[str] = []
    router = Router()

    @router.task("t")
    async def t(task: Task) -> str:
        runs.append(task.id)
        await release.wait()
        return "done"

    async def scenario() -> Worker:
        client = await AsyncClient.connect(server.seed_url, prefix=prefix)
        info = await client.enqueue("t", None, retention=60)
        worker = Worker(server.seed_url, router, prefix=prefix, **{**FAST, "lease": 30.0})
        await worker.start()
        try:
            await await_for(lambda: runs, 10, "the task to start")
            await client.aclose()
            pid = server.pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)  # the server this test started
            release.set()  # the handler returns while the server is gone: the ack waits
            await await_for(lambda: worker.stats.succeeded == 1, 10, "the attempt to end")
            await asyncio.to_thread(server.start)
            client = await AsyncClient.connect(server.seed_url, prefix=prefix)
            assert await client.result(info, timeout=30) == "done"
            await client.aclose()
        finally:
            await worker.stop()
        return worker

    try:
        worker = asyncio.run(scenario())
    finally:
        server.stop()
    assert len(runs) == 1 and worker.stats.leases_lost == 0


def test_an_ack_batch_the_server_refuses_is_set_aside(
    standalone: Any, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An ack that fails for a reason no retry cures (here: its results key holds a
    string) is dropped with an error, not retried for ever; the lease brings the task
    back, and once the cause is gone it completes; other queues are not held up."""
    caplog.set_level(logging.ERROR, logger="clusterq.worker")
    url = standalone.seed_url
    ran: list[str] = []
    router = Router()

    @router.task("t")
    async def t(task: Task) -> str:
        ran.append(task.queue)
        return "ok"

    async def scenario() -> None:
        client = await AsyncClient.connect(url, prefix=prefix)
        qk = client.keys.queue("jammed")
        await client.backend.execute(qk.slot, lambda c: c.set(qk.results, "not a hash"))
        stuck = await client.enqueue("t", None, queue="jammed", retention=60)
        async with running_worker(
            url, router, prefix=prefix, queues=["jammed", "fine"], retry_policy=fixed(0)
        ) as worker:
            await await_for(lambda: "acks refused" in caplog.text, 10, "the refusal")
            fine = await client.enqueue("t", None, queue="fine", retention=60)
            assert await client.result(fine, timeout=10) == "ok"
            assert worker.active == 0
            await client.backend.execute(qk.slot, lambda c: c.delete(qk.results))
            assert await client.result(stuck, timeout=20) == "ok"  # recovered, then acked
        await client.aclose()

    asyncio.run(scenario())
    assert ran.count("jammed") >= 2


def test_a_lease_taken_over_is_noticed_by_the_heartbeat_and_counted_once(
    url: str, prefix: str
) -> None:
    """Another holder's token in the lease (what a takeover leaves): the heartbeat marks
    the lease lost and stops renewing it; the ack that follows is refused; one task,
    one lost lease."""
    release = asyncio.Event()
    started = asyncio.Event()
    router = Router()

    @router.task("t")
    async def t(task: Task) -> str:
        started.set()
        await release.wait()
        return "mine"

    async def scenario() -> Worker:
        client = await AsyncClient.connect(url, prefix=prefix)
        info = await client.enqueue("t", None, retention=60)
        qk = client.keys.queue("default")
        async with running_worker(url, router, prefix=prefix, lease=30.0) as worker:
            await asyncio.wait_for(started.wait(), 20)
            await client.backend.execute(qk.slot, lambda c: c.hset(qk.leases, info.id, "x:1:1"))
            await await_for(lambda: worker.stats.leases_lost == 1, 20, "the heartbeat")
            release.set()
            await await_for(lambda: worker.stats.succeeded == 1, 20, "the attempt to end")
            await await_for(lambda: not worker._queues["default"].held, 20, "the ack reply")
            still = await client.info(info)
            assert still.state == TaskState.ACTIVE and still.result is None  # not ours now
        await client.aclose()
        return worker

    worker = asyncio.run(scenario())
    # one task, fenced out: counted once as a lost lease, not as processed
    assert (worker.stats.leases_lost, worker.stats.processed, worker.stats.succeeded) == (1, 0, 1)


def test_a_task_that_cannot_be_recovered_is_quarantined_with_the_reason(
    url: str, prefix: str
) -> None:
    async def scenario() -> None:
        client = await AsyncClient.connect(url, prefix=prefix)
        info = await client.enqueue("t", {"keep": "me"})
        backend = client.backend
        qk = backend.keys.queue("default")
        got = await Broker(backend).dequeue(qk, 1, 50, "gone:1:1")  # a 50 ms lease
        [(task_id, _)] = got.tasks
        recoverer, _stats = _recoverer(backend)
        q = QueueState("default", qk)
        await await_for(lambda: _lease_expired(backend, qk, task_id), 5, "the lease to end")
        await recoverer.quarantine(q, task_id, "gone:1:1", "recovery failed: KeyError('x')")
        after = await client.info(info)
        await client.aclose()
        assert after.state == TaskState.ARCHIVED
        assert after.last_error == "recovery failed: KeyError('x')"
        assert after.payload == {"keep": "me"} and after.last_failed_at is not None
        assert abs(after.last_failed_at - time.time()) < 60

    asyncio.run(scenario())


async def _lease_expired(backend: AsyncBackend, qk: Any, task_id: str) -> bool:
    """Whether the server's clock is past the task's lease."""

    async def read(client: Any) -> tuple[Any, Any]:
        return await client.time(), await client.zscore(qk.active, task_id)

    (seconds, micros), expiry = await backend.execute(qk.slot, read)
    return expiry is not None and seconds * 1000 + micros // 1000 > expiry


def test_a_worker_never_takes_back_its_own_running_task(url: str, prefix: str) -> None:
    """A task whose lease ran out while its own worker still runs it (the heartbeat was
    late) is not recovered by that worker's sweep, which still recovers another's."""
    runs: list[str] = []
    router = Router()

    @router.task("long")
    async def long(task: Task) -> None:
        runs.append(task.id)
        await asyncio.sleep(6)  # six leases of 1 s, and no renewal

    async def scenario() -> Worker:
        client = await AsyncClient.connect(url, prefix=prefix)
        mine = await client.enqueue("long", None)
        qk = client.keys.queue("default")
        async with running_worker(url, router, prefix=prefix, concurrency=1) as worker:
            worker.heartbeat_interval = 3600.0
            await await_for(lambda: runs, 10, "the task to start")
            other = await client.enqueue("other", None)  # taken by a "worker" that died
            # Its lease ends after the running task's: sweeps meet the running one first.
            got = await Broker(client.backend).dequeue(qk, 1, 1500, "dead:1:1")
            assert [i for i, _ in got.tasks] == [other.id]
            await await_for(lambda: worker.stats.recovered >= 1, 10, "the other recovered")
            assert worker.stats.processed == 0  # recovered while its own still ran
            await await_for(lambda: worker.stats.processed >= 1, 10, "its own to finish")
        await client.aclose()
        assert mine.id in runs
        return worker

    worker = asyncio.run(scenario())
    assert worker.stats.recovered == 1 and runs.count(runs[0]) == 1


def test_graceful_stop_hands_back_tasks_of_every_queue(url: str, prefix: str) -> None:
    started: list[str] = []
    router = Router()

    @router.task("long")
    async def long(task: Task) -> None:
        started.append(task.queue)
        await asyncio.sleep(30)

    async def scenario() -> None:
        client = await AsyncClient.connect(url, prefix=prefix)
        info = await client.enqueue("long", None, queue="second")
        worker = Worker(
            url,
            router,
            prefix=prefix,
            queues=["first", "second"],
            **{**FAST, "shutdown_timeout": 0},
        )
        await worker.start()
        await await_for(lambda: started, 10, "the task to start")
        await worker.stop()
        back = await client.info(info)
        await client.aclose()
        assert back.state == TaskState.PENDING  # "first" had nothing: "second" still done

    asyncio.run(scenario())


def test_acks_outlive_an_outage_longer_than_the_retry_timeout(
    tmp_path: Path, server_bin: Path, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The backend gives up on an ack after its retry timeout (here 1 s); the worker keeps
    the batch and sends it again until the server is back."""
    caplog.set_level(logging.WARNING, logger="clusterq.worker")
    server = _own_server(tmp_path, server_bin, durable=True)
    releases = {0: asyncio.Event(), 1: asyncio.Event()}
    runs: list[str] = []
    router = Router()

    @router.task("t")
    async def t(task: Task) -> str:
        runs.append(task.id)
        await releases[task.payload].wait()
        return f"kept {task.payload}"

    def failures() -> int:
        return caplog.text.count("acks failed")

    async def scenario() -> None:
        client = await AsyncClient.connect(server.seed_url, prefix=prefix)
        infos = [await client.enqueue("t", n, retention=60) for n in (0, 1)]
        await client.aclose()
        worker = Worker(
            server.seed_url, router, prefix=prefix, retry_timeout=1.0, **{**FAST, "lease": 60.0}
        )
        await worker.start()
        try:
            await await_for(lambda: len(runs) == 2, 10, "both tasks to start")
            pid = server.pid
            assert pid is not None
            os.kill(pid, signal.SIGKILL)  # the server this test started
            releases[0].set()
            await await_for(lambda: worker.stats.succeeded == 1, 10, "the first attempt to end")
            # The first ack is on its way (its call lasts the 1 s retry timeout): a second
            # joins meanwhile and must survive the first batch being put back.
            releases[1].set()
            await await_for(lambda: worker.stats.succeeded == 2, 10, "the second attempt to end")
            await await_for(lambda: failures() >= 2, 20, "the acks to fail twice")
            await asyncio.to_thread(server.start)
            client = await AsyncClient.connect(server.seed_url, prefix=prefix)
            for n, info in enumerate(infos):
                assert await client.result(info, timeout=30) == f"kept {n}"
            await client.aclose()
        finally:
            await worker.stop()

    try:
        asyncio.run(scenario())
    finally:
        server.stop()
    assert len(runs) == 2 == len(set(runs))
