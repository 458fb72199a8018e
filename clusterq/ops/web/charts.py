"""A queue's processed and failed tasks per minute as a server-rendered SVG (no I/O, no
script): one bar per minute for each series over the last ``minutes`` minutes, a y axis
labelled with the largest count, an x axis labelled with the first and last minute's
time (UTC). Every text is escaped."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

from clusterq.ops.queueinfo import HISTORY_MINUTES, Minute

WIDTH, HEIGHT = 720, 180
LEFT, BOTTOM, TOP = 44, 22, 8
SERIES = (("processed", "#59a14f"), ("failed", "#e15759"))


@dataclass(frozen=True)
class Bar:
    """One bar: a series' count in the minute starting at ``at``."""

    series: str
    at: float
    value: int
    x: float
    y: float
    width: float
    height: float


def bars(history: Sequence[Minute], now: float, minutes: int = HISTORY_MINUTES) -> list[Bar]:
    """The bars of ``history`` (minutes outside the last ``minutes`` before ``now`` left
    out; a zero draws no bar): each minute's slot split between the two series."""
    first = int(now // 60) - minutes + 1
    shown = [m for m in history if first <= int(m.at // 60) < first + minutes]
    top = max([max(m.processed, m.failed) for m in shown] + [1])
    slot = (WIDTH - LEFT) / minutes
    plot = HEIGHT - BOTTOM - TOP
    out: list[Bar] = []
    for minute in shown:
        x0 = LEFT + (int(minute.at // 60) - first) * slot
        for k, (name, _) in enumerate(SERIES):
            value = int(getattr(minute, name))
            if value <= 0:
                continue
            height = round(value * plot / top, 2)
            out.append(
                Bar(
                    name,
                    minute.at,
                    value,
                    round(x0 + k * slot / 2, 2),
                    round(TOP + plot - height, 2),
                    round(max(slot / 2, 0.5), 2),
                    height,
                )
            )
    return out


def render(
    history: Sequence[Minute],
    now: float | None = None,
    minutes: int = HISTORY_MINUTES,
    *,
    label: str = "",
) -> str:
    """The SVG of ``history`` (see :func:`bars`), or a text saying there is none;
    ``label`` (a queue's name) in its title."""
    now = time.time() if now is None else now
    drawn = bars(history, now, minutes)
    if not drawn:
        return '<p class="muted" id="no-history">no activity yet</p>'
    top = max(b.value for b in drawn)
    colour = dict(SERIES)
    start = (int(now // 60) - minutes + 1) * 60
    base = HEIGHT - BOTTOM
    title = f"{label}: processed and failed per minute, the last {minutes} minutes".lstrip(": ")
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" id="history" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label="{escape(title)}"><title>{escape(title)}</title>',
        f'<line x1="{LEFT}" x2="{WIDTH}" y1="{base}" y2="{base}" stroke="currentColor"/>',
        f'<line x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{base}" stroke="currentColor"/>',
        f'<text class="axis" x="{LEFT - 4}" y="{TOP + 10}" text-anchor="end" '
        f'font-size="11" fill="currentColor">{top}</text>',
        f'<text class="axis" x="{LEFT - 4}" y="{base}" text-anchor="end" '
        f'font-size="11" fill="currentColor">0</text>',
        f'<text class="axis" x="{LEFT}" y="{HEIGHT - 6}" font-size="11" '
        f'fill="currentColor">{escape(_hhmm(start))}</text>',
        f'<text class="axis" x="{WIDTH}" y="{HEIGHT - 6}" text-anchor="end" font-size="11" '
        f'fill="currentColor">{escape(_hhmm(now))} UTC</text>',
    ]
    for bar in drawn:
        label = f"{_hhmm(bar.at)} UTC: {bar.value} {bar.series}"
        parts.append(
            f'<rect class="bar {bar.series}" data-series="{bar.series}" '
            f'data-minute="{int(bar.at)}" data-value="{bar.value}" x="{bar.x}" y="{bar.y}" '
            f'width="{bar.width}" height="{bar.height}" fill="{colour[bar.series]}">'
            f"<title>{escape(label)}</title></rect>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _hhmm(at: float) -> str:
    return time.strftime("%H:%M", time.gmtime(at))
