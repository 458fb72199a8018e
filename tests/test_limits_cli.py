"""Flow control on the operator's surface, driven as a person would: ``clusterq queue
limit`` (set, show, replace, clear, bad input), the Limits column of ``queue ls``, the
limiter's state in ``queue inspect`` (a hold, tasks running against the cap), foreign
data in a queue's limits key named as that row's error; and the metrics: a worker's
``clusterq_worker_held_back_total`` by reason, ``clusterq_worker_rate_limited_total``,
summed by a supervisor's collector, and the declared limits in the cluster-wide
collector. The CLI runs as the installed script, against the standalone server and the
cluster."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import urllib.request
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from clusterq import Client, Inspector, RateLimited, Router, Task
from clusterq.limits import Limits
from clusterq.ops.metrics import ClusterCollector, SummedCollector, WorkerMetrics
from clusterq.tools import servers
from tests.helpers import await_for, running_worker


def _run(bin_: str, url: str, prefix: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [bin_, "--url", url, "--prefix", prefix, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def _ok(bin_: str, url: str, prefix: str, *args: str) -> str:
    done = _run(bin_, url, prefix, *args)
    assert done.returncode == 0, (args, done.stdout, done.stderr)
    return done.stdout


def _json(bin_: str, url: str, prefix: str, *args: str) -> Any:
    return json.loads(_ok(bin_, url, prefix, *args, "--json"))


def _one_line_error(done: subprocess.CompletedProcess[str], *fragments: str) -> str:
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr and not done.stdout
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def _ls_line(output: str, queue: str) -> str:
    """The ``queue ls`` table's line of ``queue`` (its name in the first cell)."""
    for line in output.splitlines():
        cells = [c.strip() for c in line.split("│")]
        if len(cells) > 2 and cells[1] == queue:
            return line
    raise AssertionError(f"no line for {queue!r} in:\n{output}")


LIMITED = {"rate": "200/s", "rate_per_second": 200.0, "burst": 20, "concurrency": 5}


