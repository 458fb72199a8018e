"""``clusterq dev``: a local 6-node cluster (3 masters, 3 replicas) without Docker."""

from __future__ import annotations

from pathlib import Path

import click

from clusterq.cli.render import console, print_json, slot_map_table, table
from clusterq.tools import servers
from clusterq.tools.devcluster import DEFAULT_BASE_PORT, LocalCluster

_base_port = click.option(
    "--base-port",
    type=int,
    default=DEFAULT_BASE_PORT,
    show_default=True,
    help="Port of the first node; the nodes use base..base+5.",
)
_dir = click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where node data, logs and pid files live (default: <tmp>/clusterq-dev-<base-port>).",
)


@click.group()
def dev() -> None:
    """Run a local 6-node cluster on 127.0.0.1 (no Docker needed)."""


@dev.command()
@_base_port
@_dir
@click.option("--server-bin", default=None, help="redis-server or valkey-server binary to run.")
@click.option(
    "--timeout", type=float, default=60.0, show_default=True, help="Seconds to wait for health."
)
def up(base_port: int, directory: Path | None, server_bin: str | None, timeout: float) -> None:
    """Start the cluster (or find it running) and print its slot map."""
    cluster = LocalCluster(base_port, directory, server_bin=server_bin)
    result = cluster.up(timeout=timeout)
    if result.already_running:
        click.echo(f"cluster already running in {cluster.directory}")
    else:
        binary = servers.find_server_binary(server_bin)
        how = "created" if result.created else "restarted"
        click.echo(
            f"{how} cluster: started nodes {', '.join(map(str, result.started))} "
            f"with {servers.server_version(binary)} in {cluster.directory}"
        )
    console().print(slot_map_table(cluster.topology(), f"cluster at {cluster.seed_url}"))
    click.echo(f"export CLUSTERQ_URL={cluster.seed_url}")


@dev.command()
@_base_port
@_dir
@click.option("--purge", is_flag=True, help="Also delete the nodes' data and logs.")
def down(base_port: int, directory: Path | None, purge: bool) -> None:
    """Stop exactly the processes that `dev up` started."""
    cluster = LocalCluster(base_port, directory)
    stopped = cluster.down(purge=purge)
    if stopped:
        click.echo(f"stopped nodes {', '.join(map(str, stopped))}")
    else:
        click.echo(f"no running nodes in {cluster.directory}")
    if purge:
        click.echo(f"removed {cluster.directory}")


@dev.command()
@_base_port
@_dir
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(base_port: int, directory: Path | None, as_json: bool) -> None:
    """The nodes, their processes and their roles; exit 1 unless the cluster is healthy."""
    cluster = LocalCluster(base_port, directory)
    rows = cluster.status()
    if any(r.running for r in rows):
        problems = cluster.health_problems(strict=True)
    else:
        answering = cluster.answering_ports()
        problems = ["not running"]
        if answering:
            problems = [
                f"no node was started from {cluster.directory}, but servers answer on ports "
                f"{', '.join(map(str, answering))}: pass the --dir that `dev up` used"
            ]
    if as_json:
        print_json([row.__dict__ for row in rows])
    else:
        console().print(
            table(
                f"local cluster in {cluster.directory}",
                ["Port", "Pid", "Running", "Role", "Health", "Master", "Slots", "Node"],
                [
                    [
                        r.port,
                        r.pid or "-",
                        "yes" if r.running else "no",
                        r.role,
                        r.health,
                        r.master,
                        r.slots,
                        r.node_id[:12],
                    ]
                    for r in rows
                ],
            )
        )
        click.echo("healthy" if not problems else "not healthy: " + "; ".join(problems))
    if problems:
        raise SystemExit(1)
