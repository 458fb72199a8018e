"""``clusterq drill failover``: fail a queue's master under load and report the damage."""

from __future__ import annotations

import asyncio

import click

from clusterq.cli.render import console, print_json, table
from clusterq.cli.state import CliState, connection_options
from clusterq.tools.drill import MODES, DrillSettings, run_drill
from clusterq.tools.drill_report import DrillReport


@click.group()
def drill() -> None:
    """Failover drills against a local cluster."""


def _fmt(value: object, unit: str = "") -> str:
    if value is None:
        return "-"
    return f"{value}{unit}"


def render(report: DrillReport) -> None:
    extra = f"{report.extra_deliveries} extra runs (bound: in flight {report.in_flight_bound})"
    pickup = f"{_fmt(report.pickup_p50_ms)} / {_fmt(report.pickup_p99_ms)}"
    rows: list[list[object]] = [
        ["mode / durability", f"{report.mode} / {report.durability}"],
        ["master", f"{report.master_before} -> {report.master_after}"],
        ["drill tasks in", f"{report.drill_queue} (same master as {report.queue})"],
        [
            "tasks acknowledged",
            f"{report.acknowledged} of {report.tasks} (gave up: {report.gave_up})",
        ],
        ["delivered", report.delivered],
        ["lost", report.lost],
        ["still queued", report.still_queued],
        [
            "duplicated",
            f"{report.duplicated} tasks, {extra}",
        ],
        ["stuck active", report.stuck_active],
        ["fault at", f"{report.fault_at:.2f}s into production"],
        ["first producer error", _fmt(report.detect, "s after the fault")],
        ["promotion", _fmt(report.promotion, "s after the fault")],
        ["producer resumed", _fmt(report.producer_resume, "s after the fault")],
        [
            "longest producer stall",
            f"{report.producer_stall}s (bound: {_fmt(report.stall_bound, 's')})",
        ],
        ["worker resume lag", _fmt(report.worker_resume_lag, "s after the promotion")],
        [
            "pickup p50 / p99 / max",
            f"{pickup} / {_fmt(report.pickup_max_ms)} ms",
        ],
        [
            f"{report.other_queue} during outage",
            f"{report.other_delivered_during_outage} tasks delivered",
        ],
        [
            "errors seen by the producer",
            ", ".join(f"{k}: {v}" for k, v in report.errors.items()) or "none",
        ],
        ["cluster healthy after", "yes" if report.healthy_after else "NO"],
        [
            "verdict",
            "OK: nothing acknowledged was lost, nothing stayed blocked"
            if report.ok
            else "FAILED: " + "; ".join(report.problems),
        ],
    ]
    title = f"failover drill on queue {report.queue}"
    console().print(table(title, ["", ""], rows, header=False))


@drill.command("failover")
@click.option("--queue", "-q", required=True, help="The queue whose master is failed.")
@click.option(
    "--mode",
    type=click.Choice(MODES),
    required=True,
    help="kill -9 the master, SIGSTOP it, or CLUSTER FAILOVER (manual/takeover) on its replica.",
)
@click.option(
    "--tasks", type=int, default=2000, show_default=True, help="Tasks enqueued during the drill."
)
@click.option("--rate", type=float, default=500.0, show_default=True, help="Tasks per second.")
@click.option(
    "--durability",
    type=click.Choice(["replica", "none", "aof"]),
    default="replica",
    show_default=True,
    help="How enqueues are confirmed (replica: WAIT 1; aof: WAITAOF).",
)
@click.option(
    "--workers", type=int, default=2, show_default=True, help="Worker processes to start."
)
@click.option("--concurrency", type=int, default=16, show_default=True, help="Per worker process.")
@click.option(
    "--processes",
    type=click.IntRange(1, 64),
    default=None,
    help="Each worker a supervisor of N processes (worker run --processes N).",
)
@click.option(
    "--use-running-workers",
    is_flag=True,
    help="Start none; use workers running clusterq.tools.drill:router.",
)
@click.option(
    "--settle-timeout",
    type=float,
    default=90.0,
    show_default=True,
    help="Seconds to wait after the fault for every task to be done.",
)
@click.option("--seed", type=int, default=None, help="Seed for the moment of the fault.")
@click.option(
    "--stall-margin",
    type=click.FloatRange(min=0),
    default=5.0,
    show_default=True,
    help="Seconds past the promotion that the producer and workers may stay blocked "
    "before the verdict fails.",
)
@click.option(
    "--keep-log",
    is_flag=True,
    help="Keep the hash of deliveries (named in the report) for an hour, to count again.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@connection_options
@click.pass_obj
def failover(
    state: CliState,
    queue: str,
    mode: str,
    tasks: int,
    rate: float,
    durability: str,
    workers: int,
    concurrency: int,
    processes: int | None,
    use_running_workers: bool,
    settle_timeout: float,
    seed: int | None,
    stall_margin: float,
    keep_log: bool,
    as_json: bool,
) -> None:
    """Fail the master of QUEUE's slot mid-stream and report the damage.

    Exits 1 when an acknowledged task was lost or is still queued, when the master was
    never replaced, when the producer or the workers stayed blocked longer than the
    promotion plus --stall-margin, or when a queue on another shard delivered nothing
    during the outage."""
    settings = DrillSettings(
        url=state.url,
        queue=queue,
        mode=mode,  # type: ignore[arg-type]
        tasks=tasks,
        rate=rate,
        durability=durability,  # type: ignore[arg-type]
        workers=workers,
        concurrency=concurrency,
        prefix=state.prefix,
        use_running_workers=use_running_workers,
        settle_timeout=settle_timeout,
        seed=seed,
        stall_margin=stall_margin,
        keep_log=keep_log,
        processes=processes,
    )
    report = asyncio.run(run_drill(settings, lambda msg: click.echo(f"drill: {msg}", err=True)))
    if as_json:
        print_json(report.to_dict())
    else:
        render(report)
    if not report.ok:
        raise SystemExit(1)
