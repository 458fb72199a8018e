"""``clusterq queue``: list, inspect, pause, unpause, purge and remove queues."""

from __future__ import annotations

import time

import click

from clusterq.admin import Admin
from clusterq.cli.render import console, human_bytes, print_json, progress_bar, safe_text, table
from clusterq.cli.state import STATE_CHOICE, CliError, CliState, confirm, connection_options
from clusterq.inspector import Inspector


@click.group()
def queue() -> None:
    """Inspect queues and act on them."""


@queue.command("ls")
@connection_options
@click.option(
    "--cluster", "show_cluster", is_flag=True, help="Also show keyslot, master and replicas."
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print JSON (always with the cluster fields)."
)
@click.pass_obj
def ls(state: CliState, show_cluster: bool, as_json: bool) -> None:
    """Every known queue and its size (like `asynq queue ls --cluster`)."""
    inspector = Inspector(backend=state.backend())
    infos = inspector.queues()
    if inspector.skipped:
        shown = ", ".join(safe_text(repr(name)) for name in inspector.skipped[:5])
        click.echo(
            f"warning: {len(inspector.skipped)} registry entries are not queue names and "
            f"were skipped: {shown}",
            err=True,
        )
    if as_json:
        print_json([info.to_dict() for info in infos])
        return
    columns = [
        "Queue",
        "Pending",
        "Active",
        "Scheduled",
        "Retry",
        "Archived",
        "Completed",
        "Paused",
    ]
    if show_cluster:
        columns += ["KeySlot", "Master", "Replicas"]
    rows = []
    for info in infos:
        if info.error:
            row: list[object] = [info.queue, f"error: {info.error}", "", "", "", "", "", ""]
        else:
            row = [
                info.queue,
                info.pending,
                info.active,
                info.scheduled,
                info.retry,
                info.archived,
                info.completed,
                "yes" if info.paused else "no",
            ]
        if show_cluster:
            row += [info.keyslot, info.master or "-", ", ".join(info.replicas) or "-"]
        rows.append(row)
    if not rows:
        click.echo("no queues yet (queues register themselves when first used)")
        return
    console().print(table(None, columns, rows))


@queue.command("inspect")
@click.argument("name")
@click.option("--types", is_flag=True, help="Also count the tasks by type (reads every record).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@connection_options
@click.pass_obj
def inspect(state: CliState, name: str, types: bool, as_json: bool) -> None:
    """One queue: sizes, counters, latency, memory, where it lives, recent history."""
    detail = Inspector(backend=state.backend()).queue_detail(name, types=types)
    if as_json:
        print_json(detail.to_dict())
        return
    info = detail.info
    if info.error:
        raise CliError(f"queue {name!r}: {info.error}")
    rows: list[list[object]] = [
        ["Keyslot", info.keyslot],
        ["Master", info.master or "-"],
        ["Replicas", ", ".join(info.replicas) or "-"],
        ["Paused", "yes" if info.paused else "no"],
        ["Pending", info.pending],
        ["Active", info.active],
        ["Scheduled", info.scheduled],
        ["Retry", info.retry],
        ["Archived", info.archived],
        ["Completed", info.completed],
        ["Processed (total)", info.processed],
        ["Failed (total)", info.failed],
        ["Latency", f"{info.latency:.3f}s"],
        ["Memory", human_bytes(detail.memory) if detail.memory is not None else "-"],
    ]
    out = console()
    out.print(table(f"queue {name}", ["", ""], rows, header=False))
    recent = detail.history[-10:]
    if recent:
        out.print(
            table(
                "last minutes with activity",
                ["Minute", "Processed", "Failed"],
                [
                    [time.strftime("%H:%M", time.localtime(m.at)), m.processed, m.failed]
                    for m in recent
                ],
            )
        )
    if detail.types is not None:
        out.print(table("tasks by type", ["Type", "Tasks"], list(detail.types.items())))


@queue.command("pause")
@click.argument("name")
@connection_options
@click.pass_obj
def pause(state: CliState, name: str) -> None:
    """Stop workers taking tasks from NAME (running ones finish; enqueues still work)."""
    Admin(backend=state.backend()).pause(name)
    click.echo(f"queue {name} paused")


@queue.command("unpause")
@click.argument("name")
@connection_options
@click.pass_obj
def unpause(state: CliState, name: str) -> None:
    """Let workers take tasks from NAME again."""
    Admin(backend=state.backend()).unpause(name)
    click.echo(f"queue {name} unpaused")


@queue.command("purge")
@click.argument("name")
@click.option(
    "--state",
    "task_state",
    type=STATE_CHOICE,
    required=True,
    help="Delete every task in this state (not active).",
)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@connection_options
@click.pass_obj
def purge(state: CliState, name: str, task_state: str, yes: bool) -> None:
    """Delete every task of NAME in one state."""
    admin = Admin(backend=state.backend())
    confirm(yes, f"delete every {task_state} task of queue {name}?")
    with progress_bar(f"deleting {task_state} tasks") as advance:
        result = admin.purge(name, task_state, progress=advance)
    click.echo(f"deleted {result.done} task(s); left {result.skipped} that changed meanwhile")


@queue.command("rm")
@click.argument("name")
@click.option("--force", is_flag=True, help="Remove it even if it holds tasks (all deleted).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@connection_options
@click.pass_obj
def rm(state: CliState, name: str, force: bool, yes: bool) -> None:
    """Remove queue NAME: its keys and its registry entry (refused while it holds tasks,
    unless --force)."""
    admin = Admin(backend=state.backend())
    confirm(yes, f"remove queue {name}{' and every task in it' if force else ''}?")
    result = admin.remove_queue(name, force=force)
    click.echo(f"queue {name} removed" + (f" with {result.done} task(s)" if result.done else ""))
