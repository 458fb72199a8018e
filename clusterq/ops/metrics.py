"""Prometheus metrics (the ``metrics`` extra: ``prometheus-client``).

Two sources:

- :class:`ClusterCollector`, served by ``clusterq metrics --port P``: read at each scrape
  through an :class:`~clusterq.ops.inspector.Inspector` — queue sizes per state, latency,
  processed/failed totals and paused, each labelled by queue and by the master that owns
  it; the limits declared on each queue (a partitioned queue: once, on its own name);
  live workers; the cluster map (nodes up, slots per node, failovers seen).
- :class:`WorkerMetrics`, served by ``clusterq worker --metrics-port P``: what only a
  worker knows — task durations per queue and type (a histogram), outcomes per type,
  handlers running, leases lost, loop restarts, dequeues its queues' limits held back
  (per queue or partition, by reason) and handlers that raised ``RateLimited``.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from clusterq.cluster.changes import MasterChanged, TopologyEvent
from clusterq.cluster.topology import Topology
from clusterq.errors import ConfigError
from clusterq.ops.inspector import Inspector

try:
    from prometheus_client import (
        CollectorRegistry,
        Counter,
        Gauge,
        Histogram,
        generate_latest,
        start_http_server,
    )
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
    from prometheus_client.parser import text_string_to_metric_families
except ImportError:  # pragma: no cover - the extra is not installed
    _MISSING = True
else:
    _MISSING = False

#: Task states reported per queue.
STATES = ("pending", "active", "scheduled", "retry", "archived", "completed")
#: Histogram buckets for task durations, seconds.
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


def require_prometheus() -> None:
    if _MISSING:
        raise ConfigError(
            "metrics need the prometheus-client library: pip install 'clusterq[metrics]'"
        )


class ClusterCollector:
    """Collects the cluster-wide metrics at each scrape (one pass over the queues)."""

    def __init__(self, inspector: Inspector) -> None:
        require_prometheus()
        self.inspector = inspector
        self.failovers = 0
        self._lock = threading.Lock()
        inspector.backend.subscribe(self._on_topology)

    def _on_topology(self, _new: Topology, events: list[TopologyEvent]) -> None:
        self.failovers += sum(1 for e in events if isinstance(e, MasterChanged))

    def describe(self) -> list[Any]:
        return []  # collected on demand; nothing to check at registration

    def collect(self) -> Iterator[Any]:
        with self._lock:  # one scrape at a time: the inspector's backend is not shared
            yield from self._collect()

    def _collect(self) -> Iterator[Any]:
        started = time.monotonic()
        topology = self.inspector.refresh()
        queues = self.inspector.queues()
        labels = ["queue", "node"]
        tasks = GaugeMetricFamily(
            "clusterq_queue_tasks", "Tasks in the queue by state.", labels=[*labels, "state"]
        )
        latency = GaugeMetricFamily(
            "clusterq_queue_latency_seconds",
            "Age of the oldest pending task (0 when none is pending).",
            labels=labels,
        )
        paused = GaugeMetricFamily("clusterq_queue_paused", "1 while paused.", labels=labels)
        up = GaugeMetricFamily(
            "clusterq_queue_up", "1 when the queue's counts could be read.", labels=labels
        )
        processed = CounterMetricFamily(
            "clusterq_queue_processed", "Tasks acknowledged (all workers).", labels=labels
        )
        failed = CounterMetricFamily(
            "clusterq_queue_failed", "Failed attempts (all workers).", labels=labels
        )
        rate = GaugeMetricFamily(
            "clusterq_queue_limit_rate_per_second",
            "The rate limit declared on the queue, tasks per second (a partitioned queue: on "
            "its own name, for all its partitions).",
            labels=labels,
        )
        cap = GaugeMetricFamily(
            "clusterq_queue_limit_concurrency",
            "The concurrency cap declared on the queue: tasks running at once across every "
            "worker (a partitioned queue: on its own name, for all its partitions).",
            labels=labels,
        )
        for q in queues:
            node = q.master or "none"
            up.add_metric([q.queue, node], 0 if q.error else 1)
            if q.error:
                continue
            for state in STATES:
                tasks.add_metric([q.queue, node, state], getattr(q, state))
            latency.add_metric([q.queue, node], q.latency)
            paused.add_metric([q.queue, node], 1 if q.paused else 0)
            processed.add_metric([q.queue, node], q.processed)
            failed.add_metric([q.queue, node], q.failed)
            if q.limits is not None and q.partition_of is None:
                if q.limits.rate is not None:
                    rate.add_metric([q.queue, node], q.limits.rate.per_second)
                if q.limits.concurrency is not None:
                    cap.add_metric([q.queue, node], q.limits.concurrency)
        yield from (tasks, latency, paused, up, processed, failed, rate, cap)
        yield from self._topology(topology)
        yield from self._workers()
        yield from self._streams()
        took = GaugeMetricFamily(
            "clusterq_scrape_duration_seconds", "How long this collection took."
        )
        took.add_metric([], time.monotonic() - started)
        yield took

    def _topology(self, topology: Topology) -> Iterator[Any]:
        slots = GaugeMetricFamily(
            "clusterq_node_slots", "Slots a master owns.", labels=["node", "node_id"]
        )
        nodes = GaugeMetricFamily(
            "clusterq_node_up",
            "1 when the map says the node is online.",
            labels=["node", "node_id", "role"],
        )
        for shard in topology.shards:
            slots.add_metric([shard.master.addr, shard.master.id], shard.slot_count)
        for node in topology.nodes:
            nodes.add_metric([node.addr, node.id, node.role], 1 if node.online else 0)
        masters = GaugeMetricFamily("clusterq_masters_up", "Masters that own slots and are online.")
        masters.add_metric([], sum(1 for m in topology.masters if m.online))
        covered = GaugeMetricFamily("clusterq_slots_covered", "Slots that have a master.")
        covered.add_metric([], topology.slots_covered)
        failovers = CounterMetricFamily(
            "clusterq_failovers", "Master changes this exporter has seen since it started."
        )
        failovers.add_metric([], self.failovers)
        yield from (slots, nodes, masters, covered, failovers)

    def _workers(self) -> Iterator[Any]:
        workers = self.inspector.workers()
        count = GaugeMetricFamily("clusterq_workers", "Live workers.")
        count.add_metric([], len(workers))
        running = GaugeMetricFamily(
            "clusterq_worker_running_tasks", "Handlers running.", labels=["worker"]
        )
        concurrency = GaugeMetricFamily(
            "clusterq_worker_concurrency", "Concurrency.", labels=["worker"]
        )
        for w in workers:
            running.add_metric([w.id], w.active)
            concurrency.add_metric([w.id], w.concurrency)
        yield from (count, running, concurrency)

    def _streams(self) -> Iterator[Any]:
        part = ["stream", "partition", "node"]
        length = GaugeMetricFamily(
            "clusterq_stream_length", "Events held per stream partition.", labels=part
        )
        dead = GaugeMetricFamily(
            "clusterq_stream_dead", "Dead-lettered events per stream partition.", labels=part
        )
        per_group = [*part, "group"]
        pending = GaugeMetricFamily(
            "clusterq_stream_pending", "Events delivered, not yet acked.", labels=per_group
        )
        lag = GaugeMetricFamily(
            "clusterq_stream_lag", "Events not yet delivered to the group.", labels=per_group
        )
        trimmed = GaugeMetricFamily(
            "clusterq_stream_trimmed_unread",
            "Events trimmed before the group read them (while the gap is visible).",
            labels=per_group,
        )
        for p in self.inspector.streams():
            where = [p.stream, str(p.partition), p.master or "-"]
            length.add_metric(where, p.length)
            dead.add_metric(where, p.dead)
            for g in p.groups:
                pending.add_metric([*where, g.group], g.pending)
                if g.lag is not None:
                    lag.add_metric([*where, g.group], g.lag)
                trimmed.add_metric([*where, g.group], g.trimmed_unread)
        yield from (length, dead, pending, lag, trimmed)


def serve_cluster_metrics(inspector: Inspector, port: int, host: str = "127.0.0.1") -> Any:
    """Serve :class:`ClusterCollector` on ``http://host:port/metrics`` (a daemon thread);
    returns the HTTP server (``shutdown()`` stops it)."""
    require_prometheus()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ClusterCollector(inspector))
    return _serve(port, host, registry)


class WorkerMetrics:
    """What one worker records for Prometheus: a registry of its own."""

    def __init__(self) -> None:
        require_prometheus()
        self.registry = CollectorRegistry(auto_describe=True)
        self.duration = Histogram(
            "clusterq_task_duration_seconds",
            "How long handlers ran, per queue and task type.",
            ["queue", "type"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.outcomes = Counter(
            "clusterq_worker_tasks",
            "Attempts by outcome (succeeded, failed).",
            ["queue", "type", "outcome"],
            registry=self.registry,
        )
        self.running = Gauge(
            "clusterq_worker_running", "Handlers running now.", registry=self.registry
        )
        self.leases_lost = Gauge(
            "clusterq_worker_leases_lost", "Leases this worker lost.", registry=self.registry
        )
        self.loop_restarts = Gauge(
            "clusterq_worker_loop_restarts",
            "Background loops that stopped and were started again.",
            registry=self.registry,
        )

        self.stream_events = Gauge(
            "clusterq_worker_stream_events",
            "Stream events by what happened: handled, failed (attempts), dead (dead-lettered), "
            "claimed (from other consumers), trimmed_unread (trimmed before the group read them).",
            ["what"],
            registry=self.registry,
        )

        self.wakeups = Gauge(
            "clusterq_worker_wakeups",
            "Idle queues' wake-ups: messages received, surveys made, subscriptions the server "
            "ended (failover, reshard) or lost with a connection.",
            ["what"],
            registry=self.registry,
        )

        self.flow = FlowCollector()
        self.registry.register(self.flow)

    def bind(self, worker: Any) -> None:
        """Read ``worker``'s (a :class:`~clusterq.worker.Worker`) counters when scraped."""
        self.flow.worker = worker
        self.running.set_function(lambda: worker.running)
        self.leases_lost.set_function(lambda: worker.stats.leases_lost)
        self.loop_restarts.set_function(lambda: worker.stats.loop_restarts)
        for what in ("handled", "failed", "dead", "claimed", "trimmed_unread"):
            gauge = self.stream_events.labels(what)
            gauge.set_function(functools.partial(getattr, worker.consumers.stats, what))
        for what in ("messages", "surveys", "dropped"):
            self.wakeups.labels(what).set_function(
                functools.partial(lambda w: getattr(worker.wakeups, w, 0), what)
            )

    def observe(self, queue: str, task_type: str, seconds: float, ok: bool) -> None:
        self.duration.labels(queue, task_type).observe(seconds)
        self.outcomes.labels(queue, task_type, "succeeded" if ok else "failed").inc()

    def serve(self, port: int, host: str = "127.0.0.1") -> Any:
        return _serve(port, host, self.registry)

    def exposition(self) -> str:
        """This worker's metrics as Prometheus text (a process of ``--processes N``
        sends it to its supervisor, which serves the sum)."""
        return generate_latest(self.registry).decode()


