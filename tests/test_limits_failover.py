"""A queue's limits through a failover of its master, on clusters owned by each test:
a graceful ``CLUSTER FAILOVER`` (nothing lost: the concurrency cap holds exactly and the
rate within its bound), and a kill -9 (the promoted replica has the limits; the rate
holds for what starts after the promotion). Starts and ends are recorded by the
handlers themselves, not read from clusterq's counters; no timing is asserted beyond
lower bounds that a slow machine only makes easier to meet."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Callable

import pytest

from clusterq import Client, Router, Task
from clusterq.tools.devcluster import LocalCluster
from tests.helpers import await_for, running_worker, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.both_servers]

QUEUE = "images"


class Log:
    """Handler start and end times (this process's clock), in the handlers' order."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spans: dict[str, list[float]] = {}

    def start(self, task: Task) -> None:
        with self.lock:
            self.spans.setdefault(task.id, []).append(time.time())

    def end(self, task: Task) -> None:
        with self.lock:
            self.spans[task.id].append(time.time())

    def starts(self) -> list[float]:
        with self.lock:
            return sorted(t for span in self.spans.values() for t in span[::2])

    def max_overlap(self) -> int:
        """The most handlers that ran at once (an end before a start at the same time)."""
        events: list[tuple[float, int]] = []
        with self.lock:
            for span in self.spans.values():
                for i in range(0, len(span) - 1, 2):
                    events += [(span[i], 1), (span[i + 1], -1)]
        running = peak = 0
        for _, step in sorted(events):
            running += step
            peak = max(peak, running)
        return peak


def _router(log: Log, seconds: float) -> Router:
    router = Router()

    @router.task("work")
    async def work(task: Task) -> None:
        log.start(task)
        await asyncio.sleep(seconds)
        log.end(task)

    return router


def _promote(cluster: LocalCluster, client: Client, how: str) -> None:
    """Fail the queue's master over to its replica (``graceful``: CLUSTER FAILOVER;
    ``kill``: kill -9 of the master) and wait until the map says so."""
    location = client.backend.topology.locate(QUEUE)
    assert location.master is not None and location.replicas
    replica_id = location.replicas[0].id
    if how == "graceful":
        replica = cluster.client(location.replicas[0].port)
        try:
            replica.execute_command("CLUSTER", "FAILOVER")
        finally:
            replica.close()
    else:
        cluster.kill_node(location.master.port, signal.SIGKILL)

    def promoted() -> bool:
        client.backend.refresh_topology()
        new = client.backend.topology.locate(QUEUE).master
        return new is not None and new.id == replica_id

    wait_for(promoted, 60, "the failover")


def test_a_graceful_failover_keeps_the_cap_and_the_rate(
    fresh_cluster: Callable[[], LocalCluster], prefix: str
) -> None:
    cluster = fresh_cluster()
    log = Log()
    tasks, rate, burst, cap = 40, 10.0, 10, 2
    with Client(cluster.seed_url, prefix=prefix, retry_timeout=60) as client:
        client.set_limits(QUEUE, rate="10/s", burst=burst, concurrency=cap)
        client.enqueue_many([("work", n) for n in range(tasks)], queue=QUEUE)

        async def scenario() -> None:
            # A burst of 10 makes the cap bind at first; 2 at once x 0.05 s would run
            # 40/s, so the rate binds after that.
            router = _router(log, 0.05)
            options = {"prefix": prefix, "queues": [QUEUE], "concurrency": 10}
            async with (
                running_worker(cluster.seed_url, router, **options),
                running_worker(cluster.seed_url, router, **options),
            ):
                await await_for(lambda: len(log.starts()) >= tasks // 3, 60, "a third")
                await asyncio.to_thread(_promote, cluster, client, "graceful")
                await await_for(lambda: len(log.spans) >= tasks, 120, "every task")
                await await_for(
                    lambda: all(len(s) >= 2 for s in list(log.spans.values())), 30, "ends"
                )

        asyncio.run(scenario())
        assert client.limits(QUEUE) is not None  # the promoted replica has them
    starts = log.starts()
    assert len(log.spans) == tasks
    assert log.max_overlap() <= cap  # nothing was lost, so the active set was exact
    # At most burst + rate x span started over the run: so the span is at least this.
    assert starts[-1] - starts[0] >= (len(starts) - burst) / rate * 0.95


def test_after_a_kill_the_promoted_replica_enforces_the_limits(
    fresh_cluster: Callable[[], LocalCluster], prefix: str
) -> None:
    cluster = fresh_cluster()
    log = Log()
    tasks, rate, burst = 40, 10.0, 2
    promoted_at: list[float] = []
    with Client(cluster.seed_url, prefix=prefix, retry_timeout=60) as client:
        client.set_limits(QUEUE, rate="10/s", burst=burst)
        location = client.backend.topology.locate(QUEUE)
        assert location.master is not None
        master = cluster.client(location.master.port)
        try:  # the limits are on the replica before the kill (else nothing could have them)
            master.execute_command("WAIT", 1, 5000)
        finally:
            master.close()
        client.enqueue_many([("work", n) for n in range(tasks)], queue=QUEUE)

        async def scenario() -> None:
            router = _router(log, 0.01)
            options = {"prefix": prefix, "queues": [QUEUE], "concurrency": 10}
            async with running_worker(cluster.seed_url, router, **options):
                await await_for(lambda: len(log.starts()) >= 5, 60, "some tasks")
                await asyncio.to_thread(_promote, cluster, client, "kill")
                promoted_at.append(time.time())
                await await_for(lambda: len(log.spans) >= tasks, 120, "every task")

        asyncio.run(scenario())
        assert client.limits(QUEUE) is not None
    # What started after the promotion was limited by the promoted replica's limiter,
    # which started from its copy of the state: at most burst + what it forgot.
    after = [t for t in log.starts() if t >= promoted_at[0]]
    assert len(after) >= 10, len(after)
    assert after[-1] - after[0] >= (len(after) - 2 * burst) / rate * 0.95


def test_a_graceful_failover_keeps_each_groups_cap_and_rate(
    fresh_cluster: Callable[[], LocalCluster], prefix: str
) -> None:
    """Two fair groups, each capped at 2 and limited to 10/s (burst 2), served by two
    workers while the queue's master fails over gracefully: each group's cap holds
    exactly (its started ids are replicated with the dequeues) and its rate within its
    bound; every task runs."""
    cluster = fresh_cluster()
    logs = {"a": Log(), "b": Log()}
    tasks, rate, burst, cap = 16, 10.0, 2, 2
    router = Router()

    @router.task("work")
    async def work(task: Task) -> None:
        logs[task.payload].start(task)
        await asyncio.sleep(0.05)
        logs[task.payload].end(task)

    with Client(cluster.seed_url, prefix=prefix, retry_timeout=60) as client:
        client.set_limits(
            QUEUE, rate_per_group="10/s", burst_per_group=burst, concurrency_per_group=cap
        )
        for group in logs:
            client.enqueue_many([("work", group)] * tasks, queue=QUEUE, group=group)

        async def scenario() -> None:
            options = {"prefix": prefix, "queues": [QUEUE], "concurrency": 10}
            async with (
                running_worker(cluster.seed_url, router, **options),
                running_worker(cluster.seed_url, router, **options),
            ):
                await await_for(lambda: len(logs["a"].starts()) >= tasks // 3, 60, "a third")
                await asyncio.to_thread(_promote, cluster, client, "graceful")
                await await_for(
                    lambda: all(len(log.spans) >= tasks for log in logs.values()), 120, "all"
                )
                await await_for(
                    lambda: all(
                        len(s) >= 2 for log in logs.values() for s in list(log.spans.values())
                    ),
                    30,
                    "ends",
                )

        asyncio.run(scenario())
    for group, log in logs.items():
        starts = log.starts()
        assert len(log.spans) == tasks, group
        assert log.max_overlap() <= cap, group
        assert starts[-1] - starts[0] >= (len(starts) - burst) / rate * 0.95, group
