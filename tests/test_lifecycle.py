"""The task lifecycle, in-process workers, on a standalone node AND on the 6-node cluster."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from typing import Any

import pytest
import redis

from clusterq import (
    AsyncClient,
    Client,
    DuplicateTask,
    Inspector,
    RetryIn,
    Router,
    SkipRetry,
    Task,
    TaskFailed,
    TaskNotFound,
    TaskState,
    Worker,
)
from clusterq.retry import fixed
from tests.helpers import await_for, running_worker, wait_for

QUEUES = ("images", "webhooks", "notifications")  # three different masters on the cluster


def test_every_task_runs_exactly_once(url: str, prefix: str) -> None:
    seen: Counter[str] = Counter()
    router = Router()

    @router.task("count")
    async def count(task: Task) -> None:
        seen[task.id] += 1

    @router.task("count_sync")
    def count_sync(task: Task) -> None:
        seen[task.id] += 1

    async def scenario() -> list[str]:
        with Client(url, prefix=prefix) as client:
            ids = [
                client.enqueue("count" if i % 2 else "count_sync", {"i": i}, queue=QUEUES[i % 3]).id
                for i in range(300)
            ]
        async with running_worker(url, router, queues=QUEUES, prefix=prefix, concurrency=8):
            await await_for(lambda: len(seen) == len(ids), 30, "all tasks")
            # Acked on the server: nothing left active (stats.processed counts before).
            await await_for(lambda: _settled(url, prefix), 10, "all acks")
        return ids

    ids = asyncio.run(scenario())
    assert sorted(seen) == sorted(ids)
    assert set(seen.values()) == {1}
    assert _settled(url, prefix)


def _settled(url: str, prefix: str) -> bool:
    """Every queue under ``prefix`` empty in every state (acks included)."""
    with Inspector(url, prefix=prefix) as inspector:
        return all(
            (q.pending, q.active, q.scheduled, q.retry, q.archived, q.completed) == (0,) * 6
            for q in inspector.queues()
        )


def test_retry_with_backoff_then_success(url: str, prefix: str) -> None:
    attempts: list[tuple[float, int]] = []
    router = Router()

    @router.task("flaky")
    async def flaky(task: Task) -> str:
        attempts.append((time.monotonic(), task.retry_count))
        if len(attempts) < 3:
            raise ValueError(f"boom {len(attempts)}")
        return "ok"

    async def scenario() -> None:
        client = await AsyncClient.connect(url, prefix=prefix)
        info = await client.enqueue("flaky", None, retention=60)
        async with running_worker(url, router, prefix=prefix, retry_policy=fixed(0.3)):
            assert await client.result(info, timeout=15) == "ok"
            done = await client.info(info)
        await client.aclose()
        assert done.state == TaskState.COMPLETED and done.retried == 2
        assert done.last_error == "ValueError: boom 2"

    asyncio.run(scenario())
    assert [retry for _, retry in attempts] == [0, 1, 2]
    gaps = [b[0] - a[0] for a, b in itertools.pairwise(attempts)]
    assert all(gap >= 0.29 for gap in gaps), gaps  # never earlier than the policy says


def test_archived_after_max_retry(url: str, prefix: str) -> None:
    calls: list[int] = []
    router = Router()

    @router.task("doomed")
    def doomed(task: Task) -> None:
        calls.append(task.retry_count)
        raise RuntimeError("always fails")

    async def scenario() -> None:
        client = await AsyncClient.connect(url, prefix=prefix)
        info = await client.enqueue("doomed", {"x": 1}, max_retry=2)
        async with running_worker(url, router, prefix=prefix, retry_policy=fixed(0.05)):
            with pytest.raises(TaskFailed, match="always fails") as failure:
                await client.result(info, timeout=15)
        archived = await client.info(info)
        await client.aclose()
        assert failure.value.last_error == "RuntimeError: always fails"
        # max_retry=2: three attempts, two of them retries (the last is not retried)
        assert archived.state == TaskState.ARCHIVED and archived.retried == 2
        assert archived.payload == {"x": 1}  # kept for inspection

    asyncio.run(scenario())
    assert calls == [0, 1, 2]


def test_skip_retry_and_retry_in(url: str, prefix: str) -> None:
    retry_times: list[float] = []
    router = Router()

    @router.task("skip")
    async def skip(task: Task) -> None:
        raise SkipRetry("bad input, do not retry")

    @router.task("later")
    async def later(task: Task) -> str:
        retry_times.append(time.monotonic())
        if task.retry_count == 0:
            raise RetryIn(0.4, "rate limited")
        return "second time"

    async def scenario() -> None:
        client = await AsyncClient.connect(url, prefix=prefix)
        skipped = await client.enqueue("skip", None, max_retry=10)
        delayed = await client.enqueue("later", None, retention=30)
        async with running_worker(url, router, prefix=prefix, retry_policy=fixed(30)):
            with pytest.raises(TaskFailed, match="SkipRetry: bad input"):
                await client.result(skipped, timeout=10)
            assert await client.result(delayed, timeout=10) == "second time"
        info = await client.info(skipped)
        await client.aclose()
        assert info.retried == 0 and info.state == TaskState.ARCHIVED  # never retried

    asyncio.run(scenario())
    assert len(retry_times) == 2 and retry_times[1] - retry_times[0] >= 0.39


def test_timeouts_cancel_async_and_abandon_sync(url: str, prefix: str) -> None:
    cancelled: list[str] = []
    router = Router()

    @router.task("slow_async")
    async def slow_async(task: Task) -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(task.id)
            raise

    @router.task("slow_sync")
    def slow_sync(task: Task) -> None:
        time.sleep(0.8)

    async def scenario() -> None:
        client = await AsyncClient.connect(url, prefix=prefix)
        a = await client.enqueue("slow_async", None, timeout=0.2, max_retry=0)
        s = await client.enqueue("slow_sync", None, timeout=0.2, max_retry=0)
        async with running_worker(url, router, prefix=prefix, concurrency=2) as worker:
            for info in (a, s):
                with pytest.raises(TaskFailed, match=r"timeout: the task ran longer than 0\.2s"):
                    await client.result(info, timeout=10)
            assert cancelled == [a.id]
            # The abandoned sync handler keeps its slot until its thread returns.
            await await_for(lambda: worker.active == 0, 5, "the abandoned thread to return")
        await client.aclose()

    asyncio.run(scenario())


def test_deadline(url: str, prefix: str) -> None:
    router = Router()

    @router.task("slow")
    async def slow(task: Task) -> None:
        await asyncio.sleep(5)

    async def scenario() -> None:
        client = await AsyncClient.connect(url, prefix=prefix)
        past = await client.enqueue("slow", None, deadline=time.time() - 1)
        soon = await client.enqueue("slow", None, deadline=time.time() + 0.3, max_retry=0)
        async with running_worker(url, router, prefix=prefix):
            with pytest.raises(TaskFailed, match="deadline passed before the task could start"):
                await client.result(past, timeout=10)
            with pytest.raises(TaskFailed, match="deadline: the task ran longer"):
                await client.result(soon, timeout=10)
        await client.aclose()

    asyncio.run(scenario())


def test_unique_tasks(url: str, prefix: str) -> None:
    router = Router()

    @router.task("unique")
    async def unique(task: Task) -> None:
        return None

    with Client(url, prefix=prefix) as client:
        first = client.enqueue("unique", {"user": 7}, unique_for=60)
        with pytest.raises(DuplicateTask, match="already in queue 'default'") as dup:
            client.enqueue("unique", {"user": 7}, unique_for=60)
        assert dup.value.existing_id == first.id
        client.enqueue("unique", {"user": 8}, unique_for=60)  # other payload: fine
        client.enqueue("unique", {"user": 7}, unique_for=60, queue="other")  # other queue: fine
        short = client.enqueue("unique", {"user": 9}, unique_for=1.0, process_in=60)
        with pytest.raises(DuplicateTask):
            client.enqueue("unique", {"user": 9}, unique_for=1.0)

        async def drain() -> None:
            async with running_worker(url, router, prefix=prefix) as worker:
                await await_for(lambda: worker.stats.processed >= 2, 10, "processing")

        asyncio.run(drain())
        # Success released the lock of user 7 at once.
        client.enqueue("unique", {"user": 7}, unique_for=60)

        # The window of `short` ends while it waits: the lock goes, the task stays.
        def enqueue_after_window() -> Any:
            try:
                return client.enqueue("unique", {"user": 9}, unique_for=60)
            except DuplicateTask:
                return None

        again = wait_for(enqueue_after_window, 10, "the unique window to end")
        assert again.duplicate_of is None and not again.already_enqueued
        assert client.info(short).state == TaskState.SCHEDULED


def test_unique_lock_outlives_a_failure(url: str, prefix: str) -> None:
    """The lock is released by success only; a failed (here archived) task keeps it for
    the rest of its window."""
    router = Router()

    @router.task("unique:fails")
    async def fails(task: Task) -> None:
        raise SkipRetry("no")

    async def scenario() -> None:
        client = await AsyncClient.connect(url, prefix=prefix)
        info = await client.enqueue("unique:fails", {"k": 1}, unique_for=60)
        async with running_worker(url, router, prefix=prefix):
            with pytest.raises(TaskFailed):
                await client.result(info, timeout=10)
        with pytest.raises(DuplicateTask) as dup:
            await client.enqueue("unique:fails", {"k": 1}, unique_for=60)
        assert dup.value.existing_id == info.id
        await client.aclose()

    asyncio.run(scenario())


def test_results_with_and_without_retention(url: str, prefix: str) -> None:
    router = Router()

    @router.task("square")
    def square(task: Task) -> dict[str, int]:
        return {"square": task.payload * task.payload}

    async def scenario() -> None:
        client = await AsyncClient.connect(url, prefix=prefix)
        kept = await client.enqueue("square", 12, retention=0.6)
        gone = await client.enqueue("square", 3)
        async with running_worker(url, router, prefix=prefix):
            assert await client.result(kept, timeout=10) == {"square": 144}
            info = await client.info(kept)
            assert info.state == TaskState.COMPLETED and info.result == {"square": 144}
            await await_for(lambda: _missing(client, gone), 10, "the task without retention to go")
            with pytest.raises(TaskNotFound, match="without retention is deleted"):
                await client.result(gone, timeout=1)
            # After its retention the sweeper deletes the kept one too.
            await await_for(lambda: _missing(client, kept), 10, "retention to expire")
        await client.aclose()

    asyncio.run(scenario())


async def _missing(client: AsyncClient, info: Any) -> bool:
    try:
        await client.info(info)
    except TaskNotFound:
        return True
    return False


def test_delayed_tasks(url: str, prefix: str) -> None:
    started: dict[str, float] = {}
    router = Router()

    @router.task("later")
    async def later(task: Task) -> None:
        started[task.id] = time.time()

    async def scenario() -> None:
        client = await AsyncClient.connect(url, prefix=prefix)
        async with running_worker(url, router, prefix=prefix):
            t0 = time.time()
            info = await client.enqueue("later", None, process_in=0.5)
            assert info.state == TaskState.SCHEDULED
            assert (await client.info(info)).state == TaskState.SCHEDULED
            at = await client.enqueue("later", None, process_at=t0 + 0.3)
            await await_for(lambda: len(started) == 2, 10, "delayed tasks")
        await client.aclose()
        assert started[info.id] - t0 >= 0.49
        assert started[at.id] >= t0 + 0.29

    asyncio.run(scenario())


def test_unknown_type_and_undecodable_payload_are_recorded(url: str, prefix: str) -> None:
    router = Router()

    @router.task("known")
    async def known(task: Task) -> None:
        raise AssertionError("must not run with a payload that does not decode")

    async def scenario() -> None:
        client = await AsyncClient.connect(url, prefix=prefix)
        unknown = await client.enqueue("nobody:handles", {"a": 1}, max_retry=1)
        corrupt = await client.enqueue("known", {"b": 2}, max_retry=5, task_id="corrupt-1")
        # Simulate a corrupted payload: same record, payload bytes replaced.
        qk = client.keys.queue("default")

        async def corrupt_it(c: Any) -> None:
            raw = await c.hget(qk.tasks, corrupt.id)
            meta = raw.split(b"\n", 1)[0]
            await c.hset(qk.tasks, corrupt.id, meta + b"\n{not json")

        await client.backend.execute(qk.slot, corrupt_it)
        async with running_worker(url, router, prefix=prefix, retry_policy=fixed(0.05)):
            with pytest.raises(
                TaskFailed, match="no handler registered for task type 'nobody:handles'"
            ):
                await client.result(unknown, timeout=10)
            with pytest.raises(TaskFailed, match="payload is not valid JSON"):
                await client.result(corrupt, timeout=10)
        assert (await client.info(unknown)).retried == 1  # it was retried first
        assert (await client.info(corrupt)).retried == 0  # archived at once
        await client.aclose()

    asyncio.run(scenario())


def test_enqueue_is_idempotent_by_task_id(url: str, prefix: str) -> None:
    ran: list[str] = []
    router = Router()

    @router.task("once")
    async def once(task: Task) -> None:
        ran.append(task.id)

    with Client(url, prefix=prefix) as client:
        first = client.enqueue("once", {"n": 1}, task_id="order-42")
        second = client.enqueue("once", {"n": 1}, task_id="order-42")
        assert (first.already_enqueued, second.already_enqueued) == (False, True)
        assert second.state == TaskState.PENDING
    with Inspector(url, prefix=prefix) as inspector:
        assert inspector.queue("default").pending == 1  # one task, one pending id

    async def scenario() -> None:
        async with running_worker(url, router, prefix=prefix):
            await await_for(lambda: ran, 10, "the task")
            await await_for(lambda: _settled(url, prefix), 10, "the queue to empty")

    asyncio.run(scenario())
    assert ran == ["order-42"]


def test_enqueue_many_pipelines_per_slot(url: str, prefix: str) -> None:
    from clusterq import TaskSpec

    with Client(url, prefix=prefix) as client:
        infos = client.enqueue_many(
            [("bulk", {"i": i}) for i in range(1500)]
            + [TaskSpec("bulk", {"i": i}, {"queue": "webhooks"}) for i in range(700)]
            + [TaskSpec("bulk", {"i": 1}, {"queue": "images", "unique_for": 60}) for _ in range(3)],
            queue="images",
        )
        assert len(infos) == 2203
        assert len({i.id for i in infos}) == 2203
        dups = [i for i in infos if i.duplicate_of]
        assert len(dups) == 2 and {d.duplicate_of for d in dups} == {infos[-3].id}
    with Inspector(url, prefix=prefix) as inspector:
        sizes = {q.queue: q.pending for q in inspector.queues()}
    assert sizes == {"images": 1501, "webhooks": 700}


def test_enqueue_retried_after_a_lost_reply_creates_each_task_once(
    url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first attempt of an enqueue skips the existence checks (its ids are new); a
    retry must not: here the server runs every first attempt but its reply is lost."""
    from clusterq.cluster import wire

    phase = [""]
    lost: list[str] = []
    fast, fast_pipeline = wire.NodeClient.fast, wire.NodeClient.fast_pipeline

    def lose_first(reply: Any) -> Any:
        if phase[0] not in lost:
            lost.append(phase[0])
            raise redis.ConnectionError("reply lost (test)")
        return reply

    def fast_losing(self: wire.NodeClient, *args: Any) -> Any:
        reply = fast(self, *args)
        return lose_first(reply) if args[0] == "EVALSHA" else reply

    def pipeline_losing(self: wire.NodeClient, commands: Any, meanwhile: Any = None) -> Any:
        replies = fast_pipeline(self, commands, meanwhile)
        return lose_first(replies) if commands[0][0] == "EVALSHA" else replies

    monkeypatch.setattr(wire.NodeClient, "fast", fast_losing)
    monkeypatch.setattr(wire.NodeClient, "fast_pipeline", pipeline_losing)
    with Client(url, prefix=prefix) as client:
        client.register_queues(["images", "webhooks"])
        phase[0] = "one"
        one = client.enqueue("lossy", {"n": 1}, queue="images")
        phase[0] = "many"
        many = client.enqueue_many([("lossy", {"i": i}) for i in range(700)], queue="images")
        phase[0] = "later"
        later = client.enqueue_many([("lossy", {})] * 3, queue="webhooks", process_in=60)
    assert lost == ["one", "many", "later"]
    assert (one.already_enqueued, one.state) == (True, TaskState.PENDING)
    assert {i.already_enqueued for i in many} == {True}
    # (the script may have met NOSCRIPT and not run on its first attempt: then it created)
    assert {i.state for i in later} == {TaskState.SCHEDULED}
    with Inspector(url, prefix=prefix) as inspector:
        counts = {q.queue: (q.pending, q.scheduled) for q in inspector.queues()}
    assert counts == {"images": (701, 0), "webhooks": (0, 3)}


