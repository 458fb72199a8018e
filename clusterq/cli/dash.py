"""``clusterq dash``: the live terminal dashboard."""

from __future__ import annotations

import click

from clusterq.cli.state import CliError, CliState, connection_options
from clusterq.ops.admin import Admin


@click.command()
@click.option(
    "--interval",
    type=click.FloatRange(min=0.2),
    default=1.0,
    show_default=True,
    help="Seconds between refreshes.",
)
@connection_options
@click.pass_obj
def dash(state: CliState, interval: float) -> None:
    """Queues grouped by master (sizes, rates, latency), workers and failover events,
    live; Enter on a queue pages through its tasks (run / archive / delete)."""
    try:
        from clusterq.ops.dash import Dashboard
    except ImportError:
        raise CliError("the dashboard needs Textual: pip install 'clusterq[dash]'") from None
    admin = Admin(backend=state.backend(retry_timeout=1.0), timeout=1.0)
    Dashboard(admin, interval=interval).run()
