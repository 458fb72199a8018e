"""Idle queues cost (almost) nothing: wake-ups by sharded pub/sub, the survey that
catches a lost one, and what happens to both across a reshard and a master's death.
Real servers: the session's standalone node and cluster, and fresh clusters for the
failover and the reshard."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from external import find_cli
from helpers import FAST, await_for, running_worker, write_raw_records
from test_reshard import _queue_on_slot, _reshard_with_cli

from clusterq import Admin, AsyncClient, Inspector, Router, Task, TaskState
from clusterq.broker.facade import Broker
from clusterq.broker.survey import UNKNOWN
from clusterq.cluster.abackend import AsyncBackend
from clusterq.keys import KeySchema
from clusterq.ops.permissions import acl_rules
from clusterq.tools.devcluster import LocalCluster, LocalServer
from clusterq.worker import Worker
from clusterq.worker.wakeups import sharded_pubsub

ARCHIVE = {"archive_max_size": 10_000, "archive_max_age_ms": 3_600_000}


def _router(started: dict[str, float]) -> Router:
    router = Router()

    @router.task("t")
    async def t(task: Task) -> None:
        started.setdefault(task.id, time.time())

    return router


def _covered(worker: Worker, queues: list[str]) -> bool:
    assert worker.wakeups is not None
    return all(worker.wakeups.covers(worker._queues[q]) for q in queues)


def _masters(target: LocalServer | LocalCluster) -> list[redis.Redis]:
    if isinstance(target, LocalCluster):
        return [target.client(s.master.port) for s in target.topology().shards]
    return [target.client()]


def _subscriber_count(reply: list[Any], channel: str) -> int:
    """A channel's count in a PUBSUB SHARDNUMSUB reply."""
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in reply[::2]]
    return int(dict(zip(names, reply[1::2], strict=True)).get(channel, 0))


def _clients(masters: list[redis.Redis]) -> list[int]:
    return [int(m.info("clients")["connected_clients"]) for m in masters]


def test_servers_with_sharded_pubsub() -> None:
    assert sharded_pubsub("7.0.15") and sharded_pubsub("7.2.4") and sharded_pubsub("8.1.0")
    assert not sharded_pubsub("6.2.14") and not sharded_pubsub("")


def test_the_survey_says_how_each_queue_stands(url: str, prefix: str) -> None:
    async def scenario() -> None:
        client = await AsyncClient.connect(url, prefix=prefix)
        backend = await AsyncBackend.connect(url, prefix=prefix)
        broker = Broker(backend)
        names = ["ready", "held", "later", "empty", "broken"]
        await client.enqueue("t", 1, queue="ready")
        await client.enqueue("t", 2, queue="held")
        admin = Admin(url, prefix=prefix)
        admin.pause("held")
        later = await client.enqueue("t", 3, queue="later", process_in=60)
        qks = {n: backend.keys.queue(n) for n in names}
        broken = qks["broken"].scheduled
        await backend.execute_key(broken, lambda c: c.set(broken, "not a zset"))
        looks = {}
        for name, qk in qks.items():  # one call per queue: each on its own node
            (looks[name],) = await broker.survey([qk], timeout=0, **ARCHIVE)
        assert looks["ready"].ready and looks["ready"].pending == 1
        assert looks["held"].paused and looks["held"].pending == 1 and not looks["held"].ready
        scheduled = await client.info(later)
        assert scheduled.next_process_at is not None
        assert looks["later"].next_due == pytest.approx(scheduled.next_process_at, abs=0.002)
        assert looks["empty"].known and not looks["empty"].ready and looks["empty"].next_due is None
        assert looks["broken"] is UNKNOWN  # keys that are not clusterq's: the loop finds out
        if backend.mode == "cluster":  # a queue served by another node: unknown there
            here = backend.master_addr(qks["ready"].slot)
            elsewhere = next(
                n
                for n in [f"x{i}" for i in range(100)]
                if backend.master_addr(backend.keys.queue(n).slot) != here
            )
            mixed = await broker.survey(
                [qks["ready"], backend.keys.queue(elsewhere)], timeout=0, **ARCHIVE
            )
            assert mixed[0].ready and mixed[1] is UNKNOWN
        admin.unpause("held")
        admin.close()
        await backend.aclose()
        await client.aclose()

    asyncio.run(scenario())