def test_weighted_priority(url: str, prefix: str) -> None:
    order: list[str] = []
    router = Router()

    @router.task("p")
    async def p(task: Task) -> None:
        order.append(task.queue)

    weights = {"critical": 6, "default": 3, "low": 1}
    with Client(url, prefix=prefix) as client:
        for queue in weights:
            client.enqueue_many([("p", None)] * 400, queue=queue)

    async def scenario() -> None:
        async with running_worker(url, router, prefix=prefix, queues=weights, concurrency=1):
            await await_for(lambda: len(order) >= 300, 30, "300 tasks")

    asyncio.run(scenario())
    counts = Counter(order[:300])
    # Expected 180 : 90 : 30. A tolerance, not an exact ratio (random draws).
    assert 150 <= counts["critical"] <= 210, counts
    assert 65 <= counts["default"] <= 115, counts
    assert 12 <= counts["low"] <= 50, counts


def test_strict_priority(url: str, prefix: str) -> None:
    order: list[str] = []
    router = Router()

    @router.task("p")
    async def p(task: Task) -> None:
        order.append(task.queue)

    with Client(url, prefix=prefix) as client:
        for queue in ("low", "critical", "default"):
            client.enqueue_many([("p", None)] * 30, queue=queue)

    async def scenario() -> None:
        async with running_worker(
            url,
            router,
            prefix=prefix,
            queues={"critical": 3, "default": 2, "low": 1},
            strict_priority=True,
            concurrency=1,
        ):
            await await_for(lambda: len(order) == 90, 30, "all tasks")

    asyncio.run(scenario())
    assert order == ["critical"] * 30 + ["default"] * 30 + ["low"] * 30


