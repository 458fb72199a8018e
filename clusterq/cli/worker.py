"""``clusterq worker``: run a worker, or list the live ones."""

from __future__ import annotations

import importlib
import logging
import os
import sys
import threading
import time
from typing import Any

import click

from clusterq.cli.render import clock, console, print_json, safe_text, table
from clusterq.cli.state import CliError, CliState, connection_options, log_options
from clusterq.logs import LogFormat
from clusterq.logs import configure as configure_logs
from clusterq.ops.inspector import Inspector
from clusterq.router import Router
from clusterq.worker import (
    DEFAULT_LEASE,
    DEFAULT_POLL_INTERVAL,
    DEFAULT_SURVEY_INTERVAL,
    Worker,
    parse_queues,
)
from clusterq.worker.announce import WorkerAnnouncement
from clusterq.worker.processes import parse_cpus, pin, run_processes
from clusterq.worker.recycle import ProcessLimits


class _RunByDefault(click.Group):
    """``clusterq worker MODULE:ROUTER ...`` means ``clusterq worker run MODULE:ROUTER ...``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_RunByDefault)
def worker() -> None:
    """Run a worker (`clusterq worker MODULE:ROUTER`), or `clusterq worker ls`."""


def load_object(spec: str, what: str) -> Any:
    """Import ``module:attribute`` (from the current directory too)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise CliError(f"expected MODULE:{what}, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CliError(f"cannot import {module_name!r}: {exc}") from None
    except Exception as exc:  # the module itself failed (SyntaxError is one too)
        raise CliError(
            f"cannot import {module_name!r}: it raised {type(exc).__name__}: {exc}"
        ) from None
    return getattr(module, attribute, None)


def load_router(spec: str) -> Router:
    """Import ``module:attribute`` and check it is a Router."""
    router = load_object(spec, "ROUTER")
    if not isinstance(router, Router):
        raise CliError(f"{spec} is {type(router).__name__}, not a clusterq Router")
    return router


@worker.command("run")
@click.argument("router_spec", metavar="MODULE:ROUTER")
@click.option("--queues", "-q", default="default=1", show_default=True, help="name=weight,...")
@click.option("--strict", is_flag=True, help="Strict priority: heavier queues first, always.")
@click.option(
    "--concurrency", "-c", type=int, default=10, show_default=True, help="Tasks run at once."
)
@click.option(
    "--shutdown-timeout",
    type=float,
    default=10.0,
    show_default=True,
    help="Seconds running tasks get to finish on stop; the rest go back to their queues.",
)
@click.option("--lease", type=float, default=DEFAULT_LEASE, show_default=True, help="Seconds.")
@click.option(
    "--recover-interval",
    type=float,
    default=1.0,
    show_default=True,
    help="Seconds between looks for expired leases and upkeep.",
)
@click.option(
    "--poll-interval",
    type=float,
    default=DEFAULT_POLL_INTERVAL,
    show_default=True,
    help="Without wake-ups: longest blocking wait for work, in seconds (due delayed tasks "
    "are checked this often).",
)
@click.option(
    "--wakeups/--no-wakeups",
    default=True,
    show_default=True,
    help="Idle queues wait for wake-ups (sharded pub/sub, Redis >= 7) instead of polling.",
)
@click.option(
    "--survey-interval",
    type=float,
    default=DEFAULT_SURVEY_INTERVAL,
    show_default=True,
    help="With wake-ups: seconds between looks at idle queues (a lost wake-up waits this long "
    "at most).",
)
@click.option("--name", default=None, help="Worker id (default host:pid:random).")
@log_options
@click.option(
    "--metrics-port",
    type=click.IntRange(1, 65535),
    default=None,
    help="Serve this worker's Prometheus metrics on 127.0.0.1:PORT/metrics (needs the "
    "metrics extra).",
)
@click.option(
    "--metrics-host", default="127.0.0.1", show_default=True, help="Address for --metrics-port."
)
@click.option(
    "--streams",
    default=None,
    help="Stream consumers to run, stream:group,... (default: all the router's; 'none').",
)
@click.option(
    "--processes",
    type=click.IntRange(1, 1024),
    default=None,
    help="Run N worker processes under a supervisor (forked; each a full worker with "
    "--concurrency slots). Without it: one process, no supervisor.",
)
@click.option(
    "--hard-timeout",
    type=click.FloatRange(0, min_open=True),
    default=None,
    help="Seconds: the timeout of plain-function (sync) handlers whose task has none.",
)
@click.option(
    "--kill-grace",
    type=click.FloatRange(0, min_open=True),
    default=1.0,
    show_default=True,
    help="With --processes: a sync handler still running this long after its timeout "
    "gets its process replaced (the attempt already counted as a timeout).",
)
@click.option(
    "--max-tasks-per-process",
    type=click.IntRange(1),
    default=None,
    help="With --processes: a process that took this many tasks finishes them and is replaced.",
)
@click.option(
    "--max-memory-per-process",
    type=click.FloatRange(0, min_open=True),
    default=None,
    metavar="MB",
    help="With --processes: a process whose resident memory passes this (MiB, checked "
    "after each task) takes nothing more, finishes what it holds and is replaced.",
)
@click.option(
    "--cpus",
    default=None,
    metavar="LIST",
    help="Pin the worker to one CPU of LIST (e.g. 1, 0-3, 0,2); with --processes, "
    "process n to the n-th (round robin). Sync handlers run faster on one CPU; C code "
    "that releases the GIL no longer runs on several.",
)
@connection_options
@click.pass_obj
def run(
    state: CliState,
    router_spec: str,
    queues: str,
    strict: bool,
    concurrency: int,
    shutdown_timeout: float,
    lease: float,
    recover_interval: float,
    poll_interval: float,
    wakeups: bool,
    survey_interval: float,
    name: str | None,
    log_level: str,
    log_format: LogFormat,
    metrics_port: int | None,
    metrics_host: str,
    streams: str | None,
    processes: int | None,
    hard_timeout: float | None,
    kill_grace: float,
    max_tasks_per_process: int | None,
    max_memory_per_process: float | None,
    cpus: str | None,
) -> None:
    """Run handlers from MODULE:ROUTER until SIGTERM/SIGINT (twice: stop at once)."""
    configure_logs(log_level, log_format)
    if processes is None and (max_tasks_per_process or max_memory_per_process):
        raise CliError("--max-tasks-per-process and --max-memory-per-process need --processes")
    options: dict[str, Any] = {
        "queues": parse_queues(queues),
        "strict_priority": strict,
        "concurrency": concurrency,
        "shutdown_timeout": shutdown_timeout,
        "prefix": state.prefix,
        "mode": state.mode,
        "lease": lease,
        "recover_interval": recover_interval,
        "poll_interval": poll_interval,
        "wakeups": wakeups,
        "survey_interval": survey_interval,
        "name": name,
        "streams": streams,
        "hard_timeout": hard_timeout,
    }
    router = load_router(router_spec)
    try:
        Worker(state.url, router, **options)  # the options checked here, once
        limits = ProcessLimits(max_tasks_per_process, max_memory_per_process, kill_grace)
        pinned = parse_cpus(cpus) if cpus is not None else None
    except ValueError as exc:
        raise CliError(str(exc)) from None
    if processes is not None:
        run_processes(
            state.url,
            router,
            processes,
            limits=limits,
            metrics_port=metrics_port,
            metrics_host=metrics_host,
            cpus=pinned,
            **options,
        )
        return
    pin(pinned)
    if metrics_port is not None:
        from clusterq.ops.metrics import WorkerMetrics

        options["metrics"] = WorkerMetrics()
        options["metrics"].serve(metrics_port, metrics_host)
    worker = Worker(state.url, router, **options)
    worker.run()
    # A sync handler abandoned after its timeout may still run in a thread; do not wait.
    if any(
        t.is_alive() and not t.daemon
        for t in threading.enumerate()
        if t is not threading.main_thread()
    ):
        logging.shutdown()
        sys.stdout.flush()
        os._exit(0)


@worker.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@connection_options
@click.pass_obj
def ls(state: CliState, as_json: bool) -> None:
    """Live workers: id, host, pid, queues, concurrency, tasks running now, processed
    and failed totals, when started and how long ago they last announced themselves."""
    workers = Inspector(backend=state.backend()).workers()
    if as_json:
        print_json([w.to_dict() for w in workers])
        return
    if not workers:
        click.echo("no live workers")
        return
    now = time.time()
    supervised = any(w.supervisor is not None for w in workers)
    console().print(
        table(
            None,
            [
                "Worker",
                *(["Supervisor"] if supervised else []),
                "Host",
                "Pid",
                "Queues",
                "Concurrency",
                "Running",
                "Processed",
                "Failed",
                "Started",
                "Seen",
            ],
            [
                [
                    w.id,
                    *([_process_of(w)] if supervised else []),
                    w.host,
                    w.pid,
                    ", ".join(f"{q}={n}" for q, n in w.queues.items()),
                    w.concurrency,
                    w.active,
                    w.processed,
                    w.failed,
                    clock(w.started),
                    f"{max(0.0, now - w.at):.0f}s ago" if w.at else "-",
                ]
                for w in workers
            ],
        )
    )
    for supervisor, group in _by_supervisor(workers).items():
        console().print(
            f"supervisor {safe_text(supervisor)}: {len(group)} processes, "
            f"concurrency {sum(w.concurrency for w in group)}, "
            f"running {sum(w.active for w in group)}, "
            f"processed {sum(w.processed for w in group)}, "
            f"failed {sum(w.failed for w in group)}",
            markup=False,
            highlight=False,
        )


def _process_of(w: WorkerAnnouncement) -> str:
    return "-" if w.supervisor is None else f"{w.supervisor} #{w.process}"


def _by_supervisor(workers: list[WorkerAnnouncement]) -> dict[str, list[WorkerAnnouncement]]:
    """One line per process in the table (each has its own leases, pid and heartbeat);
    the sums per supervisor below it."""
    groups: dict[str, list[WorkerAnnouncement]] = {}
    for w in workers:
        if w.supervisor is not None:
            groups.setdefault(w.supervisor, []).append(w)
    return groups
