"""``clusterq bench`` scenarios about spreading work over the masters and about idle
queues: ``partitioned`` (a plain queue against a partitioned one), ``stream`` (publish and
consume a partitioned stream) and ``idle`` (what N idle queues cost, and pickup into one
of them). Each reports per master what it sent (commands, CPU, connections)."""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from typing import Any

from clusterq.errors import ClusterqError
from clusterq.tools.bench_handlers import BENCH_GROUP, BENCH_STREAM, NOOP_TYPE
from clusterq.tools.bench_report import BenchRow, ms_percentiles
from clusterq.tools.bench_session import Session, drain


def _per_master(s: Session) -> dict[str, tuple[int, float]]:
    """Commands processed and CPU seconds used so far by each master (INFO)."""
    out: dict[str, tuple[int, float]] = {}
    for master in s.backend.topology.masters:
        node = s.backend.node(master.address)
        stats, cpu = node.info("stats"), node.info("cpu")
        used = float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])
        out[master.addr] = (int(stats["total_commands_processed"]), used)
    return out


def bench_stream(s: Session) -> list[BenchRow]:
    """Publish N events (no key: the partitions in turn) over a stream of ``queues``
    partitions (default 2 per master), then let the worker processes' consumers of one
    group handle them all; per master commands and CPU of the consuming."""
    settings = s.settings
    n = settings.tasks
    count = settings.queues or 2 * len(s.backend.topology.masters)
    layout = s.client.declare_stream(BENCH_STREAM, count)
    s.used_streams.append(BENCH_STREAM)
    payload = {"run": s.run_id}
    started = time.perf_counter()
    for start in range(0, n, 2000):
        s.client.publish_many(BENCH_STREAM, [(payload, None)] * min(2000, n - start))
        s.progress("publishing", min(n, start + 2000), n)
    published = time.perf_counter() - started
    idle = s.queues(1)
    before = _per_master(s)
    workers = s.workers(idle, settings.workers, streams=f"{BENCH_STREAM}:{BENCH_GROUP}")
    try:
        launched = time.perf_counter()
        workers.start()
        deadline = time.monotonic() + settings.timeout
        left, first = n, None  # timed from the first reading that shows progress
        while left:
            if time.monotonic() > deadline:
                raise ClusterqError(f"stream: {left} of {n} events not handled in time")
            left = _unhandled(s, layout.partitions, n)
            if first is None and left < n:
                first = (time.perf_counter(), n - left)
            elif first is None:
                workers.check_running()
            s.progress("stream consume", n - left, n)
            time.sleep(0.005)
        assert first is not None
        seconds, counted, timed = time.perf_counter() - first[0], n - first[1], ""
        if counted <= 0:  # all handled between two readings: time from the launch
            seconds, counted = time.perf_counter() - launched, n
            timed = " (timed from the workers' launch: a short run)"
        after = _per_master(s)
    finally:
        workers.stop()
    s.drop(idle)
    spent = {a: (after[a][0] - before[a][0], after[a][1] - before[a][1]) for a in after}
    return [
        BenchRow("stream publish_many", n, round(published, 3), n / published),
        BenchRow(
            f"stream consume ({count} partitions)",
            n,
            round(seconds, 3),
            counted / seconds if seconds > 0 else None,
            note=f"{settings.workers} worker process(es), one group{timed}; "
            + _spent_note(spent, n),
            extra={"partitions": count, "per_master": _spent_extra(spent, n)},
        ),
    ]


def _unhandled(s: Session, partitions: Sequence[str], n: int) -> int:
    """Events the benchmark group has not handled yet (n until the group exists)."""
    left = 0
    for partition in partitions:
        key = s.keys.stream(partition).events
        groups = s.backend.execute_key(key, functools.partial(_groups, key=key))
        found = [g for g in groups if g["name"] in (BENCH_GROUP, BENCH_GROUP.encode())]
        if not found or found[0].get("lag") is None:
            return n
        left += int(found[0]["lag"]) + int(found[0]["pending"])
    return left


def _groups(client: Any, key: str) -> Any:
    return client.xinfo_groups(key)


def _spent_note(spent: dict[str, tuple[int, float]], n: int) -> str:
    return "per master, commands / CPU ms per 1k: " + ", ".join(
        f"{addr} {c * 1000 / n:.0f} / {cpu * 1e6 / n:.0f}"
        for addr, (c, cpu) in sorted(spent.items())
    )


def _spent_extra(spent: dict[str, tuple[int, float]], n: int) -> dict[str, dict[str, float]]:
    return {
        addr: {"commands_per_1k": round(c * 1000 / n, 1), "cpu_ms_per_1k": round(cpu * 1e6 / n, 1)}
        for addr, (c, cpu) in sorted(spent.items())
    }