def _script_calls_and_polls(masters: list[redis.Redis]) -> tuple[int, int]:
    """EVALSHA and BLMOVE calls the masters have served (their own INFO commandstats):
    every dequeue, sweep and survey is a script call; a polled queue is a BLMOVE."""
    calls = [m.info("commandstats") for m in masters]
    return (
        sum(int(c.get("cmdstat_evalsha", {}).get("calls", 0)) for c in calls),
        sum(int(c.get("cmdstat_blmove", {}).get("calls", 0)) for c in calls),
    )


@pytest.mark.both_servers
def test_a_thousand_idle_queues_cost_almost_nothing(cluster: LocalCluster, prefix: str) -> None:
    """One worker, 1,000 idle queues on the cluster: once settled, a whole announcement
    period passes in which the masters serve it no script call and no poll (counted by
    the servers themselves), over a few connections. A task into a random queue then
    runs, which only its wake-up can do (no survey within the hour, the loops wait
    without polling); a scheduled one in another starts, not before its due time, by the
    worker's own timer (its due time learned from the enqueue's wake-up)."""
    queues = [f"idle{i}" for i in range(1000)]
    started: dict[str, float] = {}
    masters = _masters(cluster)
    rng = random.Random(17)

    async def scenario() -> dict[str, Any]:
        client = await AsyncClient.connect(cluster.seed_url, prefix=prefix)
        clients_before = _clients(masters)
        inspector = Inspector(cluster.seed_url, prefix=prefix)
        options = {**FAST, "survey_interval": 3600.0}
        async with running_worker(
            cluster.seed_url, _router(started), prefix=prefix, queues=queues, **options
        ) as worker:
            await await_for(lambda: _covered(worker, queues), 60, "every queue subscribed")

            def announced() -> float:
                return max((w.at for w in inspector.workers() if w.id == worker.id), default=0)

            async def quiet_for_an_announcement() -> bool:
                """No script call and no poll between two announcements of the worker
                (written every 2 s): the first dequeues and sweeps are over, and
                nothing polls the idle queues."""
                first = await asyncio.to_thread(announced)
                before = await asyncio.to_thread(_script_calls_and_polls, masters)
                await await_for(
                    lambda: asyncio.to_thread(lambda: announced() > first), 30, "announcement"
                )
                after = await asyncio.to_thread(_script_calls_and_polls, masters)
                # none at all from this worker; a little slack for anything else on the
                # session's cluster (polling would be thousands, one look per queue 1,000)
                return after[0] - before[0] < len(queues) // 20 and after[1] == before[1]

            await await_for(quiet_for_an_announcement, 60, "a quiet announcement period")
            clients_after = _clients(masters)
            now = await client.enqueue("t", 1, queue=rng.choice(queues))
            await await_for(lambda: now.id in started, 30, "the task into an idle queue")
            due = await client.enqueue("t", 2, queue=rng.choice(queues), process_in=1.5)
            due_at = (await client.info(due)).next_process_at or 0.0
            await await_for(lambda: due.id in started, 30, "the scheduled task")
        inspector.close()
        await client.aclose()
        return {
            "extra_clients": [a - b for a, b in zip(clients_after, clients_before, strict=True)],
            "late": started[due.id] - due_at,
        }

    result = asyncio.run(scenario())
    print(
        f"\n1,000 idle queues: {result['extra_clients']} connections per master, scheduled "
        f"task started {result['late'] * 1000:.0f} ms after its due time"
    )
    # Before wake-ups: a blocking poll per queue every poll_interval and a pooled
    # connection per waiting queue (the pool's cap).
    assert max(result["extra_clients"]) <= 8
    assert result["late"] >= -0.005  # never before it is due (the same clock)


async def _idle(client: AsyncClient, queue: str, started: dict[str, float]) -> None:
    """Run one task through ``queue`` and wait until its ack is applied: the queue's
    fetch loop then waits, idle (its dequeue after that task, sent on the same connection
    before the ack, found nothing)."""
    info = await client.enqueue("t", "warm-up", queue=queue, retention=600)
    await await_for(lambda: info.id in started, 30, f"a first task in {queue}")

    async def acked() -> bool:
        return (await client.info(info)).state == TaskState.COMPLETED

    await await_for(acked, 30, "its ack")