def test_set_show_replace_clear(url: str, prefix: str, clusterq_bin: str) -> None:
    run = lambda *a: _ok(clusterq_bin, url, prefix, *a)  # noqa: E731
    as_json = lambda *a: _json(clusterq_bin, url, prefix, *a)  # noqa: E731
    with Client(url, prefix=prefix) as client:
        client.enqueue("x", queue="api")
        client.enqueue("x", queue="plain")

        assert run("queue", "limit", "api").strip() == "queue api: no limits"
        assert as_json("queue", "limit", "api") == {"queue": "api", "limits": None}

        said = run("queue", "limit", "api", "--rate", "200/s", "--burst", "20",
                   "--concurrency", "5")  # fmt: skip
        assert said.strip() == "queue api: 200/s (burst 20), 5 at once"
        assert client.limits("api") == Limits.of("200/s", 20, 5)  # what the API reads
        assert as_json("queue", "limit", "api") == {"queue": "api", "limits": LIMITED}
        assert run("queue", "limit", "api").strip() == "queue api: 200/s (burst 20), 5 at once"

        listed = run("queue", "ls")
        assert "Limits" in listed
        assert "200/s b20 · max 5" in _ls_line(listed, "api")
        assert _ls_line(listed, "plain").rstrip(" │").endswith("-")
        rows = {r["queue"]: r for r in as_json("queue", "ls")}
        assert rows["api"]["limits"] == LIMITED and rows["plain"]["limits"] is None
        assert rows["api"]["concurrency_cap"] == 5 and rows["api"]["hold_until"] is None

        # options not given are removed, as set_limits does
        replaced = as_json("queue", "limit", "api", "--rate", "10/s")
        assert replaced["limits"] == {
            "rate": "10/s", "rate_per_second": 10.0, "burst": 1, "concurrency": None,
        }  # fmt: skip
        assert client.limits("api") == Limits.of("10/s")
        only_cap = run("queue", "limit", "api", "--concurrency", "3")
        assert only_cap.strip() == "queue api: 3 at once"
        assert "max 3" in _ls_line(run("queue", "ls"), "api")

        assert run("queue", "limit", "api", "--clear").strip() == "queue api: no limits"
        assert client.limits("api") is None
        assert as_json("queue", "limit", "api")["limits"] is None
        assert as_json("queue", "ls")[0]["limits"] is None


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--rate", "fast"), "invalid rate 'fast'"),
        (("--rate", "0/s"), "invalid rate '0/s'"),
        (("--rate", ""), "invalid rate ''"),
        (("--rate", "5/s", "--burst", "0"), "invalid burst 0"),
        (("--rate", "5/s", "--burst", "x"), "invalid burst 'x'"),
        (("--concurrency", "-1"), "invalid concurrency -1"),
        (("--concurrency", "2.5"), "invalid concurrency '2.5'"),
        (("--burst", "5"), "a burst needs a rate"),
        (("--clear", "--rate", "1/s"), "--clear"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(
    url: str, prefix: str, clusterq_bin: str, args: tuple[str, ...], fragment: str
) -> None:
    with Client(url, prefix=prefix) as client:
        client.set_limits("api", rate="7/s", concurrency=3)
        _one_line_error(_run(clusterq_bin, url, prefix, "queue", "limit", "api", *args), fragment)
        assert client.limits("api") == Limits.of("7/s", None, 3)
    bad_name = _run(clusterq_bin, url, prefix, "queue", "limit", "a{b}", "--rate", "1/s")
    _one_line_error(bad_name, "a{b}")


def test_a_partitioned_queue_shows_its_declaration(
    url: str, prefix: str, clusterq_bin: str
) -> None:
    run = lambda *a: _ok(clusterq_bin, url, prefix, *a)  # noqa: E731
    as_json = lambda *a: _json(clusterq_bin, url, prefix, *a)  # noqa: E731
    run("queue", "create", "pq", "--partitions", "4")
    with Client(url, prefix=prefix) as client:
        client.enqueue_many([("x", i) for i in range(8)], queue="pq")
        layout = client.layout("pq")
        assert layout is not None
        members = layout.members
    said = run("queue", "limit", "pq", "--rate", "100/s", "--concurrency", "10")
    assert said.strip() == "queue pq: 100/s (burst 10), 10 at once"
    listed = run("queue", "ls")
    assert "100/s b10 · max 10" in _ls_line(listed, "pq (4 partitions)")
    rows = {r["queue"]: r for r in as_json("queue", "ls")}
    declared = {"rate": "100/s", "rate_per_second": 100.0, "burst": 10, "concurrency": 10}
    assert rows["pq"]["partitions"] == 4 and rows["pq"]["limits"] == declared
    # each current partition enforces its share; together the declared cap
    assert sum(rows[m]["concurrency_cap"] for m in layout.queues) == 10
    assert all(rows[m]["limits"] == declared for m in members)
    detail = as_json("queue", "inspect", "pq")
    assert detail["limits"] == declared
    assert detail["limiter"]["concurrency_cap"] == 10
    assert detail["limiter"]["queues"] == len(members)
    shown = run("queue", "inspect", "pq")
    assert f"0 of 10 (over {len(members)} queues)" in shown
    # a cap the partitions cannot share is refused, the declaration left as it was
    refused = _run(clusterq_bin, url, prefix, "queue", "limit", "pq", "--concurrency", "2")
    _one_line_error(refused, "cannot be shared")
    assert as_json("queue", "limit", "pq")["limits"] == declared


@pytest.mark.parametrize("kind", ["string", "spec", "hold"])
def test_foreign_data_in_the_limits_key_is_the_rows_error(
    url: str, prefix: str, clusterq_bin: str, kind: str
) -> None:
    with Client(url, prefix=prefix) as client:
        client.enqueue("x", queue="victim")
        client.enqueue("x", queue="bystander")
        client.set_limits("bystander", concurrency=2)
        key = client.keys.queue("victim").limits
        writes = {
            "string": lambda c: c.set(key, "foreign"),
            "spec": lambda c: c.hset(key, "spec", "{not json"),
            "hold": lambda c: c.hset(key, mapping={"hold": "soon", "concurrency": "2"}),
        }
        client.backend.execute_key(key, writes[kind])
    listed = _ok(clusterq_bin, url, prefix, "queue", "ls")
    assert f"error: {key}" in _ls_line(listed, "victim")
    assert "max 2" in _ls_line(listed, "bystander")
    rows = {r["queue"]: r for r in _json(clusterq_bin, url, prefix, "queue", "ls")}
    assert rows["bystander"]["error"] is None
    error = rows["victim"]["error"]
    assert error and key in error and "\n" not in error
    expected = {"string": "WRONGTYPE", "spec": "'spec'", "hold": "'hold'"}[kind]
    assert expected in error
    inspected = _run(clusterq_bin, url, prefix, "queue", "inspect", "victim")
    _one_line_error(inspected, key)


# ---------------------------------------------------------------- a worker meets the limits


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return str(reply.read().decode())


def _held(samples: dict[Any, float], queue: str, reason: str) -> float:
    key = ("clusterq_worker_held_back_total", frozenset({("queue", queue), ("reason", reason)}))
    return samples.get(key, 0.0)


def test_inspect_and_metrics_show_the_limiter_at_work(
    url: str, prefix: str, clusterq_bin: str
) -> None:
    """Three queues, each held back for its own reason: ``capped`` (2 at once, its
    handlers wait), ``rated`` (1 per hour: the second task waits for a token) and
    ``held`` (a handler raised ``RateLimited(scope="queue")``)."""
    router = Router()
    release = asyncio.Event()
    started: list[str] = []

    @router.task("block")
    async def block(task: Task) -> None:
        started.append(task.id)
        await release.wait()

    @router.task("quick")
    async def quick(task: Task) -> None:
        return None

    @router.task("429")
    async def too_many(task: Task) -> None:
        raise RateLimited(300, scope="queue")

    metrics = WorkerMetrics()
    port = servers.find_free_ports(1, with_bus=False)
    server = metrics.serve(port)
    cli = lambda *a: asyncio.to_thread(_ok, clusterq_bin, url, prefix, *a)  # noqa: E731
    cli_json = lambda *a: asyncio.to_thread(_json, clusterq_bin, url, prefix, *a)  # noqa: E731

    async def scenario() -> None:
        with Client(url, prefix=prefix) as client:
            client.set_limits("capped", concurrency=2)
            client.set_limits("rated", rate="1/h")
            client.enqueue_many([("block", i) for i in range(5)], queue="capped")
            client.enqueue_many([("quick", i) for i in range(3)], queue="rated")
            client.enqueue("429", queue="held")
            queues = ["capped", "rated", "held"]
            async with running_worker(
                url, router, queues=queues, prefix=prefix, concurrency=10, metrics=metrics
            ) as worker:
                await await_for(lambda: worker.stats.rate_limited >= 1, 20, "the 429")
                client.enqueue("quick", queue="held")  # waits for the hold to end
                text = ""

                async def all_held_back() -> bool:
                    nonlocal text
                    text = await asyncio.to_thread(_scrape, port)
                    s = _samples(text)
                    return all(
                        _held(s, q, r) >= 1
                        for q, r in (("capped", "concurrency"), ("rated", "rate"), ("held", "hold"))
                    )

                await await_for(all_held_back, 30, "each queue held back for its reason")
                samples = _samples(text)
                assert samples[("clusterq_worker_rate_limited_total", frozenset())] >= 1
                assert _held(samples, "capped", "rate") == _held(samples, "rated", "hold") == 0
                await await_for(lambda: len(started) >= 2, 10, "two handlers started")
                assert len(started) == 2  # the cap, across this worker

                capped = await cli_json("queue", "inspect", "capped")
                assert capped["limiter"]["active"] == 2
                assert capped["limiter"]["concurrency_cap"] == 2
                assert capped["limiter"]["hold_until"] is None
                assert "2 of 2" in await cli("queue", "inspect", "capped")
                held = await cli_json("queue", "inspect", "held")
                assert held["limits"] is None and held["limiter"]["held_queues"] == 1
                now = time.time()
                assert now + 200 < held["limiter"]["hold_until"] <= now + 301
                shown = await cli("queue", "inspect", "held")
                assert "Held back" in shown and "until" in shown
                rated = await cli("queue", "inspect", "rated")
                assert "1/h (burst 1)" in rated and "Held back" in rated and "until" not in rated

                # a supervisor of --processes sums its processes' metrics
                twice = SummedCollector(lambda: [text, text], lambda: 2, {})
                registry = CollectorRegistry(auto_describe=False)
                registry.register(twice)
                summed = _samples(generate_latest(registry).decode())
                assert _held(summed, "capped", "concurrency") == 2 * _held(
                    samples, "capped", "concurrency"
                )
                limited = ("clusterq_worker_rate_limited_total", frozenset())
                assert summed[limited] == 2 * samples[limited]
                release.set()

    try:
        asyncio.run(scenario())
    finally:
        release.set()
        server.shutdown()


def test_the_cluster_collector_reports_the_declared_limits(url: str, prefix: str) -> None:
    with Client(url, prefix=prefix) as client:
        client.enqueue("x", queue="api")
        client.enqueue("x", queue="free")
        client.declare_queue("pq", 3)
        client.enqueue("x", queue="pq")
        client.set_limits("api", rate="5000/m", concurrency=7)
        client.set_limits("pq", concurrency=9)
    with Inspector(url, prefix=prefix) as inspector:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(ClusterCollector(inspector))
        samples = _samples(generate_latest(registry).decode())

    def series(name: str) -> dict[str, float]:
        return {dict(labels)["queue"]: v for (n, labels), v in samples.items() if n == name}

    assert series("clusterq_queue_limit_rate_per_second") == {"api": pytest.approx(5000 / 60)}
    # a partitioned queue once, on its own name, with what was declared
    assert series("clusterq_queue_limit_concurrency") == {"api": 7, "pq": 9}
