"""Benchmarks behind ``clusterq bench``: throughput, latency and memory, measured on the
server you point them at, beside a ``redis-benchmark`` baseline from the same run.

Scenarios (each uses fresh queues named ``bench-<run>-<n>`` and deletes them after):

- ``enqueue``: the synchronous :class:`~clusterq.Client`, one call per task.
- ``enqueue-many``: :meth:`~clusterq.Client.enqueue_many`, ``batch`` tasks per call.
- ``durability``: one call per task with ``durability="replica"`` (``WAIT 1``) against
  the same without, on as many tasks; needs a replica (cluster, or a standalone master
  with a replica).
- ``e2e``: N tasks are enqueued first, then ``workers`` worker processes (``concurrency``
  each) drain them; the rate counts from the first task processed to the last. ``work``
  is ``noop`` (the handler returns at once), ``incr`` (it sends one INCR, as the peers'
  benchmark tasks do, over the worker's own connection: ``backend.call``),
  ``incr-redis-py`` (the same INCR through redis-py's asyncio client), ``incr-sync``
  (the same INCR from a plain ``def`` handler, through sync redis-py over the worker's
  blocking backend, ``current_worker().sync_backend``) or ``cpu`` (a plain ``def``
  handler burning ~1 ms of pure-Python CPU: at most ~1,000 tasks/s per process; the
  shortfall is what running them costs). On a cluster the tasks go to one queue per
  master.
- ``latency``: the time from just before an enqueue to the start of its handler, in
  another process. Idle: one task at a time into an idle queue; under load: tasks
  produced at ``rate`` per second.
- ``partitioned``: the e2e drain (noop) of one plain queue, then of one partitioned queue
  over all masters, reporting each master's commands and CPU per 1k tasks.
- ``stream``: N events published (``publish_many``) over a stream of 2 partitions per
  master, then handled by the worker processes' consumers of one group.
- ``idle``: ``queues`` idle queues (default 100) served by the worker processes: commands/s
  on the masters, connections per master, worker CPU; then pickup into a random one.
- ``memory``: ``used_memory`` of the queue's master before and after N small pending
  tasks, divided by N.
- ``purge``: N pending tasks of two types taking turns; a bulk delete of one type, then a
  purge of the rest, each timed, with the PING latency of that master meanwhile
  (:mod:`clusterq.tools.bench_purge`).
- ``limits``: a queue's rate limit and concurrency cap, checked against the start (and
  end) times the handlers record, and what a rate limit costs the e2e drain
  (:mod:`clusterq.tools.bench_limits`); then fair groups: a small group's wait behind a
  big group's backlog, 20 groups each at its own rate, what groups cost the e2e drain
  (:mod:`clusterq.tools.bench_groups`).

Nothing here asserts a speed; the figures are for people (and ``--json`` for scripts).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import time
from collections.abc import Callable, Sequence

from clusterq.cluster.backend import Backend
from clusterq.cluster.connection import RedisURL
from clusterq.errors import ClusterqError, ConfigError
from clusterq.producer import new_task_id
from clusterq.slots import keyslot
from clusterq.task import TaskInfo
from clusterq.taskevents import DEFAULT_MAXLEN
from clusterq.tools import bench_tracing
from clusterq.tools.bench_groups import bench_groups
from clusterq.tools.bench_handlers import LATENCY_TYPE, NOOP_TYPE, WORK_TYPES
from clusterq.tools.bench_limits import bench_limits, check_settings
from clusterq.tools.bench_purge import bench_purge
from clusterq.tools.bench_report import (
    SCENARIOS,
    BenchReport,
    BenchRow,
    BenchSettings,
    Progress,
    Scenario,
    compare_with_baseline,
    ms_percentiles,
    run_baseline,
)
from clusterq.tools.bench_session import Session, drain, spread_queues
from clusterq.tools.bench_spread import bench_idle, bench_partitioned, bench_stream
from clusterq.tools.bench_web import bench_web


def _server_version(backend: Backend) -> str:
    addr = backend.master_addr(0)
    info = backend.node(addr).info("server")
    name = "valkey" if "valkey_version" in info else "redis"
    return f"{name} {info.get('valkey_version') or info.get('redis_version')}"


# ----------------------------------------------------------------------- scenarios


def bench_enqueue(s: Session) -> BenchRow:
    """One ``Client.enqueue`` per task, and in turns of 500 with it, on the same node
    client, the raw round trip of its writes (``MULTI HSET LPUSH EXEC``, a record of the
    same size, ids drawn beforehand): ``vs_raw`` is the enqueue's mean over that one's."""
    queues = s.queues()
    n = s.settings.tasks
    payload = {"run": s.run_id}
    enqueue = s.client.enqueue
    # connections, script cache, registry: not part of the figure
    raws = [_raw_enqueue(s, enqueue(NOOP_TYPE, payload, queue=queue)) for queue in queues]
    ids = [new_task_id() for _ in range(n)]
    times: list[float] = []
    raw_times: list[float] = []
    clock = time.perf_counter
    for start in range(0, n, 500):
        for i in range(start, min(n, start + 500)):
            t0 = clock()
            enqueue(NOOP_TYPE, payload, queue=queues[i % len(queues)])
            times.append(clock() - t0)
        for i in range(start, min(n, start + 500)):
            t0 = clock()
            raws[i % len(raws)](ids[i])
            raw_times.append(clock() - t0)
        s.progress("enqueue", len(times), n)
    s.drop(queues)
    seconds, mean, raw_mean = sum(times), statistics.fmean(times), statistics.fmean(raw_times)
    p50, raw_p50 = statistics.median(times), statistics.median(raw_times)
    row = BenchRow("enqueue", n, round(seconds, 3), n / seconds, *ms_percentiles(times))
    row.extra.update(
        mean_ms=round(mean * 1000, 4),
        raw_mean_ms=round(raw_mean * 1000, 4),
        vs_raw=round(mean / raw_mean, 3),
        # on a shared machine the means carry other processes' preemptions: medians too
        p50_us=round(p50 * 1e6, 1),
        raw_p50_us=round(raw_p50 * 1e6, 1),
        vs_raw_p50=round(p50 / raw_p50, 3),
    )
    row.note = (
        f"mean {mean * 1e6:.1f} µs, {mean / raw_mean:.2f}x the raw MULTI HSET LPUSH EXEC "
        f"round trip ({raw_mean * 1e6:.1f} µs) in turns with it; p50 {p50 * 1e6:.1f} "
        f"vs {raw_p50 * 1e6:.1f} µs: {p50 / raw_p50:.2f}x"
    )
    return row


def _raw_enqueue(s: Session, first: TaskInfo) -> Callable[[str], object]:
    """What an enqueue into ``first``'s queue writes, sent raw (its record's bytes)."""
    qk = s.keys.queue(first.queue)
    node = s.backend.node(s.backend.master_addr(qk.slot))
    record = node.fast("HGET", qk.tasks, first.id)
    return lambda task_id: node.fast_pipeline(
        [("MULTI",), ("HSET", qk.tasks, task_id, record), ("LPUSH", qk.pending, task_id), ("EXEC",)]
    )


def _timed_calls(s: Session, label: str, n: int, call: Callable[[int], object]) -> BenchRow:
    """``call(i)`` for i in 0..n-1, each timed: rate and per-call p50/p99."""
    times: list[float] = []
    clock = time.perf_counter
    started = clock()
    for i in range(n):
        t0 = clock()
        call(i)
        times.append(clock() - t0)
        if i % 500 == 499 or i == n - 1:
            s.progress(label, i + 1, n)
    seconds = clock() - started
    p50, p99 = ms_percentiles(times)
    row = BenchRow(label, n, round(seconds, 3), n / seconds, p50, p99)
    row.extra["mean_ms"] = round(statistics.fmean(times) * 1000, 4)
    return row


def bench_enqueue_many(s: Session) -> BenchRow:
    queues = s.queues()
    n = s.settings.tasks
    batch = max(1, s.settings.batch)
    item = (NOOP_TYPE, {"run": s.run_id})
    for queue in queues:
        s.client.enqueue_many([item], queue=queue)
    times: list[float] = []
    clock = time.perf_counter
    started = clock()
    done = 0
    while done < n:
        size = min(batch, n - done)
        t0 = clock()
        s.client.enqueue_many([item] * size, queue=queues[(done // batch) % len(queues)])
        times.append(clock() - t0)
        done += size
        s.progress("enqueue-many", done, n)
    seconds = clock() - started
    s.drop(queues)
    p50, p99 = ms_percentiles(times)
    return BenchRow(
        "enqueue-many",
        n,
        round(seconds, 3),
        n / seconds,
        p50,
        p99,
        note=f"{batch} tasks per call; p50/p99 per call",
    )


def _has_replica(s: Session, queue: str) -> bool:
    addr = s.backend.master_addr(keyslot(queue))
    info = s.backend.node(addr).info("replication")
    return int(info.get("connected_slaves", 0)) > 0


def bench_durability(s: Session) -> list[BenchRow]:
    (queue,) = s.queues(1)
    if not _has_replica(s, queue):
        return [
            BenchRow(
                "durability",
                0,
                0.0,
                note="skipped: the queue's master has no replica (WAIT 1 cannot succeed)",
            )
        ]
    n = min(s.settings.tasks, 5000)
    payload = {"run": s.run_id}
    rows = []
    figures: dict[str, float] = {}
    for level in ("none", "replica"):
        s.client.enqueue(NOOP_TYPE, payload, queue=queue, durability=level)
        row = _timed_calls(
            s,
            f"enqueue durability={level}",
            n,
            lambda _i, level=level: s.client.enqueue(  # type: ignore[misc]
                NOOP_TYPE, payload, queue=queue, durability=level
            ),
        )
        figures[level] = row.extra["mean_ms"]
        rows.append(row)
    extra_ms = figures["replica"] - figures["none"]
    rows[-1].note = f"WAIT 1 adds {extra_ms:.3f} ms per call (mean)"
    rows[-1].extra["added_ms_per_call"] = round(extra_ms, 4)
    s.drop([queue])
    return rows


#: ``--events``, ``--tracing``: the e2e drains to run (off, on, or one of each, off first).
E2E_EVENTS: dict[str, tuple[bool, ...]] = {"off": (False,), "on": (True,), "both": (False, True)}


def bench_e2e(s: Session, *, events: bool = False, tracing: bool = False) -> BenchRow:
    """The e2e drain; ``events``: with the queues' lifecycle events on (the default
    cap), so every transition also appends to the queue's events stream; ``tracing``:
    with an OpenTelemetry SDK in this process and the workers (:mod:`bench_tracing`;
    once on, it stays on in this process)."""
    settings = s.settings
    if tracing:
        bench_tracing.install()
        os.environ[bench_tracing.ENV] = "1"  # the workers started from here on trace
    queues = s.queues()
    n = settings.tasks
    task_type = WORK_TYPES.get(settings.work, NOOP_TYPE)
    if events:
        for q in queues:
            flag = s.keys.queue(q).evcfg
            s.call(flag, "SET", flag, DEFAULT_MAXLEN)
    s.fill(queues, n, task_type)
    cpu_before = _server_cpu(s)
    seconds, first_count = drain(s, queues, queues, n, "e2e")
    cpu_after = _server_cpu(s)
    cpu = {role: cpu_after.get(role, 0.0) - cpu_before.get(role, 0.0) for role in cpu_after}
    if settings.work.startswith("incr"):
        counted = sum(
            int(s.call(key, "GET", key) or 0)
            for key in (s.keys.bench(s.run_id, q)[0] for q in queues)
        )
        if counted < n:
            raise ClusterqError(f"e2e: the handlers counted {counted} INCRs for {n} tasks")
    s.drop(queues)
    rate = (n - first_count) / seconds if seconds > 0 else None
    where = f"{len(queues)} queue(s)" + (
        f" on {len({s.backend.master_addr(keyslot(q)) for q in queues})} master(s)"
        if s.backend.mode == "cluster"
        else ""
    )
    return BenchRow(
        f"e2e {settings.work}"
        + (", events on" if events else "")
        + (", tracing SDK" if tracing else ""),
        n,
        round(seconds, 3),
        rate,
        note=(
            f"{settings.workers} worker(s) x {settings.processes or 1} process(es) x "
            f"concurrency {settings.concurrency}, "
            f"{where}; server CPU per 1k tasks: "
            + ", ".join(f"{role}s {v * 1e6 / n:.0f} ms" for role, v in sorted(cpu.items()))
        ),
        extra={
            "workers": settings.workers,
            "processes": settings.processes or 1,
            "concurrency": settings.concurrency,
            "queues": len(queues),
            "per_process": (
                round(rate / settings.workers / (settings.processes or 1), 1) if rate else None
            ),
            "server_cpu_ms_per_1k": {k: round(v * 1000 / n * 1000, 1) for k, v in cpu.items()},
        },
    )


def _server_cpu(s: Session) -> dict[str, float]:
    """CPU seconds used so far by the target's nodes, by role (INFO cpu of each)."""
    out: dict[str, float] = {}
    for node in s.backend.topology.nodes:
        with contextlib.suppress(Exception):
            info = s.backend.node(node.address).info("cpu")
            used = float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
            out[node.role] = out.get(node.role, 0.0) + used
    return out


