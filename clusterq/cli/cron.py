"""``clusterq scheduler`` (run periodic entries) and ``clusterq cron ls|history``."""

from __future__ import annotations

import click

from clusterq.cli.render import clock, console, print_json, table
from clusterq.cli.state import CliError, CliState, connection_options, log_options
from clusterq.cli.worker import load_object
from clusterq.logs import LogFormat
from clusterq.logs import configure as configure_logs


@click.command()
@click.argument("entries_spec", metavar="MODULE:ENTRIES")
@click.option(
    "--lease",
    type=click.FloatRange(min=0.5),
    default=5.0,
    show_default=True,
    help="Seconds a leader holds the lead without renewing; a standby takes over after.",
)
@click.option(
    "--catch-up",
    type=click.FloatRange(min=0),
    default=60.0,
    show_default=True,
    help="A new leader fires missed ticks at most this many seconds old.",
)
@click.option("--name", default=None, help="Scheduler id (default host:pid:random).")
@click.option(
    "--forget-after",
    type=click.FloatRange(min=0, min_open=True),
    default=86400.0,
    show_default=True,
    help="Entries no leading scheduler declared for this many seconds are forgotten "
    "(their state and history removed).",
)
@log_options
@connection_options
@click.pass_obj
def scheduler(
    state: CliState,
    entries_spec: str,
    lease: float,
    catch_up: float,
    name: str | None,
    forget_after: float,
    log_level: str,
    log_format: LogFormat,
) -> None:
    """Fire the periodic entries in MODULE:ENTRIES (a list of clusterq.Periodic) while
    this scheduler leads; run several for availability (exactly one fires each tick)."""
    from clusterq.scheduler import Periodic, Scheduler

    entries = load_object(entries_spec, "ENTRIES")
    if not isinstance(entries, list | tuple) or not all(isinstance(e, Periodic) for e in entries):
        raise CliError(f"{entries_spec} is not a list of clusterq.Periodic")
    configure_logs(log_level, log_format)
    Scheduler(
        state.url,
        entries,
        prefix=state.prefix,
        mode=state.mode,
        lease=lease,
        catch_up=catch_up,
        name=name,
        forget_after=forget_after,
    ).run()


@click.group("cron")
def cron_group() -> None:
    """Periodic entries: their schedules, last and next runs, history."""


@cron_group.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@connection_options
@click.pass_obj
def cron_ls(state: CliState, as_json: bool) -> None:
    """Entries, their schedule, last and next tick, and which scheduler leads."""
    from clusterq.ops.croninfo import cron_status

    leader, entries = cron_status(state.backend())
    if as_json:
        print_json({"leader": leader, "entries": [e.to_dict() for e in entries]})
        return
    click.echo(f"leader: {leader or 'none (no scheduler leads)'}")
    if not entries:
        click.echo("no periodic entries yet (a leading scheduler publishes its entries)")
        return
    console().print(
        table(
            None,
            ["Entry", "Schedule", "Type", "Queue", "Last tick", "Next tick", "In flight"],
            [
                [
                    e.name,
                    e.schedule,
                    e.type,
                    e.queue,
                    clock_ms(e.last_tick),
                    clock_ms(e.next_tick),
                    clock_ms(e.inflight),
                ]
                for e in entries
            ],
        )
    )


@cron_group.command("history")
@click.argument("entry")
@click.option("--limit", type=click.IntRange(1, 100), default=20, show_default=True,
              help="How many firings.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@connection_options
@click.pass_obj
def cron_history_command(state: CliState, entry: str, limit: int, as_json: bool) -> None:
    """The latest firings of ENTRY, newest first."""
    from clusterq.ops.croninfo import cron_history

    firings = cron_history(state.backend(), entry, limit)
    if as_json:
        print_json(firings)
        return
    if not firings:
        click.echo(f"no firings of {entry} yet")
        return
    console().print(
        table(
            f"firings of {entry}",
            ["Tick", "Task", "Queue", "Fired at", "Scheduler", "Note"],
            [
                [
                    clock_ms(f.get("tick")),
                    f.get("task_id"),
                    f.get("queue"),
                    clock_ms(f.get("fired_at")),
                    f.get("scheduler"),
                    "already enqueued"
                    if f.get("already_enqueued")
                    else ("re-driven" if f.get("redriven") else ""),
                ]
                for f in firings
            ],
        )
    )


def clock_ms(at: object) -> str:
    return clock(at, ms=True)
