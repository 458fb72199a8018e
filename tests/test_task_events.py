"""Task lifecycle events (issue 30), on real servers: each transition's entry and its
fields; off by default and when turned off; 1,000 tasks with retries on the cluster,
every task's events in order; ``clusterq events --follow --json`` live; the cap; foreign
values in the flag and stream keys."""

from __future__ import annotations

import asyncio
import json
import queue as queue_module
import subprocess
import threading
from typing import Any

import pytest

from clusterq import Admin, AsyncClient, Client, Router, Task, TaskEvent
from clusterq.broker import dequeue
from clusterq.errors import ClusterqError
from clusterq.retry import fixed
from clusterq.tools.devcluster import LocalCluster, LocalServer
from tests.helpers import await_for, running_worker


def _router(gate: asyncio.Event | None = None, holding: list[str] | None = None) -> Router:
    router = Router()

    @router.task("ok")
    async def ok(task: Task) -> int:
        return 1

    @router.task("boom")
    async def boom(task: Task) -> None:
        raise RuntimeError(f"boom {task.retry_count}")

    @router.task("flaky")
    async def flaky(task: Task) -> int:
        # fails payload times (0, 1 or 2), then succeeds: deterministic by payload
        if task.retry_count < int(task.payload):
            raise RuntimeError(f"fail {task.retry_count}")
        return 0

    @router.task("hold")
    async def hold(task: Task) -> None:
        assert gate is not None and holding is not None
        holding.append(task.id)
        await gate.wait()

    return router


def _events(client: Client, queue: str, **options: Any) -> list[TaskEvent]:
    return list(client.events(queue, **options))


def _names(events: list[TaskEvent], task_id: str) -> list[str]:
    return [e.event for e in events if e.task_id == task_id]


def _xlen(client: Client, key: str) -> int:
    return int(client.backend.call(key, "XLEN", key))


def test_off_by_default_then_on_then_off(standalone: LocalServer, prefix: str) -> None:
    url = standalone.seed_url
    with Client(url, prefix=prefix) as client:
        qk = client.keys.queue("plain")
        first = client.enqueue("ok", 1, queue="plain")
        asyncio.run(_drain(url, prefix, ["plain"], 1))
        assert not client.backend.call(qk.events, "EXISTS", qk.events, qk.evcfg)
        assert _events(client, "plain") == []

        client.set_events("plain", True, maxlen=500)
        assert client.backend.call(qk.evcfg, "GET", qk.evcfg) == b"500"
        on = client.enqueue("ok", 2, queue="plain")
        client.set_events("plain", False)
        client.enqueue("ok", 3, queue="plain")
        client.enqueue_many([("ok", 4), ("ok", 5)], queue="plain")
        events = _events(client, "plain")
        assert [(e.event, e.task_id) for e in events] == [("enqueued", on.id)]
        assert first.id not in {e.task_id for e in events}
        with pytest.raises(ClusterqError, match="maxlen must be between"):
            client.set_events("plain", True, maxlen=0)


async def _drain(url: str, prefix: str, queues: list[str], expected: int, **options: Any) -> None:
    """Run a worker until it handled ``expected`` tasks (processed or failed)."""
    settings: dict[str, Any] = {"retry_policy": fixed(0), "queues": queues, **options}
    async with running_worker(url, _router(), prefix=prefix, **settings) as worker:
        await await_for(
            lambda: worker.stats.processed + worker.stats.failed >= expected, 60, "the tasks"
        )