class FlowCollector:
    """A worker's flow control at each scrape: the dequeues its queues' limits held back
    (``clusterq_worker_held_back_total``, per queue or partition and reason: rate,
    concurrency, hold, group) and the handlers that raised ``RateLimited``
    (``clusterq_worker_rate_limited_total``)."""

    def __init__(self) -> None:
        #: The :class:`~clusterq.worker.Worker` read (None: nothing yet).
        self.worker: Any = None

    def describe(self) -> list[Any]:
        return []  # collected on demand

    def collect(self) -> Iterator[Any]:
        held = CounterMetricFamily(
            "clusterq_worker_held_back",
            "Dequeues that found tasks waiting but took none because of the queue's limits, "
            "per queue (or partition) and reason (rate, concurrency, hold).",
            labels=["queue", "reason"],
        )
        limited = CounterMetricFamily(
            "clusterq_worker_rate_limited",
            "Handlers that raised RateLimited (their tasks wait, no retry spent).",
        )
        worker = self.worker
        if worker is not None:
            # read in the HTTP server's thread: copies, each made in one step
            for q in list(getattr(worker, "_queues", {}).values()):
                for reason, count in sorted(dict(q.held_back).items()):
                    held.add_metric([q.name, reason], count)
            limited.add_metric([], worker.stats.rate_limited)
        else:
            limited.add_metric([], 0)
        yield from (held, limited)


