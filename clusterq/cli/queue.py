"""``clusterq queue``: list and inspect queues."""

from __future__ import annotations

import click

from clusterq.cli.render import console, print_json, safe_text, table
from clusterq.cli.state import CliState
from clusterq.inspector import Inspector


@click.group()
def queue() -> None:
    """Inspect queues."""


@queue.command("ls")
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
