"""``clusterq workflow inspect``: a workflow's steps, their states, queues and masters."""

from __future__ import annotations

import click

from clusterq.cli.render import console, print_json, safe_text, table
from clusterq.cli.state import CliState, connection_options
from clusterq.ops.inspector import Inspector


@click.group("workflow")
def workflow_group() -> None:
    """Look at workflows (chains, groups, chords)."""


@workflow_group.command("inspect")
@click.argument("workflow_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@connection_options
@click.pass_obj
def inspect(state: CliState, workflow_id: str, as_json: bool) -> None:
    """Each step of WORKFLOW_ID: its task, type, queue, the master it lives on, state."""
    inspector = Inspector(backend=state.backend())
    info = inspector.workflow(workflow_id)
    topology = inspector.topology
    masters = {}
    for step in info.steps:
        location = topology.locate(step.queue).master
        masters[step.id] = location.addr if location else None
    if as_json:
        data = info.to_dict()
        for step in data["steps"]:
            step["master"] = masters[step["id"]]
        print_json(data)
        return
    kept = f" (state kept {info.expires_in:.0f}s more)" if info.expires_in is not None else ""
    click.echo(safe_text(f"workflow {info.id}: {info.status}{kept}"))
    rows = [
        [s.id, s.task_id, s.type, s.queue, masters[s.id] or "-", s.state, (s.error or "")[:60]]
        for s in info.steps
    ]
    console().print(
        table(None, ["Step", "Task", "Type", "Queue", "Master", "State", "Error"], rows)
    )
    if info.status == "succeeded":
        click.echo(safe_text(f"result: {info.result!r}"))
