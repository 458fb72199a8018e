"""``clusterq stats``: the whole deployment at a glance, per node and per queue."""

from __future__ import annotations

import click

from clusterq.cli.render import console, print_json, table
from clusterq.cli.state import CliState, connection_options
from clusterq.ops.inspector import Inspector, NodeTotals, QueueInfo


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
            ["Master", "Queues", *COUNT_COLUMNS, "Max latency"],
            [[n.master, n.queues, *_counts(n), f"{n.latency:.3f}s"] for n in summary.nodes],
        )
    )
    rows: list[list[object]] = []
    for q in summary.queues:
        if q.error:
            rows.append([q.queue, q.master or "-", f"error: {q.error}", *[""] * 8])
        else:
            paused = "yes" if q.paused else "no"
            rows.append([q.queue, q.master or "-", *_counts(q), f"{q.latency:.3f}s", paused])
    out.print(table("per queue", ["Queue", "Master", *COUNT_COLUMNS, "Latency", "Paused"], rows))
    click.echo(
        f"{summary.workers} live worker(s), {summary.running} task(s) running, "
        f"concurrency {summary.concurrency}"
    )


COUNT_COLUMNS = ["Pending", "Active", "Scheduled", "Retry", "Archived", "Processed", "Failed"]


def _counts(totals: NodeTotals | QueueInfo) -> list[object]:
    return [
        totals.pending,
        totals.active,
        totals.scheduled,
        totals.retry,
        totals.archived,
        totals.processed,
        totals.failed,
    ]
