"""The handlers that benchmark worker processes run (``clusterq.tools.bench_handlers:router``):
a no-op, one INCR over the worker's connection or through redis-py (asyncio, or sync
from a plain ``def`` handler), about 1 ms of pure-Python CPU in a plain ``def`` handler,
the latency probe that records how long after its enqueue each task started, and the
probes of ``clusterq bench limits`` that record when each task started (and ended, or
in which fair group it was)."""

from __future__ import annotations

import asyncio
import os
import threading
import time

from clusterq.cluster.backend import Backend
from clusterq.retry import SkipRetry
from clusterq.router import Router
from clusterq.streams import Event
from clusterq.task import Task
from clusterq.tools.bench_tracing import install_from_env
from clusterq.worker import current_worker

NOOP_TYPE = "clusterq:bench:noop"
INCR_TYPE = "clusterq:bench:incr"
INCR_REDIS_PY_TYPE = "clusterq:bench:incr-redis-py"
INCR_SYNC_TYPE = "clusterq:bench:incr-sync"
CPU_TYPE = "clusterq:bench:cpu"
LATENCY_TYPE = "clusterq:bench:latency"
#: ``clusterq bench limits``: a task that records its start; one that sleeps and records
#: its start and end.
START_TYPE = "clusterq:bench:start"
SPAN_TYPE = "clusterq:bench:span"
#: ``clusterq bench limits``, its fair-group parts: a task that records its start and group.
GROUP_START_TYPE = "clusterq:bench:group-start"
#: ``clusterq bench e2e --work``: what each task does, and the task type that does it.
#: The ``incr*`` kinds each count one INCR per task (checked after the run).
WORK_TYPES: dict[str, str] = {
    "noop": NOOP_TYPE,
    "incr": INCR_TYPE,
    "incr-redis-py": INCR_REDIS_PY_TYPE,
    "incr-sync": INCR_SYNC_TYPE,
    "cpu": CPU_TYPE,
}
#: Milliseconds of pure-Python CPU one ``cpu`` task burns (see :func:`burn`).
CPU_WORK_MS = 1.0
#: The stream and group of ``clusterq bench stream`` (under the benchmark's prefix).
BENCH_STREAM = "clusterq-bench-events"
BENCH_GROUP = "bench"

# ----------------------------------------------------------------------- handlers

install_from_env()  # bench e2e --tracing: this worker process traces (bench_tracing)
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


def _sync_backend() -> Backend:
    """The blocking backend a plain ``def`` handler uses: what
    ``current_worker().sync_backend`` gives (:mod:`clusterq.worker.blocking`)."""
    return current_worker().sync_backend


@router.task(INCR_SYNC_TYPE)
def incr_sync(task: Task) -> None:
    """One INCR from a plain ``def`` handler, through redis-py's sync client over the
    worker's blocking backend (``current_worker().sync_backend``): what a handler
    written against sync redis-py pays, in the worker's handler threads."""
    backend = _sync_backend()
    counter, _ = backend.keys.bench(_run_of(task), task.queue)
    backend.execute_key(counter, lambda c: c.incr(counter))


@router.task(CPU_TYPE)
def cpu(task: Task) -> None:
    """About :data:`CPU_WORK_MS` of pure-Python CPU in a plain ``def`` handler (it holds
    the GIL throughout): one worker process cannot go past ~1,000 of them a second, and
    what it reaches below that is what running them costs."""
    burn(_loops_per_task())


def burn(loops: int) -> int:
    """A loop of pure-Python arithmetic, ``loops`` rounds."""
    total = 0
    for i in range(loops):
        total += i * i % 7
    return total


_calibration = threading.Lock()
_loops: list[int] = []


def _loops_per_task() -> int:
    """Rounds of :func:`burn` that take :data:`CPU_WORK_MS` on this machine: measured
    once per process, on the first ``cpu`` task (the fastest of 7 timed runs of 20,000
    rounds each: the others were slowed by something else)."""
    if _loops:
        return _loops[0]
    with _calibration:
        if not _loops:
            rounds = 20_000
            best = float("inf")
            for _ in range(7):
                started = time.perf_counter()
                burn(rounds)
                best = min(best, time.perf_counter() - started)
            _loops.append(max(1, int(rounds * CPU_WORK_MS / 1000 / best)))
    return _loops[0]


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


@router.task(START_TYPE)
async def start(task: Task) -> None:
    """Record when this task started, and in which process (``"<time> <pid>"``)."""
    started = time.time()
    await _record(task, f"{started:.6f} {os.getpid()}")


@router.task(GROUP_START_TYPE)
async def group_start(task: Task) -> None:
    """Record when this task started, its fair group (``-`` for none) and in which
    process (``"<time> <group> <pid>"``; a group name has no space)."""
    started = time.time()
    await _record(task, f"{started:.6f} {task.group or '-'} {os.getpid()}")


@router.task(SPAN_TYPE)
async def span(task: Task) -> None:
    """Sleep the payload's ``ms``, then record when this task started and ended, and in
    which process (``"<start> <end> <pid>"``)."""
    started = time.time()
    ms = task.payload.get("ms") if isinstance(task.payload, dict) else None
    if not isinstance(ms, float | int) or not 0 <= ms <= 60_000:
        raise SkipRetry("not a span payload")
    await asyncio.sleep(ms / 1000)
    ended = time.time()
    await _record(task, f"{started:.6f} {ended:.6f} {os.getpid()}")


async def _record(task: Task, sample: str) -> None:
    """RPUSH ``sample`` through redis-py onto the run's list beside the task's queue: what
    the limits are checked with, independently of clusterq's own counters."""
    backend = current_worker().backend
    assert backend is not None
    _, samples = backend.keys.bench(_run_of(task), task.queue)
    await backend.execute_key(samples, lambda c: c.rpush(samples, sample))
