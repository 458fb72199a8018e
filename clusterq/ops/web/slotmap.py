"""The cluster's slot map as a server-rendered SVG (no I/O): all 16,384 slots as one bar,
each master's ranges in its colour, slots no master serves in red, and a mark at the
keyslot of each queue."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

from clusterq.cluster.topology import Topology

SLOTS = 16384
#: Colours of the masters, in the order of their first slot (they repeat past eight).
PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#76b7b2", "#edc948", "#9c755f", "#bab0ac")
UNCOVERED = "#e15759"
WIDTH, BAR, MARK = 1024, 28, 10


@dataclass(frozen=True)
class Span:
    """Slots ``start..end`` (inclusive) served by ``master`` (None: by no master)."""

    start: int
    end: int
    master: str | None
    colour: str


def spans(topology: Topology) -> tuple[list[Span], dict[str, str]]:
    """The bar's spans in slot order (gaps as uncovered spans) and each master's colour."""
    owned = sorted(
        (start, end, shard.master.addr) for shard in topology.shards for start, end in shard.slots
    )
    colours: dict[str, str] = {}
    for _, _, master in owned:
        colours.setdefault(master, PALETTE[len(colours) % len(PALETTE)])
    out: list[Span] = []
    at = 0
    for start, end, master in owned:
        if start > at:
            out.append(Span(at, start - 1, None, UNCOVERED))
        out.append(Span(start, end, master, colours[master]))
        at = max(at, end + 1)
    if at < SLOTS:
        out.append(Span(at, SLOTS - 1, None, UNCOVERED))
    return out, colours


def _x(slot: float) -> float:
    return round(slot * WIDTH / SLOTS, 2)


def render(topology: Topology, marks: Sequence[tuple[str, int]]) -> str:
    """The SVG: the bar, then a tick per ``(queue, keyslot)`` below it, each with its
    name as a tooltip. Every text is escaped."""
    bar, _ = spans(topology)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="slotmap" viewBox="0 0 {WIDTH} '
        f'{BAR + MARK + 4}" role="img" aria-label="slot map">'
    ]
    for span in bar:
        who = escape(span.master) if span.master else "no master"
        width = max(_x(span.end + 1) - _x(span.start), 0.5)
        parts.append(
            f'<rect class="span{"" if span.master else " uncovered"}" x="{_x(span.start)}" y="0" '
            f'width="{width}" height="{BAR}" fill="{span.colour}">'
            f"<title>slots {span.start}-{span.end}: {who}</title></rect>"
        )
    for queue, slot in marks:
        x = _x(slot + 0.5)
        parts.append(
            f'<line class="mark" x1="{x}" x2="{x}" y1="{BAR}" y2="{BAR + MARK}" '
            f'stroke="#222" stroke-width="1.5"><title>{escape(queue)}: slot {slot}</title></line>'
        )
    parts.append("</svg>")
    return "".join(parts)
