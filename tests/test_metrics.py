"""Prometheus metrics, scraped over HTTP as Prometheus would: the cluster-wide exporter
(``clusterq metrics``, a real process) and a worker's own (``metrics=WorkerMetrics()``);
and the JSON log lines a log shipper reads."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import subprocess
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from clusterq import Client, Inspector, Router, SkipRetry, Task
from clusterq.logs import JsonFormatter
from clusterq.ops.metrics import WorkerMetrics
from clusterq.producer import TaskSpec
from clusterq.tools import servers
from clusterq.tools.devcluster import LocalServer
from tests.helpers import await_for, running_worker, wait_for

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def _value(samples: Samples, name: str, **labels: str) -> float:
    wanted = set(labels.items())
    found = [v for (n, ls), v in samples.items() if n == name and wanted <= ls]
    assert len(found) == 1, (name, labels, found)
    return found[0]


@pytest.fixture
def exporter(url: str, prefix: str, clusterq_bin: str) -> Iterator[int]:
    port = servers.find_free_ports(1, with_bus=False)
    proc = subprocess.Popen(
        [clusterq_bin, "--url", url, "--prefix", prefix, "metrics", "--port", str(port),
         "--duration", "120"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip

    def answers() -> bool:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        try:
            _scrape(port)
        except OSError:
            return False
        return True

    try:
        wait_for(answers, 30, "the exporter")
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_the_exporter_reports_what_the_queues_hold(url: str, prefix: str, exporter: int) -> None:
    with Client(url, prefix=prefix) as client:
        client.enqueue_many([("a", i) for i in range(7)], queue="images")
        client.enqueue_many(
            [TaskSpec("b", i, {"queue": "webhooks", "process_in": 600}) for i in range(3)]
        )
        client.declare_stream("orders", 2)
        client.publish_many("orders", [({"n": n}, "k") for n in range(5)])
        layout = client.stream_layout("orders")
        sk = client.keys.stream(layout.partitions[layout.pick("k")])
        client.backend.call(sk.events, "XGROUP", "CREATE", sk.events, "billing", "0")
    with Inspector(url, prefix=prefix) as inspector:
        images, webhooks = inspector.queue("images"), inspector.queue("webhooks")
        topology = inspector.topology
    samples = _scrape(exporter)
    tasks = "clusterq_queue_tasks"
    assert _value(samples, tasks, queue="images", state="pending", node=images.master) == 7
    assert _value(samples, tasks, queue="webhooks", state="scheduled", node=webhooks.master) == 3
    assert _value(samples, tasks, queue="webhooks", state="pending") == 0
    assert _value(samples, "clusterq_queue_latency_seconds", queue="images") >= 0
    assert _value(samples, "clusterq_queue_up", queue="images") == 1
    assert _value(samples, "clusterq_queue_processed_total", queue="images") == 0
    assert _value(samples, "clusterq_masters_up") == len(topology.masters)
    assert _value(samples, "clusterq_slots_covered") == 16384
    for shard in topology.shards:
        slots = _value(samples, "clusterq_node_slots", node=shard.master.addr)
        assert slots == shard.slot_count
    assert _value(samples, "clusterq_workers") == 0
    part = str(layout.pick("k"))
    assert _value(samples, "clusterq_stream_length", stream="orders", partition=part) == 5
    assert _value(samples, "clusterq_stream_lag", stream="orders", group="billing") == 5
    assert _value(samples, "clusterq_stream_pending", stream="orders", group="billing") == 0


def test_a_worker_serves_durations_and_outcomes_per_type(url: str, prefix: str) -> None:
    router = Router()

    @router.task("ok")
    async def ok(task: Task) -> None:
        return None

    @router.task("bad")
    async def bad(task: Task) -> None:
        raise SkipRetry("no")

    metrics = WorkerMetrics()
    port = servers.find_free_ports(1, with_bus=False)
    server = metrics.serve(port)

    async def scenario() -> None:
        with Client(url, prefix=prefix) as client:
            client.enqueue_many([("ok", i) for i in range(20)], queue="wm")
            client.enqueue_many([("bad", i) for i in range(2)], queue="wm")
            async with running_worker(
                url, router, queues=["wm"], prefix=prefix, metrics=metrics
            ) as worker:
                await await_for(
                    lambda: worker.stats.processed == 20 and worker.stats.failed == 2,
                    15,
                    "all attempts",
                )
                samples = await asyncio.to_thread(_scrape, port)
        count = "clusterq_task_duration_seconds_count"
        assert _value(samples, count, queue="wm", type="ok") == 20
        assert _value(samples, count, queue="wm", type="bad") == 2
        outcomes = "clusterq_worker_tasks_total"
        assert _value(samples, outcomes, queue="wm", type="ok", outcome="succeeded") == 20
        assert _value(samples, outcomes, queue="wm", type="bad", outcome="failed") == 2
        assert _value(samples, "clusterq_worker_running") == 0

    try:
        asyncio.run(scenario())
    finally:
        server.shutdown()


def test_json_logs_carry_the_worker_events(url: str, prefix: str) -> None:
    """A lease recovered by the worker's sweep is one JSON line with an ``event``."""
    from tests.helpers import write_raw_records

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("clusterq")
    logger.addHandler(handler)
    router = Router()

    @router.task("t")
    async def t(task: Task) -> None:
        return None

    record = b'{"t":"t","mr":3,"e":1}\nnull'
    write_raw_records(url, prefix, "logs", {"orphan-1": record}, active=True)

    async def scenario() -> None:
        async with running_worker(url, router, queues=["logs"], prefix=prefix) as worker:
            await await_for(lambda: worker.stats.recovered == 1, 10, "the recovery")

    try:
        asyncio.run(scenario())
    finally:
        logger.removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    recovered = [line for line in lines if line.get("event", {}).get("event") == "lease_recovered"]
    assert recovered and recovered[0]["event"]["task"] == "orphan-1"
    assert recovered[0]["level"] == "WARNING" and recovered[0]["logger"] == "clusterq.worker"


