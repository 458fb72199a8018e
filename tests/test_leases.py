"""Leases and fencing, with two live workers on one queue (standalone and cluster).

- A task that outlives its lease keeps it while its worker renews it: the other worker's
  recoverer never takes it, and it runs once.
- A worker whose lease was taken over may still finish: its ack or fail reaches the
  server, is refused (the token is not the holder's), is counted in ``leases_lost``, and
  the new owner's outcome stays.
- A sync handler abandoned after its timeout keeps its concurrency slot until it returns.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from clusterq import AsyncClient, Router, Task, TaskInfo, TaskState, Worker
from clusterq.retry import fixed
from tests.helpers import FAST, await_for, running_worker


def test_renewal_keeps_a_task_longer_than_its_lease(url: str, prefix: str) -> None:
    """The handler runs until the test has seen its task outlive the lease it started
    with (renewed after that lease ran out) and both workers sweep the queue since; then
    it returns: it ran once, nobody took it back. No duration is assumed: a slow machine
    only makes the waits longer (the lease is 3 s, renewed every 0.75 s)."""
    lease = 3.0
    runs: list[str] = []
    release = asyncio.Event()
    router = Router()

    @router.task("long")
    async def long(task: Task) -> str:
        runs.append(task.id)
        await release.wait()
        return "done"

    async def scenario() -> None:
        client = await AsyncClient.connect(url, prefix=prefix)
        info = await client.enqueue("long", None, retention=60)
        # Without wake-ups each worker sweeps the queue every recover_interval (with them,
        # a worker holding nothing sweeps only when its survey sees an expired lease).
        settings: dict[str, Any] = {"lease": lease, "wakeups": False}
        async with (
            running_worker(url, router, prefix=prefix, name="renewing-a", **settings) as a,
            running_worker(url, router, prefix=prefix, name="renewing-b", **settings) as b,
        ):
            await await_for(lambda: runs, 20, "the task to start")
            first = await client.info(info)
            assert first.state == TaskState.ACTIVE and first.next_process_at is not None
            first_expiry = first.next_process_at

            async def renewed_after_first_expiry() -> bool:
                # a renewal at t sets the expiry to t + lease: this one came after the
                # first lease had run out (and the run above is still the only one)
                now = await client.info(info)
                expiry = now.next_process_at or 0.0
                return now.state == TaskState.ACTIVE and expiry >= first_expiry + lease

            await await_for(renewed_after_first_expiry, 60, "a renewal past the first lease")
            assert runs == [info.id], "taken back while it ran"
            swept = a.stats.sweeps, b.stats.sweeps
            await await_for(
                lambda: a.stats.sweeps > swept[0] + 1 and b.stats.sweeps > swept[1] + 1,
                30,
                "both workers to sweep the queue twice more",
            )
            assert runs == [info.id], "taken back while it ran"
            release.set()
            assert await client.result(info, timeout=30) == "done"
            done = await client.info(info)
            assert a.stats.recovered == b.stats.recovered == 0
            assert a.stats.leases_lost == b.stats.leases_lost == 0
        await client.aclose()
        assert done.state == TaskState.COMPLETED and done.retried == 0

    asyncio.run(scenario())
    assert len(runs) == 1


class _Gate:
    """A handler's first run waits here until the test opens it; later runs don't."""

    def __init__(self) -> None:
        self.first_started = asyncio.Event()
        self.open = asyncio.Event()
        self.runs: list[str] = []

    async def first_waits(self, task: Task) -> bool:
        self.runs.append(task.attempt)
        if len(self.runs) == 1:
            self.first_started.set()
            await self.open.wait()
            return True
        return False


async def _start(url: str, router: Router, prefix: str, name: str, **options: Any) -> Worker:
    settings = {**FAST, "retry_policy": fixed(0), **options}
    worker = Worker(url, router, prefix=prefix, name=name, **settings)
    await worker.start()
    return worker


async def _take_over(
    url: str, prefix: str, router: Router, gate: _Gate, client: AsyncClient, info: TaskInfo
) -> tuple[Worker, Worker, Any]:
    """Worker A takes the task and stops renewing its lease (alive, but as if frozen);
    worker B recovers the task and runs it to completion while A's handler still waits.
    Returns both workers, running, and the task's result."""
    # One slot, held by the waiting handler: A fetches nothing more meanwhile.
    a = await _start(url, router, prefix, "frozen-a", concurrency=1)
    await asyncio.wait_for(gate.first_started.wait(), 20)
    a.heartbeat_interval = 3600.0  # its lease runs out after at most one more renewal
    b = await _start(url, router, prefix, "takes-over-b")
    return a, b, await client.result(info, timeout=30)


@pytest.mark.parametrize("stale", ["ack", "fail"])
def test_a_stale_ack_or_fail_is_refused_and_the_new_owners_result_kept(
    url: str, prefix: str, stale: str
) -> None:
    gate = _Gate()
    router = Router()

    @router.task("fenced")
    async def fenced(task: Task) -> str:
        if await gate.first_waits(task):
            if stale == "fail":
                raise RuntimeError("A's late failure")
            return "from A"
        return "from B"

    async def scenario() -> None:
        client = await AsyncClient.connect(url, prefix=prefix)
        info = await client.enqueue("fenced", None, retention=60, max_retry=5)
        a, b, result = await _take_over(url, prefix, router, gate, client, info)
        try:
            assert result == "from B"
            assert b.stats.recovered + a.stats.recovered == 1
            gate.open.set()  # A's handler returns now, with its old token
            await await_for(lambda: a.stats.leases_lost >= 1, 15, "A's stale outcome refused")
            assert a.stats.leases_lost == 1  # one task, one lost lease
            # Whatever A's heartbeat noticed too, its outcome was sent and refused once:
            # nothing it sent changed the task.
            after = await client.info(info)
            assert after.state == TaskState.COMPLETED and after.result == "from B"
            assert after.retried == 1  # B's attempt came from the recovery; A's fail no-op
            assert a.stats.processed + a.stats.failed <= 1 and b.stats.leases_lost == 0
        finally:
            await a.stop()
            await b.stop()
            await client.aclose()
        assert len(gate.runs) == 2 and gate.runs[0] != gate.runs[1]  # two fencing tokens

    asyncio.run(scenario())


def test_an_abandoned_sync_handler_keeps_its_slot_until_it_returns(url: str, prefix: str) -> None:
    returned: list[float] = []
    started: dict[str, float] = {}
    router = Router()

    @router.task("stuck")
    def stuck(task: Task) -> None:
        started[task.id] = time.monotonic()
        time.sleep(1.2)  # far past its 0.1 s timeout; a thread cannot be interrupted
        returned.append(time.monotonic())

    @router.task("next")
    async def next_task(task: Task) -> None:
        started[task.id] = time.monotonic()

    async def scenario() -> tuple[str, str]:
        client = await AsyncClient.connect(url, prefix=prefix)
        first = await client.enqueue("stuck", None, timeout=0.1, max_retry=0)
        async with running_worker(url, router, prefix=prefix, concurrency=1):
            await await_for(lambda: first.id in started, 20, "the sync handler to start")
            second = await client.enqueue("next", None)
            await await_for(lambda: second.id in started, 20, "the second task")
        await client.aclose()
        return first.id, second.id

    _, second = asyncio.run(scenario())
    # With one slot, the second task could only start once the thread gave it back.
    assert returned and started[second] >= returned[0]
