"""``clusterq cluster``: the cluster map (nodes, slots)."""

from __future__ import annotations

import click

from clusterq.cli.app import CliState
from clusterq.cli.render import console, print_json, slot_ranges, table
from clusterq.topology import Topology


def slot_map_table(topology: Topology, title: str | None = None) -> object:
    rows = [
        [
            slot_ranges(shard.slots),
            shard.slot_count,
            f"{shard.master.addr} ({shard.master.id[:8]})",
            ", ".join(r.addr for r in shard.replicas) or "-",
        ]
        for shard in topology.shards
    ]
    return table(title, ["Slots", "Count", "Master", "Replicas"], rows)


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
@click.pass_obj
def slots(state: CliState, as_json: bool) -> None:
    """Slot ranges and the master and replicas that hold each."""
    topology = state.backend().topology
    if as_json:
        print_json(slots_json(topology))
        return
    console().print(slot_map_table(topology, f"{topology.mode} at {topology.source}"))