def test_json_formatter_keeps_the_traceback() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = logging.LogRecord(
            "clusterq.worker", logging.ERROR, __file__, 1, "task %s failed", ("x",), sys.exc_info()
        )
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "task x failed"
    assert line["exception"]["type"] == "ValueError" and "boom" in line["exception"]["traceback"]


def test_the_grafana_example_uses_only_metrics_clusterq_serves(
    standalone: LocalServer, prefix: str
) -> None:
    """Every series the example dashboard queries is one clusterq exposes: the names are
    read from what the collectors themselves expose (the exporter's collector on a real
    server, a worker's registry), each as its type makes it (a counter ``_total``, a
    histogram ``_bucket``/``_count``/``_sum``), so a rename or a change of type breaks
    this test."""
    import re
    from pathlib import Path

    from prometheus_client import CollectorRegistry, generate_latest

    from clusterq.ops.metrics import ClusterCollector

    dashboard = json.loads(
        (Path(__file__).parents[1] / "examples/grafana/clusterq-dashboard.json").read_text()
    )
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {name for e in exprs for name in re.findall(r"clusterq_[a-z_]+", e)}
    assert used, "the dashboard queries no clusterq series"

    registry = CollectorRegistry(auto_describe=False)
    with Inspector(standalone.seed_url, prefix=prefix) as inspector:
        registry.register(ClusterCollector(inspector))
        text = generate_latest(registry).decode()
    text += generate_latest(WorkerMetrics().registry).decode()
    series = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}
    exposed = {
        family.name + suffix
        for family in text_string_to_metric_families(text)
        for suffix in series.get(family.type, ("",))
    }
    assert used <= exposed, f"not exposed: {sorted(used - exposed)}"
