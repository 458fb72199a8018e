"""The operator's admin API (``clusterq.ops.admin.Admin`` over ``Inspector``), on a
standalone node and on the 6-node cluster: acting on tasks one by one and in bulk while
a worker is busy on the same queue, pausing, removing queues, listing and inspecting
tasks, history counters, and the true worker counts."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

import clusterq.ops.admin
from clusterq import Client, Router, Task, TaskState, Worker
from clusterq.broker import manage
from clusterq.broker.dequeue import Dequeued
from clusterq.broker.facade import Broker
from clusterq.keys import QueueKeys
from clusterq.ops.admin import Admin, QueueNotEmpty
from clusterq.ops.inspector import HISTORY_MINUTES, Inspector, history_from_stats
from clusterq.producer import TaskSpec
from clusterq.tools.devcluster import LocalCluster
from tests.helpers import FAST, await_for, running_worker, wait_for


def _park(client: Client, queue: str, count: int, task_type: str, **options: Any) -> list[str]:
    """``count`` tasks of ``task_type`` enqueued an hour ahead (scheduled)."""
    specs = [
        TaskSpec(task_type, {"n": i}, {"queue": queue, "process_in": 3600, **options})
        for i in range(count)
    ]
    return [info.id for info in client.enqueue_many(specs)]


@contextlib.asynccontextmanager
async def _renewing_worker(url: str, router: Router, **options: Any) -> AsyncIterator[Worker]:
    """A worker whose leases (30 s) cannot run out on a loaded machine during a test,
    renewed every 0.25 s: an operator's cancel, which travels with a renewal, arrives at
    once, and a lease lost can only mean the cancel took it."""
    worker = Worker(url, router, **{**FAST, "lease": 30.0, **options})
    worker.heartbeat_interval = 0.25
    await worker.start()
    try:
        yield worker
    finally:
        await worker.stop()


def _bulk_step(
    admin: Admin, qk: QueueKeys, action: manage.Action, ids: list[str], state: str
) -> dict[str, str]:
    """One script call of a bulk action (``manage.lua``, as ``Admin.act_all`` makes it):
    ``action`` on ``ids``, taken from a listing of ``state``."""
    keys, args = manage.build(qk, action, [manage.Target(i) for i in ids], state=state)
    reply = admin.backend.execute(qk.slot, lambda c: manage.SCRIPT.call(c, keys, args))
    return dict(zip(ids, manage.parse(reply), strict=True))


def test_single_actions_and_what_each_refuses(url: str, prefix: str) -> None:
    with Client(url, prefix=prefix) as client, Admin(url, prefix=prefix) as admin:
        later = _park(client, "ops", 3, "report")
        now = client.enqueue("report", {"x": 1}, queue="ops").id
        unique = client.enqueue("report", {"u": 1}, queue="ops", unique_for=600).id
        # archive: pending and scheduled tasks move to the archive
        assert admin.archive("ops", [later[0], now]) == {later[0]: "ok", now: "ok"}
        assert client.info(now, queue="ops").state == TaskState.ARCHIVED
        # run now: archived and scheduled become pending; pending cannot "run"
        statuses = admin.run("ops", [now, later[1], unique, "nope"])
        assert statuses == {now: "ok", later[1]: "ok", unique: "state:pending", "nope": "missing"}
        assert client.info(later[1], queue="ops").state == TaskState.PENDING
        assert admin.task_ids("ops", "pending") == [unique, now, later[1]]  # next to run first
        # delete: the record goes, and a unique task's lock with it
        assert admin.delete("ops", [unique, later[2]]) == {unique: "ok", later[2]: "ok"}
        assert client.enqueue("report", {"u": 1}, queue="ops", unique_for=600).id != unique
        with pytest.raises(Exception, match="no task"):
            client.info(later[2], queue="ops")
        info = admin.queue("ops")
        assert (info.pending, info.scheduled, info.archived) == (3, 0, 1)


def test_an_active_task_is_never_moved_under_its_worker(url: str, prefix: str) -> None:
    router = Router()
    started, release = asyncio.Event(), asyncio.Event()

    @router.task("hold")
    async def hold(task: Task) -> str:
        started.set()
        await release.wait()
        return "done"

    async def scenario() -> None:
        with Client(url, prefix=prefix) as client, Admin(url, prefix=prefix) as admin:
            task_id = client.enqueue("hold", queue="ops", retention=60).id
            async with running_worker(url, router, queues=["ops"], prefix=prefix) as worker:
                await asyncio.wait_for(started.wait(), 10)
                for action in ("delete", "archive", "run"):
                    assert admin.act(action, "ops", [task_id]) == {task_id: "active"}
                with pytest.raises(ValueError, match="held by workers"):
                    admin.act_all("delete", "ops", "active")
                detail = admin.task("ops", task_id)
                assert detail.info.state == TaskState.ACTIVE
                assert detail.worker == worker.id
                assert detail.lease_expires is not None and detail.lease_expires > time.time()
                release.set()
                await await_for(
                    lambda: client.info(task_id, queue="ops").state == TaskState.COMPLETED,
                    10,
                    "the task to complete",
                )
            assert client.result(task_id, queue="ops") == "done"

    asyncio.run(scenario())


def test_a_bulk_step_leaves_alone_the_tasks_that_moved_since_its_listing(
    url: str, prefix: str
) -> None:
    """A bulk action lists a state, then acts on what it listed. Here the gap between the
    two is made long: pending tasks are listed, then a worker takes one (active) and an
    operator archives another; the delete of the listed ids "as pending" removes only
    those still pending. The active task keeps its record and lease (its worker's ack is
    applied, its result kept), the archived one stays archived."""
    router = Router()
    taken: list[str] = []
    release = asyncio.Event()

    @router.task("hold")
    async def hold(task: Task) -> str:
        taken.append(task.id)
        await release.wait()
        return "done"

    async def scenario() -> None:
        with Client(url, prefix=prefix) as client, Admin(url, prefix=prefix) as admin:
            client.enqueue_many([("hold", i) for i in range(4)], queue="moves", retention=600)
            listed = admin.task_ids("moves", "pending")
            assert len(listed) == 4
            async with running_worker(
                url, router, queues=["moves"], prefix=prefix, concurrency=1, lease=30.0
            ) as worker:
                await await_for(lambda: taken, 30, "a worker to take one")
                (active,) = taken
                archived = next(i for i in listed if i != active)
                assert admin.archive("moves", [archived]) == {archived: "ok"}
                statuses = _bulk_step(admin, admin.keys.queue("moves"), "delete", listed, "pending")
                moved = {active: "state:active", archived: "state:archived"}
                assert statuses == {**dict.fromkeys(listed, "ok"), **moved}
                assert admin.task("moves", active).info.state == TaskState.ACTIVE
                assert client.info(archived, queue="moves").state == TaskState.ARCHIVED
                release.set()
                await await_for(
                    lambda: client.info(active, queue="moves").state == TaskState.COMPLETED,
                    30,
                    "the active task to complete",
                )
                assert worker.stats.leases_lost == 0  # its ack was applied
            assert client.result(active, queue="moves") == "done"
            assert taken == [active]  # the others were deleted before it could take them
            info = admin.queue("moves")
            assert (info.pending, info.active, info.archived) == (0, 0, 1)

    asyncio.run(scenario())


def test_cancel_reaches_the_running_async_handler_and_archives_the_task(
    url: str, prefix: str
) -> None:
    router = Router()
    started = asyncio.Event()
    outcome: list[str] = []

    @router.task("long")
    async def long(task: Task) -> None:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            outcome.append("cancelled")
            raise
        outcome.append("finished")

    async def scenario() -> None:
        with Client(url, prefix=prefix) as client, Admin(url, prefix=prefix) as admin:
            task_id = client.enqueue("long", queue="c", max_retry=5).id
            waiting = client.enqueue("long", queue="c", process_in=600).id
            async with _renewing_worker(url, router, queues=["c"], prefix=prefix) as worker:
                await asyncio.wait_for(started.wait(), 10)
                assert admin.cancel("c", [task_id, waiting, "nope"]) == {
                    task_id: "ok",
                    waiting: "state:scheduled",
                    "nope": "missing",
                }
                await await_for(
                    lambda: client.info(task_id, queue="c").state == TaskState.ARCHIVED,
                    30,
                    "the cancelled task to be archived",
                )
                await await_for(lambda: worker.running == 0, 30, "its handler to end")
                qk = admin.keys.queue("c")
                # the request goes once the task is no longer active (the worker's sweep)
                await await_for(
                    lambda: not admin.backend.execute(qk.slot, lambda c: c.exists(qk.cancel)),
                    30,
                    "the cancel request to be dropped",
                )
            info = client.info(task_id, queue="c")
            assert info.last_error == "cancelled by an operator"
            assert outcome == ["cancelled"]  # the handler saw CancelledError, no retry
            # archived by its worker, under its lease (30 s: it cannot have run out)
            assert worker.stats.leases_lost == 0

    asyncio.run(scenario())


def test_cancel_of_a_sync_handler_archives_the_task_and_keeps_its_slot_until_it_returns(
    url: str, prefix: str
) -> None:
    router = Router()
    started, release = threading.Event(), threading.Event()

    @router.task("blocking")
    def blocking(task: Task) -> str:
        started.set()
        release.wait(30)
        return "late"

    async def scenario() -> None:
        with Client(url, prefix=prefix) as client, Admin(url, prefix=prefix) as admin:
            task_id = client.enqueue("blocking", queue="cs", retention=60).id
            async with _renewing_worker(
                url, router, queues=["cs"], prefix=prefix, concurrency=2
            ) as worker:
                await asyncio.to_thread(started.wait, 10)
                assert admin.cancel("cs", [task_id]) == {task_id: "ok"}
                await await_for(
                    lambda: client.info(task_id, queue="cs").state == TaskState.ARCHIVED,
                    30,
                    "the cancelled task to be archived",
                )
                assert worker.active == 1  # the thread still runs: its slot stays taken
                release.set()
                await await_for(lambda: worker.active == 0, 30, "the slot back")
            info = client.info(task_id, queue="cs")
            assert info.state == TaskState.ARCHIVED and info.result is None

    asyncio.run(scenario())


@pytest.mark.slow
def test_bulk_run_and_delete_of_10000_archived_tasks_while_a_worker_is_busy(
    url: str, prefix: str
) -> None:
    ran: Counter[str] = Counter()
    router = Router()

    @router.task("replay")
    async def replay(task: Task) -> None:
        ran[task.id] += 1

    @router.task("work")
    async def work(task: Task) -> None:
        ran[task.id] += 1

    n = 10_000

    async def scenario() -> None:
        with Client(url, prefix=prefix) as client, Admin(url, prefix=prefix) as admin:
            replayed = _park(client, "bulk", n, "replay")
            dropped = _park(client, "bulk", n, "drop")
            kept = _park(client, "bulk", 50, "keep", process_in=7200)
            # parked as scheduled, archived in bulk (by type: the "keep" ones stay)
            for task_type in ("replay", "drop"):
                moved = admin.act_all("archive", "bulk", "scheduled", task_type=task_type)
                assert moved.done == n and moved.skipped == moved.statuses["type"]
            assert admin.queue("bulk").archived == 2 * n
            async with running_worker(url, router, queues=["bulk"], prefix=prefix, concurrency=20):
                work_ids = [client.enqueue("work", {"i": i}, queue="bulk").id for i in range(300)]
                progress: list[tuple[int, int]] = []
                deleted = admin.act_all(
                    "delete",
                    "bulk",
                    "archived",
                    task_type="drop",
                    progress=lambda done, total: progress.append((done, total)),
                )
                run = admin.act_all("run", "bulk", "archived", task_type="replay")
                assert (deleted.done, run.done) == (n, n)
                assert progress[-1] == (2 * n, 2 * n) and len(progress) > 1
                await await_for(lambda: len(ran) == n + 300, 120, "every task to run")
                await await_for(lambda: admin.queue("bulk").active == 0, 10, "the acks")
            assert set(ran) == set(replayed) | set(work_ids)
            assert set(ran.values()) == {1}
            info = admin.queue("bulk")
            assert (info.pending, info.active, info.archived, info.retry) == (0, 0, 0, 0)
            assert info.scheduled == 50
            assert set(admin.task_ids("bulk", "scheduled", limit=100)) == set(kept)
            with pytest.raises(Exception, match="no task"):
                client.info(dropped[0], queue="bulk")

    asyncio.run(scenario())


def _archived(client: Client, admin: Admin, queue: str, count: int, task_type: str) -> list[str]:
    ids = _park(client, queue, count, task_type)
    assert set(admin.archive(queue, ids).values()) == {"ok"}
    return ids


def test_a_bulk_action_goes_through_every_batch_stepping_over_what_it_leaves(
    url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches of 7: 30 tasks of one type behind 10 of another (due first) are all
    archived, over several script calls, and the 10 are stepped over, each seen once."""
    monkeypatch.setattr(clusterq.ops.admin, "BATCH", 7)
    with Client(url, prefix=prefix) as client, Admin(url, prefix=prefix) as admin:
        first = [
            info.id
            for info in client.enqueue_many(
                [TaskSpec("other", i, {"queue": "walk", "process_in": 600}) for i in range(10)]
            )
        ]
        wanted = _park(client, "walk", 30, "wanted")  # an hour ahead: due after the others
        assert set(admin.task_ids("walk", "scheduled", limit=10)) == set(first)
        calls: list[tuple[int, int]] = []
        result = admin.act_all(
            "archive",
            "walk",
            "scheduled",
            task_type="wanted",
            progress=lambda done, total: calls.append((done, total)),
        )
        assert (result.done, result.skipped, result.statuses) == (30, 10, {"ok": 30, "type": 10})
        assert len(calls) == 6 and calls[-1] == (40, 40)  # ceil(40 / 7) script calls
        assert set(admin.task_ids("walk", "archived", limit=100)) == set(wanted)
        assert set(admin.task_ids("walk", "scheduled", limit=100)) == set(first)


