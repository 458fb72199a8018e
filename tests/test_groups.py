"""Fair groups (issue 28): ``enqueue(..., group=...)``. A queue's groups take turns, so a
small group's tasks do not wait behind a big group's backlog; each group may have its
own rate (``rate_per_group``), cap (``concurrency_per_group``) and hold
(``RateLimited(scope="group")``).

What ran, and when, is recorded by the handlers themselves (``time.time()`` into lists
of the test's own); the queue's keys are read with redis-py. Assertions are about the
order of events and about lower bounds on time that a slow machine only makes easier to
meet. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import defaultdict
from typing import Any

import pytest

from clusterq import Admin, Client, InvalidLimits, Limits, RateLimited, Router, Task, TaskSpec
from clusterq.broker.facade import Broker
from clusterq.cluster.abackend import AsyncBackend
from clusterq.errors import InvalidName
from clusterq.keys import KeySchema, parse_fair_member
from clusterq.task import Record
from tests.helpers import (
    assert_token_bucket,
    await_for,
    max_overlap,
    on_node,
    read_hash,
    running_worker,
)

MS = 0.002  # the server's clock and this one's differ by less than this on one machine


def _specs(queue: str, group: str | None, count: int, **payload: Any) -> list[TaskSpec]:
    options: dict[str, Any] = {"queue": queue}
    if group is not None:
        options["group"] = group
    return [TaskSpec("job", {"g": group, "i": i, **payload}, options) for i in range(count)]


def _recording() -> tuple[Router, list[tuple[str, float]]]:
    """A router whose ``job`` handler records (the payload's group, when it started)."""
    starts: list[tuple[str, float]] = []
    router = Router()

    @router.task("job")
    async def job(task: Task) -> None:
        starts.append((task.payload["g"], time.time()))

    return router, starts


# ---------------------------------------------------------------------- the vocabulary


def test_a_group_is_written_right_after_the_type_and_read_back() -> None:
    from clusterq.producer import Producer

    producer = Producer(KeySchema(), "json", 1000)
    record = producer.prepare("job", {"a": 1}, group="tenant-42", timeout=3).new.record
    assert record.startswith(b'{"t":"job","g":"tenant-42",')
    assert Record.decode(record).group == "tenant-42"
    assert Record.decode(producer.prepare("job", 1).new.record).group is None


@pytest.mark.parametrize("bad", ["", "a b", "x{y}", "tab\t", 7, "n" * 129])
def test_a_bad_group_name_is_refused_in_one_line(bad: Any) -> None:
    from clusterq.producer import Producer

    with pytest.raises(InvalidName, match="group name"):
        Producer(KeySchema(), "json", 1000).prepare("job", 1, group=bad)


def test_a_fair_member_reads_back_as_group_time_and_id() -> None:
    assert parse_fair_member(b"A\x00001796512294180\x00id-1") == ("A", 1796512294180, "id-1")
    assert parse_fair_member(b"\x00000000000000007\x00x") == ("", 7, "x")
    assert parse_fair_member(b"no member") is None


def test_per_group_limits_are_checked_described_and_shared_whole() -> None:
    limits = Limits.of(rate_per_group="5/s", concurrency_per_group=2)
    assert limits.group_burst == 1 and not limits.empty
    assert limits.describe() == "per group 5/s (burst 1), 2 at once per group"
    assert limits.as_dict()["per_group"]["concurrency"] == 2
    # a group lives in one partition: every partition enforces the whole of them
    shares = limits.shares(3)
    assert {s["gi"] for s in shares} == {repr(200.0)} and {s["gc"] for s in shares} == {"2"}
    assert Limits.from_fields(shares[0]) == limits
    with pytest.raises(InvalidLimits, match=r"^rate_per_group: invalid rate 'fast'"):
        Limits.of(rate_per_group="fast")
    with pytest.raises(InvalidLimits, match=r"^invalid rate 'fast'"):
        Limits.of(rate="fast")
    with pytest.raises(InvalidLimits, match="burst_per_group needs a rate_per_group"):
        Limits.of(burst_per_group=3)
    with pytest.raises(InvalidLimits, match="concurrency_per_group"):
        Limits.of(concurrency_per_group=0)


# ---------------------------------------------------------------------- taking turns


def test_a_small_group_does_not_wait_behind_a_big_groups_backlog(url: str, prefix: str) -> None:
    """Group A's 10,000 tasks are enqueued first, then group B's 100; one worker: every
    B task starts before A's 1,000th does (A still has 9,000 waiting)."""
    queue = "fair"
    router, starts = _recording()

    with Client(url, prefix=prefix) as client:
        client.enqueue_many(_specs(queue, "A", 10_000))
        b_enqueued = time.time()
        client.enqueue_many(_specs(queue, "B", 100))

    async def scenario() -> None:
        async with running_worker(url, router, queues=[queue], prefix=prefix):
            await await_for(lambda: sum(g == "B" for g, _ in starts) >= 100, 60, "B's tasks")

    asyncio.run(scenario())
    order = [g for g, _ in starts]
    last_b = max(i for i, g in enumerate(order) if g == "B")
    assert order[: last_b + 1].count("A") < 1000, f"B's last task started {last_b}th"
    waits = sorted(at - b_enqueued for g, at in starts if g == "B")
    print(f"B's median wait {statistics.median(waits):.3f}s, last B start #{last_b}")


def test_groups_take_turns_one_task_at_a_time(url: str, prefix: str) -> None:
    """A worker that takes one task per dequeue (concurrency 1): 12 groups of 4 tasks
    each, enqueued group after group; the first 12 starts are one per group, and so are
    the next 12 (a group that started one goes to the back of the line)."""
    queue = "turns"
    order: list[str] = []
    router = Router()

    @router.task("job")
    async def job(task: Task) -> None:
        order.append(task.payload["g"])

    groups = [f"g{i:02d}" for i in range(12)]
    with Client(url, prefix=prefix) as client:
        for g in groups:
            client.enqueue_many(_specs(queue, g, 4))

    async def scenario() -> None:
        async with running_worker(url, router, queues=[queue], prefix=prefix, concurrency=1):
            await await_for(lambda: len(order) >= 48, 60, "every task")

    asyncio.run(scenario())
    assert sorted(order[:12]) == groups and sorted(order[12:24]) == groups


def test_tasks_without_a_group_take_turns_as_one_group(url: str, prefix: str) -> None:
    """A grouped task turns a queue fair: 3,000 ungrouped tasks, then 20 of group X; X's
    tasks do not wait for the ungrouped backlog."""
    queue = "mixed"
    order: list[str | None] = []
    router = Router()

    @router.task("job")
    async def job(task: Task) -> None:
        order.append(task.group)

    with Client(url, prefix=prefix) as client:
        client.enqueue_many(_specs(queue, None, 3000))
        client.enqueue_many(_specs(queue, "X", 20))

    async def scenario() -> None:
        async with running_worker(url, router, queues=[queue], prefix=prefix):
            await await_for(lambda: order.count("X") >= 20, 60, "X's tasks")

    asyncio.run(scenario())
    last_x = max(i for i, g in enumerate(order) if g == "X")
    assert last_x < 1500, f"X's last task started {last_x}th of 3,020"


def test_a_fair_queue_empties_and_leaves_no_keys_behind(url: str, prefix: str) -> None:
    queue = "tidy"
    done: list[int] = []
    router = Router()

    @router.task("job")
    async def job(task: Task) -> None:
        done.append(1)

    with Client(url, prefix=prefix) as client:
        client.enqueue_many(_specs(queue, "A", 50) + _specs(queue, "B", 50))

        async def scenario() -> None:
            async with running_worker(url, router, queues=[queue], prefix=prefix):
                await await_for(lambda: len(done) >= 100, 30, "every task")

        asyncio.run(scenario())
        qk = client.keys.queue(queue)
        for key in (qk.fair, qk.turns, qk.groups, qk.pending):
            assert on_node(client, key, "EXISTS") == 0, key
    assert len(done) == 100


# ---------------------------------------------------------------------- per-group limits


def test_each_group_keeps_its_own_rate_and_all_progress_at_once(url: str, prefix: str) -> None:
    """20 groups of 8 tasks, ``rate_per_group="5/s"`` (burst 1), one worker: each group's
    starts obey its own token bucket, and the first 20 starts are one per group (all 20
    progress at once, none waits for another's)."""
    queue = "tenants"
    starts: dict[str, list[float]] = defaultdict(list)
    order: list[str] = []
    router = Router()

    @router.task("job")
    async def job(task: Task) -> None:
        starts[task.payload["g"]].append(time.time())
        order.append(task.payload["g"])

    groups = [f"g{i:02d}" for i in range(20)]
    with Client(url, prefix=prefix) as client:
        client.set_limits(queue, rate_per_group="5/s")
        client.enqueue_many([s for g in groups for s in _specs(queue, g, 8)])

    async def scenario() -> None:
        async with running_worker(url, router, queues=[queue], prefix=prefix, concurrency=50):
            await await_for(lambda: len(order) >= 160, 60, "every task")

    asyncio.run(scenario())
    assert sorted(order[:20]) == groups
    for g in groups:
        assert len(starts[g]) == 8
        assert_token_bucket(sorted(starts[g]), 5.0, 1, what=g)


def test_a_group_cap_holds_while_other_groups_run(url: str, prefix: str) -> None:
    """``concurrency_per_group=2``, three groups of 6 tasks that each sleep 0.2 s, worker
    concurrency 20: never more than 2 of one group run at once, and groups run beside
    each other (more than 2 at once overall)."""
    queue = "capped"
    spans: dict[str, list[tuple[float, float]]] = defaultdict(list)
    router = Router()

    @router.task("job")
    async def job(task: Task) -> None:
        start = time.time()
        await asyncio.sleep(0.2)
        spans[task.payload["g"]].append((start, time.time()))

    with Client(url, prefix=prefix) as client:
        client.set_limits(queue, concurrency_per_group=2)
        client.enqueue_many([s for g in "ABC" for s in _specs(queue, g, 6)])

    async def scenario() -> None:
        async with running_worker(url, router, queues=[queue], prefix=prefix, concurrency=20):
            await await_for(lambda: sum(map(len, spans.values())) >= 18, 60, "every task")

    asyncio.run(scenario())
    for g in "ABC":
        assert len(spans[g]) == 6
        assert max_overlap(spans[g]) <= 2, g
    assert max_overlap([s for g in "ABC" for s in spans[g]]) > 2


def test_rate_limited_for_the_group_holds_only_that_group(url: str, prefix: str) -> None:
    """A task of group A raises RateLimited(1.0, scope="group") once: no A task starts
    until 1 s after the raise (not even when the queue's limits are declared anew
    meanwhile, which gives every group its turn at once), while group B's tasks start
    meanwhile; then A's all run, the raising one again too."""
    queue = "held"
    starts: list[tuple[str, str, float]] = []
    raised: list[float] = []
    router = Router()

    @router.task("job")
    async def job(task: Task) -> None:
        starts.append((task.payload["g"], task.id, time.time()))
        if task.payload.get("raise") and not raised:
            raised.append(time.time())
            raise RateLimited(1.0, scope="group")
        if task.payload["g"] == "B":
            await asyncio.sleep(0.05)  # B's tasks take their time, so some start later

    with Client(url, prefix=prefix) as client:
        client.enqueue("job", {"g": "A", "i": -1, "raise": True}, queue=queue, group="A")
        client.enqueue_many(_specs(queue, "A", 4) + _specs(queue, "B", 30))

        async def scenario() -> None:
            async with running_worker(url, router, queues=[queue], prefix=prefix, concurrency=1):
                await await_for(lambda: raised, 30, "the raise")
                # a new declaration gives every group its turn now: the hold still holds
                client.set_limits(queue, rate_per_group="1000/s")
                await await_for(lambda: len(starts) >= 36, 60, "every task, the first twice")

        asyncio.run(scenario())
    assert raised
    a_after = [at - raised[0] for g, task_id, at in starts if g == "A" and at > raised[0]]
    assert sum(g == "A" for g, _, _ in starts) == 6  # five tasks, the raising one twice
    assert a_after  # the raising one again at least
    assert min(a_after) >= 1.0 - MS, f"an A task started {min(a_after):.3f}s after the raise"
    b_during = [at for g, _, at in starts if g == "B" and raised[0] < at < raised[0] + 1.0]
    assert b_during, "group B waited for group A's hold"


def test_a_group_cap_slot_comes_back_with_an_expired_lease(url: str, prefix: str) -> None:
    """A worker that took both of group A's slots and died (its tasks taken by a bare
    dequeue, never acked): a new worker runs nothing of A until the leases expire and
    are recovered, then runs every A task; B's run at once."""
    queue = "crash"
    router, order = _recording()

    with Client(url, prefix=prefix) as client:
        client.set_limits(queue, concurrency_per_group=2)
        client.enqueue_many(_specs(queue, "A", 4))

    async def scenario() -> float:
        backend = await AsyncBackend.connect(url, prefix=prefix)
        try:
            broker = Broker(backend)
            qk = backend.keys.queue(queue)
            got = await broker.dequeue(qk, 10, 1500, "dead:1")
            assert len(got.tasks) == 2  # the cap: two of A's four
            again = await broker.dequeue(qk, 10, 1500, "dead:2")
            assert not again.tasks and again.limited == "group"
            taken = time.time()
            with Client(url, prefix=prefix) as client:
                client.enqueue_many(_specs(queue, "B", 3))
            async with running_worker(url, router, queues=[queue], prefix=prefix):
                await await_for(lambda: len(order) >= 7, 60, "every task")
            return taken
        finally:
            await backend.aclose()

    taken = asyncio.run(scenario())
    a_starts = [at for g, at in order if g == "A"]
    assert len(a_starts) == 4  # the two left behind, and the two recovered
    assert sum(g == "B" for g, _ in order) == 3
    # the dead worker's two leases (1.5 s) held both slots: nothing of A before that
    assert min(a_starts) >= taken + 1.5 - MS


# ---------------------------------------------------------------------- operators


def test_pending_grouped_tasks_are_counted_listed_and_managed(url: str, prefix: str) -> None:
    """Once sorted into their groups (a dequeue that finds every group held back), the
    pending tasks are counted by queue ls, listed page by page, found by id, deleted
    and archived; ``Inspector.groups`` counts them per group."""
    queue = "ops"
    with Client(url, prefix=prefix) as client:
        client.set_limits(queue, rate_per_group="1/h")
        ids = [client.enqueue("job", {"i": i}, queue=queue, group=f"t{i % 3}").id for i in range(9)]

        async def sort_them() -> tuple[list[str], Any, Any]:
            backend = await AsyncBackend.connect(url, prefix=prefix)
            try:
                broker, qk = Broker(backend), backend.keys.queue(queue)
                got = await broker.dequeue(qk, 9, 60_000, "op:1")
                again = await broker.dequeue(qk, 9, 60_000, "op:2")
                (look,) = await broker.survey(
                    [qk], timeout=0, archive_max_size=100, archive_max_age_ms=60_000
                )
                return [task_id for task_id, _ in got.tasks], again, look
            finally:
                await backend.aclose()

        started, again, look = asyncio.run(sort_them())
        assert len(started) == 3  # each group's one token
        # nothing more may start for an hour: the worker is told to wait that long
        assert not again.tasks and again.limited == "group"
        assert again.next_due is not None and again.next_due > time.time() + 3000
        # the survey counts the tasks waiting in their groups as pending
        assert look.pending == 6 and look.next_due is not None
        qk = client.keys.queue(queue)
        assert on_node(client, qk.pending, "LLEN") == 0
        assert on_node(client, qk.fair, "ZCARD") == 6
        with Admin(url, prefix=prefix) as admin:
            info = admin.queue(queue)
            assert info.pending == 6 and info.active == 3
            listed = admin.task_ids(queue, "pending", limit=100)
            assert sorted(listed) == sorted(set(ids) - set(started))
            page = admin.task_ids(queue, "pending", offset=2, limit=2)
            assert page == listed[2:4]
            (groups,) = admin.groups(queue)
            assert {(g.group, g.waiting) for g in groups.groups} == {
                ("t0", 2),
                ("t1", 2),
                ("t2", 2),
            }
            assert all(g.next_turn > time.time() + 3000 for g in groups.groups)
            one, two = (next(i for i in listed if ids.index(i) % 3 == k) for k in (1, 2))
            assert admin.task(queue, one).info.state.value == "pending"
            assert admin.task(queue, one).info.group == "t1"
            assert admin.delete(queue, [one]) == {one: "ok"}
            assert admin.archive(queue, [two]) == {two: "ok"}
            assert on_node(client, qk.fair, "ZCARD") == 4
            assert admin.queue(queue).archived == 1
            (groups,) = admin.groups(queue)
            assert {(g.group, g.waiting) for g in groups.groups} == {
                ("t0", 2),
                ("t1", 1),
                ("t2", 1),
            }


def test_a_group_at_its_cap_and_out_of_tokens_waits_for_the_later(url: str, prefix: str) -> None:
    """``rate_per_group="1/h"`` and ``concurrency_per_group=1``: after one start the group
    is at its cap (looked at again 100 ms on) and out of tokens (for an hour): its next
    turn is the later of the two."""
    queue = "both"
    with Client(url, prefix=prefix) as client:
        client.set_limits(queue, rate_per_group="1/h", concurrency_per_group=1)
        client.enqueue_many(_specs(queue, "A", 2))

        async def take() -> Any:
            backend = await AsyncBackend.connect(url, prefix=prefix)
            try:
                broker, qk = Broker(backend), backend.keys.queue(queue)
                first = await broker.dequeue(qk, 5, 60_000, "w:1")
                return first, await broker.dequeue(qk, 5, 60_000, "w:2")
            finally:
                await backend.aclose()

        first, second = asyncio.run(take())
        assert len(first.tasks) == 1 and not second.tasks and second.limited == "group"
        assert second.next_due is not None and second.next_due > time.time() + 3000
        with Admin(url, prefix=prefix) as admin:
            ((group,),) = [g.groups for g in admin.groups(queue)]
        assert group.running == 1 and group.next_turn > time.time() + 3000


def test_a_group_stays_in_one_partition(url: str, prefix: str) -> None:
    with Client(url, prefix=prefix) as client:
        client.declare_queue("parts", partitions=4)
        placed = {
            client.enqueue("job", i, queue="parts", group="tenant-7").queue for i in range(20)
        }
        assert len(placed) == 1
        spread = {client.enqueue("job", i, queue="parts", group=f"t{i}").queue for i in range(40)}
        assert len(spread) > 1


def test_a_fair_key_holding_foreign_data_is_named_and_nothing_is_lost(
    url: str, prefix: str
) -> None:
    queue = "foreign"
    with Client(url, prefix=prefix) as client:
        task = client.enqueue("job", 1, queue=queue, group="A")
        qk = client.keys.queue(queue)
        on_node(client, qk.turns, "SET", "not a zset")

        async def take() -> Any:
            backend = await AsyncBackend.connect(url, prefix=prefix)
            try:
                return await Broker(backend).dequeue(qk, 5, 60_000, "w:1")
            finally:
                await backend.aclose()

        with pytest.raises(Exception, match=f"{qk.turns}.*holds a string"):
            asyncio.run(take())
        assert on_node(client, qk.fair, "ZCARD") == 1  # still there
        on_node(client, qk.turns, "DEL")  # and its group is in no turn: found again
        got = asyncio.run(take())
        assert [task_id for task_id, _ in got.tasks] == [task.id]
        assert set(read_hash(client, qk.groups)) <= {"clk"}


# ---------------------------------------------------------------------- caps per task type


def test_type_caps_are_checked_described_and_shared() -> None:
    limits = Limits.of(type_concurrency={"slow": 3})
    assert limits.describe() == "type slow 3 at once" and not limits.empty
    assert limits.as_dict()["type_concurrency"] == {"slow": 3}
    shares = limits.shares(2)
    assert [s["tc:slow"] for s in shares] == ["2", "1"] and shares[0]["tcaps"] == "1"
    assert Limits.from_fields(shares[1]) == limits
    with pytest.raises(InvalidLimits, match="task type 'slow': concurrency 3 cannot be shared"):
        limits.shares(4)
    with pytest.raises(InvalidLimits, match="task type 'x': invalid concurrency 0"):
        Limits.of(type_concurrency={"x": 0})
    with pytest.raises(InvalidLimits, match="invalid type_concurrency"):
        Limits.of(type_concurrency=["x"])  # type: ignore[arg-type]


def test_a_type_at_its_cap_holds_up_no_other_type(url: str, prefix: str) -> None:
    """``type_concurrency={"slow": 2}``: 8 slow tasks (0.5 s each) enqueued before 20
    fast ones, worker concurrency 20: never more than 2 slow ones at once, and every
    fast task starts before the slow ones' 5th (which cannot start before two rounds of
    slow tasks ended, a second after the first)."""
    queue = "typed"
    spans: dict[str, list[tuple[float, float]]] = defaultdict(list)
    router = Router()

    @router.task("slow")
    async def slow(task: Task) -> None:
        start = time.time()
        await asyncio.sleep(0.5)
        spans["slow"].append((start, time.time()))

    @router.task("fast")
    async def fast(task: Task) -> None:
        spans["fast"].append((time.time(), time.time()))

    with Client(url, prefix=prefix) as client:
        client.set_limits(queue, type_concurrency={"slow": 2})
        client.enqueue_many([("slow", i) for i in range(8)], queue=queue)
        client.enqueue_many([("fast", i) for i in range(20)], queue=queue)

        async def scenario() -> None:
            async with running_worker(url, router, queues=[queue], prefix=prefix, concurrency=20):
                await await_for(lambda: len(spans["slow"]) + len(spans["fast"]) >= 28, 60, "all")

        asyncio.run(scenario())
        limits = read_hash(client, client.keys.queue(queue).limits)
        client.set_limits(queue, rate="1000/s")  # the caps are no longer declared
        assert not any(
            f.startswith("tc:") for f in read_hash(client, client.keys.queue(queue).limits)
        )
    assert limits["tc:slow"] == "2" and limits["tcaps"] == "1"
    assert max_overlap(spans["slow"]) <= 2
    fifth_slow = sorted(s for s, _ in spans["slow"])[4]
    assert max(s for s, _ in spans["fast"]) < fifth_slow