def test_middleware_wraps_handlers(url: str, prefix: str) -> None:
    trail: list[str] = []
    router = Router()

    async def outer(task: Task, call_next: Any) -> Any:
        trail.append("outer>")
        result = await call_next(task)
        trail.append("<outer")
        return result

    async def inner(task: Task, call_next: Any) -> Any:
        trail.append("inner>")
        return {"wrapped": await call_next(task)}

    router.use(outer, inner)

    @router.task("email:")
    def email(task: Task) -> str:  # a prefix pattern: handles email:send, email:bounce...
        trail.append(task.type)
        return "sent"

    async def scenario() -> None:
        client = await AsyncClient.connect(url, prefix=prefix)
        info = await client.enqueue("email:send", None, retention=30)
        async with running_worker(url, router, prefix=prefix):
            assert await client.result(info, timeout=10) == {"wrapped": "sent"}
        await client.aclose()

    asyncio.run(scenario())
    assert trail == ["outer>", "inner>", "email:send", "<outer"]


def test_archive_is_trimmed(url: str, prefix: str) -> None:
    router = Router()

    @router.task("bad")
    async def bad(task: Task) -> None:
        raise SkipRetry("no")

    with Client(url, prefix=prefix) as client:
        client.enqueue_many([("bad", i) for i in range(8)])

    async def scenario() -> None:
        async with running_worker(url, router, prefix=prefix, archive_max_size=5) as worker:
            await await_for(lambda: worker.stats.archived == 8, 10, "archiving")
            with Inspector(url, prefix=prefix) as inspector:
                await await_for(lambda: inspector.queue("default").archived == 5, 10, "trimming")

    asyncio.run(scenario())


