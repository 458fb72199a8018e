"""Task commands: ``clusterq enqueue``."""

from __future__ import annotations

import json

import click

from clusterq.cli.render import print_json
from clusterq.cli.state import CliError, CliState
from clusterq.client import Client
from clusterq.producer import DEFAULT_MAX_RETRY, DEFAULT_QUEUE


@click.command()
@click.argument("task_type")
@click.argument("payload_json", default="null")
@click.option("--queue", "-q", default=DEFAULT_QUEUE, show_default=True, help="Queue name.")
@click.option("--max-retry", type=int, default=DEFAULT_MAX_RETRY, show_default=True)
@click.option("--process-in", type=float, default=None, help="Delay in seconds.")
@click.option("--timeout", type=float, default=None, help="Seconds one attempt may take.")
@click.option(
    "--unique-for", type=float, default=None, help="Refuse duplicates for this many seconds."
)
@click.option("--task-id", default=None, help="Task id (makes retrying the enqueue safe).")
@click.option(
    "--retention", type=float, default=None, help="Keep the completed task this many seconds."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
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
    retention: float | None,
    as_json: bool,
) -> None:
    """Enqueue one task of TASK_TYPE with PAYLOAD_JSON (a JSON value) into a queue."""
    try:
        payload = json.loads(payload_json)
    except ValueError as exc:
        raise CliError(f"PAYLOAD_JSON is not valid JSON: {exc}") from None
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
        retention=retention,
    )
    if as_json:
        print_json(info.to_dict())
        return
    verb = "already enqueued" if info.already_enqueued else "enqueued"
    click.echo(f"{verb}: task {info.id} ({info.type}) in queue {info.queue}, state {info.state}")
