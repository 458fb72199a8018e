"""Pure functions and small classes: retry policies, capacity, records, router."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest

from clusterq import Router, Task
from clusterq.priority import Capacity
from clusterq.retry import RetryIn, exponential, fibonacci, fixed
from clusterq.task import Record
from clusterq.worker import parse_queues

TASK = Task(id="x", type="t", payload=None, queue="q")


def test_exponential_backoff_bounds() -> None:
    policy = exponential(base=1.0, factor=2.0, maximum=60.0, jitter=0.5)
    for retried in range(12):
        ceiling = min(60.0, 2.0**retried)
        for _ in range(20):
            assert ceiling * 0.5 <= policy(retried, RuntimeError(), TASK) <= ceiling
    with pytest.raises(ValueError):
        exponential(jitter=2)


def test_fibonacci_backoff_like_machinery() -> None:
    policy = fibonacci(unit=1.0, maximum=100)
    assert [policy(n, RuntimeError(), TASK) for n in range(10)] == [
        1,
        1,
        2,
        3,
        5,
        8,
        13,
        21,
        34,
        55,
    ]
    assert policy(50, RuntimeError(), TASK) == 100
    assert fixed(3)(7, RuntimeError(), TASK) == 3
    assert RetryIn(-1).seconds == 0


def test_record_round_trip_and_failure() -> None:
    record = Record(
        type="a:b", payload=b'{"x":"\\n"}\nraw', max_retry=3, enqueued_ms=5, unique_key="k"
    )
    again = Record.decode(record.encode())
    assert again == record
    failed = again.failed("boom", 99)
    assert (failed.retried, failed.last_error, failed.failed_ms) == (1, "boom", 99)
    assert b"\n" not in failed.meta()  # the meta part never contains the separator
    assert Record.decode(failed.meta() + b"\n" + record.payload).payload == record.payload


def test_parse_queues() -> None:
    assert parse_queues("critical=6,default=3,low") == {"critical": 6, "default": 3, "low": 1}
    assert parse_queues(["a", "b"]) == {"a": 1, "b": 1}
    assert parse_queues(None) == {"default": 1}
    with pytest.raises(ValueError, match="weight"):
        parse_queues({"a": 0})
    with pytest.raises(ValueError, match="name=integer"):
        parse_queues("a=x")
    with pytest.raises(ValueError, match="invalid queue name"):
        parse_queues("a{b}=1")


def test_router_exact_then_longest_prefix() -> None:
    router = Router()
    router.handle("email:", lambda t: "any email")
    router.handle("email:urgent:", lambda t: "urgent")
    router.handle("email:send", lambda t: "send")
    assert router.resolve("email:send")(TASK) == "send"  # type: ignore[misc]
    assert router.resolve("email:urgent:page")(TASK) == "urgent"  # type: ignore[misc]
    assert router.resolve("email:bounce")(TASK) == "any email"  # type: ignore[misc]
    assert router.resolve("sms:send") is None
    with pytest.raises(ValueError, match="already registered"):
        router.handle("email:send", lambda t: None)


async def _shares(total: int, want: int, until: int) -> Counter[str]:
    """Slots each of three busy queues (weights 6:3:1) got, ``want`` at a time."""
    capacity = Capacity(total, {"a": 6, "b": 3, "c": 1})
    slots: Counter[str] = Counter()

    async def loop(queue: str) -> None:
        while sum(slots.values()) < until:
            got = await capacity.acquire(queue, want)
            if got == 0:
                return
            slots[queue] += got
            await asyncio.sleep(0)
            capacity.release(got)

    tasks = [asyncio.create_task(loop(q)) for q in "abc"]
    await asyncio.wait_for(asyncio.gather(*tasks), 20)
    return slots


def test_capacity_weighted_draws() -> None:
    wins = asyncio.run(_shares(1, 1, 3000))
    total = sum(wins.values())
    assert abs(wins["a"] / total - 0.6) < 0.05 and abs(wins["c"] / total - 0.1) < 0.03, wins


def test_capacity_grants_slots_freed_together_as_one_batch() -> None:
    async def scenario() -> list[int]:
        capacity = Capacity(10, {"a": 6, "b": 3, "c": 1})
        assert await capacity.acquire("a", 10) == 10  # all in use
        waiting = {q: asyncio.create_task(capacity.acquire(q, 10)) for q in "abc"}
        await asyncio.sleep(0)
        capacity.release(10)  # freed in one turn: one waiter takes them all
        await asyncio.wait(waiting.values(), timeout=5, return_when=asyncio.FIRST_COMPLETED)
        for _ in range(3):
            await asyncio.sleep(0)  # any other grant of that turn would be done too
        sizes = [t.result() for t in waiting.values() if t.done()]
        for task in waiting.values():
            task.cancel()
        await asyncio.gather(*waiting.values(), return_exceptions=True)
        return sizes

    assert asyncio.run(scenario()) == [10]
    slots = asyncio.run(_shares(4, 4, 12000))  # many grants of 4: shares follow the weights
    total = sum(slots.values())
    assert abs(slots["a"] / total - 0.6) < 0.06 and abs(slots["c"] / total - 0.1) < 0.04, slots


def test_capacity_strict_and_close() -> None:
    async def scenario() -> None:
        capacity = Capacity(2, {"hi": 2, "lo": 1}, strict=True)
        assert await capacity.acquire("lo", 5) == 2  # alone: takes what is free
        hi = asyncio.create_task(capacity.acquire("hi", 1))
        lo = asyncio.create_task(capacity.acquire("lo", 1))
        await asyncio.sleep(0)
        capacity.release(1)
        assert await hi == 1
        for _ in range(5):  # turns of the loop in which a wrong grant would land
            await asyncio.sleep(0)
        assert not lo.done()
        capacity.close()
        assert await lo == 0
        assert await capacity.acquire("hi", 1) == 0

    asyncio.run(scenario())


def test_drills_refuse_nodes_that_are_not_local() -> None:
    import os

    from clusterq.tools.servers import NotLocal, local_process

    with pytest.raises(NotLocal, match="not a loopback address"):
        local_process("10.1.2.3", 7000, {"process_id": os.getpid(), "tcp_port": 7000})
    with pytest.raises(NotLocal, match="does not run on this machine"):
        local_process("127.0.0.1", 7000, {"process_id": 2**22 + 12345, "tcp_port": 7000})
    with pytest.raises(NotLocal, match="process_id"):
        local_process("127.0.0.1", 7000, {})


def test_drills_refuse_nodes_they_could_not_restart_as_they_run(tmp_path: Path) -> None:
    """Killed nodes are restarted from their executable and config file: a node whose
    ports came from its command line (lost on restart) is refused before the drill."""
    import os
    import sys

    from clusterq.tools.servers import NotLocal, local_process

    me = {"process_id": os.getpid(), "executable": sys.executable}
    (tmp_path / "shared.conf").write_text("cluster-enabled yes\nport 7999\n")
    good = tmp_path / "node.conf"
    good.write_text(f"include {tmp_path / 'shared.conf'}\n# comment\nport 7000\n")
    proc = local_process("127.0.0.1", 7000, {**me, "tcp_port": 7000, "config_file": str(good)})
    assert (proc.pid, proc.config_file) == (os.getpid(), str(good))
    tls_only = tmp_path / "tls.conf"
    tls_only.write_text("port 0\ntls-port 7000\n")
    local_process("127.0.0.1", 7000, {**me, "tcp_port": 7000, "config_file": str(tls_only)})
    with pytest.raises(NotLocal, match="without a config file"):
        local_process("127.0.0.1", 7000, {**me, "tcp_port": 7000, "config_file": ""})
    flags_only = tmp_path / "flags.conf"
    flags_only.write_text("cluster-enabled yes\n")  # port came from --port
    with pytest.raises(NotLocal, match=r"says port 6379 .* options on its command line"):
        local_process("127.0.0.1", 7000, {**me, "tcp_port": 7000, "config_file": str(flags_only)})
    with pytest.raises(NotLocal, match="cannot read the config file"):
        local_process(
            "127.0.0.1", 7000, {**me, "tcp_port": 7000, "config_file": "/nonexistent.conf"}
        )


def test_durability_commands() -> None:
    from clusterq.durability import confirmed_replicas, durability_commands

    assert durability_commands("none", 1) == []
    assert durability_commands("replica", 0.25) == [("WAIT", 1, 250)]
    assert durability_commands("aof", 2) == [("WAITAOF", 1, 1, 2000)]
    # No timeout given: WAITAOF waits for once-a-second fsyncs, so it gets more than WAIT.
    assert durability_commands("replica", None) == [("WAIT", 1, 1000)]
    assert durability_commands("aof", None) == [("WAITAOF", 1, 1, 3000)]
    assert confirmed_replicas("replica", [1]) == 1
    assert confirmed_replicas("aof", [[1, 0]]) == 0


def test_enqueue_is_a_push_on_the_first_attempt_only() -> None:
    from clusterq.broker import enqueue
    from clusterq.keys import KeySchema

    qk = KeySchema("u").queue("q")
    tasks = [enqueue.NewTask(f"id{i}", b"rec%d" % i, fresh=True) for i in range(2)]
    attempts = enqueue.Attempts([(qk, tasks)], durable=False)
    (first,) = attempts.next()
    assert first == (
        enqueue.PUSH,
        [qk.tasks, qk.pending, qk.wake, qk.evcfg, qk.events],
        ["id0", b"rec0", "id1", b"rec1"],
    )
    assert enqueue.created_as_sent(first)
    ((script, keys, args),) = attempts.next()  # a retry: the first may have run
    assert script is enqueue.SCRIPT and keys[:2] == [qk.tasks, qk.pending]
    assert args == [0, "id0", 0, 0, 0, 1, b"rec0", "id1", 0, 0, 0, 1, b"rec1"]
    assert attempts.sent == [(script, keys, args)]

    def first_step(*new: enqueue.NewTask, durable: bool = False) -> object:
        return enqueue.Attempts([(qk, list(new))], durable=durable).next()[0]

    given = enqueue.NewTask("mine", b"rec")  # an id from the caller: checked
    delayed = enqueue.NewTask("x", b"r", delay_ms=9, fresh=True)  # the server's clock
    for step in (
        first_step(tasks[0], given),
        first_step(delayed),
        first_step(tasks[0], durable=True),
    ):
        assert not enqueue.created_as_sent(step)


def test_new_record_heads_match_record_encode() -> None:
    from clusterq.task import record_meta, with_enqueued

    for options in (
        {},
        {"timeout_ms": 5},
        {"unique_key": "k", "deadline_ms": 9, "retention_ms": 3},
    ):
        record = Record(type="a", payload=b"P", max_retry=3, enqueued_ms=77, **options)  # type: ignore[arg-type]
        head = with_enqueued(record_meta("a", max_retry=3, **options), 77)  # type: ignore[arg-type]
        assert head + b"P" == record.encode()
        assert Record.decode(head + b"P") == record


def test_task_ids_never_start_with_a_dash() -> None:
    """An id is also a command-line argument (`clusterq task inspect ID`)."""
    from clusterq.producer import new_task_id

    ids = [new_task_id() for _ in range(20_000)]
    assert not any(i.startswith("-") for i in ids)
    assert len(set(ids)) == len(ids) and {len(i) for i in ids} == {16}
