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
from clusterq.tools.bench_limits import overlap, rate_text, window_counts
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
    # limits (slow by design: it waits for its rate) has a test of its own, below
    chosen = [name for name in SCENARIOS if name != "limits"]
    report = run_bench(settings, chosen, lambda label, _done, _total: seen.append(label))

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
    # the web UI: ten pages on the live overview cost what one does; ten pages polling
    # on their own cost ten times as much
    web = {name: row for name, row in rows.items() if name.startswith("web: ")}
    live1, live10 = (web[f"web: {n} page(s), live (one shared poll)"] for n in (1, 10))
    polled10 = web["web: 10 page(s), each polling /api/queues"]
    assert live10.extra["commands_per_s"] < polled10.extra["commands_per_s"] / 3
    assert live10.extra["commands_per_s"] < 2 * live1.extra["commands_per_s"]
    assert web["web: overview, 50 queues"].p50_ms > 0
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


# ----------------------------------------------------------------------- limits


def test_window_counts_most_and_fewest() -> None:
    starts = [1.05, 0.0, 0.1, 0.2, 1.0, 3.0]  # any order
    # [0.1, 1.1) holds 0.1, 0.2, 1.0, 1.05; (1.05, 2.05] holds nothing
    assert window_counts(starts, 1.0) == (4, 0)
    # half-open: a start exactly one window later is in the next window
    assert window_counts([0.0, 1.0], 1.0) == (1, 1)
    assert window_counts([0.0, 0.5], 1.0) == (2, None)  # shorter than a window
    assert window_counts([], 1.0) == (0, None)
    steady = [i / 10 for i in range(100)]  # 10/s for 10 s
    assert window_counts(steady, 2.0) == (20, 20)


def test_overlap_most_and_average_while_backlog() -> None:
    # one ends exactly when the third starts: never three at once
    most, average = overlap([(0.0, 1.0), (0.5, 1.5), (1.0, 2.0)])
    assert most == 2
    assert average == pytest.approx(1.5)  # from 0 to 1 (the last start): 1 + 0.5
    # the average counts until the last start, not the last end (when none waits)
    most, average = overlap([(0.0, 1.0), (0.0, 1.0), (0.5, 3.0)])
    assert most == 3 and average == pytest.approx(2.0)
    assert overlap([]) == (0, 0.0)
    assert overlap([(5.0, 6.0)]) == (1, 1.0)


def test_rate_text_reads_back() -> None:
    assert rate_text(200.0) == "200/s" and rate_text(12.5) == "12.5/s"


