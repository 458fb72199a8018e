"""Task commands: ``clusterq enqueue`` and ``clusterq task ls|inspect|delete|archive|run``."""

from __future__ import annotations

import json

import click

from clusterq.broker.manage import Action
from clusterq.cli.events import print_timeline
from clusterq.cli.render import clock, console, print_json, progress_bar, table
from clusterq.cli.state import (
    STATE_CHOICE,
    CliError,
    CliState,
    confirm,
    connection_options,
    json_argument,
)
from clusterq.client import Client
from clusterq.ops.admin import Admin
from clusterq.ops.inspector import MAX_PAGE, Inspector
from clusterq.producer import DEFAULT_MAX_RETRY, DEFAULT_QUEUE


@click.command()
@click.argument("task_type")
@click.argument("payload_json", default="null")
@click.option("--queue", "-q", default=DEFAULT_QUEUE, show_default=True, help="Queue name.")
@click.option(
    "--max-retry",
    type=int,
    default=DEFAULT_MAX_RETRY,
    show_default=True,
    help="Retries allowed after the first attempt.",
)
@click.option("--process-in", type=float, default=None, help="Delay in seconds.")
@click.option("--timeout", type=float, default=None, help="Seconds one attempt may take.")
@click.option(
    "--unique-for", type=float, default=None, help="Refuse duplicates for this many seconds."
)
@click.option("--task-id", default=None, help="Task id (makes retrying the enqueue safe).")
@click.option(
    "--key", default=None, help="Partitioned queue: tasks with the same key share a partition."
)
@click.option(
    "--retention", type=float, default=None, help="Keep the completed task this many seconds."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@connection_options
@click.pass_obj
def enqueue(
    state: CliState,
    task_type: str,
    payload_json: str,
    queue: str,
    max_retry: int,
    process_in: float | None,
    timeout: float | None,
    unique_for: float | None,
    task_id: str | None,
    key: str | None,
    retention: float | None,
    as_json: bool,
) -> None:
    """Enqueue one task of TASK_TYPE with PAYLOAD_JSON (a JSON value) into a queue."""
    payload = json_argument(payload_json)
    client = Client(backend=state.backend(retry_timeout=15.0))
    info = client.enqueue(
        task_type,
        payload,
        queue=queue,
        max_retry=max_retry,
        process_in=process_in,
        timeout=timeout,
        unique_for=unique_for,
        task_id=task_id,
        key=key,
        retention=retention,
    )
    if as_json:
        print_json(info.to_dict())
        return
    verb = "already enqueued" if info.already_enqueued else "enqueued"
    click.echo(f"{verb}: task {info.id} ({info.type}) in queue {info.queue}, state {info.state}")


@click.group()
def task() -> None:
    """List, inspect, delete, archive and run tasks."""


_QUEUE = click.option("--queue", "-q", required=True, help="The queue the tasks are in.")


@task.command("ls")
@_QUEUE
@click.option(
    "--state",
    "task_state",
    type=STATE_CHOICE,
    default="pending",
    show_default=True,
    help="Which tasks.",
)
@click.option("--offset", type=click.IntRange(0), default=0, help="Skip this many first.")
@click.option(
    "--limit",
    type=click.IntRange(1, MAX_PAGE),
    default=20,
    show_default=True,
    help="At most this many.",
)
@click.option("--newest", is_flag=True, help="Newest first (default: next to run / oldest first).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@connection_options
@click.pass_obj
def task_ls(
    state: CliState,
    queue: str,
    task_state: str,
    offset: int,
    limit: int,
    newest: bool,
    as_json: bool,
) -> None:
    """One page of a queue's tasks in one state."""
    infos = Inspector(backend=state.backend()).tasks(
        queue, task_state, offset=offset, limit=limit, newest_first=newest
    )
    if as_json:
        print_json([info.to_dict() for info in infos])
        return
    if not infos:
        click.echo(f"no {task_state} tasks in queue {queue}")
        return
    rows = [
        [
            info.id,
            info.type,
            _short(json.dumps(info.payload, default=repr)),
            f"{info.retried}/{info.max_retry}",
            clock(info.next_process_at),
            _short(info.last_error or ""),
        ]
        for info in infos
    ]
    console().print(
        table(
            f"{task_state} tasks of {queue}",
            ["Id", "Type", "Payload", "Retried", "Next", "Last error"],
            rows,
        )
    )


@task.command("inspect")
@click.argument("task_id")
@_QUEUE
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@connection_options
@click.pass_obj
def task_inspect(state: CliState, task_id: str, queue: str, as_json: bool) -> None:
    """Everything about one task: record, payload, retries, last error, result, which
    worker holds it, and its timeline when the queue's events are on."""
    inspector = Inspector(backend=state.backend())
    detail = inspector.task(queue, task_id)
    timeline = inspector.timeline(queue, task_id)
    data = detail.to_dict()
    if as_json:
        if timeline is not None:
            data["timeline"] = [event.to_dict() for event in timeline]
        print_json(data)
        return
    for name in ("enqueued_at", "next_process_at", "last_failed_at", "retained_until",
                 "deadline", "lease_expires"):  # fmt: skip
        data[name] = clock(data[name])
    data["payload"] = json.dumps(data["payload"], default=repr)
    data["result"] = json.dumps(data["result"], default=repr)
    data["headers"] = json.dumps(data["headers"], ensure_ascii=False) if data["headers"] else None
    rows = [[name, value] for name, value in data.items() if value not in (None, "-")]
    console().print(table(f"task {task_id}", ["", ""], rows, header=False))
    if timeline is not None:
        print_timeline(timeline, f"timeline of task {task_id} (events still in the stream)")


def _bulk_command(action: Action, verb: str, doc: str) -> click.Command:
    @click.argument("task_ids", nargs=-1)
    @_QUEUE
    @click.option("--all", "every", is_flag=True, help="Every task in --state (of --type).")
    @click.option("--state", "task_state", type=STATE_CHOICE, help="With --all: which state.")
    @click.option("--type", "task_type", default=None, help="With --all: only this task type.")
    @click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    @connection_options
    @click.pass_obj
    def command(
        state: CliState,
        task_ids: tuple[str, ...],
        queue: str,
        every: bool,
        task_state: str | None,
        task_type: str | None,
        yes: bool,
        as_json: bool,
    ) -> None:
        admin = Admin(backend=state.backend())
        if every == bool(task_ids):
            raise CliError("give task ids, or --all --state STATE (not both)")
        if not every:
            if task_state or task_type:
                raise CliError("--state and --type go with --all")
            confirm(yes, f"{action} {len(task_ids)} task(s) of queue {queue}?")
            statuses = admin.act(action, queue, list(task_ids))
            if as_json:
                print_json(statuses)
            else:
                for task_id, status in statuses.items():
                    click.echo(f"{task_id}: {verb if status == 'ok' else _why(status)}")
            if any(status != "ok" for status in statuses.values()):
                raise SystemExit(1)
            return
        if task_state is None:
            raise CliError("--all needs --state")
        kind = f" of type {task_type}" if task_type else ""
        confirm(yes, f"{action} every {task_state} task{kind} of queue {queue}?")
        with progress_bar(f"{action}: {task_state} tasks") as advance:
            result = admin.act_all(action, queue, task_state, task_type=task_type, progress=advance)
        if as_json:
            print_json({"done": result.done, "skipped": result.skipped,
                        "statuses": result.statuses})  # fmt: skip
        else:
            click.echo(f"{verb}: {result.done} task(s); left alone: {result.skipped}")

    command.__doc__ = doc
    return click.command(action)(command)


@task.command("cancel")
@click.argument("task_ids", nargs=-1, required=True)
@_QUEUE
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@connection_options
@click.pass_obj
def task_cancel(state: CliState, task_ids: tuple[str, ...], queue: str, yes: bool) -> None:
    """Cancel active tasks: the worker running each is told at its next lease renewal,
    cancels an async handler, and archives the task."""
    admin = Admin(backend=state.backend())
    confirm(yes, f"cancel {len(task_ids)} running task(s) of queue {queue}?")
    statuses = admin.cancel(queue, list(task_ids))
    for task_id, status in statuses.items():
        click.echo(f"{task_id}: {'cancel requested' if status == 'ok' else _why(status)}")
    if any(status != "ok" for status in statuses.values()):
        raise SystemExit(1)


def _why(status: str) -> str:
    if status == "missing":
        return "no such task"
    if status == "active":
        return "left alone: a worker is running it"
    if status.startswith("state:"):
        return f"left alone: it is {status[6:]}"
    return f"left alone: {status}"


def _short(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


task.add_command(
    _bulk_command(
        "delete", "deleted",
        "Delete tasks (given by id, or --all in a state); active ones are left alone.",
    )
)  # fmt: skip
task.add_command(
    _bulk_command("archive", "archived", "Move pending, scheduled or retry tasks to the archive.")
)
task.add_command(
    _bulk_command(
        "run", "made pending",
        "Run scheduled, retry or archived tasks now (an archived one gets one more attempt).",
    )
)  # fmt: skip