class SummedCollector:
    """The metrics of several worker processes as one worker's: each sample summed
    over the processes (counters, gauges, histogram buckets, sums and counts add up;
    ``_created`` timestamps are left out), plus ``clusterq_worker_processes`` and
    ``clusterq_worker_process_replacements`` from the supervisor."""

    def __init__(
        self, texts: Callable[[], list[str]], processes: Callable[[], int], replaced: Any
    ) -> None:
        self.texts = texts
        self.processes = processes
        self.replaced = replaced

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        families: dict[str, Any] = {}
        sums: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
        for text in self.texts():
            for family in text_string_to_metric_families(text):
                families.setdefault(family.name, family)
                into = sums.setdefault(family.name, {})
                for sample in family.samples:
                    if sample.name.endswith("_created"):
                        continue
                    key = (sample.name, tuple(sorted(sample.labels.items())))
                    into[key] = into.get(key, 0.0) + sample.value
        for name, family in families.items():
            merged = Metric(name, family.documentation, family.type, family.unit)
            for (sample_name, labels), value in sums[name].items():
                merged.add_sample(sample_name, dict(labels), value)
            yield merged
        yield GaugeMetricFamily(
            "clusterq_worker_processes", "Worker processes running.", value=self.processes()
        )
        replaced = CounterMetricFamily(
            "clusterq_worker_process_replacements",
            "Worker processes replaced, by cause (max_tasks, memory, hard_timeout, died, killed).",
            labels=["cause"],
        )
        for cause, count in dict(self.replaced).items():
            replaced.add_metric([cause], count)
        yield replaced


def serve_summed(collector: SummedCollector, port: int, host: str = "127.0.0.1") -> Any:
    """Serve ``collector`` (a supervisor's ``--metrics-port``)."""
    require_prometheus()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return _serve(port, host, registry)


def _serve(port: int, host: str, registry: Any) -> Any:
    """The HTTP server of ``registry`` on ``host:port``; a port in use or a host that
    cannot be bound is a one-line :class:`ConfigError`."""
    try:
        server, _thread = start_http_server(port, addr=host, registry=registry)
    except (OSError, ValueError, UnicodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(f"cannot serve metrics on {host}:{port}: {reason}") from None
    return server
