"""Lifecycle events: ``clusterq events QUEUE`` (read, follow) and ``clusterq queue events
NAME --on|--off`` (see :mod:`clusterq.taskevents`)."""

from __future__ import annotations

import json

import click

from clusterq.cli.render import clock, console, safe_text, table
from clusterq.cli.state import CliError, CliState, connection_options
from clusterq.ops.admin import Admin
from clusterq.ops.inspector import Inspector
from clusterq.taskevents import DEFAULT_MAXLEN, MAX_MAXLEN, TaskEvent

COLUMNS = ["time", "event", "task", "type", "attempt", "worker", "state", "error"]


def event_row(event: TaskEvent, *, queue: bool = False) -> list[object]:
    """One event as a table row (``queue``: with its queue first)."""
    if event.garbled:
        row: list[object] = [clock(event.time, ms=True), "?", "", "", "", "", "", event.garbled]
    else:
        row = [
            clock(event.time, ms=True),
            event.event,
            safe_text(event.task_id),
            safe_text(event.type),
            event.attempt,
            safe_text(event.worker or ""),
            event.state,
            safe_text(event.error or "")
            if event.progress is None
            else f"progress {event.progress:.0%}",
        ]
    return [event.queue, *row] if queue else row


def _line(event: TaskEvent, partitioned: bool) -> str:
    cells = [str(c) for c in event_row(event, queue=partitioned)]
    return "  ".join(c for c in cells if c != "")


@click.command("events")
@click.argument("queue")
@click.option("--follow", "-f", is_flag=True, help="Then show new events as they come.")
@click.option("--task", "task_id", default=None, help="Only this task's events.")
@click.option("--count", type=click.IntRange(min=1), default=None, help="At most this many.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@connection_options
@click.pass_obj
def events(
    state: CliState, queue: str, follow: bool, task_id: str | None, count: int | None, as_json: bool
) -> None:
    """Lifecycle events of QUEUE's tasks (enqueued, started, retried, succeeded, ...),
    oldest first; a partitioned queue's partitions merged in time order. Events must be
    on (`clusterq queue events NAME --on`)."""
    inspector = Inspector(backend=state.backend())
    partitioned = len(inspector.members(queue)) > 1
    if not inspector.events_on(queue):
        click.echo(
            f"events of queue {queue} are off (clusterq queue events {queue} --on)", err=True
        )
    found = inspector.events(queue, task_id=task_id, follow=follow, count=count)
    if as_json:
        for event in found:
            click.echo(json.dumps(event.to_dict()), nl=True)
        return
    if follow:
        out = console()
        for event in found:
            out.print(_line(event, partitioned), markup=False, highlight=False)
        return
    rows = [event_row(event, queue=partitioned) for event in found]
    columns = ["queue", *COLUMNS] if partitioned else COLUMNS
    console().print(table(f"events of {queue}", columns, rows))


@click.command("events")
@click.argument("name", required=False)
@click.option("--on/--off", "on", default=None, help="Turn the queue's events on or off.")
@click.option(
    "--maxlen",
    type=click.IntRange(1, MAX_MAXLEN),
    default=DEFAULT_MAXLEN,
    show_default=True,
    help="With --on: keep about this many events (the stream is trimmed past it).",
)
@click.option("--all", "every", is_flag=True, help="Every queue in the registry now.")
@connection_options
@click.pass_obj
def queue_events(
    state: CliState, name: str | None, on: bool | None, maxlen: int, every: bool
) -> None:
    """Turn NAME's lifecycle events on or off (every partition of a partitioned queue),
    or with --all those of every queue known now (queues made later start off)."""
    if on is None:
        raise CliError("say --on or --off")
    if every == bool(name):
        raise CliError("give a queue NAME, or --all (not both)")
    admin = Admin(backend=state.backend())
    names = admin.queue_names() if every else [name or ""]
    changed = [q for n in names for q in admin.set_events(n, on, maxlen)]
    what = f"on (about {maxlen} kept)" if on else "off"
    click.echo(f"events {what} for {len(changed)} queue(s): {', '.join(changed) or '-'}")


def print_timeline(found: list[TaskEvent], title: str) -> None:
    """A task's events as a table (``task inspect``)."""
    console().print(table(title, COLUMNS, [event_row(e) for e in found]))