def _samples(s: Session, queue: str) -> list[float]:
    key = s.keys.bench(s.run_id, queue)[1]
    values = s.backend.execute_key(key, lambda c: c.lrange(key, 0, -1))
    return [float(v) for v in values]


def bench_latency(s: Session) -> list[BenchRow]:
    settings = s.settings
    (idle_queue,) = s.queues(1)
    load_queues = s.queues()
    workers = s.workers([idle_queue, *load_queues], 1)
    rows = []
    try:
        s.start_workers(workers)
        # Idle: one task at a time; the worker is back to blocking on the server when
        # the next one arrives.
        count = max(1, settings.samples)
        samples = s.pickups([idle_queue], count, warmup=10, what="latency, idle queue")
        p50, p99 = ms_percentiles(samples)
        rows.append(
            BenchRow(
                "pickup latency, idle",
                count,
                0.0,
                None,
                p50,
                p99,
                note="enqueue to handler start, one task at a time, 1 worker process",
                extra={"max_ms": round(max(samples) * 1000, 3)},
            )
        )
        # Under load: a steady stream at `rate` tasks/s.
        total = max(1, min(settings.tasks, int(settings.rate * 10)))
        interval = 1.0 / settings.rate
        started = time.perf_counter()
        for i in range(total):
            due = started + i * interval
            pause = due - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
            queue = load_queues[i % len(load_queues)]
            s.client.enqueue(LATENCY_TYPE, {"run": s.run_id, "t": time.time()}, queue=queue)
            if i % 200 == 199 or i == total - 1:
                s.progress(f"latency at {settings.rate:g}/s", i + 1, total)
        produced = time.perf_counter() - started
        deadline = time.monotonic() + 60
        under: list[float] = []
        while time.monotonic() < deadline:
            under = [v for q in load_queues for v in _samples(s, q)]
            if len(under) >= total:
                break
            time.sleep(0.05)
        if len(under) < total:
            raise ClusterqError(f"latency: only {len(under)} of {total} tasks ran in time")
        p50, p99 = ms_percentiles(under)
        rows.append(
            BenchRow(
                "pickup latency, load",
                total,
                round(produced, 3),
                total / produced,
                p50,
                p99,
                note=(
                    f"enqueue to handler start at {settings.rate:g} tasks/s over "
                    f"{len(load_queues)} queue(s), 1 worker process"
                ),
                extra={"max_ms": round(max(under) * 1000, 3)},
            )
        )
    finally:
        workers.stop()
    s.drop([idle_queue, *load_queues])
    return rows


