"""Flow control (issue 28): a queue's rate limit and concurrency cap, ``RateLimited``.

What the handlers did is recorded outside clusterq's own counters: in-process handlers
take ``time.time()`` as they start and RPUSH it through redis-py (or keep it in a list of
the test's own); the handlers of worker processes (``tests.workload:timed``) RPUSH
``start``/``end`` lines with their times to the standalone server. The limits hashes
are read back with redis-py. Every wait is bounded; no assertion depends on how fast
the machine is, only on the order of events (a start comes after its dequeue, an end
before its ack) and on lower bounds that a slow machine only makes easier to meet.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import math
import time
from typing import Any

import pytest
import redis
import redis.asyncio

from clusterq import (
    Admin,
    AsyncClient,
    Client,
    Inspector,
    InvalidLimits,
    Limits,
    RateLimited,
    Router,
    Task,
    Worker,
)
from clusterq.errors import ClusterqError
from clusterq.events import QueueUnavailable
from clusterq.limits import Rate, parse_rate
from clusterq.partitions import Layout
from clusterq.tools.devcluster import LocalServer
from tests.helpers import (
    START_JITTER,
    StartWorker,
    as_text,
    assert_token_bucket,
    await_for,
    max_overlap,
    on_node,
    read_hash,
    running_worker,
    wait_for,
)

# ---------------------------------------------------------------------- the vocabulary


@pytest.mark.parametrize(
    ("text", "count", "period_ms", "per_second"),
    [
        ("200/s", 200, 1000, 200.0),
        ("5000/m", 5000, 60_000, 5000 / 60),
        ("3/10s", 3, 10_000, 0.3),
        ("10/h", 10, 3_600_000, 10 / 3600),
        (" 7 / 2 min ", 7, 120_000, 7 / 120),
        ("1.5/S", 1.5, 1000, 1.5),
        ("100/ms", 100, 1, 100_000.0),
        ("1/day", 1, 86_400_000, 1 / 86_400),
    ],
)
def test_parse_rate_reads_a_count_per_period(
    text: str, count: float, period_ms: float, per_second: float
) -> None:
    rate = parse_rate(text)
    assert (rate.count, rate.period_ms) == (count, period_ms)
    assert rate.per_second == pytest.approx(per_second)
    assert rate.interval_ms == pytest.approx(period_ms / count)
    assert rate.text == text.strip()


@pytest.mark.parametrize(
    ("given", "says"),
    [
        ("", "give a count per period"),
        ("200", "give a count per period"),
        ("200/", "give a count per period"),
        ("/s", "give a count per period"),
        ("-5/s", "give a count per period"),
        ("5/fortnight", "give a count per period"),
        ("five/s", "give a count per period"),
        ("1e3/s", "give a count per period"),
        ("0/s", "must be above 0"),
        ("5/0s", "must be above 0"),
        ("9" * 400 + "/s", "must be above 0"),  # a count too large to be a number
        ("101/ms", "at most 100 tasks per ms"),
        ("200000/s", "at most 100 tasks per ms"),
        (200, "give it as text"),
        (None, "give it as text"),
    ],
)
def test_parse_rate_refuses_what_is_no_rate_in_one_line(given: Any, says: str) -> None:
    with pytest.raises(InvalidLimits) as caught:
        parse_rate(given)
    message = str(caught.value)
    assert "\n" not in message
    assert says in message
    assert repr(given)[:30] in message  # names what it was given
    assert isinstance(caught.value, ValueError) and isinstance(caught.value, ClusterqError)


@pytest.mark.parametrize(
    ("options", "says"),
    [
        ({"burst": 5}, "a burst needs a rate"),
        ({"rate": "10/s", "burst": 0}, "invalid burst 0"),
        ({"rate": "10/s", "burst": -1}, "invalid burst -1"),
        ({"rate": "10/s", "burst": 2.5}, "invalid burst 2.5"),
        ({"rate": "10/s", "burst": True}, "invalid burst True"),
        ({"concurrency": 0}, "invalid concurrency 0"),
        ({"concurrency": -3}, "invalid concurrency -3"),
        ({"concurrency": True}, "invalid concurrency True"),
        ({"concurrency": "5"}, "invalid concurrency '5'"),
        ({"rate": "fast"}, "invalid rate 'fast'"),
    ],
)
def test_limits_of_refuses_bad_limits_in_one_line(options: dict[str, Any], says: str) -> None:
    with pytest.raises(InvalidLimits) as caught:
        Limits.of(**options)
    assert "\n" not in str(caught.value)
    assert says in str(caught.value)


def test_limits_of_keeps_what_it_is_given_and_nothing_is_empty() -> None:
    assert Limits.of().empty
    assert Limits.of().describe() == "-"
    limits = Limits.of("200/s", 20, 5)
    assert not limits.empty
    assert limits.rate == parse_rate("200/s") and limits.burst == 20
    assert limits.concurrency == 5
    assert limits.describe() == "200/s (burst 20), 5 at once"
    assert limits.as_dict() == {
        "rate": "200/s",
        "rate_per_second": 200.0,
        "burst": 20,
        "concurrency": 5,
    }
    assert Limits.of(concurrency=3).effective_burst is None  # no rate, no burst
    assert Limits.of(rate=parse_rate("4/s")).rate == Rate(4, 1000, "4/s")


@pytest.mark.parametrize(
    ("rate", "burst"),
    [("200/s", 20), ("40/s", 4), ("30/s", 3), ("25/s", 3), ("5/s", 1), ("10/h", 1), ("3/10s", 1)],
)
def test_the_default_burst_is_a_tenth_of_a_seconds_worth_at_least_one(
    rate: str, burst: int
) -> None:
    assert Limits.of(rate).effective_burst == burst
    assert Limits.of(rate, 7).effective_burst == 7  # a burst given wins
    assert Limits.of(rate).as_dict()["burst"] == burst


def test_shares_of_a_plain_queue_are_the_declaration() -> None:
    [fields] = Limits.of("40/s", 4, 3).shares(1)
    assert float(fields["interval"]) == pytest.approx(25.0)
    assert (fields["burst"], fields["concurrency"]) == ("4", "3")
    assert json.loads(fields["spec"]) == {
        "rate": "40/s",
        "burst": 4,
        "concurrency": 3,
        "partitions": 1,
    }
    assert Limits.from_fields(fields) == Limits.of("40/s", 4, 3)
    [only_cap] = Limits.of(concurrency=2).shares(1)
    assert "interval" not in only_cap and "burst" not in only_cap


def test_shares_split_rate_and_burst_evenly_and_concurrency_remainder_first() -> None:
    shares = Limits.of("30/s", 7, 11).shares(3)
    assert len(shares) == 3
    for fields in shares:
        assert float(fields["interval"]) == pytest.approx(100.0)  # 10/s each
        assert fields["burst"] == str(math.ceil(7 / 3))
        assert json.loads(fields["spec"])["partitions"] == 3
        assert Limits.from_fields(fields) == Limits.of("30/s", 7, 11)
    assert [f["concurrency"] for f in shares] == ["4", "4", "3"]
    assert sum(1000 / float(f["interval"]) for f in shares) == pytest.approx(30.0)
    # a burst smaller than the partitions: at least 1 each
    assert {f["burst"] for f in Limits.of("30/s", 1).shares(4)} == {"1"}
    # concurrency exactly the partitions: 1 each
    assert [f["concurrency"] for f in Limits.of(concurrency=3).shares(3)] == ["1", "1", "1"]


def test_shares_refuse_a_concurrency_below_the_partitions_in_one_line() -> None:
    with pytest.raises(InvalidLimits) as caught:
        Limits.of(concurrency=2).shares(3)
    message = str(caught.value)
    assert "\n" not in message
    assert "concurrency 2" in message and "3 partitions" in message
    with pytest.raises(InvalidLimits):
        Limits.of(concurrency=2).shares(0)


def test_from_fields_ignores_what_it_cannot_read() -> None:
    assert Limits.from_fields({}) is None
    assert Limits.from_fields({"spec": "{not json"}) is None
    assert Limits.from_fields({"spec": json.dumps({"rate": "nonsense"})}) is None
    assert Limits.from_fields({"spec": json.dumps({"rate": None, "concurrency": None})}) is None


def test_rate_limited_keeps_its_delay_and_scope() -> None:
    assert (RateLimited(1.5).retry_in, RateLimited(1.5).scope) == (1.5, "task")
    assert (RateLimited(0, "queue").retry_in, RateLimited(0, "queue").scope) == (0.0, "queue")
    assert "again in 2s (queue)" in str(RateLimited(2, scope="queue"))


@pytest.mark.parametrize(
    ("args", "says"),
    [
        ((1.0, "tenant"), "scope 'tenant'"),
        ((1.0, "Queue"), "scope 'Queue'"),
        ((1.0, None), "scope None"),
        ((-0.5,), "retry_in -0.5"),
        ((float("nan"),), "retry_in nan"),
        ((float("inf"),), "retry_in inf"),
        (("soon",), "soon"),
    ],
)
def test_rate_limited_refuses_a_bad_scope_or_delay(args: tuple[Any, ...], says: str) -> None:
    with pytest.raises(ValueError) as caught:
        RateLimited(*args)
    assert says in str(caught.value)


# ---------------------------------------------------------------------- helpers


def _spans(r: redis.Redis, key: str) -> dict[str, dict[str, float]]:
    """Per task id: its ``start`` and ``end`` times as tests.workload:timed recorded them
    (the latest of each, for a task that ran more than once)."""
    out: dict[str, dict[str, float]] = {}
    for raw in r.lrange(key, 0, -1):
        event, stamp, task_id, _pid = as_text(raw).split()
        out.setdefault(task_id, {})[event] = float(stamp)
    return out


def _pids(r: redis.Redis, key: str) -> set[str]:
    return {as_text(raw).split()[3] for raw in r.lrange(key, 0, -1)}


def test_max_overlap_counts_what_runs_at_once() -> None:
    assert max_overlap([]) == 0
    assert max_overlap([(0, 1), (1, 2), (2, 3)]) == 1  # back to back
    assert max_overlap([(0, 3), (1, 2), (1.5, 4), (3.5, 5)]) == 3


# ---------------------------------------------------------------------- the rate

RATE, BURST, TASKS = 40, 4, 120
#: A start's lag (START_JITTER) as a count of tasks in a window.
WINDOW_SLACK = math.ceil(RATE * START_JITTER)


def test_a_rate_spreads_the_starts_over_time(
    url: str, standalone: LocalServer, prefix: str
) -> None:
    """rate 40/s, burst 4, 120 tasks waiting, one worker of concurrency 20: the starts
    (recorded by the handler through redis-py) follow the token bucket: the k-th start
    is at least (k + 1 - burst) / rate after the first (less the first start's own lag),
    no second holds more than rate + burst (+ the lag's worth), and the whole run spans
    at least (N - burst) / rate. A slow machine only spreads them more."""
    key = f"{prefix}:starts"
    queue = "metered"
    router = Router()

    async def scenario() -> None:
        recorder = redis.asyncio.Redis.from_url(standalone.seed_url)

        @router.task("go")
        async def go(task: Task) -> None:
            await recorder.rpush(key, f"{time.time():.6f}")

        async def recorded() -> bool:
            return int(await recorder.llen(key)) >= TASKS

        try:
            with Client(url, prefix=prefix) as client:
                declared = client.set_limits(queue, rate=f"{RATE}/s", burst=BURST)
                assert declared == Limits.of(f"{RATE}/s", BURST)
                client.enqueue_many([("go", i) for i in range(TASKS)], queue=queue)
            async with running_worker(url, router, queues=[queue], prefix=prefix, concurrency=20):
                await await_for(recorded, 90, f"{TASKS} starts")
        finally:
            await recorder.aclose()

    asyncio.run(scenario())
    starts = sorted(float(x) for x in standalone.client().lrange(key, 0, -1))
    assert len(starts) == TASKS  # each once
    span = assert_token_bucket(starts, RATE, BURST)
    busiest = max(bisect.bisect_left(starts, s + 1.0) - i for i, s in enumerate(starts))
    assert busiest <= RATE + BURST + WINDOW_SLACK, busiest
    print(f"\n{url}: {TASKS} starts over {span:.2f}s; busiest second {busiest}")


def test_a_rate_far_above_the_throughput_holds_nothing_back(url: str, prefix: str) -> None:
    done: list[str] = []
    router = Router()

    @router.task("go")
    async def go(task: Task) -> None:
        done.append(task.id)

    async def scenario() -> None:
        async with running_worker(url, router, queues=["roomy"], prefix=prefix, concurrency=20):
            await await_for(lambda: len(done) >= 500, 60, "every task")

    with Client(url, prefix=prefix) as client:
        client.set_limits("roomy", rate="50000/s", concurrency=1000)
        ids = {t.id for t in client.enqueue_many([("go", i) for i in range(500)], queue="roomy")}
    asyncio.run(scenario())
    assert set(done) == ids and len(done) == 500


# ---------------------------------------------------------------------- concurrency


def _workers_announced(url: str, prefix: str, count: int) -> bool:
    with Inspector(url, prefix=prefix) as inspector:
        return len(inspector.workers()) >= count


def test_a_concurrency_cap_holds_across_worker_processes(
    url: str,
    standalone: LocalServer,
    prefix: str,
    start_worker: StartWorker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """concurrency=3 over 3 worker processes of concurrency 2 each (6 could run): the
    handlers' [start, end] intervals (time.time() on this machine, through redis-py)
    never overlap more than 3 deep — exact, since a start comes after its dequeue and an
    end before its ack. And 3 are reached: more than one process ran tasks at once."""
    cap, count = 3, 30
    queue = "capped"
    key = f"{prefix}:spans"
    monkeypatch.setenv("CLUSTERQ_TEST_COUNT_URL", standalone.seed_url)
    with Client(url, prefix=prefix) as client:
        client.set_limits(queue, concurrency=cap)
    # a long lease: a task whose lease expired mid-run would leave the active set early
    procs = [
        start_worker(url, "--streams", "none", "--lease", "30", queues=queue, concurrency=2)
        for _ in range(3)
    ]
    wait_for(lambda: _workers_announced(url, prefix, 3), 60, "the 3 workers to start")
    with Client(url, prefix=prefix) as client:
        ids = {
            t.id
            for t in client.enqueue_many(
                [("timed", {"key": key, "seconds": 0.2})] * count, queue=queue
            )
        }
    r = standalone.client()
    wait_for(
        lambda: sum("end" in s for s in _spans(r, key).values()) >= count, 90, "every task to end"
    )
    spans = _spans(r, key)
    assert set(spans) == ids
    assert r.llen(key) == 2 * count  # each ran once
    deepest = max_overlap([(s["start"], s["end"]) for s in spans.values()])
    assert deepest <= cap, f"{deepest} tasks ran at once, the cap is {cap}"
    assert deepest == cap, f"at most {deepest} ran at once: the cap of {cap} was never reached"
    print(f"\n{url}: at most {deepest} at once; processes that ran tasks: {len(_pids(r, key))}")
    for proc in procs:
        proc.terminate()
    for proc in procs:
        assert proc.wait(timeout=30) == 0


def test_a_killed_workers_slots_come_back_with_its_leases(
    url: str,
    standalone: LocalServer,
    prefix: str,
    start_worker: StartWorker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """concurrency=2, a worker process (--lease 1) takes the 2 tasks that block for an
    hour and the other 5 wait behind the cap; kill -9 of that worker, another starts:
    the 2 leases expire, recovery archives those tasks (no retries left) and frees their
    slots, and the other 5 run."""
    queue = "capped"
    key = f"{prefix}:spans"
    monkeypatch.setenv("CLUSTERQ_TEST_COUNT_URL", standalone.seed_url)
    with Client(url, prefix=prefix) as client:
        client.set_limits(queue, concurrency=2)
        stuck = [
            client.enqueue("timed", {"key": key, "seconds": 3600}, queue=queue, max_retry=0).id
            for _ in range(2)
        ]
        others = {
            t.id
            for t in client.enqueue_many([("timed", {"key": key})] * 5, queue=queue, max_retry=0)
        }
    r = standalone.client()
    first = start_worker(url, "--streams", "none", queues=queue, concurrency=4)
    wait_for(lambda: set(stuck) <= set(_spans(r, key)), 60, "the 2 blocking tasks to start")
    with Inspector(url, prefix=prefix) as inspector:
        row = inspector.queue(queue)
    assert (row.active, row.pending) == (2, 5)  # the cap held the others back
    assert not set(_spans(r, key)) & others
    first.kill()  # kill -9: its leases are left to expire
    first.wait(timeout=10)
    killed = time.time()
    second = start_worker(url, "--streams", "none", queues=queue, concurrency=4)
    wait_for(
        lambda: all("end" in _spans(r, key).get(t, {}) for t in others),
        60,
        "the other tasks to run once the killed worker's slots came back",
    )
    resumed = min(_spans(r, key)[t]["start"] for t in others) - killed
    with Client(url, prefix=prefix) as client:
        for task_id in stuck:
            info = client.info(task_id, queue=queue)
            assert info.state.value == "archived"
            assert "lease expired" in (info.last_error or "")
    print(f"\n{url}: the others started {resumed:.2f}s after the kill (lease 1s)")
    second.terminate()
    assert second.wait(timeout=30) == 0


# ---------------------------------------------------------------------- RateLimited

#: The scripts keep times in whole ms of the server's clock (the same machine's).
MS = 0.001


def test_rate_limited_goes_back_without_spending_a_retry(url: str, prefix: str) -> None:
    """A handler raising RateLimited(0.3) on its first 2 attempts: the task runs a third
    time, after 0.3 s each time, and succeeds with retried 0 and nothing counted as
    failed; with max_retry=0 too."""
    queue = "api"
    attempts: dict[str, list[tuple[float, int]]] = {}
    raised: dict[str, list[float]] = {}
    router = Router()

    @router.task("call")
    async def call(task: Task) -> str:
        attempts.setdefault(task.id, []).append((time.time(), task.retry_count))
        if len(attempts[task.id]) <= 2:
            raised.setdefault(task.id, []).append(time.time())
            raise RateLimited(0.3)
        return "ok"

    with Client(url, prefix=prefix) as client:
        ids = [
            client.enqueue("call", 1, queue=queue, max_retry=3, retention=600).id,
            client.enqueue("call", 2, queue=queue, max_retry=0, retention=600).id,
        ]

    async def scenario() -> Worker:
        async with running_worker(url, router, queues=[queue], prefix=prefix) as worker:
            with Client(url, prefix=prefix) as client:
                await await_for(
                    lambda: all(
                        client.info(i, queue=queue).state.value == "completed" for i in ids
                    ),
                    30,
                    "both tasks to complete",
                )
        return worker

    worker = asyncio.run(scenario())
    with Client(url, prefix=prefix) as client:
        for task_id in ids:
            info = client.info(task_id, queue=queue)
            assert info.retried == 0 and info.result == "ok", info
            assert [n for _, n in attempts[task_id]] == [0, 0, 0]  # the handler saw it too
            for (again, _), before in zip(attempts[task_id][1:], raised[task_id], strict=True):
                assert again - before >= 0.3 - MS  # back after retry_in, not sooner
    with Inspector(url, prefix=prefix) as inspector:
        row = inspector.queue(queue)
    assert (row.failed, row.processed, row.archived, row.retry) == (0, 2, 0, 0)
    assert worker.stats.rate_limited == 4 and worker.stats.failed == 0


def test_rate_limited_for_the_queue_holds_every_task_back(url: str, prefix: str) -> None:
    """One worker, concurrency 1: task A raises RateLimited(1.0, scope="queue") once,
    with others pending: none of them starts until 1 s after A raised (the hold starts
    when the failure is recorded, later still); then all run, A again too."""
    queue = "held"
    starts: list[tuple[str, float]] = []
    raised: list[float] = []
    router = Router()

    @router.task("call")
    async def call(task: Task) -> None:
        starts.append((task.id, time.time()))
        if task.payload == "A" and not raised:
            raised.append(time.time())
            raise RateLimited(1.0, scope="queue")

    with Client(url, prefix=prefix) as client:
        first = client.enqueue("call", "A", queue=queue, max_retry=0).id
        client.enqueue_many([("call", "B")] * 4, queue=queue)

    async def scenario() -> None:
        async with running_worker(url, router, queues=[queue], prefix=prefix, concurrency=1):
            await await_for(lambda: len(starts) >= 6, 30, "every task, A twice")

    asyncio.run(scenario())
    assert starts[0][0] == first and raised
    later = [(task_id, at - raised[0]) for task_id, at in starts[1:]]
    assert len(later) == 5 and sum(task_id == first for task_id, _ in later) == 1
    early = [(task_id, round(gap, 4)) for task_id, gap in later if gap < 1.0 - MS]
    assert not early, f"started during the hold (s after the raise): {early}"


def test_rate_limited_for_the_task_holds_only_that_task(url: str, prefix: str) -> None:
    """RateLimited(30) with the default scope: the task waits, the others run now."""
    queue = "held"
    starts: list[tuple[str, float]] = []
    raised: list[float] = []
    router = Router()

    @router.task("call")
    async def call(task: Task) -> None:
        starts.append((task.id, time.time()))
        if task.payload == "A":
            raised.append(time.time())
            raise RateLimited(30)

    with Client(url, prefix=prefix) as client:
        first = client.enqueue("call", "A", queue=queue).id
        others = {t.id for t in client.enqueue_many([("call", "B")] * 4, queue=queue)}

    async def scenario() -> None:
        async with running_worker(url, router, queues=[queue], prefix=prefix, concurrency=1):
            await await_for(lambda: len(starts) >= 5, 20, "the other tasks")
            with Client(url, prefix=prefix) as client:
                info = client.info(first, queue=queue)
        assert info.state.value == "retry" and info.retried == 0
        assert info.next_process_at is not None and info.next_process_at >= raised[0] + 30 - MS

    asyncio.run(scenario())
    assert {task_id for task_id, _ in starts[1:]} == others
    assert all(at - raised[0] < 30 for _, at in starts[1:])  # not held back for 30 s


# ---------------------------------------------------------------------- partitioned queues


def test_a_partitioned_queues_limits_are_declared_read_and_cleared(url: str, prefix: str) -> None:
    with Client(url, prefix=prefix) as client:
        layout = client.declare_queue("pq", 3)
        limits = client.set_limits("pq", rate="30/s", concurrency=6)
        assert limits == Limits.of("30/s", concurrency=6)
        assert client.limits("pq") == limits
        for name in layout.queues:  # each partition holds a share, read by redis-py
            fields = read_hash(client, client.keys.queue(name).limits)
            assert {"spec", "interval", "concurrency"} <= set(fields), fields
        with pytest.raises(InvalidLimits) as caught:
            client.set_limits("pq", concurrency=2)
        assert "\n" not in str(caught.value) and "concurrency 2" in str(caught.value)
        assert client.limits("pq") == limits  # refused: nothing changed
        assert client.set_limits("pq") is None
        assert client.limits("pq") is None
        for name in layout.members:
            key = client.keys.queue(name).limits
            assert on_node(client, key, "EXISTS") == 0


@pytest.mark.parametrize("api", ["sync", "async"])
def test_declaring_partitions_again_carries_the_limits_over(
    url: str, prefix: str, api: str
) -> None:
    """Limits set on a plain queue, which is then partitioned (3), then declared again
    (4): after each declaration every member enforces its share of the same
    declaration; a new partition never runs without limits."""

    def declare(n: int) -> Layout:
        if api == "sync":
            with Client(url, prefix=prefix) as client:
                return client.declare_queue("grow", n)

        async def go() -> Layout:
            client = await AsyncClient.connect(url, prefix=prefix)
            try:
                return await client.declare_queue("grow", n)
            finally:
                await client.aclose()

        return asyncio.run(go())

    with Client(url, prefix=prefix) as client:
        client.set_limits("grow", rate="60/s", burst=12, concurrency=12)
        for n in (3, 4):
            layout = declare(n)
            assert len(layout.queues) == n
            for name in layout.members:  # the draining ones and the plain queue too
                fields = read_hash(client, client.keys.queue(name).limits)
                assert float(fields["interval"]) == pytest.approx(1000 / 60 * n), name
                assert fields["concurrency"] == str(12 // n), name
                assert json.loads(fields["spec"])["partitions"] == n
            assert client.limits("grow") == Limits.of("60/s", 12, 12)


@pytest.mark.parametrize("api", ["client", "admin"])
def test_each_partition_holds_its_share(url: str, prefix: str, api: str) -> None:
    """rate 30/s (burst 3), concurrency 3 over 3 partitions: each partition enforces
    10/s, burst 1, 1 at once, and says the declaration is shared by 3; the plain queue of
    the name (stray tasks of producers that had not read the declaration) holds one share
    too, so its tasks are limited as well."""
    with Client(url, prefix=prefix) as client:
        layout = client.declare_queue("pq", 3)
        if api == "admin":
            with Admin(url, prefix=prefix) as admin:
                admin.set_limits("pq", rate="30/s", burst=3, concurrency=3)
        else:
            client.set_limits("pq", rate="30/s", burst=3, concurrency=3)
        assert layout.members == (*layout.queues, "pq")
        for name in layout.members:
            fields = read_hash(client, client.keys.queue(name).limits)
            assert float(fields["interval"]) == pytest.approx(100.0)
            assert (fields["burst"], fields["concurrency"]) == ("1", "1")
            assert json.loads(fields["spec"])["partitions"] == 3


# ---------------------------------------------------------------------- foreign data


def test_a_limits_key_holding_foreign_data_is_named(url: str, prefix: str) -> None:
    """The limits key holds a string: set_limits says so naming the key (and writes
    nothing); a worker's dequeue of that queue is refused naming the key, reported as the
    queue unavailable, while its other queue flows."""
    done: list[str] = []
    events: list[object] = []
    router = Router()

    @router.task("go")
    async def go(task: Task) -> None:
        done.append(task.queue)

    with Client(url, prefix=prefix) as client:
        key = client.keys.queue("victim").limits
        on_node(client, key, "SET", "foreign")
        with pytest.raises(ClusterqError) as caught:
            client.set_limits("victim", concurrency=2)
        message = str(caught.value)
        assert key in message and "holds a string" in message and "\n" not in message
        assert on_node(client, key, "GET") == b"foreign"
        client.enqueue_many([("go", 1)] * 3, queue="victim")
        client.enqueue_many([("go", 2)] * 3, queue="bystander")

    async def scenario() -> None:
        worker = Worker(url, router, queues=["victim", "bystander"], prefix=prefix, lease=1.0)
        worker.subscribe(events.append)
        await worker.start()
        try:
            await await_for(lambda: done.count("bystander") == 3, 30, "the other queue")
            await await_for(
                lambda: any(isinstance(e, QueueUnavailable) for e in events), 30, "the refusal"
            )
        finally:
            await worker.stop()

    asyncio.run(scenario())
    refused = [e for e in events if isinstance(e, QueueUnavailable)]
    assert {e.queue for e in refused} == {"victim"}
    assert all(key in e.error for e in refused), refused
    assert "victim" not in done
    with Inspector(url, prefix=prefix) as inspector:
        assert inspector.queue("victim").pending == 3


# ---------------------------------------------------------------------- clearing


@pytest.mark.parametrize("held_by", ["rate", "hold"])
def test_clearing_the_limits_lets_a_held_back_queue_flow_at_once(
    url: str, prefix: str, held_by: str
) -> None:
    """A queue held back for an hour — by its rate (1/h: one task ran) or by a handler's
    RateLimited(3600, scope="queue") — and a worker waiting for that (its survey slowed
    to once a minute, so only a wake-up moves it): set_limits(queue) with nothing clears
    the limits and the hold and wakes the worker, and the rest runs now."""
    queue = "throttled"
    done: list[str] = []
    router = Router()

    @router.task("go")
    async def go(task: Task) -> None:
        if task.payload == "stop them":
            raise RateLimited(3600, scope="queue")
        done.append(task.id)

    with Client(url, prefix=prefix) as client:
        if held_by == "rate":
            client.set_limits(queue, rate="1/h")
            client.enqueue("go", "first", queue=queue)
        else:
            client.enqueue("go", "stop them", queue=queue)
        rest = {t.id for t in client.enqueue_many([("go", i) for i in range(4)], queue=queue)}

    async def scenario() -> None:
        async with running_worker(
            url, router, queues=[queue], prefix=prefix, concurrency=1, survey_interval=60
        ) as worker:
            state = worker._queues[queue]
            await await_for(lambda: state.held_back.get(held_by, 0) >= 1, 20, "the hold-back")
            assert not rest & set(done)
            async with await AsyncClient.connect(url, prefix=prefix) as client:
                assert await client.set_limits(queue) is None
                assert await client.limits(queue) is None
            await await_for(lambda: rest <= set(done), 20, "the rest, once the limits are gone")

    asyncio.run(scenario())


# ---------------------------------------------------------------------- the APIs agree


def test_async_client_and_admin_set_and_read_the_same_limits(url: str, prefix: str) -> None:
    async def scenario() -> None:
        async with await AsyncClient.connect(url, prefix=prefix) as aclient:
            set_async = await aclient.set_limits("api", rate="5000/m", burst=10, concurrency=4)
            assert set_async == Limits.of("5000/m", 10, 4)
            with Admin(url, prefix=prefix) as admin, Client(url, prefix=prefix) as client:
                assert admin.limits("api") == client.limits("api") == set_async
                assert admin.set_limits("api", concurrency=2) == Limits.of(concurrency=2)
                assert await aclient.limits("api") == Limits.of(concurrency=2)
                assert client.limits("api") == Limits.of(concurrency=2)
                with pytest.raises(InvalidLimits):
                    admin.set_limits("api", burst=3)
                with pytest.raises(InvalidLimits):
                    await aclient.set_limits("api", concurrency=0)
                assert admin.limits("api") == Limits.of(concurrency=2)  # unchanged
                assert admin.set_limits("api") is None
                assert await aclient.limits("api") is None and admin.limits("other") is None

    asyncio.run(scenario())