def bench_partitioned(s: Session) -> list[BenchRow]:
    """The e2e drain (noop handlers) of one plain queue, then of one partitioned queue
    (``queues`` partitions, default 4 per master), with the commands and CPU each
    master spent per 1k tasks."""
    settings = s.settings
    n = settings.tasks
    masters = len(s.backend.topology.masters)
    count = settings.queues or 4 * masters
    plain = s.queues(1)
    logical = f"bench-{s.run_id}-part"
    layout = s.client.declare_queue(logical, count)
    s.used_layouts.append(logical)
    s.used_queues.extend(layout.members)
    rows = []
    for label, target, members, partitions in (
        ("plain queue", plain[0], plain, 1),
        (f"partitioned queue ({count} partitions)", logical, list(layout.members), count),
    ):
        payload = {"run": s.run_id}
        for start in range(0, n, 2000):
            s.client.enqueue_many([(NOOP_TYPE, payload)] * min(2000, n - start), queue=target)
            s.progress(f"filling the {label}", min(n, start + 2000), n)
        before = _per_master(s)
        seconds, first_count = drain(s, [target], members, n, f"e2e {label}")
        after = _per_master(s)
        rate = (n - first_count) / seconds if seconds > 0 else None
        spent = {a: (after[a][0] - before[a][0], after[a][1] - before[a][1]) for a in after}
        rows.append(
            BenchRow(
                f"e2e {label}",
                n,
                round(seconds, 3),
                rate,
                note=f"{settings.workers} worker process(es) x concurrency "
                f"{settings.concurrency}; " + _spent_note(spent, n),
                extra={
                    "workers": settings.workers,
                    "concurrency": settings.concurrency,
                    "partitions": partitions,
                    "masters": masters,
                    "per_master": _spent_extra(spent, n),
                },
            )
        )
    s.drop(plain)
    return rows


#: Seconds the idle scenario lets the workers settle (plus one per 500 queues: the first
#: dequeue and sweep of each, the subscriptions), then measures.
IDLE_SETTLE = 1.0
IDLE_WINDOW = 2.0
#: The two ways an idle worker waits, measured in the same run: (label, worker options).
IDLE_MODES = (("wake-ups", ()), ("polling", ("--no-wakeups",)))


def _connections(s: Session) -> dict[str, int]:
    """Clients connected to each master now (INFO clients)."""
    return {
        m.addr: int(s.backend.node(m.address).info("clients")["connected_clients"])
        for m in s.backend.topology.masters
    }


def bench_idle(s: Session) -> list[BenchRow]:
    """``queues`` idle queues (default 100) served by the worker processes, first with
    wake-ups, then polling (``--no-wakeups``, the baseline): what the masters receive
    per second and the CPU they spend, the connections per master and the workers' CPU
    while nothing happens; then the pickup latency of tasks sent one at a time into
    random ones of those queues."""
    n = s.settings.queues or 100
    queues = s.queues(n)
    rows: list[BenchRow] = []
    try:
        for label, extra in IDLE_MODES:
            rows += _idle_round(s, queues, label, extra)
    finally:
        s.drop(queues)
    return rows


def _idle_round(s: Session, queues: list[str], label: str, extra: Sequence[str]) -> list[BenchRow]:
    settings = s.settings
    n = len(queues)
    connected = _connections(s)
    workers = s.workers(queues, settings.workers, extra=extra)
    try:
        s.start_workers(workers)
        time.sleep(IDLE_SETTLE + n / 500)  # every fetch loop at its idle rhythm
        before, cpu_before, started = _per_master(s), workers.cpu_seconds(), time.perf_counter()
        time.sleep(IDLE_WINDOW)
        after, cpu_after = _per_master(s), workers.cpu_seconds()
        seconds = time.perf_counter() - started
        connections = {a: c - connected.get(a, 0) for a, c in _connections(s).items()}
        count = max(1, settings.samples)
        what = f"pickup, 1 of {n} idle queues ({label})"
        samples = s.pickups(queues, count, warmup=5, what=what)
    finally:
        workers.stop()
    rate = sum(after[a][0] - before[a][0] for a in after) / seconds
    server_ms = 1000 * sum(after[a][1] - before[a][1] for a in after) / seconds
    cpu = None
    if cpu_before is not None and cpu_after is not None:
        cpu = round(100 * (cpu_after - cpu_before) / seconds / settings.workers, 1)
    p50, p99 = ms_percentiles(samples)
    per_master = {a: connections[a] for a in sorted(connections)}
    per_queue = rate / n / settings.workers
    return [
        BenchRow(
            f"idle, {n} queues, {label}",
            n,
            round(seconds, 3),
            None,
            note=f"{settings.workers} worker process(es): {rate:,.0f} commands/s on the "
            f"masters ({per_queue:.2f} per queue and worker; commands run by scripts "
            f"count), masters' CPU {server_ms:.1f} ms/s, connections per master "
            f"{per_master}, worker CPU {cpu if cpu is not None else '?'}% of a core "
            "(per process)",
            extra={
                "mode": label,
                "commands_per_s": round(rate, 1),
                "commands_per_s_per_queue": round(per_queue, 3),
                "masters_cpu_ms_per_s": round(server_ms, 2),
                "connections_per_master": per_master,
                "worker_cpu_percent": cpu,
            },
        ),
        BenchRow(
            f"pickup latency, 1 of {n} idle queues, {label}",
            count,
            0.0,
            None,
            p50,
            p99,
            note="enqueue to handler start, one task at a time into a random idle queue",
            extra={"max_ms": round(max(samples) * 1000, 3)},
        ),
    ]
