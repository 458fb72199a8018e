"""Partitioned queues: one logical queue over many slots and masters."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from clusterq import Admin, AsyncClient, Client, Inspector, Router, Task, TaskSpec, Worker, chain
from clusterq.cli import main
from clusterq.cluster.changes import MasterChanged
from clusterq.errors import DuplicateTask, InvalidName
from clusterq.partitions import (
    MAX_PARTITIONS,
    Layout,
    partition_names,
    partition_of,
    relayout,
    without,
)
from clusterq.slots import SLOT_COUNT, keyslot
from clusterq.tools.devcluster import LocalCluster
from tests.helpers import FAST, StartWorker, await_for, running_worker, wait_for
from tests.workload import read_events

# ---------------------------------------------------------------------- pure functions


@pytest.mark.parametrize("count", [2, 3, 5, 7, 12, 64, 256])
def test_partitions_spread_evenly_over_the_slot_space(count: int) -> None:
    names = partition_names("clicks", count)
    assert len(set(names)) == count
    step = SLOT_COUNT / count
    for index, name in enumerate(names):
        # partition i hashes into the i-th of `count` equal stretches of the slots
        assert index * step <= keyslot(name) < (index + 1) * step, (index, name)
    assert partition_names("clicks", count) == names  # the same in every process


def test_twelve_partitions_land_four_on_each_of_three_even_masters() -> None:
    ranges = [(0, 5460), (5461, 10922), (10923, 16383)]  # redis-cli --cluster create
    owners = Counter(
        next(i for i, (lo, hi) in enumerate(ranges) if lo <= keyslot(n) <= hi)
        for n in partition_names("clicks", 12)
    )
    assert owners == {0: 4, 1: 4, 2: 4}


def test_a_key_always_picks_the_same_partition() -> None:
    assert partition_of("user-42", 12) == partition_of(b"user-42", 12) == 7  # crc32 2097592435
    layout = relayout(None, "clicks", 12, 0)
    assert layout is not None
    assert {layout.pick("user-42") for _ in range(5)} == {layout.queues[7]}
    # without a key the partitions are taken in turn
    assert [layout.pick() for _ in range(24)] == list(layout.queues) * 2


def test_relayout_drains_the_old_partitions() -> None:
    first = relayout(None, "clicks", 4, 1000)
    assert first is not None and first.version == 1 and first.draining == ()
    assert relayout(first, "clicks", 4, 2000) is None  # same count: nothing to change
    second = relayout(first, "clicks", 6, 3000)
    assert second is not None and second.version == 2 and second.partitions == 6
    assert second.draining == first.queues and second.changed_ms == 3000
    assert second.members == (*second.queues, *first.queues, "clicks")
    plain = relayout(second, "clicks", 1, 4000)
    assert plain is not None and plain.queues == ("clicks",)
    assert set(plain.draining) == set(first.queues) | set(second.queues)
    assert without(plain, first.queues, 5000).draining == second.queues
    assert Layout.from_json(second.to_json()).members == second.members


@pytest.mark.parametrize(
    ("name", "count", "error"),
    [
        ("cl{icks", 4, InvalidName),
        ("clicks~2", 4, InvalidName),
        ("x" * 120, 4, InvalidName),
        ("clicks", 0, ValueError),
        ("clicks", MAX_PARTITIONS + 1, ValueError),
        ("clicks", True, ValueError),
    ],
)
def test_bad_declarations_are_refused(name: str, count: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        relayout(None, name, count, 0)


# ---------------------------------------------------------------------- against servers


@pytest.mark.both_servers
def test_declare_and_list_with_the_cluster_fields(cluster: LocalCluster, prefix: str) -> None:
    url = cluster.seed_url
    result = CliRunner().invoke(
        main, ["queue", "create", "clicks", "--partitions", "12", "--url", url, "--prefix", prefix]
    )
    assert result.exit_code == 0, result.output
    assert "12 partitions" in result.output
    with Client(url, prefix=prefix) as client:
        layout = client.layout("clicks")
        assert layout is not None and layout.partitions == 12
        assert client.declare_queue("clicks", 12).version == layout.version  # idempotent
    listed = CliRunner().invoke(
        main, ["queue", "ls", "--cluster", "--json", "--url", url, "--prefix", prefix]
    )
    assert listed.exit_code == 0, listed.output
    rows = {row["queue"]: row for row in json.loads(listed.output)}
    parts = [row for row in rows.values() if row["partition_of"] == "clicks"]
    assert sorted(row["partition"] for row in parts) == list(range(12))
    for row in parts:
        assert row["keyslot"] == keyslot(row["queue"])
        assert row["master"] and len(row["replicas"]) == 1
    assert Counter(row["master"] for row in parts).most_common()[0][1] == 4
    assert len({row["master"] for row in parts}) == 3
    assert rows["clicks"]["partitions"] == 12
    table = CliRunner().invoke(main, ["queue", "ls", "--cluster", "--url", url, "--prefix", prefix])
    assert table.exit_code == 0, table.output
    assert "clicks" in table.output and "~0of12" in table.output


def _router(ran: Counter[str], fail_once: set[str] | None = None) -> Router:
    router = Router()

    @router.task("click")
    async def click(task: Task) -> Any:
        ran[task.id] += 1
        if fail_once is not None and task.payload.get("fail") and task.id not in fail_once:
            fail_once.add(task.id)
            raise RuntimeError("first attempt fails")
        return {"queue": task.queue, "n": task.payload.get("n")}

    @router.task("sum")
    async def total(task: Task) -> int:
        ran[task.id] += 1
        return sum(task.parent_results) + int(task.payload)

    return router


def test_features_work_on_a_partitioned_queue(url: str, prefix: str) -> None:
    """Keys, delays, retries, unique, results, durability, info by bare id, admin
    actions and workflows: on a partitioned queue as on a plain one."""
    ran: Counter[str] = Counter()
    failed_once: set[str] = set()

    async def scenario() -> None:
        with Client(url, prefix=prefix) as client:
            layout = client.declare_queue("clicks", 6)
            keyed = client.enqueue_many(
                [("click", {"n": n}) for n in range(30)], queue="clicks", key="user-7"
            )
            assert {t.queue for t in keyed} == {layout.pick("user-7")}
            spread = client.enqueue_many([("click", {"n": n}) for n in range(60)], queue="clicks")
            assert Counter(t.queue for t in spread) == {q: 10 for q in layout.queues}
            first = client.enqueue("click", {"n": 0}, queue="clicks", task_id="once")
            again = [client.enqueue("click", {"n": 0}, queue="clicks", task_id="once")]
            again += client.enqueue_many([("click", {"n": 0})] * 2, queue="clicks", task_id="once")
            assert all(t.already_enqueued and t.queue == first.queue for t in again)
            delayed = client.enqueue("click", {"n": 1}, queue="clicks", process_in=0.3)
            retried = client.enqueue("click", {"fail": True}, queue="clicks", max_retry=2)
            kept = client.enqueue("click", {"n": 2}, queue="clicks", retention=60, key="k")
            unique = client.enqueue("click", {"u": 1}, queue="clicks", unique_for=60)
            with pytest.raises(DuplicateTask):
                client.enqueue("click", {"u": 1}, queue="clicks", unique_for=60)
            if client.backend.mode == "cluster":
                durable = client.enqueue("click", {}, queue="clicks", durability="replica")
                assert durable.replicas == 1
            # a bare id is found in whichever partition holds it
            assert client.info(kept.id, queue="clicks").queue == kept.queue
            with Admin(url, prefix=prefix) as admin:
                admin.pause("clicks")
                assert all(q.paused for q in admin.queues(["clicks"]))
                parked = client.enqueue("click", {"n": 3}, queue="clicks")
                assert admin.archive("clicks", [parked.id]) == {parked.id: "ok"}
                assert admin.purge("clicks", "archived").done == 1
                admin.unpause("clicks")
            handle = client.enqueue(
                chain(
                    TaskSpec("sum", 1, {"queue": "clicks"}),
                    TaskSpec("sum", 10, {"queue": "clicks"}),
                )
            )
            async with running_worker(
                url, _router(ran, failed_once), queues=["clicks"], prefix=prefix,
                retry_policy=lambda *_: 0.05,
            ):  # fmt: skip
                result = await asyncio.to_thread(client.result, kept, timeout=20)
                assert result == {"queue": kept.queue, "n": 2}
                assert await asyncio.to_thread(client.result, handle, timeout=20) == 11

                def quiet() -> bool:
                    with Inspector(url, prefix=prefix) as inspector:
                        infos = inspector.queues(["clicks"])
                    return all(q.pending + q.active + q.scheduled + q.retry == 0 for q in infos)

                await await_for(quiet, 20, "every partition to be empty")
            ids = [*(t.id for t in keyed), *(t.id for t in spread), delayed.id, first.id]
            assert all(ran[i] == 1 for i in ids if i != retried.id)
            assert ran[retried.id] == 2 and ran[unique.id] == 1

    asyncio.run(scenario())


def test_a_running_worker_follows_a_change_of_the_partition_count(
    cluster: LocalCluster, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """4 partitions, then 6 while a worker runs: tasks already in the old partitions and
    tasks a stale producer still sends there are processed; the new partitions get their
    fetch loops; the drained old partitions are retired."""
    import clusterq.worker.partitions as watch

    monkeypatch.setattr(watch, "LAYOUT_TTL", 0.2)
    monkeypatch.setattr(watch, "RETIRE_GRACE", 0.5)
    url = cluster.seed_url
    ran: Counter[str] = Counter()

    async def scenario() -> None:
        with Client(url, prefix=prefix) as stale, Client(url, prefix=prefix) as fresh:
            old = stale.declare_queue("clicks", 4)
            with Admin(url, prefix=prefix) as admin:
                admin.pause("clicks")  # the old partitions keep their tasks for now
                before = stale.enqueue_many(
                    [("click", {"n": n}) for n in range(40)], queue="clicks"
                )
                async with running_worker(url, _router(ran), queues=["clicks"], prefix=prefix) as w:
                    assert set(w.fetching_from) == set(old.members)
                    new = fresh.declare_queue("clicks", 6)
                    assert new.draining == old.queues and new.version == old.version + 1
                    late = stale.enqueue("click", {"n": 99}, queue="clicks")  # its cache is old
                    assert late.queue in old.queues
                    after = fresh.enqueue_many(
                        [("click", {"n": n}) for n in range(60)], queue="clicks"
                    )
                    assert {t.queue for t in after} == set(new.queues)
                    await await_for(
                        lambda: set(new.queues) <= set(w.fetching_from), 10, "the new loops"
                    )
                    admin.unpause("clicks")
                    ids = [t.id for t in (*before, late, *after)]
                    await await_for(lambda: all(ran[i] == 1 for i in ids), 30, "every task")

                    def retired() -> bool:
                        layout = fresh.layout("clicks")
                        return layout is not None and layout.draining == ()

                    await await_for(retired, 20, "the drained partitions to be retired")
                    await await_for(
                        lambda: not set(old.queues) & set(w.fetching_from), 10, "loops to end"
                    )
            assert set(ran.values()) == {1}

    asyncio.run(scenario())


# ---------------------------------------------------------------------- spread and faults


def _commands_per_master(cluster: LocalCluster) -> dict[int, int]:
    """Commands each master has processed so far (INFO stats)."""
    counts = {}
    for shard in cluster.topology().shards:
        client = cluster.client(shard.master.port)
        try:
            counts[shard.master.port] = int(client.info("stats")["total_commands_processed"])
        finally:
            client.close()
    return counts


@pytest.mark.slow
def test_10k_keyed_tasks_by_two_worker_processes_spread_over_the_masters(
    cluster: LocalCluster, prefix: str, start_worker: StartWorker, log_dir: Path
) -> None:
    url = cluster.seed_url
    with Client(url, prefix=prefix) as client:
        layout = client.declare_queue("clicks", 12)
        before = _commands_per_master(cluster)
        infos = []
        for _ in range(20):  # 500 keys, 20 tasks each
            infos += client.enqueue_many(
                [TaskSpec("record", n, {"key": f"user-{n % 500}"}) for n in range(500)],
                queue="clicks",
            )
    by_key: dict[int, set[str]] = {}
    for n, info in enumerate(infos):
        by_key.setdefault(n % 500, set()).add(info.queue)
    assert all(len(queues) == 1 for queues in by_key.values())  # a key, one partition
    ids = {info.id for info in infos}
    assert len(ids) == 10_000
    # a long poll interval: idle fetch loops wake on an enqueue, and add few commands
    workers = [
        start_worker(url, "--poll-interval", "1", queues="clicks=1", concurrency=20)
        for _ in range(2)
    ]

    def done() -> Counter[str]:
        return Counter(i for event, i in read_events(log_dir) if event == "done")

    wait_for(lambda: len(done()) >= len(ids), 240, "every task to be handled")
    after = _commands_per_master(cluster)
    counts = done()
    assert set(counts) == ids and set(counts.values()) == {1}  # each exactly once
    handled_by = {path.stem for path in log_dir.glob("*.log")}
    assert handled_by == {str(w.pid) for w in workers}  # both processes took part
    # The work spread over the masters: the tasks each master held and served, counted
    # from where each task went (its partition) and where that partition's slot lives.
    # (Commands per master are printed only: the idle chatter of the workers, their
    # announcements on one master among it, grows with the time the run takes.)
    topology = cluster.topology()
    master_of = {}
    for queue in layout.queues:
        owner = topology.locate(queue).master
        assert owner is not None
        master_of[queue] = owner.port
    by_id = {info.id: info.queue for info in infos}
    served = Counter(master_of[by_id[task_id]] for task_id in counts)
    spent = {port: after[port] - before[port] for port in after}
    print(f"\ntasks per master: {dict(served)}; commands per master: {spent}")
    assert set(served) == set(spent), served  # every master took part
    for n in served.values():
        assert abs(n / len(ids) - 1 / 3) <= 0.2 / 3, served  # within ±20% of a third


@pytest.mark.both_servers
def test_a_dead_master_stalls_only_its_own_partitions(
    fresh_cluster: Callable[[], LocalCluster], prefix: str
) -> None:
    cluster = fresh_cluster()
    url = cluster.seed_url
    done: dict[str, float] = {}
    events: list[Any] = []
    router = Router()

    @router.task("t")
    async def t(task: Task) -> None:
        done.setdefault(task.id, time.time())

    with Client(url, prefix=prefix) as client:
        layout = client.declare_queue("clicks", 6)
    topology = cluster.topology()
    masters = [topology.locate(q).master for q in layout.queues]
    # The master that also holds the declarations (and the registry): clients and workers
    # that read them before keep what they read (a client that starts while it is down
    # sends to the plain queue: see the README).
    victim = topology.master_for_slot(keyslot(f"{prefix}:layouts"))
    assert victim is not None and victim in masters
    doomed = {q for q, m in zip(layout.queues, masters, strict=True) if m == victim}
    assert len(doomed) == 2  # 6 partitions over 3 masters
    keys = {  # a key for each partition
        q: next(f"k{n}" for n in range(10_000) if layout.pick(f"k{n}") == q) for q in layout.queues
    }
    # The replica to be promoted must hold the declarations before its master dies (a
    # fresh cluster's replica may still be in its first sync).
    (replica,) = topology.locate_slot_replicas(keyslot(f"{prefix}:layouts"))
    mirror = cluster.client(replica.port)
    mirror.execute_command("READONLY")
    wait_for(lambda: mirror.hget(f"{prefix}:layouts", "clicks"), 10, "the replica's copy")
    mirror.close()

    async def scenario() -> None:
        worker = Worker(url, router, prefix=prefix, queues=["clicks"], **FAST)
        worker.subscribe(events.append)
        await worker.start()
        client = await AsyncClient.connect(url, prefix=prefix)
        try:
            first = await client.enqueue("t", -1, queue="clicks", key=keys[layout.queues[0]])
            assert first.queue == layout.queues[0]  # the client has read the declarations
            cluster.kill_node(victim.port)
            healthy = []
            for queue, key in keys.items():
                if queue not in doomed:
                    for n in range(10):
                        healthy.append(await client.enqueue("t", n, queue="clicks", key=key))
            assert {i.queue for i in healthy} == set(layout.queues) - doomed
            await await_for(lambda: {i.id for i in healthy} <= done.keys(), 20, "healthy ones")
            # Handled while the dead master's replica was still a replica: the other
            # partitions did not wait for the failover.
            assert not any(isinstance(e, MasterChanged) for e in events)
            late = [
                await client.enqueue("t", n, queue="clicks", key=keys[queue])
                for queue in sorted(doomed)
                for n in range(5)
            ]  # these wait for the promotion
            assert {i.queue for i in late} == doomed
            await await_for(lambda: {i.id for i in late} <= done.keys(), 60, "the stalled ones")
            assert any(isinstance(e, MasterChanged) for e in events)
        finally:
            await client.aclose()
            await worker.stop()

    asyncio.run(scenario())


def test_a_bad_declaration_is_skipped_and_enqueues_go_on(
    standalone: Any, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = standalone.seed_url
    with Client(url, prefix=prefix) as client:
        layouts = client.keys.layouts
        client.backend.call(layouts, "HSET", layouts, "broken", "{not json")
        layout = client.declare_queue("clicks", 3)
    with Client(url, prefix=prefix) as fresh:  # reads every declaration
        assert fresh.enqueue("t", 1, queue="clicks", key="a").queue == layout.pick("a")
        assert fresh.enqueue("t", 1, queue="broken").queue == "broken"  # a plain queue
    assert "'broken': declaration skipped" in caplog.text
    result = CliRunner().invoke(
        main, ["enqueue", "t", "1", "-q", "clicks", "--key", "a", "--url", url, "--prefix", prefix]
    )
    assert result.exit_code == 0, result.output
    assert f"in queue {layout.pick('a')}," in result.output
