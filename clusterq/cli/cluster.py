"""``clusterq cluster``: the cluster map (nodes, slots)."""

from __future__ import annotations

import json
import sys
import time

import click
from rich.text import Text

from clusterq.cli.render import console, print_json, slot_map_table, slot_ranges, table
from clusterq.cli.state import CliState, connection_options
from clusterq.cluster.changes import TopologyEvent
from clusterq.cluster.topology import Topology
from clusterq.errors import ClusterqError


def slots_json(topology: Topology) -> list[dict[str, object]]:
    return [
        {
            "slots": [list(r) for r in shard.slots],
            "master": shard.master.addr,
            "master_id": shard.master.id,
            "replicas": [r.addr for r in shard.replicas],
        }
        for shard in topology.shards
    ]


@click.group()
def cluster() -> None:
    """Inspect the cluster map."""


@cluster.command("nodes")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@connection_options
@click.pass_obj
def nodes(state: CliState, as_json: bool) -> None:
    """Every node: id, address, role, master, health, slots."""
    topology = state.backend().topology
    if as_json:
        print_json([node.to_dict() for node in topology.nodes])
        return
    owned = {shard.master.id: slot_ranges(shard.slots) for shard in topology.shards}
    rows = []
    for node in topology.nodes:
        master = topology.node(node.master_id) if node.master_id else None
        rows.append(
            [
                node.id[:12],
                node.addr,
                node.role,
                master.addr if master else "",
                node.health,
                owned.get(node.id, ""),
                "" if node.replication_offset is None else node.replication_offset,
            ]
        )
    console().print(
        table(
            f"{topology.mode} at {topology.source}",
            ["Node", "Address", "Role", "Master", "Health", "Slots", "Repl offset"],
            rows,
        )
    )


@cluster.command("slots")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@connection_options
@click.pass_obj
def slots(state: CliState, as_json: bool) -> None:
    """Slot ranges and the master and replicas that hold each."""
    topology = state.backend().topology
    if as_json:
        print_json(slots_json(topology))
        return
    console().print(slot_map_table(topology, f"{topology.mode} at {topology.source}"))


@cluster.command("watch")
@click.option(
    "--interval",
    type=click.FloatRange(min=0.05),
    default=0.5,
    show_default=True,
    help="Seconds between reads.",
)
@click.option(
    "--duration", type=click.FloatRange(min=0), default=None, help="Stop after this many seconds."
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@connection_options
@click.pass_obj
def watch(state: CliState, interval: float, duration: float | None, as_json: bool) -> None:
    """Stream topology events (failovers, failed and recovered nodes) until Ctrl-C."""
    backend = state.backend(retry_timeout=interval)
    out = console()

    def emit(event: TopologyEvent) -> None:
        stamp = time.strftime("%H:%M:%S") + f".{int(time.time() * 1000) % 1000:03d}"
        if as_json:
            click.echo(json.dumps({"time": time.time(), **event.to_dict()}), nl=True)
        else:
            out.print(f"[dim]{stamp}[/dim] {event.describe()}", highlight=False)

    topology = backend.topology
    if not as_json:
        out.print(slot_map_table(topology, f"watching {topology.mode} at {topology.source}"))
    else:
        click.echo(json.dumps({"time": time.time(), "event": "snapshot", **topology.to_dict()}))
    sys.stdout.flush()
    deadline = None if duration is None else time.monotonic() + duration
    try:
        while deadline is None or time.monotonic() < deadline:
            time.sleep(interval)
            try:
                events = backend.refresh_topology()
            except ClusterqError as exc:
                if not as_json:
                    out.print(Text(f"cannot read the map: {exc}", style="red"))
                continue
            for event in events:
                emit(event)
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass
