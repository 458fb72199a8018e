"""``clusterq metrics``: a Prometheus exporter for the whole deployment."""

from __future__ import annotations

import time

import click

from clusterq.cli.state import CliState, connection_options
from clusterq.ops.inspector import Inspector


@click.command()
@click.option(
    "--port", type=click.IntRange(1, 65535), default=9808, show_default=True, help="HTTP port."
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option(
    "--duration",
    type=click.FloatRange(min=0),
    default=None,
    help="Stop after this many seconds (default: until Ctrl-C).",
)
@connection_options
@click.pass_obj
def metrics(state: CliState, port: int, host: str, duration: float | None) -> None:
    """Serve queue sizes, latency, processed/failed totals, workers and the cluster map
    (labelled by queue and by master) on http://HOST:PORT/metrics, read at each scrape."""
    from clusterq.ops.metrics import serve_cluster_metrics

    inspector = Inspector(backend=state.backend())
    server = serve_cluster_metrics(inspector, port, host)
    click.echo(f"serving metrics on http://{host}:{port}/metrics", err=True)
    deadline = None if duration is None else time.monotonic() + duration
    try:
        while deadline is None or time.monotonic() < deadline:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
