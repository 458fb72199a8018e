"""Small helpers shared by the tests: polling with a deadline, in-process workers."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from clusterq import Client, Router, Worker

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


def keys_holding(node: Any, prefix: str, needle: str) -> list[str]:
    """Every key under ``prefix`` on ``node`` (one server: a standalone server or one
    master) that names ``needle`` or holds it: in its name, as a hash field, a (sorted)
    set member, a list element, a string value or a stream entry's field or value.
    Read straight from the server, not through clusterq."""
    want = needle.encode()
    found: list[str] = []
    for raw in node.scan_iter(match=f"{prefix}:*", count=1000):
        key = raw.decode(errors="replace")
        kind = node.type(raw)
        kind = kind.decode() if isinstance(kind, bytes) else str(kind)
        if want in raw:
            held = True
        elif kind == "hash":
            held = bool(node.hexists(raw, want))
        elif kind == "zset":
            held = node.zscore(raw, want) is not None
        elif kind == "set":
            held = bool(node.sismember(raw, want))
        elif kind == "list":
            held = node.lpos(raw, want) is not None
        elif kind == "string":
            held = want in (node.get(raw) or b"")
        elif kind == "stream":
            held = any(
                want in part
                for _id, fields in node.xrange(raw)
                for pair in fields.items()
                for part in pair
            )
        else:
            held = False
        if held:
            found.append(key)
    return found


def on_node(client: Client, key: str, command: str, *args: Any) -> Any:
    """``command`` on ``key`` through the redis-py client of the node that holds it (the
    standalone server, or the key's master in the cluster)."""

    def run(node: Any) -> Any:
        return node.execute_command(command, key, *args)

    return client.backend.execute_key(key, run)


def read_hash(client: Client, key: str) -> dict[str, str]:
    """A hash read with redis-py, as text."""
    raw = on_node(client, key, "HGETALL")
    return {as_text(k): as_text(v) for k, v in raw.items()}


def as_text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


#: Seconds a handler's recorded start may lag its dequeue (the event loop handing the
#: task over): how much earlier than the token bucket allows a start may seem to come.
START_JITTER = 0.15


def assert_token_bucket(starts: list[float], rate: float, burst: int, what: str = "") -> float:
    """Sorted start times obey a token bucket of ``rate``/s and ``burst``: the k-th start
    no earlier than (k + 1 - burst) / rate after the first (less START_JITTER), and the
    whole span at least (n - burst) / rate (a slow machine only makes it longer).
    Returns the span."""
    first = starts[0]
    span = starts[-1] - first
    assert span >= (len(starts) - burst) / rate * 0.9, f"{what} span {span:.3f}s"
    for k, start in enumerate(starts):
        due = (k + 1 - burst) / rate - START_JITTER
        assert start - first >= due, f"{what} start {k} at +{start - first:.3f}s, due +{due:.3f}s"
    return span


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals [start, end] open at once (an end at the same instant as a
    start is counted first)."""
    edges = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    running = most = 0
    for _, step in edges:
        running += step
        most = max(most, running)
    return most