def test_bench_limits_holds_the_limits(url: str, prefix: str) -> None:
    """The scenario through the CLI, small: its figures come from the handlers' own
    records, and the hard invariants hold (no speed is asserted). With ``--tasks 300``
    the fair-group parts run 300 + 100 tasks (backlog), 20 groups x 15 (per-group rate,
    ~3 s) and 300 per cost drain."""
    result = CliRunner().invoke(
        main,
        [
            *("--url", url, "--prefix", prefix, "bench", "limits", "--json", "--no-baseline"),
            *("--tasks", "300", "--limit-rate", "100", "--limit-window", "1"),
            *("--limit-concurrency", "4"),
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    rate, cap, plain, limited, backlog, per_group, ungrouped, grouped = data["rows"]
    assert rate["scenario"] == "limits: rate 100/s" and rate["tasks"] == 300
    extra = rate["extra"]
    assert extra["rate"] == 100.0 and extra["window_s"] == 1.0
    assert extra["burst"] == 10 and extra["bound"] == 110.0  # the default: 0.1 s worth
    # The token bucket: at most 100 x 1 + 10 starts in any second; slack for the time
    # between a task's token and its handler's start on a busy machine. Without the
    # limit, 300 noop tasks start within a fraction of a second.
    assert 0 < extra["max_in_window"] <= extra["bound"] + 50, extra
    assert extra["average_rate"] > 0 and extra["share_of_rate"] > 0
    assert 1 <= extra["processes_seen"] <= 3
    assert rate["vs_baseline"] is None and "bound 100 x 1 + burst 10 = 110" in rate["note"]

    assert cap["scenario"] == "limits: concurrency 4" and cap["tasks"] == 300
    # Each handler runs inside its task's time in the active set: never more than 4.
    assert 1 <= cap["extra"]["max_running"] <= 4, cap
    assert 0 < cap["extra"]["average_running"] <= 4
    assert cap["extra"]["handler_ms"] == 50
    assert cap["extra"]["shortest_ms"] >= 45  # each handler's record spans its sleep

    assert plain["scenario"] == "limits cost: e2e noop, no limits"
    assert limited["scenario"] == "limits cost: e2e noop, rate 100000/s"
    for row in (plain, limited):
        assert row["tasks"] == 300 and len(row["extra"]["runs"]) == 3
        assert all(r > 0 for r in row["extra"]["runs"])
        assert row["rate"] == pytest.approx(sum(row["extra"]["runs"]) / 3, rel=1e-3)
    assert limited["extra"]["ratio"] == pytest.approx(limited["rate"] / plain["rate"], rel=1e-3)

    assert backlog["scenario"] == "groups: backlog" and backlog["tasks"] == 400
    extra = backlog["extra"]
    assert extra["a_tasks"] == 300 and extra["b_tasks"] == 100
    assert extra["a_started_at_last_b"] + extra["a_waiting_at_last_b"] == 300
    # The queue is paused until A's 300 and B's 100 are all in, so the order in which
    # they are taken does not depend on the machine's speed: dequeue.lua hands out A and
    # B in turn, and B's last goes out with about A's 100th. A handler may start a little
    # out of that order (at most the worker's concurrency, 50, held at once), never 200
    # tasks late: some of A's were still waiting.
    assert extra["a_waiting_at_last_b"] > 0, extra
    assert 0 <= extra["b_wait_median_ms"] <= extra["b_wait_p95_ms"] <= extra["b_wait_max_ms"]
    assert extra["processes_seen"] == 1 and "1 worker x 1 process" in backlog["note"]

    assert per_group["scenario"] == "groups: per-group rate 5/s" and per_group["tasks"] == 300
    extra = per_group["extra"]
    assert extra["groups"] == 20 and extra["tasks_per_group"] == 15
    assert extra["counts"] == [15, 15]  # every group's tasks, each started once
    assert extra["burst"] == 1 and extra["bound"] == extra["bound_1s"] == 6.0  # 5 x 1 + 1
    # Each group's token bucket: at most 6 starts in any second, with the same kind of
    # slack as above for a handler that starts late (here: up to 0.6 s). Without the
    # limit a group's 15 tasks start within milliseconds.
    assert 1 <= extra["max_in_window"] <= extra["bound"] + 3, extra
    assert 1 <= extra["max_in_1s"] <= extra["bound_1s"] + 3, extra
    assert 0 < extra["average_rate_min"] <= extra["average_rate_max"]
    assert extra["first_starts_spread_s"] >= 0 and 1 <= extra["distinct_in_first"] <= 20
    assert per_group["rate"] is None and per_group["vs_baseline"] is None

    assert ungrouped["scenario"] == "groups: cost, e2e noop, no groups"
    assert grouped["scenario"] == "groups: cost, e2e noop, 10 groups"
    for row in (ungrouped, grouped):
        assert row["tasks"] == 300 and len(row["extra"]["runs"]) == 3
        assert all(r > 0 for r in row["extra"]["runs"])
        assert row["rate"] == pytest.approx(sum(row["extra"]["runs"]) / 3, rel=1e-3)
    ratio = grouped["rate"] / ungrouped["rate"]
    assert grouped["extra"]["ratio"] == pytest.approx(ratio, rel=1e-3)
    assert grouped["extra"]["groups"] == 10
    assert _leftovers(url, prefix) == []


def test_bench_limits_refuses_bad_limits(standalone: object, prefix: str) -> None:
    url = standalone.seed_url  # type: ignore[attr-defined]
    for bad in (
        {"limit_rate": 0.0},
        {"limit_rate": 1e6},  # above 100 per ms
        {"limit_burst": 0},
        {"limit_concurrency": 0},
        {"limit_window": 0.0},
    ):
        settings = BenchSettings(url=url, prefix=prefix, baseline=False, **bad)
        with pytest.raises(ConfigError, match="limits"):
            run_bench(settings, ["limits"])
    assert _leftovers(url, prefix) == []
