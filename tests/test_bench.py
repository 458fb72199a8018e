"""`clusterq bench`: every scenario runs on both targets, cleans up after itself, and
reports figures that hang together. No timing is asserted."""

from __future__ import annotations

import json

import pytest
import redis
from click.testing import CliRunner

from clusterq.cli import main
from clusterq.cluster import topology as topo
from clusterq.errors import ConfigError
from clusterq.slots import keyslot
from clusterq.tools.bench import run_bench, spread_queues
from clusterq.tools.bench_report import (
    SCENARIOS,
    BenchSettings,
    Work,
    parse_benchmark_csv,
    percentile,
)
from clusterq.tools.devcluster import LocalCluster


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([3.0], 99) == 3.0
    assert percentile([], 50) == 0.0


def test_parse_redis_benchmark_csv() -> None:
    text = (
        '"test","rps","avg_latency_ms","min_latency_ms"\n'
        '"PING_INLINE","81300.81","0.321","0.080"\n'
        '"PING_MBULK","85034.02","0.306","0.072"\n'
    )
    assert parse_benchmark_csv(text) == 85034.02
    with pytest.raises(ValueError, match="PING_MBULK"):
        parse_benchmark_csv("garbage")


def test_spread_queues_puts_one_queue_on_each_master(cluster: LocalCluster) -> None:
    client = redis.Redis(port=cluster.ports[0])
    try:
        topology = topo.fetch(client, "cluster", ("127.0.0.1", cluster.ports[0]))
    finally:
        client.close()
    names = spread_queues(topology, "bench-x", 3)
    owners = {topology.master_for_slot(keyslot(name)).id for name in names}  # type: ignore[union-attr]
    assert len(names) == 3 and len(owners) == 3


def _leftovers(url: str, prefix: str) -> list[bytes]:
    """Keys under ``prefix`` anywhere on the target (every master)."""
    from clusterq.cluster.backend import Backend

    found: list[bytes] = []
    with Backend(url) as backend:
        for master in backend.topology.masters:
            found += list(backend.node(master.address).scan_iter(match=f"{prefix}:*"))
    return found


def test_every_scenario_runs_and_cleans_up(url: str, prefix: str) -> None:
    settings = BenchSettings(
        url=url, prefix=prefix, tasks=300, samples=15, rate=400.0, concurrency=10, seed=1
    )
    seen: list[str] = []
    report = run_bench(settings, SCENARIOS, lambda label, _done, _total: seen.append(label))

    rows = {row.scenario: row for row in report.rows}
    assert {"enqueue", "enqueue-many", "e2e noop", "memory"} <= rows.keys()
    assert {"pickup latency, idle", "pickup latency, load"} <= rows.keys()
    for name in ("enqueue", "enqueue-many", "e2e noop"):
        row = rows[name]
        assert row.tasks == 300 and row.rate is not None and row.rate > 0, row
    assert 0 < rows["enqueue"].p50_ms <= rows["enqueue"].p99_ms  # type: ignore[operator]
    idle = rows["pickup latency, idle"]
    assert idle.tasks == 15 and idle.p50_ms is not None and 0 < idle.p50_ms <= idle.p99_ms  # type: ignore[operator]
    assert rows["pickup latency, load"].tasks == 300
    assert rows["memory"].extra["bytes_per_task"] > 0
    if report.mode == "cluster":
        assert "enqueue durability=replica" in rows
        assert rows["enqueue durability=replica"].extra["added_ms_per_call"] is not None
        assert "3 queue(s) on 3 master(s)" in rows["e2e noop"].note
    else:  # the session's standalone server has no replica
        assert rows["durability"].note.startswith("skipped")
    if report.baseline is not None:
        assert report.baseline.unpipelined > 0 and report.baseline.pipelined > 0
        assert rows["enqueue"].vs_baseline is not None
    else:
        assert any("redis-benchmark" in note for note in report.notes)
    assert "e2e" in seen and "enqueue" in seen
    plain = rows["e2e plain queue"]
    (part,) = (r for name, r in rows.items() if name.startswith("e2e partitioned queue"))
    assert plain.rate and part.rate and part.tasks == 300
    if report.mode == "cluster":
        # the plain queue's work lands on one master; the partitions' on all three
        shares = {}
        for row in (plain, part):
            spent = {a: m["commands_per_1k"] for a, m in row.extra["per_master"].items()}
            shares[row.scenario] = sorted(c / sum(spent.values()) for c in spent.values())
        assert shares["e2e plain queue"][-1] > 0.5
        assert part.extra["partitions"] == 12 and shares[part.scenario][0] > 0.2
    consumed = next(r for name, r in rows.items() if name.startswith("stream consume"))
    assert consumed.tasks == 300 and consumed.rate and rows["stream publish_many"].rate
    if report.mode == "cluster":
        assert consumed.extra["partitions"] == 6
        assert all(m["commands_per_1k"] > 0 for m in consumed.extra["per_master"].values())
    woken, polling = rows["idle, 100 queues, wake-ups"], rows["idle, 100 queues, polling"]
    for idling in (woken, polling):
        assert idling.extra["commands_per_s"] > 0 and idling.extra["connections_per_master"]
    # Polling sends a blocking command per queue every poll_interval; wake-ups a survey.
    assert woken.extra["commands_per_s"] < polling.extra["commands_per_s"] / 5
    for mode in ("wake-ups", "polling"):
        # every sample asked for was picked up, and its figures hang together (with no
        # samples, or figures mixed up, p50 is 0 or above p99; p99 of 15 is the largest)
        pickup = rows[f"pickup latency, 1 of 100 idle queues, {mode}"]
        assert pickup.tasks == 15 and pickup.p50_ms is not None and pickup.p99_ms is not None
        assert 0 < pickup.p50_ms <= pickup.p99_ms == pickup.extra["max_ms"], pickup
    assert _leftovers(url, prefix) == []


