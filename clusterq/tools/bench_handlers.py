"""The handlers that benchmark worker processes run (``clusterq.tools.bench_handlers:router``):
a no-op, one INCR over the worker's connection or through redis-py, and the latency
probe that records how long after its enqueue each task started."""

from __future__ import annotations

import time

from clusterq.retry import SkipRetry
from clusterq.router import Router
from clusterq.streams import Event
from clusterq.task import Task
from clusterq.worker import current_worker

NOOP_TYPE = "clusterq:bench:noop"
INCR_TYPE = "clusterq:bench:incr"
INCR_REDIS_PY_TYPE = "clusterq:bench:incr-redis-py"
LATENCY_TYPE = "clusterq:bench:latency"
#: The stream and group of ``clusterq bench stream`` (under the benchmark's prefix).
BENCH_STREAM = "clusterq-bench-events"
BENCH_GROUP = "bench"

# ----------------------------------------------------------------------- handlers

router = Router()


def _run_of(task: Task) -> str:
    payload = task.payload
    if not isinstance(payload, dict) or not isinstance(payload.get("run"), str):
        raise SkipRetry("not a benchmark payload")
    return str(payload["run"])


@router.consumer(BENCH_STREAM, group=BENCH_GROUP)
async def consume(event: Event) -> None:
    """Nothing: what consuming costs."""


@router.task(NOOP_TYPE)
async def noop(task: Task) -> None:
    """Nothing: what the worker itself costs."""


@router.task(INCR_TYPE)
async def incr(task: Task) -> None:
    """One INCR, like the tasks of the peers' benchmark, over the worker's connection."""
    backend = current_worker().backend
    assert backend is not None
    counter, _ = backend.keys.bench(_run_of(task), task.queue)
    await backend.call(counter, "INCR", counter)


@router.task(INCR_REDIS_PY_TYPE)
async def incr_redis_py(task: Task) -> None:
    """One INCR through redis-py's asyncio client (what a handler written against
    redis-py pays: its per-command layer is most of the task's cost)."""
    backend = current_worker().backend
    assert backend is not None
    counter, _ = backend.keys.bench(_run_of(task), task.queue)
    await backend.execute_key(counter, lambda c: c.incr(counter))


@router.task(LATENCY_TYPE)
async def latency(task: Task) -> None:
    """Record how long after its enqueue began this task started."""
    started = time.time()
    sent = task.payload.get("t") if isinstance(task.payload, dict) else None
    if not isinstance(sent, float | int):
        raise SkipRetry("not a latency payload")
    backend = current_worker().backend
    assert backend is not None
    _, samples = backend.keys.bench(_run_of(task), task.queue)
    # Over the node's lane: redis-py's pooled connections, opened on demand when a burst
    # starts, put tens of ms into the first samples of the loaded run.
    sample = f"{started - sent:.6f}"
    await backend.execute_key(samples, lambda c: c.fast("RPUSH", samples, sample))