def _used_memory(s: Session, queue: str) -> int:
    addr = s.backend.master_addr(keyslot(queue))
    return int(s.backend.node(addr).info("memory")["used_memory"])


def bench_memory(s: Session) -> BenchRow:
    (queue,) = s.queues(1)
    n = s.settings.tasks
    s.client.enqueue_many([(NOOP_TYPE, {"run": s.run_id})], queue=queue)  # keys exist
    before = _used_memory(s, queue)
    item = (NOOP_TYPE, {"i": 0})
    for start in range(0, n, 2000):
        size = min(2000, n - start)
        s.client.enqueue_many([item] * size, queue=queue)
        s.progress("memory", start + size, n)
    after = _used_memory(s, queue)
    s.drop([queue])
    per_task = (after - before) / n
    return BenchRow(
        "memory",
        n,
        0.0,
        note=f"{per_task:.0f} bytes per pending task (used_memory delta / N)",
        extra={"bytes_per_task": round(per_task, 1), "used_memory_delta": after - before},
    )


# ----------------------------------------------------------------------- the run


def run_bench(
    settings: BenchSettings,
    scenarios: Sequence[Scenario] = SCENARIOS,
    progress: Progress = lambda _label, _done, _total: None,
) -> BenchReport:
    """Run ``scenarios`` in order and return the report."""
    unknown = [name for name in scenarios if name not in SCENARIOS]
    if unknown:
        raise ConfigError(f"unknown scenario {unknown[0]!r}: one of {', '.join(SCENARIOS)}")
    if settings.tasks < 1 or settings.workers < 1 or settings.concurrency < 1:
        raise ConfigError("tasks, workers and concurrency must be at least 1")
    if settings.rate <= 0:
        raise ConfigError("rate must be positive")
    if "limits" in scenarios:
        check_settings(settings)
    session = Session(settings, progress)
    try:
        backend = session.backend
        report = BenchReport(
            target=RedisURL.parse(settings.url).redacted(),
            mode=backend.mode,
            masters=len(backend.topology.masters),
            server=_server_version(backend),
            cores=os.cpu_count() or 1,
        )
        if settings.baseline:
            progress("redis-benchmark baseline", 0, 1)
            report.baseline, note = run_baseline(backend.url, backend.mode)
            if note:
                report.notes.append(note)
            progress("redis-benchmark baseline", 1, 1)
        for name in scenarios:
            if name == "enqueue":
                rows = [bench_enqueue(session)]
            elif name == "enqueue-many":
                rows = [bench_enqueue_many(session)]
            elif name == "durability":
                rows = bench_durability(session)
            elif name == "e2e":
                rows = [
                    bench_e2e(session, events=on, tracing=traced)
                    for traced in E2E_EVENTS[settings.tracing]
                    for on in E2E_EVENTS[settings.events]
                ]
            elif name == "latency":
                rows = bench_latency(session)
            elif name == "partitioned":
                rows = bench_partitioned(session)
            elif name == "stream":
                rows = bench_stream(session)
            elif name == "idle":
                rows = bench_idle(session)
            elif name == "purge":
                rows = bench_purge(session)
            elif name == "limits":
                rows = bench_limits(session, also=[bench_groups])
            elif name == "web":
                rows = bench_web(session)
            else:
                rows = [bench_memory(session)]
            for row in rows:
                compare_with_baseline(row, report.baseline)
            report.rows.extend(rows)
        return report
    finally:
        session.close()


__all__ = ["run_bench", "spread_queues"]