@pytest.mark.both_servers
def test_an_enqueue_wakes_its_idle_queue(url: str, prefix: str) -> None:
    """Nothing but the wake-up an enqueue publishes can start its task here: the worker
    surveys once an hour, its idle loop never polls (``poll_interval`` an hour too) and
    each task is enqueued once the loop is idle. A fresh task (``push.lua``), a unique
    one (``enqueue.lua``) and one due in a moment (``enqueue.lua``'s wake-up for a new
    earliest due time, then the worker's own timer) each start."""
    started: dict[str, float] = {}

    async def scenario() -> None:
        client = await AsyncClient.connect(url, prefix=prefix)
        async with running_worker(
            url,
            _router(started),
            prefix=prefix,
            queues=["idle"],
            survey_interval=3600,
            poll_interval=3600,
        ) as worker:
            await await_for(lambda: _covered(worker, ["idle"]), 30, "the subscription")
            await _idle(client, "idle", started)
            kinds: list[dict[str, Any]] = [{}, {"unique_for": 600}, {"process_in": 0.5}]
            for options in kinds:
                info = await client.enqueue("t", options, queue="idle", retention=600, **options)
                await await_for(lambda i=info.id: i in started, 30, f"the task with {options}")
                await _idle(client, "idle", started)
        await client.aclose()

    asyncio.run(scenario())


@pytest.mark.both_servers
def test_a_lost_wakeup_is_found_by_the_survey(url: str, prefix: str) -> None:
    """A task written without its wake-up (as if the message were lost: no SPUBLISH, the
    record and the pending id written directly) into a queue whose loop waits, idle,
    still starts: found by the survey. (A long ``poll_interval``: the loop never polls.)"""
    started: dict[str, float] = {}

    async def scenario() -> None:
        async with running_worker(
            url,
            _router(started),
            prefix=prefix,
            queues=["quiet"],
            survey_interval=0.3,
            poll_interval=3600,
        ) as worker:
            await await_for(lambda: _covered(worker, ["quiet"]), 30, "the subscription")
            client = await AsyncClient.connect(url, prefix=prefix)
            await _idle(client, "quiet", started)
            info = await client.enqueue("t", 1, queue="elsewhere")  # a record, not served
            qk = client.keys.queue("elsewhere")
            raw = await client.backend.execute_key(qk.tasks, lambda c: c.hget(qk.tasks, info.id))
            await client.aclose()
            await asyncio.to_thread(
                write_raw_records, url, prefix, "quiet", {info.id: raw}, active=False
            )
            await await_for(lambda: info.id in started, 30, "the task without a wake-up")

    asyncio.run(scenario())


