"""``clusterq bench``: throughput, latency and memory figures for the server at --url."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from clusterq.cli.render import console, print_json, table
from clusterq.cli.state import CliState, connection_options
from clusterq.tools.bench import run_bench
from clusterq.tools.bench_handlers import WORK_TYPES
from clusterq.tools.bench_report import (
    SCENARIOS,
    BenchReport,
    BenchSettings,
    describe_target,
)
from clusterq.tools.bench_report import (
    Progress as ProgressFn,
)


def _num(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def render(report: BenchReport) -> None:
    rows = []
    for row in report.rows:
        ratio = f"{row.vs_baseline:.3f} of {row.baseline}" if row.vs_baseline is not None else "-"
        rows.append(
            [
                row.scenario,
                _num(row.tasks),
                _num(row.seconds, 2) if row.seconds else "-",
                _num(row.rate),
                _num(row.p50_ms, 2),
                _num(row.p99_ms, 2),
                ratio,
                row.note,
            ]
        )
    out = console()
    out.print(
        table(
            f"clusterq bench — {describe_target(report)}",
            [
                "scenario",
                "tasks",
                "seconds",
                "tasks/s",
                "p50 ms",
                "p99 ms",
                "vs redis-benchmark",
                "note",
            ],
            rows,
        )
    )
    if report.baseline is not None:
        base = report.baseline
        out.print(
            f"baseline: redis-benchmark PING, 50 connections: {base.unpipelined:,.0f} "
            f"round trips/s unpipelined, {base.pipelined:,.0f}/s with -P {base.pipeline}"
        )
    for note in report.notes:
        out.print(f"note: {note}")


@contextmanager
def _progress(enabled: bool) -> Iterator[ProgressFn]:
    if not enabled:
        yield lambda _label, _done, _total: None
        return
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(file=sys.stderr),
        transient=True,
    )
    tasks: dict[str, object] = {}

    def update(label: str, done: int, total: int) -> None:
        task = tasks.get(label)
        if task is None:
            task = tasks[label] = bar.add_task(label, total=total)
        bar.update(task, completed=done, total=total)  # type: ignore[arg-type]

    with bar:
        yield update


@click.command()
@click.argument("scenarios", nargs=-1, type=click.Choice(SCENARIOS))
@click.option(
    "--tasks", "-n", type=int, default=10_000, show_default=True, help="Tasks per scenario."
)
@click.option(
    "--workers",
    "-w",
    type=int,
    default=1,
    show_default=True,
    help="Worker processes (e2e); limits: worker supervisors (see --processes).",
)
@click.option(
    "--processes",
    type=click.IntRange(1, 256),
    default=None,
    help="e2e: each worker a supervisor of N processes (worker run --processes N); "
    "limits: default 3 (its fair groups' backlog part: always 1).",
)
@click.option(
    "--cpus",
    default=None,
    metavar="LIST",
    help="Pin the benchmark's workers to CPUs (worker run --cpus LIST).",
)
@click.option(
    "--concurrency", "-c", type=int, default=50, show_default=True, help="Per worker process."
)
@click.option(
    "--work",
    type=click.Choice(tuple(WORK_TYPES)),
    default="noop",
    show_default=True,
    help="What an e2e task does: nothing, one INCR over the worker's connection, "
    "one INCR through redis-py's asyncio client, one INCR through sync redis-py from a "
    "plain def handler (incr-sync), or ~1 ms of pure-Python CPU in a plain def handler "
    "(cpu).",
)
@click.option(
    "--events",
    type=click.Choice(("off", "on", "both")),
    default="off",
    show_default=True,
    help="e2e with the queues' lifecycle events off, on, or both (two drains, off first).",
)
@click.option(
    "--tracing",
    type=click.Choice(("off", "on", "both")),
    default="off",
    show_default=True,
    help="e2e with an OpenTelemetry SDK set up (spans made, batched and dropped) in the "
    "benchmark and its workers: off, on, or both (two drains, off first).",
)
@click.option(
    "--batch", type=int, default=1000, show_default=True, help="Tasks per enqueue_many call."
)
@click.option(
    "--rate",
    type=float,
    default=2000.0,
    show_default=True,
    help="Tasks per second for latency under load.",
)
@click.option(
    "--limit-rate",
    type=float,
    default=200.0,
    show_default=True,
    help="limits: the rate (tasks/s) set on the queue of its rate part.",
)
@click.option(
    "--limit-burst",
    type=int,
    default=None,
    help="limits: that rate's burst (default: a tenth of a second's worth).",
)
@click.option(
    "--limit-concurrency",
    type=int,
    default=5,
    show_default=True,
    help="limits: the cap set on the queue of its concurrency part.",
)
@click.option(
    "--limit-window",
    type=float,
    default=5.0,
    show_default=True,
    help="limits: seconds over which starts are counted against rate x window + burst "
    "(also each fair group's, at 5/s per group).",
)
@click.option("--samples", type=int, default=300, show_default=True, help="Idle pickup samples.")
@click.option(
    "--queues",
    type=int,
    default=None,
    help="Queues for e2e/latency (default: one per master); partitions for partitioned "
    "(default: 4 per master).",
)
@click.option("--no-baseline", is_flag=True, help="Skip the redis-benchmark baseline.")
@click.option("--seed", type=int, default=None, hidden=True, help="Random seed (tests).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@connection_options
@click.pass_obj
def bench(
    state: CliState,
    scenarios: tuple[str, ...],
    tasks: int,
    workers: int,
    processes: int | None,
    cpus: str | None,
    concurrency: int,
    work: str,
    events: str,
    tracing: str,
    batch: int,
    rate: float,
    limit_rate: float,
    limit_burst: int | None,
    limit_concurrency: int,
    limit_window: float,
    samples: int,
    queues: int | None,
    no_baseline: bool,
    seed: int | None,
    as_json: bool,
) -> None:
    """Measure clusterq on the server at --url: SCENARIOS among enqueue, enqueue-many,
    durability, e2e, latency, memory, partitioned, stream, idle, purge, limits, web
    (default: all).

    Uses fresh queues and deletes them afterwards. With redis-benchmark installed, its
    PING rate on the same server is measured too, and each rate is related to it.
    """
    settings = BenchSettings(
        url=state.url,
        prefix=state.prefix,
        tasks=tasks,
        workers=workers,
        processes=processes,
        cpus=cpus,
        concurrency=concurrency,
        work=work,  # type: ignore[arg-type]
        events=events,
        tracing=tracing,
        batch=batch,
        rate=rate,
        limit_rate=limit_rate,
        limit_burst=limit_burst,
        limit_concurrency=limit_concurrency,
        limit_window=limit_window,
        samples=samples,
        baseline=not no_baseline,
        queues=queues,
        seed=seed,
    )
    chosen = scenarios or SCENARIOS
    with _progress(sys.stderr.isatty()) as progress:
        report = run_bench(settings, chosen, progress)  # type: ignore[arg-type]
    if as_json:
        print_json(report.to_dict())
    else:
        render(report)
