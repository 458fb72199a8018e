"""The top-level group, its global options, and the registration of every command group."""

from __future__ import annotations

import click

from clusterq import __version__
from clusterq.cli.bench import bench
from clusterq.cli.cluster import cluster
from clusterq.cli.cron import cron_group, scheduler
from clusterq.cli.dash import dash
from clusterq.cli.dev import dev
from clusterq.cli.doctor import doctor
from clusterq.cli.drill import drill
from clusterq.cli.events import events, queue_events
from clusterq.cli.metrics import metrics
from clusterq.cli.queue import queue
from clusterq.cli.reference import reference
from clusterq.cli.state import CliState, ClusterqGroup
from clusterq.cli.stats import stats
from clusterq.cli.stream import stream
from clusterq.cli.tasks import enqueue, task
from clusterq.cli.web import web
from clusterq.cli.worker import worker
from clusterq.cli.workflow import workflow_group
from clusterq.cluster.connection import DEFAULT_URL, Mode
from clusterq.keys import DEFAULT_PREFIX


@click.group(cls=ClusterqGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--url",
    envvar="CLUSTERQ_URL",
    default=DEFAULT_URL,
    show_default=True,
    help="redis:// or rediss:// URL of one or more seed nodes (comma-separated); "
    "user:password@ for ACL. Env: CLUSTERQ_URL.",
)
@click.option(
    "--cluster/--standalone",
    "mode",
    default=None,
    help="Insist on a cluster or a standalone server (default: ask the server).",
)
@click.option(
    "--prefix",
    envvar="CLUSTERQ_PREFIX",
    default=DEFAULT_PREFIX,
    show_default=True,
    help="Key prefix. Env: CLUSTERQ_PREFIX.",
)
@click.version_option(__version__, prog_name="clusterq")
@click.pass_context
def main(ctx: click.Context, url: str, mode: bool | None, prefix: str) -> None:
    """clusterq: background task queues at home on Redis Cluster."""
    chosen: Mode | None = None if mode is None else ("cluster" if mode else "standalone")
    state = CliState(url=url, mode=chosen, prefix=prefix)
    ctx.obj = state
    ctx.call_on_close(state.close)


main.add_command(dev)
queue.add_command(queue_events)
main.add_command(queue)
main.add_command(events)
main.add_command(stream)
main.add_command(cluster)
main.add_command(enqueue)
main.add_command(task)
main.add_command(stats)
main.add_command(metrics)
main.add_command(dash)
main.add_command(scheduler)
main.add_command(cron_group)
main.add_command(workflow_group)
main.add_command(worker)
main.add_command(drill)
main.add_command(bench)
main.add_command(doctor)
main.add_command(reference)
main.add_command(web)