def test_each_transition_with_its_fields(standalone: LocalServer, prefix: str) -> None:
    url = standalone.seed_url
    q = "lifecycle"
    with Client(url, prefix=prefix) as client, Admin(url, prefix=prefix) as admin:
        client.set_events(q, True)
        ok = client.enqueue("ok", 1, queue=q, retention=60)
        boom = client.enqueue("boom", 1, queue=q, max_retry=1, task_id="boom-1")
        asyncio.run(_drain(url, prefix, [q], 3))  # ok; boom twice (retried, then failed)
        events = _events(client, q)
        assert all(e.garbled is None for e in events)
        mine = [e for e in events if e.task_id == ok.id]
        assert [(e.event, e.state, e.retries, e.type) for e in mine] == [
            ("enqueued", "pending", 0, "ok"),
            ("started", "active", 0, "ok"),
            ("succeeded", "completed", 0, "ok"),
        ]
        assert mine[0].worker is None and mine[1].worker and mine[2].worker == mine[1].worker
        assert mine[0].time <= mine[1].time <= mine[2].time
        failing = [e for e in events if e.task_id == boom.id]
        assert [(e.event, e.state, e.retries) for e in failing] == [
            ("enqueued", "pending", 0),
            ("started", "active", 0),
            ("retried", "retry", 1),
            ("started", "active", 1),
            ("failed", "archived", 1),
        ]
        assert "boom 0" in (failing[2].error or "") and "boom 1" in (failing[4].error or "")
        assert failing[3].attempt == 2
        assert [e.event for e in _events(client, q, task_id=boom.id)] == [e.event for e in failing]

        # an operator's actions
        admin.run(q, [boom.id])
        later = client.enqueue("ok", 2, queue=q, process_in=3600)
        gone = client.enqueue("ok", 3, queue=q, process_in=3600)
        admin.archive(q, [later.id])
        admin.delete(q, [gone.id])
        tail = _events(client, q, since=events[-1].stream_id)
        assert [(e.event, e.task_id, e.state) for e in tail[1:]] == [
            ("run", boom.id, "pending"),
            ("enqueued", later.id, "scheduled"),
            ("enqueued", gone.id, "scheduled"),
            ("archived", later.id, "archived"),
            ("deleted", gone.id, ""),
        ]
        assert _events(client, q, count=2) == events[:2]


def test_cancel_and_a_lost_lease_recovered(standalone: LocalServer, prefix: str) -> None:
    url = standalone.seed_url
    q = "leases"
    with Client(url, prefix=prefix) as client, Admin(url, prefix=prefix) as admin:
        client.set_events(q, True)
        qk = client.keys.queue(q)
        lost = client.enqueue("ok", 1, queue=q)
        # a worker that died holding the task: taken under its token, then its lease
        # made to have expired (its score in ``active`` set in the past)
        keys, args = dequeue.build(qk, 1, 60_000, "ghost-worker:run:1")
        taken = client.backend.execute(qk.slot, lambda c: dequeue.SCRIPT.call(c, keys, args))
        assert dequeue.parse(taken).tasks[0][0] == lost.id
        client.backend.call(qk.active, "ZADD", qk.active, 0, lost.id)
        held = client.enqueue("hold", 1, queue=q)

        async def scenario() -> None:
            gate, holding = asyncio.Event(), []
            async with running_worker(
                url, _router(gate, holding), prefix=prefix, queues=[q], retry_policy=fixed(0)
            ) as worker:
                await await_for(lambda: worker.stats.processed >= 1, 60, "the recovered task")
                await await_for(lambda: held.id in holding, 30, "hold to start")
                await asyncio.to_thread(admin.cancel, q, [held.id])
                await await_for(lambda: worker.stats.failed >= 1, 30, "the cancel")
                gate.set()

        asyncio.run(scenario())
        recovered = [e for e in _events(client, q) if e.task_id == lost.id]
        assert [(e.event, e.worker) for e in recovered[:3]] == [
            ("enqueued", None),
            ("started", "ghost-worker"),
            ("recovered", "ghost-worker"),
        ]
        assert recovered[2].state == "retry" and "lease" in (recovered[2].error or "")
        assert [e.event for e in recovered[3:]] == ["started", "succeeded"]
        assert recovered[3].worker != "ghost-worker" and recovered[3].retries == 1
        assert recovered[-1].state == "deleted"  # no retention: gone once it succeeded
        cancelled = _names(_events(client, q), held.id)
        assert cancelled[:3] == ["enqueued", "started", "cancelled"]
        assert cancelled[3] in ("failed", "succeeded")  # the worker's answer to it


def _queues_on_masters(client: Client, want: int) -> list[str]:
    """Queue names whose slots are served by ``want`` different masters."""
    out: dict[Any, str] = {}
    for i in range(2000):
        name = f"ev{i}"
        out.setdefault(client.backend.master_addr(client.keys.queue(name).slot), name)
        if len(out) == want:
            break
    assert len(out) == want
    return list(out.values())


