"""What ``clusterq bench`` reports: rows, the ``redis-benchmark`` baseline measured in the
same run, percentiles, and the comparison of a row with the baseline."""

from __future__ import annotations

import csv
import io
import math
import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

from clusterq.cluster.connection import RedisURL
from clusterq.keys import DEFAULT_PREFIX

Scenario = Literal[
    "enqueue",
    "enqueue-many",
    "durability",
    "e2e",
    "latency",
    "memory",
    "partitioned",
    "stream",
    "idle",
    "purge",
    "limits",
    "web",
]
SCENARIOS: tuple[Scenario, ...] = get_args(Scenario)
Work = Literal["noop", "incr", "incr-redis-py", "incr-sync", "cpu"]
WORKS: tuple[Work, ...] = ("noop", "incr", "incr-redis-py")
Progress = Callable[[str, int, int], None]

# ----------------------------------------------------------------------- results


@dataclass
class BenchRow:
    """One line of the report."""

    scenario: str
    tasks: int
    seconds: float
    #: Tasks per second.
    rate: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    #: ``rate`` divided by the redis-benchmark baseline it compares with.
    vs_baseline: float | None = None
    baseline: str | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Baseline:
    """``redis-benchmark`` PING figures from the same run (requests per second)."""

    command: str
    unpipelined: float
    pipelined: float
    pipeline: int


@dataclass
class BenchReport:
    target: str
    mode: str
    masters: int
    server: str
    cores: int
    rows: list[BenchRow] = field(default_factory=list)
    baseline: Baseline | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class BenchSettings:
    url: str
    prefix: str = DEFAULT_PREFIX
    tasks: int = 10_000
    workers: int = 1
    #: Each worker a supervisor of this many processes (``--processes``), if set.
    processes: int | None = None
    #: ``worker run --cpus`` of the benchmark's workers (pinning), if set.
    cpus: str | None = None
    concurrency: int = 50
    work: Work = "noop"
    #: e2e with the queues' lifecycle events "off", "on", or "both" (two drains).
    events: str = "off"
    #: e2e with an OpenTelemetry SDK set up "off", "on", or "both" (bench_tracing).
    tracing: str = "off"
    batch: int = 1000
    rate: float = 2000.0
    samples: int = 300
    baseline: bool = True
    #: Queues for e2e and latency under load (default: one per master); partitions for
    #: ``partitioned`` (default: 4 per master).
    queues: int | None = None
    timeout: float = 300.0
    seed: int | None = None
    #: ``limits``: the rate (tasks/s) and burst (None: the default) of its rate part, the
    #: cap of its concurrency part, and the window (s) its starts are counted over.
    limit_rate: float = 200.0
    limit_burst: int | None = None
    limit_concurrency: int = 5
    limit_window: float = 5.0


def percentile(values: Sequence[float], pct: float) -> float:
    """The ``pct`` percentile (nearest rank) of ``values``; 0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(pct / 100 * len(ordered)) - 1))
    return ordered[rank]


def ms_percentiles(values: Sequence[float]) -> tuple[float, float]:
    return round(percentile(values, 50) * 1000, 3), round(percentile(values, 99) * 1000, 3)


# ----------------------------------------------------------------------- baseline


def benchmark_binary() -> str | None:
    return shutil.which("redis-benchmark") or shutil.which("valkey-benchmark")


def parse_benchmark_csv(text: str, test: str = "PING_MBULK") -> float:
    """Requests per second of ``test`` from ``redis-benchmark --csv`` output."""
    for row in csv.reader(io.StringIO(text)):
        if row and row[0] == test:
            return float(row[1])
    raise ValueError(f"no {test} line in redis-benchmark output: {text[:200]!r}")


def run_baseline(url: RedisURL, mode: str, pipeline: int = 16) -> tuple[Baseline | None, str]:
    """PING round trips per second, unpipelined and pipelined ``-P pipeline``, with
    50 connections against the first seed. Returns (baseline, note)."""
    binary = benchmark_binary()
    if binary is None:
        return None, "redis-benchmark not installed: no baseline"
    if url.ssl:
        return None, "TLS URL: no redis-benchmark baseline"
    host, port = url.seeds[0]
    base = [binary, "-h", host, "-p", str(port), "-t", "ping", "-c", "50", "--csv"]
    if url.username:
        base += ["--user", url.username]
    if url.password:
        base += ["-a", url.password]
    if mode == "cluster":
        base.append("--cluster")
    env = {**os.environ, "REDISCLI_AUTH": url.password or ""}
    try:
        plain = subprocess.run(
            [*base, "-n", "100000"], capture_output=True, text=True, timeout=120, env=env
        )
        piped = subprocess.run(
            [*base, "-n", "1000000", "-P", str(pipeline)],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        baseline = Baseline(
            command=" ".join([*base, "-n", "100000"]).replace(url.password or "\0", "***"),
            unpipelined=parse_benchmark_csv(plain.stdout),
            pipelined=parse_benchmark_csv(piped.stdout),
            pipeline=pipeline,
        )
    except (OSError, subprocess.TimeoutExpired, ValueError) as exc:
        return None, f"redis-benchmark failed: {exc}"
    return baseline, ""


# ----------------------------------------------------------------------- helpers


def compare_with_baseline(row: BenchRow, baseline: Baseline | None) -> None:
    """Relate a rate to the round trips redis-benchmark managed on the same server."""
    if baseline is None or row.rate is None or row.scenario.startswith(("pickup", "limits:")):
        return
    if row.scenario == "enqueue-many":
        row.vs_baseline = row.rate / baseline.pipelined
        row.baseline = f"PING -P {baseline.pipeline}"
    else:
        row.vs_baseline = row.rate / baseline.unpipelined
        row.baseline = "PING"


def describe_target(report: BenchReport) -> str:
    return (
        f"{report.target}: {report.mode}, {report.masters} master(s), {report.server}, "
        f"{report.cores} cores"
    )
