"""``clusterq bench purge``: what an operator's bulk action costs the master it runs on.

N pending tasks of two types, taking turns, in one queue; then a bulk delete of one type
(every other task: the walk steps over as many as it deletes), then a purge of the rest.
Meanwhile a thread PINGs that master on its own connection: its latency is what every
other client of the master waits through the bulk action's calls.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from clusterq.cluster.backend import Backend
from clusterq.ops.admin import Admin, BulkResult
from clusterq.slots import keyslot
from clusterq.tools.bench_handlers import NOOP_TYPE
from clusterq.tools.bench_report import BenchRow, ms_percentiles
from clusterq.tools.bench_session import Session

#: The prober's bounds: at most this many PINGs, for at most this long.
PING_MOST = 2_000_000
PING_SECONDS = 3600.0
OTHER_TYPE = f"{NOOP_TYPE}:other"


class Prober:
    """PINGs one master in a loop on a connection of its own, until stopped (or its
    bounds are reached), keeping each round trip's seconds."""

    def __init__(self, url: str, prefix: str, queue: str) -> None:
        self.backend = Backend(url, prefix=prefix)
        self.node: Any = self.backend.node(self.backend.master_addr(keyslot(queue)))
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-ping", daemon=True)

    def _run(self) -> None:
        started = time.monotonic()
        for _ in range(PING_MOST):
            if self._stop.is_set() or time.monotonic() - started > PING_SECONDS:
                return
            began = time.perf_counter()
            self.node.fast("PING")
            self.samples.append(time.perf_counter() - began)

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.backend.close()


def _row(name: str, n: int, seconds: float, pings: list[float], note: str) -> BenchRow:
    p50, p99 = ms_percentiles(pings)
    most = f"{max(pings) * 1000:.2f}" if pings else "-"
    return BenchRow(
        name,
        n,
        round(seconds, 3),
        n / seconds if seconds > 0 else None,
        p50,
        p99,
        note=f"{note} (p50/p99: PING of that master meanwhile; max {most} ms)",
        extra={
            "ping_p50_ms": p50,
            "ping_p99_ms": p99,
            "ping_max_ms": round(max(pings) * 1000, 3) if pings else None,
            "pings": len(pings),
        },
    )


def _measured(
    s: Session, queue: str, name: str, note: str, action: Callable[[Any], BulkResult]
) -> BenchRow:
    """Run ``action(progress)`` with the prober on; its row."""
    with Prober(s.settings.url, s.settings.prefix, queue) as prober:
        began = time.perf_counter()
        result = action(lambda done, total: s.progress(f"purge: {name}", done, total))
        took = time.perf_counter() - began
        pings = list(prober.samples)
    return _row(name, result.done, took, pings, note)


def bench_purge(s: Session) -> list[BenchRow]:
    (queue,) = s.queues(1)
    n = s.settings.tasks
    half = n // 2
    for start in range(0, n, 2000):  # two types, taking turns
        size = min(2000, n - start)
        items = [(NOOP_TYPE if (start + i) % 2 else OTHER_TYPE, None) for i in range(size)]
        s.client.enqueue_many(items, queue=queue)
        s.progress("purge: filling the queue", start + size, n)
    with Admin(s.settings.url, prefix=s.settings.prefix, timeout=30.0) as admin:
        by_type = _measured(
            s,
            queue,
            "bulk delete by type",
            f"every other task of {n} pending (the walk steps over the others)",
            lambda progress: admin.act_all(
                "delete", queue, "pending", task_type=OTHER_TYPE, progress=progress
            ),
        )
        rest = _measured(
            s,
            queue,
            "purge pending",
            f"the {n - half} left",
            lambda progress: admin.purge(queue, "pending", progress=progress),
        )
    s.drop([queue])
    return [by_type, rest]
