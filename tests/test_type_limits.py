"""Rate limits per task type (issue 28: "limits ... per task type").

A queue may declare a rate for some of its task types (``type_rates``). ``dequeue.lua``
reads each popped task's type from its record; a task whose type has no token does not
start: it goes to the queue's ``scheduled`` zset at a time reserved for it (its type's
next token time, or the type's reservation horizon if later; the horizon then moves one
interval on), its record unchanged, and competes for a token again when it is due.

The script-level tests call ``dequeue.lua`` directly and read the scheduled zset and the
limits hash back with redis-py: exact, and independent of the machine's speed (every
task put back is due at least one interval later). The worker-level tests record each
start's time through redis-py and check lower bounds only (a slow machine makes them
easier to meet) and the order of events.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import subprocess
import time
from typing import Any

import pytest
import redis.asyncio

from clusterq import Admin, AsyncClient, Client, InvalidLimits, Limits, Router, Task
from clusterq.broker import dequeue
from clusterq.limits import parse_rate
from clusterq.tools.devcluster import LocalServer
from tests.helpers import (
    as_text,
    assert_token_bucket,
    await_for,
    on_node,
    read_hash,
    running_worker,
)

# ---------------------------------------------------------------------- the vocabulary


def test_type_rates_are_parsed_sorted_and_described() -> None:
    limits = Limits.of(type_rates={"z:last": "3/10s", "email:send": "10/s"})
    assert [name for name, _ in limits.type_rates] == ["email:send", "z:last"]
    assert limits.type_rates[0][1] == parse_rate("10/s")
    assert not limits.empty and limits.declared is limits
    assert limits.describe() == "type email:send 10/s (burst 1), type z:last 3/10s (burst 1)"
    assert limits.as_dict()["type_rates"] == {
        "email:send": {"rate": "10/s", "rate_per_second": 10.0, "burst": 1},
        "z:last": {"rate": "3/10s", "rate_per_second": 0.3, "burst": 1},
    }
    both = Limits.of("200/s", concurrency=5, type_rates={"a": "50/s"})
    assert both.describe() == "200/s (burst 20), 5 at once, type a 50/s (burst 5)"
    # Without type rates the dictionary keeps the fields it had (the README lists them).
    assert "type_rates" not in Limits.of("10/s").as_dict()
    assert Limits.of(type_rates={}).empty and Limits.of(type_rates=None).empty


@pytest.mark.parametrize(
    ("type_rates", "says"),
    [
        ({"": "10/s"}, "invalid task type '': must be a non-empty string"),
        ({1: "10/s"}, "invalid task type 1: must be a non-empty string"),
        ({"a": "ten/s"}, "task type 'a': invalid rate 'ten/s'"),
        ({"a": 10}, "task type 'a': invalid rate 10"),
        ({"a": "0/s"}, "task type 'a': invalid rate '0/s'"),
        (["a", "10/s"], "give a mapping of task type to rate"),
    ],
)
def test_bad_type_rates_are_refused_in_one_line(type_rates: Any, says: str) -> None:
    with pytest.raises(InvalidLimits) as err:
        Limits.of(type_rates=type_rates)
    assert says in str(err.value) and "\n" not in str(err.value)


def test_type_rates_are_shared_over_partitions() -> None:
    """Each of n partitions: the type's interval x n, its burst ceil(b / n) (at least
    1), the flag, and the declaration (with the type rates) in spec."""
    limits = Limits.of(type_rates={"a": "40/s", "b": "1/s"})  # bursts 4 and 1
    one = limits.shares(1)[0]
    assert one["types"] == "1"
    assert float(one["ti:a"]) == pytest.approx(25.0) and one["tb:a"] == "4"
    assert float(one["ti:b"]) == pytest.approx(1000.0) and one["tb:b"] == "1"
    assert "interval" not in one and "concurrency" not in one
    for share in limits.shares(3):
        assert float(share["ti:a"]) == pytest.approx(75.0) and share["tb:a"] == "2"
        assert float(share["ti:b"]) == pytest.approx(3000.0) and share["tb:b"] == "1"
        assert json.loads(share["spec"])["type_rates"] == {"a": "40/s", "b": "1/s"}
        assert Limits.from_fields(share) == limits
    assert "types" not in Limits.of("10/s").shares(1)[0]


# ---------------------------------------------------------------------- helpers


def _dequeue(client: Client, queue: str, count: int) -> dequeue.Dequeued:
    """One call of dequeue.lua, as a worker makes it."""
    qk = client.keys.queue(queue)
    keys, args = dequeue.build(qk, count, 60_000, "test:1")
    run = functools.partial(dequeue.SCRIPT.call, keys=keys, args=args)
    return dequeue.parse(client.backend.execute_key(qk.pending, run))


def _scheduled(client: Client, queue: str) -> dict[str, float]:
    key = client.keys.queue(queue).scheduled
    raw = list(on_node(client, key, "ZRANGE", 0, -1, "WITHSCORES"))
    if raw and isinstance(raw[0], (list, tuple)):  # RESP3: pairs
        return {as_text(k): float(v) for k, v in raw}
    return {as_text(k): float(v) for k, v in zip(raw[::2], raw[1::2], strict=True)}


# ---------------------------------------------------------------------- the script


def test_a_type_without_a_token_is_put_back_at_spread_reserved_times(url: str, prefix: str) -> None:
    """Type a at 10/s (burst 1), 5 of them enqueued before 3 of type b (no rate): one
    dequeue of 8 starts one a and every b (not blocked behind a's backlog) and puts the
    other 4 a back in ``scheduled``, each one interval (100 ms) after the one before,
    starting one interval after the first: no two share a time (no churn). The records
    are unchanged (no retry counted). The horizon and the type's tat are stored; the
    next dequeue, before the first reserved time, starts nothing and says when the
    earliest is due."""
    with Client(url, prefix=prefix) as client:
        client.set_limits("q", type_rates={"a": "10/s"})
        a_ids = [client.enqueue("a", i, queue="q").id for i in range(5)]
        b_ids = [client.enqueue("b", i, queue="q").id for i in range(3)]
        before = int(time.time() * 1000)
        got = _dequeue(client, "q", 8)
        started = [task_id for task_id, _ in got.tasks]
        assert sorted(started) == sorted([a_ids[0], *b_ids])
        put_back = _scheduled(client, "q")
        assert sorted(put_back) == sorted(a_ids[1:])
        times = sorted(put_back.values())
        assert times[0] >= before + 100 - 1
        assert [b - a for a, b in itertools.pairwise(times)] == pytest.approx([100] * 3, abs=1)
        for task_id in a_ids[1:]:
            info = client.info(task_id, queue="q")
            assert (str(info.state), info.retried) == ("scheduled", 0)
        fields = read_hash(client, client.keys.queue("q").limits)
        assert float(fields["th:a"]) == pytest.approx(times[-1] + 100, abs=1)
        assert float(fields["tt:a"]) >= before + 100
        again = _dequeue(client, "q", 8)
        if time.time() * 1000 < times[0]:  # a slow machine may be past it already
            assert again.tasks == [] and again.next_due == pytest.approx(times[0] / 1000)


def test_a_dequeue_reads_past_the_tasks_it_puts_back(url: str, prefix: str) -> None:
    """5 a (10/s, burst 1) ahead of 3 b, a dequeue of 3: it pops on past the a tasks it
    puts back until 3 start (one a, two b), leaving the last b pending."""
    with Client(url, prefix=prefix) as client:
        client.set_limits("q", type_rates={"a": "10/s"})
        a_ids = [client.enqueue("a", i, queue="q").id for i in range(5)]
        b_ids = [client.enqueue("b", i, queue="q").id for i in range(3)]
        got = [task_id for task_id, _ in _dequeue(client, "q", 3).tasks]
        assert sorted(got) == sorted([a_ids[0], *b_ids[:2]])
        assert sorted(_scheduled(client, "q")) == sorted(a_ids[1:])
        assert str(client.info(b_ids[2], queue="q").state) == "pending"


def test_a_dequeue_that_only_put_back_says_to_come_again_at_once(url: str, prefix: str) -> None:
    """A dequeue reads a bounded number of tasks (500): with 501 a (1/s) ahead of one b,
    a dequeue of 1 starts the first a; the next reads 500 a, puts them back, starts
    nothing, and says to come again now (b waits), not at the first reserved time, a
    second later; the one after starts b."""
    with Client(url, prefix=prefix) as client:
        client.set_limits("q", type_rates={"a": "1/s"})
        client.enqueue_many([("a", i) for i in range(501)], queue="q")
        b_id = client.enqueue("b", 0, queue="q").id
        assert len(_dequeue(client, "q", 1).tasks) == 1
        got = _dequeue(client, "q", 1)
        assert got.tasks == [] and got.next_due is not None
        assert got.next_due <= time.time() + 0.5
        assert [i for i, _ in _dequeue(client, "q", 1).tasks] == [b_id]


def test_a_types_burst_starts_at_once(url: str, prefix: str) -> None:
    """Type a at 40/s has the default burst 4: of 6 waiting, one dequeue starts exactly
    4 and puts 2 back."""
    with Client(url, prefix=prefix) as client:
        client.set_limits("q", type_rates={"a": "40/s"})
        for i in range(6):
            client.enqueue("a", i, queue="q")
        assert len(_dequeue(client, "q", 10).tasks) == 4
        assert len(_scheduled(client, "q")) == 2


def test_a_put_back_task_competes_for_a_token_again(url: str, prefix: str) -> None:
    """The reserved time does not hold a token: a task of the type enqueued later that
    finds a token takes it; the task put back, once due, finds none left and is put back
    again, later (the horizon moved on), its record still unchanged."""
    with Client(url, prefix=prefix) as client:
        client.set_limits("q", type_rates={"a": "2/s"})  # interval 500 ms, burst 1
        first, second = (client.enqueue("a", i, queue="q").id for i in range(2))
        assert [i for i, _ in _dequeue(client, "q", 5).tasks] == [first]
        due = _scheduled(client, "q")[second]
        # Until shortly before the reserved time nothing starts (a dequeue right at it
        # would forward and start it: the margin keeps a slow call clear of that).
        deadline = time.monotonic() + 10
        while time.time() * 1000 < due - 100 and time.monotonic() < deadline:
            assert _dequeue(client, "q", 5).tasks == []
            time.sleep(0.02)
        time.sleep(max(0.0, (due + 5) / 1000 - time.time()))  # the reserved time has come
        # A newcomer is enqueued at once before the due task is forwarded; the due one
        # is forwarded to the back of the list, so the newcomer is popped first.
        third = client.enqueue("a", 3, queue="q").id
        got = [i for i, _ in _dequeue(client, "q", 5).tasks]
        assert got == [third]
        again = _scheduled(client, "q")
        assert list(again) == [second] and again[second] >= due + 500 - 1
        assert client.info(second, queue="q").retried == 0


def test_queue_tokens_are_taken_only_by_tasks_that_start(url: str, prefix: str) -> None:
    """Queue rate 10/s burst 5 and type a at 1/s (burst 1): 5 a tasks, one dequeue of 5:
    one starts, four are put back, and the queue's tat moves by one interval only (the
    four left the queue's tokens): 4 b tasks enqueued next all start at once."""
    with Client(url, prefix=prefix) as client:
        client.set_limits("q", rate="10/s", burst=5, type_rates={"a": "1/s"})
        for i in range(5):
            client.enqueue("a", i, queue="q")
        now = time.time() * 1000
        assert len(_dequeue(client, "q", 5).tasks) == 1
        fields = read_hash(client, client.keys.queue("q").limits)
        assert float(fields["tat"]) <= time.time() * 1000 + 100 + 1
        assert float(fields["tat"]) >= now + 100 - 1
        b_ids = [client.enqueue("b", i, queue="q").id for i in range(4)]
        assert sorted(i for i, _ in _dequeue(client, "q", 10).tasks) == sorted(b_ids)


def test_queues_without_type_rates_carry_no_flag(url: str, prefix: str) -> None:
    """The flag is written only with type rates, and removed with them: a queue without
    them reads its type from no record (its dequeue is as before)."""
    with Client(url, prefix=prefix) as client:
        key = client.keys.queue("q").limits
        client.set_limits("q", rate="10/s", type_rates={"a": "1/s"})
        assert read_hash(client, key)["types"] == "1"
        client.set_limits("q", rate="10/s")
        fields = read_hash(client, key)
        assert "types" not in fields and not any(f.startswith("t") and ":" in f for f in fields)


# ---------------------------------------------------------------------- declaring


def test_type_rates_are_replaced_and_cleared_with_their_state(url: str, prefix: str) -> None:
    with Client(url, prefix=prefix) as client:
        key = client.keys.queue("q").limits
        client.set_limits("q", type_rates={"a": "1/s", "b": "2/s"})
        for i in range(3):
            client.enqueue("a", i, queue="q")
            client.enqueue("b", i, queue="q")
        _dequeue(client, "q", 6)
        fields = read_hash(client, key)
        assert {"tt:a", "th:a", "tt:b", "th:b"} <= set(fields)
        # b unchanged keeps its state; a's rate changed: its limiter starts full again.
        client.set_limits("q", type_rates={"a": "5/s", "b": "2/s"})
        after = read_hash(client, key)
        assert "tt:a" not in after and "th:a" not in after
        assert (after["tt:b"], after["th:b"]) == (fields["tt:b"], fields["th:b"])
        assert float(after["ti:a"]) == pytest.approx(200.0)
        assert client.limits("q") == Limits.of(type_rates={"a": "5/s", "b": "2/s"})
        # b removed: its rate and state go.
        client.set_limits("q", type_rates={"a": "5/s"})
        assert not {f for f in read_hash(client, key) if f.endswith(":b")}
        client.set_limits("q")
        assert read_hash(client, key) == {} and client.limits("q") is None


def test_a_partitioned_queue_gets_type_shares(url: str, prefix: str) -> None:
    with Client(url, prefix=prefix) as client:
        layout = client.declare_queue("pq", 2)
        with Admin(url, prefix=prefix) as admin:
            admin.set_limits("pq", type_rates={"a": "30/s"})  # burst 3
        for name in layout.members:
            fields = read_hash(client, client.keys.queue(name).limits)
            assert fields["types"] == "1"
            assert float(fields["ti:a"]) == pytest.approx(2000 / 30)
            assert fields["tb:a"] == "2"
        assert client.limits("pq") == Limits.of(type_rates={"a": "30/s"})


def test_async_client_sets_and_reads_type_rates(url: str, prefix: str) -> None:
    async def scenario() -> None:
        async with await AsyncClient.connect(url, prefix=prefix) as client:
            declared = await client.set_limits("q", type_rates={"x": "7/s"})
            assert declared == Limits.of(type_rates={"x": "7/s"})
            assert await client.limits("q") == declared

    asyncio.run(scenario())


def test_the_cli_sets_shows_and_refuses_type_rates(
    clusterq_bin: str, url: str, prefix: str
) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [clusterq_bin, "--url", url, "--prefix", prefix, "queue", "limit", "q", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )

    done = run("--rate", "100/s", "--type-rate", "email:send=10/s", "--type-rate", "b=1/m")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        "queue q: 100/s (burst 10), type b 1/m (burst 1), type email:send 10/s (burst 1)"
    )
    shown = json.loads(run("--json").stdout)["limits"]
    assert shown["type_rates"]["email:send"]["rate"] == "10/s"
    for bad, says in [
        ("nope", "invalid --type-rate 'nope': give TYPE=RATE"),
        ("=1/s", "invalid --type-rate '=1/s'"),
        ("a=fast", "task type 'a': invalid rate 'fast'"),
    ]:
        done = run("--type-rate", bad)
        assert done.returncode == 1 and "Traceback" not in done.stderr
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and says in lines[0], done.stderr
    done = run("--clear", "--type-rate", "a=1/s")
    assert done.returncode == 1 and "--clear removes every limit" in done.stderr
    inspect = subprocess.run(
        [clusterq_bin, "--url", url, "--prefix", prefix, "queue", "inspect", "q"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "type email:send 10/s (burst 1)" in inspect.stdout, inspect.stdout


# ---------------------------------------------------------------------- with a worker

RATE_A, N = 20, 60
BURST_A = 2  # the default: a tenth of a second's worth


def test_one_types_backlog_neither_blocks_others_nor_exceeds_its_rate(
    url: str, standalone: LocalServer, prefix: str
) -> None:
    """Type a at 20/s (burst 2), 60 of them enqueued before 60 of type b (no rate); one
    worker of concurrency 20. Every b starts before a's backlog is done; a's starts obey
    the bound (the k-th no earlier than (k + 1 - burst) / rate after the first, less the
    first start's lag; the span at least (N - burst) / rate x 0.9); no task runs twice;
    none spends a retry."""
    key = f"{prefix}:starts"
    router = Router()

    async def scenario() -> None:
        recorder = redis.asyncio.Redis.from_url(standalone.seed_url)

        async def record(task: Task) -> None:
            line = f"{task.type} {time.time():.6f} {task.id} {task.retry_count}"
            await recorder.rpush(key, line)

        router.task("a")(record)
        router.task("b")(record)

        async def recorded() -> bool:
            return int(await recorder.llen(key)) >= 2 * N

        try:
            with Client(url, prefix=prefix) as client:
                client.set_limits("mixed", type_rates={"a": f"{RATE_A}/s"})
                client.enqueue_many([("a", i) for i in range(N)], queue="mixed")
                client.enqueue_many([("b", i) for i in range(N)], queue="mixed")
            async with running_worker(url, router, queues=["mixed"], prefix=prefix, concurrency=20):
                await await_for(recorded, 90, f"{2 * N} starts")
        finally:
            await recorder.aclose()

    asyncio.run(scenario())
    lines = [as_text(x).split() for x in standalone.client().lrange(key, 0, -1)]
    assert len(lines) == 2 * N
    assert len({line[2] for line in lines}) == 2 * N  # each task once
    assert {line[3] for line in lines} == {"0"}  # no retry spent
    a = sorted(float(line[1]) for line in lines if line[0] == "a")
    b = sorted(float(line[1]) for line in lines if line[0] == "b")
    assert len(a) == len(b) == N
    assert b[-1] < a[-1], "b waited behind a's backlog"
    span = assert_token_bucket(a, RATE_A, BURST_A, "a")
    print(f"\n{url}: a over {span:.2f}s, b done {b[-1] - b[0]:.2f}s after its first")


def test_a_queue_rate_and_a_type_rate_hold_together(
    url: str, standalone: LocalServer, prefix: str
) -> None:
    """Queue 40/s (burst 4) and type a at 10/s (burst 1): 20 a then 40 b. All starts obey
    the queue's bound, a's starts the type's; every task runs once."""
    key = f"{prefix}:starts"
    router = Router()
    total = 60

    async def scenario() -> None:
        recorder = redis.asyncio.Redis.from_url(standalone.seed_url)

        async def record(task: Task) -> None:
            await recorder.rpush(key, f"{task.type} {time.time():.6f} {task.id}")

        router.task("a")(record)
        router.task("b")(record)

        async def recorded() -> bool:
            return int(await recorder.llen(key)) >= total

        try:
            with Client(url, prefix=prefix) as client:
                client.set_limits("both", rate="40/s", burst=4, type_rates={"a": "10/s"})
                client.enqueue_many([("a", i) for i in range(20)], queue="both")
                client.enqueue_many([("b", i) for i in range(40)], queue="both")
            async with running_worker(url, router, queues=["both"], prefix=prefix, concurrency=20):
                await await_for(recorded, 90, f"{total} starts")
        finally:
            await recorder.aclose()

    asyncio.run(scenario())
    lines = [as_text(x).split() for x in standalone.client().lrange(key, 0, -1)]
    assert len({line[2] for line in lines}) == len(lines) == total
    for rate, burst, starts in [
        (40, 4, sorted(float(line[1]) for line in lines)),
        (10, 1, sorted(float(line[1]) for line in lines if line[0] == "a")),
    ]:
        assert_token_bucket(starts, rate, burst, f"{rate}/s:")
