"""Small helpers shared by the tests: polling with a deadline, in-process workers."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from clusterq import Router, Worker

#: The ``start_worker`` fixture (conftest): starts a `clusterq worker` process.
StartWorker = Callable[..., subprocess.Popen[str]]

#: Worker settings that make the tests quick: short leases, frequent sweeps.
FAST = {"lease": 1.0, "recover_interval": 0.2, "poll_interval": 0.05, "shutdown_timeout": 5.0}


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


async def await_for(
    predicate: Callable[[], Any | Awaitable[Any]], timeout: float = 10.0, what: str = "condition"
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running_worker(url: str, router: Router, **options: Any) -> AsyncIterator[Worker]:
    settings = {**FAST, **options}
    worker = Worker(url, router, **settings)
    await worker.start()
    try:
        yield worker
    finally:
        await worker.stop()


def write_raw_records(
    url: str, prefix: str, queue: str, records: dict[str, bytes], *, active: bool
) -> None:
    """Write task records straight into Redis, as no clusterq client would: pending, or
    active under a lease that expired long ago (a worker that died)."""
    from clusterq import Client

    with Client(url, prefix=prefix) as client:
        qk = client.keys.queue(queue)
        client.register_queues([queue])

        def write(c: Any) -> Any:
            pipe = c.pipeline(transaction=True)
            for task_id, raw in records.items():
                pipe.hset(qk.tasks, task_id, raw)
                if active:
                    pipe.zadd(qk.active, {task_id: 1})
                    pipe.hset(qk.leases, task_id, "dead-worker:1:1")
                else:
                    pipe.lpush(qk.pending, task_id)
            return pipe.execute()

        client.backend.execute(qk.slot, write)