def test_a_thousand_tasks_with_retries_on_the_cluster(cluster: LocalCluster, prefix: str) -> None:
    """Every task's events, read back from its queue's stream: enqueued, started,
    (retried, started) once per failure, succeeded; retries counted up."""
    url = cluster.seed_url
    with Client(url, prefix=prefix) as client:
        queues = _queues_on_masters(client, 3)
        for q in queues:
            client.set_events(q, True)
        fails: dict[str, int] = {}
        for n in range(1000):
            q = queues[n % len(queues)]
            # some with their own ids (the checked enqueue script), most through push
            options: dict[str, Any] = {"task_id": f"t{n}"} if n % 7 == 0 else {}
            info = client.enqueue("flaky", n % 3, queue=q, max_retry=5, **options)
            fails[info.id] = n % 3
        expected = sum(fails.values()) + len(fails)

        async def scenario() -> None:
            async with running_worker(
                url, _router(), prefix=prefix, queues=queues, retry_policy=fixed(0), concurrency=16
            ) as worker:
                await await_for(
                    lambda: worker.stats.processed + worker.stats.failed >= expected,
                    240,
                    "every attempt",
                )

        asyncio.run(scenario())
        seen: dict[str, list[TaskEvent]] = {}
        for q in queues:
            for event in client.events(q):
                assert event.garbled is None and event.queue == q
                seen.setdefault(event.task_id, []).append(event)
        assert set(seen) == set(fails)
        for task_id, count in fails.items():
            got = [(e.event, e.retries) for e in seen[task_id]]
            want = [("enqueued", 0)]
            for i in range(count):
                want += [("started", i), ("retried", i + 1)]
            want += [("started", count), ("succeeded", count)]
            assert got == want, f"task {task_id}: {got}"