def test_a_bulk_action_stops_after_as_many_tasks_as_the_state_held_when_it_began(
    url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The archive grows while a bulk delete walks it (15 tasks archived after its first
    batch, at the newest end): the 20 it held at the start are deleted, in batches of 7,
    and the delete stops there; the 15 newcomers stay."""
    monkeypatch.setattr(clusterq.ops.admin, "BATCH", 7)
    with (
        Client(url, prefix=prefix) as client,
        Admin(url, prefix=prefix) as admin,
        Admin(url, prefix=prefix) as other,
    ):
        held = _archived(client, admin, "grows", 20, "x")
        newcomers: list[str] = []
        calls: list[tuple[int, int]] = []

        def progress(done: int, total: int) -> None:
            calls.append((done, total))
            if not newcomers:  # meanwhile, another operator archives more
                newcomers.extend(_archived(client, other, "grows", 15, "x"))

        result = admin.act_all("delete", "grows", "archived", progress=progress)
        assert (result.done, result.skipped) == (20, 0)
        assert calls == [(7, 20), (14, 20), (20, 20)]
        assert set(admin.task_ids("grows", "archived", limit=100)) == set(newcomers)
        for task_id in held:
            with pytest.raises(Exception, match="no task"):
                client.info(task_id, queue="grows")


def test_pause_stops_fetching_and_unpause_resumes(
    url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran: list[str] = []
    router = Router()

    @router.task("t")
    async def t(task: Task) -> None:
        ran.append(task.id)

    # What the server answered the worker's dequeues of "p" (a spy: the real call, its
    # real reply), with when each was sent.
    answers: list[tuple[float, Dequeued]] = []
    dequeue = Broker.dequeue

    async def spy(self: Broker, qk: QueueKeys, *args: Any, **kwargs: Any) -> Dequeued:
        sent = time.monotonic()
        got = await dequeue(self, qk, *args, **kwargs)
        if qk.queue == "p":
            answers.append((sent, got))
        return got

    monkeypatch.setattr(Broker, "dequeue", spy)

    async def scenario() -> None:
        with Client(url, prefix=prefix) as client, Admin(url, prefix=prefix) as admin:
            async with running_worker(url, router, queues=["p"], prefix=prefix):
                first = client.enqueue("t", queue="p").id
                await await_for(lambda: ran == [first], 30, "the first task")
                admin.pause("p")
                assert admin.queue("p").paused
                second = client.enqueue("t", queue="p").id
                enqueued = time.monotonic()
                # Its wake-up makes the worker ask; the server answers "paused".
                await await_for(
                    lambda: (
                        second in ran or any(at > enqueued and got.paused for at, got in answers)
                    ),
                    30,
                    "a dequeue made after the enqueue, answered paused",
                )
                assert ran == [first]
                assert all(not got.tasks for at, got in answers if at > enqueued)
                info = admin.queue("p")
                assert (info.pending, info.active) == (1, 0)
                admin.unpause("p")
                await await_for(lambda: ran == [first, second], 30, "the task after unpause")

    asyncio.run(scenario())


def test_remove_queue_refuses_a_queue_with_tasks_unless_forced(url: str, prefix: str) -> None:
    with Client(url, prefix=prefix) as client, Admin(url, prefix=prefix) as admin:
        client.enqueue("x", queue="gone")
        client.enqueue("x", queue="gone", process_in=60, unique_for=600)
        assert "gone" in admin.queue_names()
        with pytest.raises(QueueNotEmpty, match="still holds 2 task"):
            admin.remove_queue("gone")
        assert admin.queue("gone").size == 2  # nothing touched
        removed = admin.remove_queue("gone", force=True)
        assert removed.done == 2
        assert "gone" not in admin.queue_names()
        qk = admin.keys.queue("gone")
        left = admin.backend.execute(qk.slot, lambda c: c.exists(*qk.all_keys()))
        assert left == 0
        # the unique lock went with its task
        client.enqueue("x", queue="gone", process_in=60, unique_for=600)


def test_listing_pages_and_orders(url: str, prefix: str) -> None:
    with Client(url, prefix=prefix) as client, Admin(url, prefix=prefix) as admin:
        ids = [client.enqueue("x", {"i": i}, queue="list").id for i in range(7)]
        assert admin.task_ids("list", "pending", limit=3) == ids[:3]
        assert admin.task_ids("list", "pending", offset=3, limit=3) == ids[3:6]
        assert admin.task_ids("list", "pending", newest_first=True, limit=2) == ids[::-1][:2]
        page = admin.tasks("list", TaskState.PENDING, offset=5, limit=10)
        assert [t.id for t in page] == ids[5:] and page[0].payload == {"i": 5}
        later = [client.enqueue("x", queue="list", process_in=100 + i).id for i in (3, 1, 2)]
        assert admin.task_ids("list", "scheduled") == [later[1], later[2], later[0]]
        with pytest.raises(ValueError, match="state must be one of"):
            admin.task_ids("list", "sleeping")
        assert admin.queue("list").latency >= 0.0


def test_history_counts_processed_and_failed_per_minute(url: str, prefix: str) -> None:
    router = Router()

    @router.task("ok")
    async def ok(task: Task) -> None:
        return None

    @router.task("bad")
    async def bad(task: Task) -> None:
        raise RuntimeError("no")

    async def scenario() -> None:
        with Client(url, prefix=prefix) as client:
            for i in range(20):
                client.enqueue("ok", {"i": i}, queue="h")
            for i in range(3):
                client.enqueue("bad", {"i": i}, queue="h", max_retry=0)
            async with running_worker(url, router, queues=["h"], prefix=prefix):
                with Inspector(url, prefix=prefix) as inspector:

                    def settled() -> bool:
                        info = inspector.queue("h")
                        return info.processed == 20 and info.failed == 3

                    await await_for(settled, 15, "the counters")
                    history = inspector.history("h")
        assert sum(m.processed for m in history) == 20
        assert sum(m.failed for m in history) == 3
        assert all(m.at <= time.time() for m in history)

    asyncio.run(scenario())


def test_history_from_stats_keeps_the_window_only() -> None:
    now = 1_800_000_000.0
    minute = int(now // 60)
    fields = {
        b"processed": b"99",
        f"p:{minute}".encode(): b"5",
        f"f:{minute}".encode(): b"2",
        f"p:{minute - 1}".encode(): b"1",
        f"p:{minute - HISTORY_MINUTES}".encode(): b"7",  # just out of the window
        b"p:junk": b"1",
    }
    history = history_from_stats(fields, now)
    assert [(m.at, m.processed, m.failed) for m in history] == [
        ((minute - 1) * 60.0, 1, 0),
        (minute * 60.0, 5, 2),
    ]


def test_lua_and_python_agree_on_the_history_window() -> None:
    from clusterq.broker.script import _read

    assert f"local HISTORY_MINUTES = {HISTORY_MINUTES}\n" in _read("_prelude.lua")


def test_worker_ls_shows_true_running_and_processed_counts(url: str, prefix: str) -> None:
    router = Router()
    gate = asyncio.Event()

    @router.task("quick")
    async def quick(task: Task) -> None:
        return None

    @router.task("slow")
    async def slow(task: Task) -> None:
        await gate.wait()

    async def scenario() -> None:
        with Client(url, prefix=prefix) as client, Inspector(url, prefix=prefix) as inspector:
            async with running_worker(
                url, router, queues=["w"], prefix=prefix, concurrency=20
            ) as worker:
                client.enqueue_many([("quick", i) for i in range(500)], queue="w")

                def announced(check: Callable[[Any], bool]) -> bool:
                    mine = [w for w in inspector.workers() if w.id == worker.id]
                    return bool(mine) and check(mine[0])

                await await_for(
                    lambda: announced(lambda w: w.processed == 500 and w.active == 0),
                    15,
                    "an idle worker announcing 500 processed and nothing running",
                )
                client.enqueue_many([("slow", i) for i in range(3)], queue="w")
                await await_for(lambda: announced(lambda w: w.active == 3), 15, "three running")
                gate.set()

    asyncio.run(scenario())


@pytest.mark.slow
@pytest.mark.both_servers
def test_history_counters_survive_a_failover(
    fresh_cluster: Callable[[], LocalCluster], prefix: str
) -> None:
    cluster = fresh_cluster()
    router = Router()

    @router.task("ok")
    async def ok(task: Task) -> None:
        return None

    async def scenario() -> None:
        with Client(cluster.seed_url, prefix=prefix) as client:
            client.enqueue_many([("ok", i) for i in range(50)], queue="images")
            async with running_worker(cluster.seed_url, router, queues=["images"], prefix=prefix):
                with Inspector(cluster.seed_url, prefix=prefix) as inspector:
                    await await_for(
                        lambda: inspector.queue("images").processed == 50, 15, "processed"
                    )

    asyncio.run(scenario())
    with Admin(cluster.seed_url, prefix=prefix) as admin:
        before = admin.history("images")
        location = admin.topology.locate("images")
        assert location.master is not None and location.replicas
        master = cluster.client(location.master.port)
        master.execute_command("WAIT", 1, 5000)
        master.close()
        replica = cluster.client(location.replicas[0].port)
        replica.execute_command("CLUSTER", "FAILOVER")
        replica.close()

        def promoted() -> bool:
            new = admin.refresh().locate("images").master
            return new is not None and new.id == location.replicas[0].id

        wait_for(promoted, 30, "the failover")
        assert admin.history("images") == before
        assert sum(m.processed for m in before) == 50
        assert admin.queue("images").processed == 50


def test_the_asyncio_twin_acts_without_blocking_the_loop(url: str, prefix: str) -> None:
    from clusterq.ops.admin import AsyncAdmin

    router = Router()
    ran: list[str] = []

    @router.task("t")
    async def t(task: Task) -> None:
        ran.append(task.id)

    async def scenario() -> None:
        with Client(url, prefix=prefix) as client:
            parked = _park(client, "twin", 5, "t")
            async with AsyncAdmin(url, prefix=prefix) as admin:
                assert (await admin.queue("twin")).scheduled == 5
                async with running_worker(url, router, queues=["twin"], prefix=prefix):
                    moved = await admin.act_all("run", "twin", "scheduled")
                    assert moved.done == 5
                    await await_for(lambda: sorted(ran) == sorted(parked), 10, "the runs")
                await admin.pause("twin")
                assert (await admin.queue("twin")).paused
                assert [q.queue for q in await admin.queues(["twin"])] == ["twin"]

    asyncio.run(scenario())


def _commandstats(node: Any, *names: str) -> dict[str, int]:
    info = node.info("commandstats")
    return {name: int(info.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in names}


def test_a_bulk_walk_of_a_pending_list_searches_it_for_no_task(
    standalone: Any, prefix: str
) -> None:
    """Purging or deleting by type from a pending list walks it from its oldest end and
    finds each task where its listing saw it (LINDEX from the tail), never by a search
    of the list (LPOS: one per task made a purge of 60,000 take 47 s and hold the master
    for up to 300 ms). Counted on the server: no LPOS, one LREM per batch."""
    url = standalone.seed_url
    node = standalone.client()
    with Client(url, prefix=prefix) as client:
        items = [("a" if i % 2 else "b", i) for i in range(3000)]
        client.enqueue_many(items, queue="big")
        before = _commandstats(node, "lpos", "lrem", "lindex")
        with Admin(url, prefix=prefix) as admin:
            by_type = admin.act_all("delete", "big", "pending", task_type="b")
            assert by_type.done == 1500 and by_type.skipped == 1500
            purged = admin.purge("big", "pending")
            assert purged.done == 1500
            assert admin.queue("big").pending == 0
        after = _commandstats(node, "lpos", "lrem", "lindex")
    assert after["lpos"] - before["lpos"] == 0
    batch = clusterq.ops.admin.BATCH
    batches = -(-3000 // batch) + -(-1500 // batch)  # the walk by type sees all 3,000
    assert after["lrem"] - before["lrem"] <= batches
    assert after["lindex"] - before["lindex"] >= 3000  # each task found where it was seen
    tasks = client.keys.queue("big").tasks
    assert node.hlen(tasks) == 0  # every record went with its task


def test_a_worker_whose_task_was_removed_with_its_queue_says_so(
    url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``queue rm --force`` while a handler runs: its ack is refused because the task is
    gone, and the worker says that (not "its lease was taken over")."""
    started = threading.Event()
    release = asyncio.Event()
    router = Router()

    @router.task("slow")
    async def slow(task: Task) -> None:
        started.set()
        await release.wait()

    async def scenario() -> None:
        async with running_worker(url, router, queues=["doomed"], prefix=prefix, lease=30):
            with Client(url, prefix=prefix) as client:
                client.enqueue("slow", None, queue="doomed")
            await asyncio.to_thread(started.wait, 30)
            with Admin(url, prefix=prefix) as admin:
                removed = await asyncio.to_thread(admin.remove_queue, "doomed", force=True)
            assert removed.done == 1
            release.set()
            await await_for(
                lambda: any("the task is gone" in r.getMessage() for r in caplog.records),
                30,
                "the worker to say the task is gone",
            )

    with caplog.at_level("WARNING", logger="clusterq.worker"):
        asyncio.run(scenario())
    assert not any("taken over" in r.getMessage() for r in caplog.records)