def test_without_the_right_to_subscribe_a_worker_polls_and_says_so(
    standalone: LocalServer, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An ACL user without channel permissions: the enqueue's wake-up is refused inside
    the script without failing it, the worker falls back to polling and logs why."""
    admin = standalone.client()
    user = f"nochan-{prefix}"
    rules = acl_rules(prefix).replace(f"&{prefix}:* ", "")
    admin.execute_command("ACL", "SETUSER", user, "reset", "on", ">pw", *rules.split())
    url = standalone.seed_url.replace("redis://", f"redis://{user}:pw@")
    started: dict[str, float] = {}

    async def scenario() -> bool:
        async with running_worker(url, _router(started), prefix=prefix, queues=["acl"]) as w:
            client = await AsyncClient.connect(url, prefix=prefix)
            info = await client.enqueue("t", 1, queue="acl")
            await await_for(lambda: info.id in started, 10, "the task, by polling")
            await client.aclose()
            assert w.wakeups is not None
            return w.wakeups.active

    try:
        with caplog.at_level(logging.WARNING, logger="clusterq.worker"):
            active = asyncio.run(scenario())
    finally:
        admin.execute_command("ACL", "DELUSER", user)
        admin.close()
    assert not active
    assert any(
        "wake-ups off" in r.getMessage() and f"&{prefix}:*" in r.getMessage()
        for r in caplog.records
    )


def test_wakeups_off_polls_as_before(standalone: LocalServer, prefix: str) -> None:
    started: dict[str, float] = {}

    async def scenario() -> None:
        async with running_worker(
            standalone.seed_url, _router(started), prefix=prefix, queues=["old"], wakeups=False
        ) as worker:
            assert worker.wakeups is not None and not worker.wakeups.active
            client = await AsyncClient.connect(standalone.seed_url, prefix=prefix)
            info = await client.enqueue("t", 1, queue="old")
            await await_for(lambda: info.id in started, 10, "the task")
            await client.aclose()

    asyncio.run(scenario())


@pytest.mark.slow
@pytest.mark.both_servers
def test_no_wakeup_is_lost_across_a_reshard_and_a_master_kill(
    fresh_cluster: Callable[..., LocalCluster], server_bin: Path
) -> None:
    """The slot of a waiting queue moves (the server ends the subscription), then the
    master of another waiting queue dies (kill -9): the worker subscribes again where the
    slots went, and tasks enqueued meanwhile, whose wake-ups reached no one, still run."""
    cli = find_cli(server_bin)
    if cli is None:
        pytest.fail("no redis-cli/valkey-cli beside the server or on PATH")
    cluster = fresh_cluster()
    shards = sorted(cluster.topology().shards, key=lambda s: s.slots[0][0])
    source, target, doomed = shards[1], shards[2], shards[0]
    moving = _queue_on_slot(source.slots[0][0])
    orphan = next(
        f"k{i}"
        for i in range(10_000)
        if (s := cluster.topology().locate(f"k{i}")) and s.master.id == doomed.master.id
    )
    queues = [moving, orphan]
    started: dict[str, float] = {}

    def subscribed(queue: str) -> bool:
        """Whether the master that serves ``queue``'s slot now counts one subscriber of
        its channel (the server's own count, PUBSUB SHARDNUMSUB)."""
        location = cluster.topology().locate(queue)
        assert location is not None and location.master is not None
        node = cluster.client(location.master.port)
        try:
            channel = KeySchema().queue(queue).wake
            reply = node.execute_command("PUBSUB", "SHARDNUMSUB", channel)
        finally:
            node.close()
        return _subscriber_count(reply, channel) == 1

    async def scenario() -> dict[str, Any]:
        client = await AsyncClient.connect(cluster.seed_url, retry_timeout=30)
        async with running_worker(
            cluster.seed_url, _router(started), queues=queues, survey_interval=1.0
        ):
            await await_for(lambda: all(map(subscribed, queues)), 30, "the subscriptions")
            await asyncio.to_thread(_reshard_with_cli, cli, cluster, source, target)
            moved = await client.enqueue("t", "moved", queue=moving)
            await await_for(lambda: moved.id in started, 30, "the task after the reshard")
            await await_for(lambda: subscribed(moving), 30, "subscribed where the slot went")
            woken = await client.enqueue("t", "woken", queue=moving)
            await await_for(lambda: woken.id in started, 30, "a task once subscribed again")
            cluster.kill_node(doomed.master.port)
            killed_at = time.time()
            during = await client.enqueue("t", "during", queue=orphan)  # to the promoted one
            acked_at = time.time()
            await await_for(lambda: during.id in started, 30, "the task after the kill")
            await await_for(lambda: subscribed(orphan), 30, "subscribed on the promoted one")
            after = await client.enqueue("t", "after", queue=orphan)
            await await_for(lambda: after.id in started, 30, "a task once subscribed again")
        await client.aclose()
        return {"failover": acked_at - killed_at, "pickup": started[during.id] - acked_at}

    result = asyncio.run(scenario())
    print(
        f"\nenqueue during the failover acknowledged {result['failover']:.2f}s after the kill, "
        f"started {result['pickup']:.2f}s after that"
    )


def test_a_frozen_server_is_noticed_by_the_keepalive(
    tmp_path: Path, server_bin: Path, prefix: str
) -> None:
    """SIGSTOP the server: the subscription's keepalive PING goes unanswered, the queue's
    loop is woken to find out (and polls); after SIGCONT the worker subscribes again and
    a task wakes it as before."""
    from test_outcomes import _own_server

    server = _own_server(tmp_path, server_bin)
    url = server.seed_url + "?socket_timeout=1"
    started: dict[str, float] = {}

    channel = KeySchema(prefix).queue("cold").wake

    def subscribers() -> int:
        node = server.client()
        try:
            reply = node.execute_command("PUBSUB", "SHARDNUMSUB", channel)
            return _subscriber_count(reply, channel)
        finally:
            node.close()

    async def scenario() -> None:
        async with running_worker(url, _router(started), prefix=prefix, queues=["cold"]) as w:
            assert w.wakeups is not None
            await await_for(lambda: _covered(w, ["cold"]), 10, "the subscription")
            assert server.pid is not None
            os.kill(server.pid, signal.SIGSTOP)
            try:  # what is tested: the keepalive's own report
                await await_for(lambda: w.wakeups.dropped >= 1, 10, "the keepalive to give up")
            finally:
                os.kill(server.pid, signal.SIGCONT)
            # the server's count: the old connection closed, a new one subscribed
            await await_for(
                lambda: subscribers() == 1 and _covered(w, ["cold"]), 30, "subscribed again"
            )
            client = await AsyncClient.connect(url, prefix=prefix)
            info = await client.enqueue("t", 1, queue="cold")
            await await_for(lambda: info.id in started, 30, "the task")
            await client.aclose()

    try:
        asyncio.run(scenario())
    finally:
        server.stop()