def test_msgpack_payloads_and_results(url: str, prefix: str) -> None:
    router = Router()

    @router.task("bytes")
    async def echo(task: Task) -> dict[str, Any]:
        return {"len": len(task.payload["blob"]), "blob": task.payload["blob"][::-1]}

    async def scenario() -> None:
        client = await AsyncClient.connect(url, prefix=prefix, codec="msgpack")
        info = await client.enqueue("bytes", {"blob": b"\x00\xffraw"}, retention=30)
        async with running_worker(url, router, prefix=prefix):
            assert await client.result(info, timeout=10) == {"len": 5, "blob": b"war\xff\x00"}
        await client.aclose()

    asyncio.run(scenario())


def test_stop_soon_after_start_never_hangs(standalone: Any, prefix: str) -> None:
    """A cancel can be lost inside redis-py on Python 3.11; stop() must still return."""
    router = Router()

    async def scenario() -> None:
        for cycle in range(20):
            worker = Worker(
                standalone.seed_url,
                router,
                prefix=prefix,
                queues=QUEUES,
                lease=1.0,
                recover_interval=0.01,
                poll_interval=0.01,
            )
            await worker.start()
            await asyncio.sleep(0.002 * (cycle % 10))
            await asyncio.wait_for(worker.stop(), 15)

    asyncio.run(scenario())


def test_retried_enqueue_after_completion_does_not_run_twice(url: str, prefix: str) -> None:
    """A producer that retries an enqueue (timeout, failover) after the task already ran
    and was deleted gets "already enqueued", within the worker's dedup window."""
    ran: list[str] = []
    router = Router()

    @router.task("once")
    async def once(task: Task) -> None:
        ran.append(task.id)

    async def scenario() -> None:
        client = await AsyncClient.connect(url, prefix=prefix)
        async with running_worker(url, router, prefix=prefix, dedup_window=0.6):
            first = await client.enqueue("once", None, task_id="pay-1")
            await await_for(lambda: _missing(client, first), 10, "the first run's ack")
            again = await client.enqueue("once", None, task_id="pay-1")
            assert (again.already_enqueued, again.state) == (True, TaskState.COMPLETED)

            async def fresh_after_window() -> Any:
                info = await client.enqueue("once", None, task_id="pay-1")
                return None if info.already_enqueued else info

            await await_for(fresh_after_window, 10, "the window to end and be swept")
            await await_for(lambda: len(ran) == 2, 10, "the new task")
        await client.aclose()

    asyncio.run(scenario())
    assert ran == ["pay-1", "pay-1"]
