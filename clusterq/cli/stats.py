"""``clusterq stats``: the whole deployment at a glance, per node and per queue."""

from __future__ import annotations

import click

from clusterq.cli.render import console, print_json, table
from clusterq.cli.state import CliState, connection_options
from clusterq.inspector import Inspector


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@connection_options
@click.pass_obj
def stats(state: CliState, as_json: bool) -> None:
    """Totals per master (the queues it owns) and per queue, and the live workers."""
    summary = Inspector(backend=state.backend()).stats()
    if as_json:
        print_json(summary.to_dict())
        return
    out = console()
    out.print(
        table(
            "per master",
            [
                "Master",
                "Queues",
                "Pending",
                "Active",
                "Scheduled",
                "Retry",
                "Archived",
                "Processed",
                "Failed",
                "Max latency",
            ],
            [
                [
                    n.master,
                    n.queues,
                    n.pending,
                    n.active,
                    n.scheduled,
                    n.retry,
                    n.archived,
                    n.processed,
                    n.failed,
                    f"{n.latency:.3f}s",
                ]
                for n in summary.nodes
            ],
        )
    )
    out.print(
        table(
            "per queue",
            [
                "Queue",
                "Master",
                "Pending",
                "Active",
                "Scheduled",
                "Retry",
                "Archived",
                "Processed",
                "Failed",
                "Latency",
                "Paused",
            ],
            [
                [
                    q.queue,
                    q.master or "-",
                    q.pending,
                    q.active,
                    q.scheduled,
                    q.retry,
                    q.archived,
                    q.processed,
                    q.failed,
                    f"{q.latency:.3f}s",
                    "yes" if q.paused else "no",
                ]
                if not q.error
                else [q.queue, q.master or "-", f"error: {q.error}"] + [""] * 8
                for q in summary.queues
            ],
        )
    )
    click.echo(
        f"{summary.workers} live worker(s), {summary.running} task(s) running, "
        f"concurrency {summary.concurrency}"
    )
