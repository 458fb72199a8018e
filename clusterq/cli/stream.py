"""``clusterq stream``: declare, publish to, list and inspect event streams."""

from __future__ import annotations

import click

from clusterq.cli.render import console, print_json, table
from clusterq.cli.state import CliError, CliState, connection_options, json_argument
from clusterq.client import Client
from clusterq.errors import ClusterqError
from clusterq.ops.inspector import Inspector
from clusterq.ops.streaminfo import StreamPartitionInfo


@click.group()
def stream() -> None:
    """Event streams: declare, publish, list, inspect."""


@stream.command("create")
@click.argument("name")
@click.option("--partitions", type=int, required=True, help="How many partitions (1..256).")
@click.option("--maxlen", type=int, default=None, help="Trim each partition to about this.")
@connection_options
@click.pass_obj
def create(state: CliState, name: str, partitions: int, maxlen: int | None) -> None:
    """Declare a stream (its partition count cannot change later)."""
    with Client(backend=state.backend()) as client:
        try:
            layout = client.declare_stream(name, partitions, maxlen=maxlen)
        except (ValueError, ClusterqError) as exc:
            raise CliError(str(exc)) from None
    trim = f", trimmed to ~{layout.maxlen} each" if layout.maxlen else ""
    click.echo(f"stream {name}: {len(layout.partitions)} partitions{trim}")


@stream.command("publish")
@click.argument("name")
@click.argument("payload_json")
@click.option("--key", default=None, help="Events with the same key share a partition.")
@connection_options
@click.pass_obj
def publish(state: CliState, name: str, payload_json: str, key: str | None) -> None:
    """Publish one event (PAYLOAD_JSON, a JSON value) to stream NAME."""
    payload = json_argument(payload_json)
    with Client(backend=state.backend()) as client:
        try:
            published = client.publish(name, payload, key=key)
        except ClusterqError as exc:
            raise CliError(str(exc)) from None
    click.echo(f"published: event {published.id} to {name} partition {published.partition}")


def _rows(infos: list[StreamPartitionInfo], show_cluster: bool) -> list[list[object]]:
    rows: list[list[object]] = []
    for info in infos:
        groups = info.groups or []
        row: list[object] = [
            info.stream,
            info.partition,
            info.length if not info.error else f"error: {info.error}",
            info.dead,
            ", ".join(g.group for g in groups) or "-",
            sum(g.consumers for g in groups),
            sum(g.pending for g in groups),
            ", ".join(f"{g.group}={'?' if g.lag is None else g.lag}" for g in groups) or "-",
        ]
        if show_cluster:
            row += [info.keyslot, info.master or "-", ", ".join(info.replicas) or "-"]
        rows.append(row)
    return rows


_COLUMNS = ["Stream", "Partition", "Length", "Dead", "Groups", "Consumers", "Pending", "Lag"]
_CLUSTER = ["KeySlot", "Master", "Replicas"]


@stream.command("ls")
@click.option(
    "--cluster", "show_cluster", is_flag=True, help="Also show keyslot, master and replicas."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (one object per partition).")
@connection_options
@click.pass_obj
def ls(state: CliState, show_cluster: bool, as_json: bool) -> None:
    """Every declared stream, one row per partition."""
    infos = Inspector(backend=state.backend()).streams()
    if as_json:
        print_json([info.to_dict() for info in infos])
        return
    if not infos:
        click.echo("no streams yet (clusterq stream create NAME --partitions N)")
        return
    columns = _COLUMNS + (_CLUSTER if show_cluster else [])
    console().print(table(None, columns, _rows(infos, show_cluster)))


@stream.command("inspect")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@connection_options
@click.pass_obj
def inspect(state: CliState, name: str, as_json: bool) -> None:
    """One stream: per partition its node, length and dead letters, and per group its
    consumers, pending events, lag and events trimmed before the group read them."""
    try:
        infos = Inspector(backend=state.backend()).streams([name])
    except ClusterqError as exc:
        raise CliError(str(exc)) from None
    if as_json:
        print_json([info.to_dict() for info in infos])
        return
    console().print(table(f"stream {name}", _COLUMNS + _CLUSTER, _rows(infos, True)))
    groups = [
        [info.partition, g.group, g.consumers, g.pending, g.lag, g.last_delivered, g.trimmed_unread]
        for info in infos
        for g in info.groups
    ]
    if groups:
        console().print(
            table(
                "groups",
                [
                    "Partition",
                    "Group",
                    "Consumers",
                    "Pending",
                    "Lag",
                    "Last delivered",
                    "Trimmed unread",
                ],
                groups,
            )
        )