@pytest.mark.parametrize("work", ["incr", "incr-redis-py"])
def test_e2e_with_incr_counts_every_task(url: str, prefix: str, work: Work) -> None:
    settings = BenchSettings(
        url=url, prefix=prefix, tasks=400, workers=2, work=work, baseline=False
    )
    (row,) = run_bench(settings, ["e2e"]).rows  # raises unless the handlers counted 400
    assert row.scenario == f"e2e {work}" and row.rate is not None and row.rate > 0
    assert row.extra["workers"] == 2 and row.extra["per_process"] > 0
    assert _leftovers(url, prefix) == []


def test_bad_settings_are_refused(standalone: object, prefix: str) -> None:
    url = standalone.seed_url  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="unknown scenario"):
        run_bench(BenchSettings(url=url, prefix=prefix), ["fastest"])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="at least 1"):
        run_bench(BenchSettings(url=url, prefix=prefix, tasks=0), ["enqueue"])


def test_cli_bench_json(url: str, prefix: str) -> None:
    result = CliRunner().invoke(
        main,
        [
            *("--url", url, "--prefix", prefix, "bench", "enqueue", "enqueue-many", "memory"),
            *("--tasks", "200", "--batch", "50", "--json", "--no-baseline"),
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [row["scenario"] for row in data["rows"]] == ["enqueue", "enqueue-many", "memory"]
    assert data["rows"][1]["note"].startswith("50 tasks per call")
    assert data["baseline"] is None
    assert data["mode"] in ("standalone", "cluster")


def test_cli_bench_table_and_errors(standalone: object, prefix: str, dead_port: int) -> None:
    url = standalone.seed_url  # type: ignore[attr-defined]
    result = CliRunner().invoke(
        main, ["--url", url, "--prefix", prefix, "bench", "enqueue", "--tasks", "50"]
    )
    assert result.exit_code == 0, result.output
    assert "tasks/s" in result.output and "enqueue" in result.output
    result = CliRunner().invoke(
        main, ["--url", f"redis://127.0.0.1:{dead_port}", "bench", "enqueue"]
    )
    assert result.exit_code == 1
    assert "cannot reach" in result.output or "no seed node answered" in result.output