def test_events_follow_json_sees_later_tasks(
    standalone: LocalServer, prefix: str, clusterq_bin: str
) -> None:
    url = standalone.seed_url
    q = "followed"
    with Client(url, prefix=prefix) as client:
        client.set_events(q, True)
        before = client.enqueue("ok", 1, queue=q)
        proc = subprocess.Popen(
            [clusterq_bin, "--url", url, "--prefix", prefix, "events", q, "--follow", "--json"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        lines: queue_module.Queue[str] = queue_module.Queue()

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.put(line)

        threading.Thread(target=pump, daemon=True).start()
        try:
            assert json.loads(lines.get(timeout=30))["task_id"] == before.id  # history
            after = client.enqueue("ok", 2, queue=q)  # while it follows
            got = json.loads(lines.get(timeout=30))
            assert (got["task_id"], got["event"], got["state"]) == (after.id, "enqueued", "pending")
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def test_the_cap_holds(standalone: LocalServer, prefix: str) -> None:
    """maxlen 300, counted in events though a call's events share one entry: rounds of
    300 single enqueues (push.lua, an entry each), 300 enqueued in one call (enqueue.lua,
    entries of 64) and a worker's 600 starts and 600 successes (dequeue.lua, ack.lua:
    entries of a batch each) keep about 300 events: never more than the cap, a stream
    node's worth (MAXLEN ~ trims whole nodes) and one entry's events, never fewer than
    half the cap; twice the transitions, no more memory."""
    url, q, cap = standalone.seed_url, "capped", 300
    with Client(url, prefix=prefix) as client:
        qk = client.keys.queue(q)
        client.set_events(q, True, maxlen=cap)
        r = standalone.client()
        node_entries = int(r.config_get("stream-node-max-entries")["stream-node-max-entries"])
        most = cap + node_entries + 64
        sizes = []
        for round_ in range(2):
            for i in range(cap):
                client.enqueue("ok", i, queue=q)
            kept = len(_events(client, q))
            assert cap // 2 <= kept <= most, kept
            client.enqueue_many([("ok", i) for i in range(cap)], queue=q, unique_for=60)
            kept = len(_events(client, q))
            assert cap // 2 <= kept <= most, kept
            asyncio.run(_drain(url, prefix, [q], 2 * cap))
            events = _events(client, q)
            assert cap // 2 <= len(events) <= most, len(events)
            assert events[-1].event == "succeeded"
            sizes.append(int(r.memory_usage(qk.events, samples=0)))
            print(f"events stream after {(round_ + 1) * 4 * cap} transitions: {len(events)} "
                  f"events in {_xlen(client, qk.events)} entries, {sizes[-1]} bytes")  # fmt: skip
        assert sizes[1] <= sizes[0] * 1.5  # bounded: twice the transitions, not more memory


def test_entries_written_before_batching_are_read(standalone: LocalServer, prefix: str) -> None:
    """A stream holding entries of one event each (as written before a call's events
    shared an entry) reads as before, in order with the new entries; the cap counts
    those entries until they are trimmed away."""
    q = "older"
    r = standalone.client()
    with Client(standalone.seed_url, prefix=prefix) as client:
        qk = client.keys.queue(q)
        client.set_events(q, True, maxlen=50)
        for i in range(3):
            r.xadd(qk.events, {"event": "enqueued", "id": f"old{i}", "type": "ok",
                               "retries": "0", "worker": "", "state": "pending"})  # fmt: skip
        infos = client.enqueue_many([("ok", i) for i in range(2)], queue=q)
        events = _events(client, q)
        assert [(e.task_id, e.event, e.garbled) for e in events] == [
            ("old0", "enqueued", None),
            ("old1", "enqueued", None),
            ("old2", "enqueued", None),
            (infos[0].id, "enqueued", None),
            (infos[1].id, "enqueued", None),
        ]
        assert events[3].stream_id == events[4].stream_id  # one call, one entry
        for i in range(200):
            client.enqueue("ok", i, queue=q)
        assert _xlen(client, qk.events) < 50 + 100  # trimmed to the cap in entries
        assert not [e for e in _events(client, q) if e.task_id.startswith("old")]


@pytest.mark.parametrize(
    "damage",
    ["flag a list", "flag not a number", "flag zero", "stream a string", "stream at its last id"],
)
def test_foreign_values_in_the_flag_or_stream_lose_no_task(
    standalone: LocalServer, prefix: str, damage: str
) -> None:
    url = standalone.seed_url
    q = "foreign"
    r = standalone.client()
    with Client(url, prefix=prefix) as client:
        qk = client.keys.queue(q)
        client.set_events(q, True)
        if damage == "flag a list":
            r.delete(qk.evcfg)
            r.rpush(qk.evcfg, "x")
        elif damage == "flag not a number":
            r.set(qk.evcfg, "lots")
        elif damage == "flag zero":
            r.set(qk.evcfg, "0")
        elif damage == "stream a string":
            r.set(qk.events, "foreign")
        else:
            r.xadd(qk.events, {"foreign": "x"}, id="18446744073709551615-18446744073709551615")
        infos = [client.enqueue("ok", 1, queue=q), client.enqueue("ok", 2, queue=q, task_id="x")]
        infos += client.enqueue_many([("ok", 3), ("boom", 4)], queue=q, max_retry=0)
        asyncio.run(_drain(url, prefix, [q], 4, name=f"w-{damage.replace(' ', '-')}"))
        # every task ran: three succeeded (deleted), the failing one archived
        assert r.zrange(qk.archived, 0, -1) == [infos[3].id.encode()]
        assert r.hkeys(qk.tasks) == [infos[3].id.encode()]
        assert int(r.hget(qk.stats, "processed") or 0) == 3
        if damage == "stream a string":
            assert r.get(qk.events) == b"foreign"
            with pytest.raises(ClusterqError) as refused:
                _events(client, q)
            assert qk.events in str(refused.value) and "\n" not in str(refused.value)
        elif damage == "stream at its last id":
            (only,) = _events(client, q)  # the foreign entry: set aside, described
            assert only.garbled and "unknown event" in only.garbled
        else:
            assert not r.exists(qk.events)


def test_garbled_entries_are_set_aside(standalone: LocalServer, prefix: str) -> None:
    q = "garbled"
    r = standalone.client()
    with Client(standalone.seed_url, prefix=prefix) as client:
        qk = client.keys.queue(q)
        client.set_events(q, True)
        r.xadd(qk.events, {"event": "started", "id": "a", "retries": "many"})
        r.xadd(qk.events, {"worker": "w", "events": "[[1"})
        r.xadd(qk.events, {"worker": "w", "events": '{"a": 1}'})
        r.xadd(qk.events, {"worker": "w", "events": '[7, ["started", "b", "t", "x", "active"]]'})
        info = client.enqueue("ok", 1, queue=q)
        events = _events(client, q)
        assert events[0].garbled and "retries 'many'" in events[0].garbled
        assert events[1].garbled and "not a JSON array" in events[1].garbled
        assert events[2].garbled and "not a JSON array" in events[2].garbled
        assert events[3].garbled and "not a list" in events[3].garbled
        assert events[4].garbled and "retries 'x'" in events[4].garbled
        assert (events[4].task_id, events[4].worker) == ("b", "w")
        assert (events[5].event, events[5].task_id, events[5].garbled) == (
            "enqueued",
            info.id,
            None,
        )
        assert all(json.dumps(e.to_dict()) for e in events)


def test_async_client_events(standalone: LocalServer, prefix: str) -> None:
    async def scenario() -> None:
        client = await AsyncClient.connect(standalone.seed_url, prefix=prefix)
        try:
            await client.set_events("aq", True, maxlen=50)
            first = await client.enqueue("ok", 1, queue="aq")
            got: list[TaskEvent] = []
            async for event in client.events("aq", follow=True, count=2):
                got.append(event)
                if len(got) == 1:
                    second = await client.enqueue("ok", 2, queue="aq")
            assert [e.task_id for e in got] == [first.id, second.id]
        finally:
            await client.aclose()

    asyncio.run(scenario())


def test_a_partitioned_queue_reads_its_partitions_merged(
    cluster: LocalCluster, prefix: str
) -> None:
    with Client(cluster.seed_url, prefix=prefix) as client:
        client.declare_queue("parts", 3)
        client.set_events("parts", True)
        infos = [client.enqueue("ok", i, queue="parts", key=f"k{i}") for i in range(12)]
        events = _events(client, "parts")
        assert {e.task_id for e in events} == {i.id for i in infos}
        assert len({e.queue for e in events}) > 1
        assert [e.time for e in events] == sorted(e.time for e in events)


def _cli(*args: str) -> Any:
    from click.testing import CliRunner

    from clusterq.cli.app import main

    return CliRunner().invoke(main, list(args))


def test_cli_on_off_events_and_task_inspect_timeline(standalone: LocalServer, prefix: str) -> None:
    url = standalone.seed_url
    base = ("--url", url, "--prefix", prefix)
    with Client(url, prefix=prefix) as client:
        qk = client.keys.queue("clied")
        quiet = client.enqueue("ok", 0, queue="clied", retention=60)
        shown = _cli(*base, "task", "inspect", quiet.id, "--queue", "clied", "--json")
        assert shown.exit_code == 0 and "timeline" not in json.loads(shown.output)

        off = _cli(*base, "events", "clied")
        assert off.exit_code == 0 and "events of queue clied are off" in off.output, off.output
        done = _cli(*base, "queue", "events", "clied", "--on", "--maxlen", "200")
        assert done.exit_code == 0, done.output
        assert (
            "events on" in done.output and client.backend.call(qk.evcfg, "GET", qk.evcfg) == b"200"
        )
        info = client.enqueue("ok", 1, queue="clied", retention=60)
        listed = _cli(*base, "events", "clied")
        assert listed.exit_code == 0 and "enqueued" in listed.output and info.id in listed.output
        lines = _cli(*base, "events", "clied", "--task", info.id, "--json").output.splitlines()
        assert [json.loads(line)["event"] for line in lines] == ["enqueued"]
        shown = _cli(*base, "task", "inspect", info.id, "--queue", "clied", "--json")
        assert [e["event"] for e in json.loads(shown.output)["timeline"]] == ["enqueued"]
        table = _cli(*base, "task", "inspect", info.id, "--queue", "clied")
        assert table.exit_code == 0 and "timeline of task" in table.output

        every = _cli(*base, "queue", "events", "--all", "--off")
        assert every.exit_code == 0 and "clied" in every.output, every.output
        assert not client.backend.call(qk.evcfg, "EXISTS", qk.evcfg)
        refused = _cli(*base, "queue", "events", "clied")
        assert refused.exit_code != 0 and "--on or --off" in refused.output
        # removing the queue removes its events and their flag
        assert _cli(*base, "queue", "events", "clied", "--on").exit_code == 0
        assert _cli(*base, "queue", "rm", "clied", "--force", "--yes").exit_code == 0
        assert not client.backend.call(qk.events, "EXISTS", qk.events, qk.evcfg)


def test_a_stopping_worker_hands_back_with_requeued(standalone: LocalServer, prefix: str) -> None:
    url = standalone.seed_url
    q = "handback"
    with Client(url, prefix=prefix) as client:
        client.set_events(q, True)
        info = client.enqueue("hold", 1, queue=q)

        async def scenario() -> None:
            gate, holding = asyncio.Event(), []
            async with running_worker(
                url, _router(gate, holding), prefix=prefix, queues=[q], shutdown_timeout=0.2
            ):
                await await_for(lambda: info.id in holding, 30, "the task to start")
            gate.set()  # the worker stopped without it: handed back

        asyncio.run(scenario())
        got = [(e.event, e.state) for e in _events(client, q, task_id=info.id)]
        assert got == [("enqueued", "pending"), ("started", "active"), ("requeued", "pending")]
        requeued = _events(client, q, task_id=info.id)[-1]
        assert requeued.worker and requeued.worker == _events(client, q)[1].worker


def test_following_a_partitioned_queue_sees_every_partition(
    cluster: LocalCluster, prefix: str
) -> None:
    """History from the partitions merged, then new events from any partition (each
    partition's XREAD in turn), until ``count`` of them were handed out."""
    with Client(cluster.seed_url, prefix=prefix) as client:
        client.declare_queue("followparts", 3)
        client.set_events("followparts", True)
        first = {client.enqueue("ok", i, queue="followparts", key=f"a{i}").id for i in range(3)}
        later: set[str] = set()
        got: list[TaskEvent] = []
        history_read = threading.Event()

        def follow() -> None:
            for event in client.events("followparts", follow=True, count=9):
                got.append(event)
                if len(got) == 3:
                    history_read.set()

        reader = threading.Thread(target=follow, daemon=True)
        reader.start()
        assert history_read.wait(30)
        with Client(cluster.seed_url, prefix=prefix) as other:
            for i in range(6):
                later.add(other.enqueue("ok", i, queue="followparts", key=f"b{i}").id)
        reader.join(60)
        assert not reader.is_alive(), f"followed {len(got)} of 9 events"
        assert {e.task_id for e in got[:3]} == first and {e.task_id for e in got[3:]} == later
        assert len({e.queue for e in got[3:]}) > 1


def test_retries_of_reads_only_the_meta_field(standalone: LocalServer) -> None:
    """``retries_of`` (``_events.lua``): the meta's own "r", not one inside the parent
    results of a workflow step, a header or an error text, nor one in the payload."""
    from clusterq.broker.script import _read

    source = _read("_events.lua") + "\nreturn retries_of(ARGV[1])"
    r = standalone.client()
    cases = {
        '{"t":"a","r":3,"e":1}\n{}': 3,
        '{"t":"a","e":1}\n{"x":1,"r":9}': 0,
        '{"t":"a","wf":"w","ws":1,"pr":{"x":1,"r":9},"e":1}\n{}': 0,
        '{"t":"a","r":2,"wf":"w","ws":1,"pr":{"x":1,"r":9},"e":1}\n{}': 2,
        '{"t":"a","h":{"k":"1","r":"5"},"e":1}\n{}': 0,
        '{"t":"a","err":"x\\",\\"r\\":4","e":1}\n{}': 0,
        '{"t":"a","r":12}': 12,
    }
    for record, retries in cases.items():
        assert r.eval(source, 0, record) == retries, record
