"""What the benchmark scenarios share: fresh queue names spread over the masters, the
client, filling queues, starting worker processes, and deleting it all afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import secrets
import time
from collections.abc import Sequence
from typing import Any

from clusterq.client import Client
from clusterq.cluster import topology as topo
from clusterq.cluster.abackend import AsyncBackend
from clusterq.cluster.backend import Backend
from clusterq.errors import ClusterqError
from clusterq.keys import KeySchema
from clusterq.slots import keyslot
from clusterq.tools.bench_handlers import LATENCY_TYPE
from clusterq.tools.bench_report import BenchSettings, Progress
from clusterq.tools.workerprocs import WorkerProcesses


def spread_queues(topology: topo.Topology, base: str, count: int) -> list[str]:
    """``count`` queue names ``base-<n>``, taking the masters in turn (one queue per
    master when ``count`` is the number of masters)."""
    masters = sorted(m.id for m in topology.masters)
    if not masters:
        raise ClusterqError("no master owns any slot")
    names: list[str] = []
    for n in range(100_000):
        if len(names) == count:
            return names
        name = f"{base}-{n}"
        owner = topology.master_for_slot(keyslot(name))
        if owner is not None and owner.id == masters[len(names) % len(masters)]:
            names.append(name)
    raise ClusterqError(f"could not place {count} queues on the masters")


class Session:
    """Connections and bookkeeping shared by the scenarios of one run."""

    def __init__(self, settings: BenchSettings, progress: Progress) -> None:
        self.settings = settings
        self.progress = progress
        self.run_id = secrets.token_hex(4)
        self.client = Client(settings.url, prefix=settings.prefix)
        self.backend: Backend = self.client.backend
        self.keys = KeySchema(settings.prefix)
        self.used_queues: list[str] = []
        self.used_layouts: list[str] = []
        self.used_streams: list[str] = []
        self.rng = random.Random(settings.seed)
        self._n = 0

    def queues(self, count: int | None = None) -> list[str]:
        """Fresh queue names, one per master by default."""
        self._n += 1
        count = count or self.settings.queues or len(self.backend.topology.masters)
        names = spread_queues(self.backend.topology, f"bench-{self.run_id}-{self._n}", count)
        self.used_queues.extend(names)
        return names

    def drop(self, queues: Sequence[str]) -> None:
        """Delete everything the benchmark wrote for ``queues``."""
        for name in queues:
            qk = self.keys.queue(name)
            self.call(qk.pending, "DEL", *qk.all_keys(), *self.keys.bench(self.run_id, name))
        if queues:
            self.call(self.keys.queues, "SREM", self.keys.queues, *queues)

    def call(self, key: str, *command: Any) -> Any:
        """One command on the master of ``key``'s slot."""
        return self.backend.call(key, *command)

    def processed(self, queues: Sequence[str]) -> int:
        total = 0
        for name in queues:
            stats = self.keys.queue(name).stats
            total += int(self.call(stats, "HGET", stats, "processed") or 0)
        return total

    def fill(self, queues: Sequence[str], count: int, task_type: str) -> None:
        """Enqueue ``count`` tasks spread over ``queues`` (untimed)."""
        payload = {"run": self.run_id}
        step = 2000
        for start in range(0, count, step):
            n = min(step, count - start)
            queue = queues[(start // step) % len(queues)]
            self.client.enqueue_many([(task_type, payload)] * n, queue=queue)
            self.progress("filling queues", start + n, count)

    def pickups(self, queues: Sequence[str], count: int, *, warmup: int, what: str) -> list[float]:
        """Enqueue to handler start (s), one task at a time into a random one of
        ``queues`` (the bench handler pushes its latency beside the queue), after
        ``warmup`` unmeasured ones."""
        samples: list[float] = []
        for i in range(count + warmup):
            time.sleep(self.rng.uniform(0.005, 0.015))  # let the worker go idle again
            queue = self.rng.choice(queues)
            key = self.keys.bench(self.run_id, queue)[1]
            self.client.enqueue(LATENCY_TYPE, {"run": self.run_id, "t": time.time()}, queue=queue)
            reply = self.backend.execute_key(key, functools.partial(_pop, key=key))
            if reply is None:
                raise ClusterqError(
                    f"{what}: a task into {queue} was not picked up within {PICKUP_PATIENCE:g} s"
                )
            if i >= warmup:  # the first ones warm up connections and caches
                samples.append(float(reply[1]))
            self.progress(what, i + 1, count + warmup)
        return samples

    def workers(
        self, queues: Sequence[str], count: int, streams: str = "none", extra: Sequence[str] = ()
    ) -> WorkerProcesses:
        pinned = ["--cpus", self.settings.cpus] if self.settings.cpus else []
        return WorkerProcesses(
            streams=streams,
            extra=[*extra, *pinned],
            url=self.settings.url,
            prefix=self.settings.prefix,
            router="clusterq.tools.bench_handlers:router",
            queues=",".join(queues),
            count=count,
            concurrency=self.settings.concurrency,
            name=f"bench-{self.run_id}-{self._n}",
            processes=self.settings.processes,
        )

    def start_workers(self, workers: WorkerProcesses) -> None:
        workers.start()

        async def wait() -> None:
            backend = await AsyncBackend.connect(self.settings.url, prefix=self.settings.prefix)
            try:
                await workers.announced(backend, timeout=60)
            finally:
                await backend.aclose()

        asyncio.run(wait())

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.drop(self.used_queues)
        with contextlib.suppress(Exception):
            if self.used_layouts:
                self.call(self.keys.layouts, "HDEL", self.keys.layouts, *self.used_layouts)
        for stream in self.used_streams:
            with contextlib.suppress(Exception):
                layout = self.client.stream_layout(stream)
                for partition in layout.partitions:
                    sk = self.keys.stream(partition)
                    self.call(sk.events, "DEL", sk.events, sk.dead)
                self.call(self.keys.streams, "HDEL", self.keys.streams, stream)
        self.client.close()


#: Seconds a pickup may take before a scenario gives up (polling 1,000 idle queues on a
#: small machine takes seconds).
PICKUP_PATIENCE = 16.0


def _pop(client: Any, key: str) -> Any:
    # Blocks of 4 s: shorter than the connection's socket timeout (5 s).
    for _ in range(int(PICKUP_PATIENCE // 4) + 1):
        reply = client.blpop([key], timeout=4)
        if reply is not None:
            return reply
    return None


def drain(
    s: Session, serve: Sequence[str], members: Sequence[str], n: int, label: str
) -> tuple[float, int]:
    """Start the worker processes on ``serve`` and wait until ``members`` processed ``n``
    tasks; returns the seconds from the first task processed to the last, and how many
    were processed at that first reading (0, timed from the launch, when all were done
    by the first reading: a run too short to time otherwise)."""
    workers = s.workers(serve, s.settings.workers)
    try:
        launched = time.perf_counter()
        workers.start()
        deadline = time.monotonic() + s.settings.timeout
        first_at = None
        first_count = 0
        done = 0
        while done < n:
            if time.monotonic() > deadline:
                raise ClusterqError(f"{label}: only {done} of {n} tasks processed in time")
            done = s.processed(members)
            now = time.perf_counter()
            if first_at is None:
                if done:
                    first_at, first_count = now, done
                else:
                    workers.check_running()
            s.progress(label, done, n)
            time.sleep(0.005)
        assert first_at is not None
        if first_count >= n:
            return time.perf_counter() - launched, 0
        return time.perf_counter() - first_at, first_count
    finally:
        workers.stop()
