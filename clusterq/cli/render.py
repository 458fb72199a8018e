"""Output helpers: rich for people, stable JSON for scripts."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import click
from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from rich.text import Text

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
    shown = Text(safe_text(title)) if title is not None else None
    out = Table(title=shown, show_lines=False, header_style="bold", show_header=header)
    for column in columns:
        out.add_column(column, overflow="fold")
    for row in rows:
        out.add_row(*[Text(safe_text(cell)) for cell in row])
    return out


def safe_text(value: object) -> str:
    """``value`` as text a terminal shows as it is: control characters (ANSI escapes
    among them) written as escapes. In a :class:`~rich.text.Text` it is never read as
    markup either: data from Redis (queue names, worker ids) can hold anything."""
    text = "" if value is None else str(value)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


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


def clock(at: object, *, ms: bool = False) -> str:
    """Unix time ``at`` as local date and time (with milliseconds if ``ms``); "-" for
    none."""
    if not isinstance(at, int | float) or isinstance(at, bool) or not at:
        return "-"
    shown = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))
    return shown + f".{int(at * 1000) % 1000:03d}" if ms else shown


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


@contextlib.contextmanager
def progress_bar(what: str) -> Iterator[Callable[[int, int], None]]:
    """A progress bar on stderr (shown on a terminal only) and the ``progress(done,
    total)`` callback that moves it."""
    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(safe_text(what), total=None)

        def advance(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield advance
