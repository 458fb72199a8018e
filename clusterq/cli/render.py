"""Output helpers: rich for people, stable JSON for scripts."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from clusterq.cluster.topology import Topology


def console() -> Console:
    """A console on the current stdout; wide when not a terminal, so tables do not wrap."""
    is_tty = sys.stdout.isatty()
    return Console(file=sys.stdout, width=None if is_tty else 200, soft_wrap=not is_tty)


def print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False, default=str))


def table(
    title: str | None, columns: list[str], rows: Sequence[Sequence[Any]], *, header: bool = True
) -> Table:
    out = Table(title=title, show_lines=False, header_style="bold", show_header=header)
    for column in columns:
        out.add_column(column, overflow="fold")
    for row in rows:
        out.add_row(*["" if cell is None else str(cell) for cell in row])
    return out


def slot_ranges(ranges: Any) -> str:
    return ", ".join(f"{lo}" if lo == hi else f"{lo}-{hi}" for lo, hi in ranges)


def slot_map_table(topology: Topology, title: str | None = None) -> Table:
    """The slot map: ranges, count, master and replicas per shard."""
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
