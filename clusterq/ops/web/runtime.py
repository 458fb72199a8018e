"""What runs: workers (processes, queues, tasks, heartbeats; queues no live worker
serves), periodic entries, event streams, partitioned queues, a workflow's steps.

Each page reads through the admin API only. What cannot be read (a dead node, a
command the ACL refuses) is shown on the page as ``n/a (...)``, never as an error page;
a missing workflow is a 404 naming it. Every text from Redis is escaped: by the
templates (autoescape), and in the workflow's SVG by :func:`workflow_svg` itself.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from html import escape
from typing import TYPE_CHECKING, Any, TypeVar

import redis
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from clusterq.errors import ClusterqError, InvalidName
from clusterq.ops.croninfo import cron_history, cron_status
from clusterq.workflow import StepInfo, WorkflowGone, WorkflowInfo

if TYPE_CHECKING:
    from clusterq.ops.web.ui import Ui

T = TypeVar("T")


#: Firings of each periodic entry shown on /cron.
FIRINGS = 5
#: The most steps drawn as a graph (larger workflows: the table only).
GRAPH_STEPS = 200
#: The most steps listed in the table.
TABLE_STEPS = 1000
#: Characters of a result or error shown.
SHOWN = 300

#: Each step state's colour in the workflow graph.
STATE_COLOURS = {
    "done": "#59a14f",
    "failed": "#e15759",
    "enqueued": "#4e79a7",
    "enqueuing": "#76b7b2",
    "waiting": "#bab0ac",
    "skipped": "#dddddd",
}
BOX_W, BOX_H, GAP_X, GAP_Y, PAD = 170, 40, 60, 14, 10


def routes(ui: Ui) -> list[Route]:
    """This module's routes (its nav entries added to ``ui.nav``)."""
    pages = Runtime(ui)
    ui.nav += [
        ("Workers", "/workers"),
        ("Cron", "/cron"),
        ("Streams", "/streams"),
        ("Partitions", "/partitions"),
        ("Workflows", "/workflow"),
    ]
    return [
        Route("/workers", pages.workers),
        Route("/cron", pages.cron),
        Route("/streams", pages.streams),
        Route("/partitions", pages.partitions),
        Route("/workflow", pages.workflow),
    ]


def unreadable(exc: BaseException) -> str:
    """How a failed read is shown: ``n/a (ACL)`` for a refused command, else the reason."""
    if isinstance(exc, redis.exceptions.NoPermissionError) or "NOPERM" in str(exc):
        return "n/a (ACL)"
    return f"n/a ({exc})"


def attempt(read: Callable[[], T]) -> tuple[T | None, str | None]:
    """``read()``, or None and why it could not be read."""
    try:
        return read(), None
    except (ClusterqError, redis.RedisError, OSError) as exc:
        return None, unreadable(exc)


def when(at: object) -> str:
    """Unix time as UTC date and time with milliseconds; "-" for none."""
    if not isinstance(at, int | float) or isinstance(at, bool) or not at:
        return "-"
    shown = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(at))
    return f"{shown}.{int(at * 1000) % 1000:03d}Z"


def ago(at: object, now: float) -> str:
    """Seconds since ``at`` ("-" for none)."""
    if not isinstance(at, int | float) or isinstance(at, bool) or not at:
        return "-"
    return f"{max(0.0, now - at):.1f}s"


def shorten(value: Any) -> str:
    """A value as JSON text (a text as it is), cut to :data:`SHOWN` characters."""
    text = value if isinstance(value, str) else json.dumps(value, default=repr)
    return text if len(text) <= SHOWN else text[: SHOWN - 1] + "…"


class Runtime:
    """The pages of what runs."""

    def __init__(self, ui: Ui) -> None:
        self.ui = ui
        self.admin = ui.admin

    # ------------------------------------------------------------------ workers

    def workers(self, request: Request) -> Response:
        now = time.time()
        read_workers, error = attempt(self.admin.workers)
        announced = read_workers or []
        rows = [
            {
                "id": w.id,
                "host": w.host,
                "pid": w.pid,
                "supervisor": w.supervisor or "",
                "process": w.process,
                "queues": ", ".join(f"{q}={n}" for q, n in sorted(w.queues.items())),
                "names": sorted(w.queues),
                "streams": ", ".join(w.streams),
                "concurrency": w.concurrency,
                "active": w.active,
                "processed": w.processed,
                "failed": w.failed,
                "restarts": w.loop_restarts,
                "strict": w.strict_priority,
                "heartbeat": ago(w.at, now),
                "uptime": ago(w.started, now),
                "events": [
                    f"{e.get('event', '?')} {e.get('queue', '?')} on {e.get('node', '?')}"
                    for e in w.events[-3:]
                ],
            }
            for w in sorted(announced, key=lambda w: (w.supervisor or w.id, w.process or 0, w.id))
        ]
        unserved, unserved_error = self._unserved(
            [q for w in announced for q in w.queues], error is None
        )
        return self.ui.page(
            request,
            "workers.html",
            workers=rows,
            error=error,
            unserved=unserved,
            unserved_error=unserved_error,
            running=sum(w.active for w in announced),
            concurrency=sum(w.concurrency for w in announced),
        )

    def _unserved(
        self, served_names: Iterable[str], known: bool
    ) -> tuple[list[dict[str, Any]], str | None]:
        """The known queues no live worker serves (a partitioned queue served by its name
        serves its partitions), each with its waiting tasks."""
        if not known:
            return [], None
        read_names, error = attempt(self.admin.queue_names)
        names = read_names or []
        read_layouts, layout_error = attempt(self.admin.layouts)
        layouts = read_layouts or {}
        served: set[str] = set()
        for name in served_names:
            served.add(name)
            layout = layouts.get(name)
            if layout is not None:
                served.update(layout.members)
        left = [n for n in names if n not in served]
        read_infos, info_error = attempt(partial(self.admin.queues, left))
        infos = read_infos or []
        out = [
            {
                "name": q.queue,
                "pending": q.pending,
                "scheduled": q.scheduled,
                "retry": q.retry,
                "waiting": q.pending + q.scheduled + q.retry,
                "error": unreadable(ClusterqError(q.error)) if q.error else None,
            }
            for q in infos
        ]
        return out, error or layout_error or info_error

    # ------------------------------------------------------------------ cron

    def cron(self, request: Request) -> Response:
        status, error = attempt(partial(cron_status, self.admin.backend))
        leader, entries = status or (None, [])
        rows = []
        for e in entries:
            firings, history_error = attempt(
                partial(cron_history, self.admin.backend, e.name, FIRINGS)
            )
            rows.append(
                {
                    "name": e.name,
                    "schedule": e.schedule,
                    "type": e.type,
                    "queue": e.queue,
                    "last": when(e.last_tick),
                    "last_at": e.last_tick,
                    "next": when(e.next_tick),
                    "next_at": e.next_tick,
                    "inflight": when(e.inflight),
                    "firings": [_firing(f) for f in firings or []],
                    "error": history_error,
                }
            )
        return self.ui.page(request, "cron.html", leader=leader, entries=rows, error=error)

    # ------------------------------------------------------------------ streams

    def streams(self, request: Request) -> Response:
        read_partitions, error = attempt(self.admin.streams)
        partitions = read_partitions or []
        by_stream: dict[str, list[dict[str, Any]]] = {}
        for p in partitions:
            by_stream.setdefault(p.stream, []).append(
                {
                    "partition": p.partition,
                    "name": p.name,
                    "keyslot": p.keyslot,
                    "master": p.master or "-",
                    "length": p.length,
                    "dead": p.dead,
                    "groups": [
                        {
                            "group": g.group,
                            "consumers": g.consumers,
                            "pending": g.pending,
                            "lag": "-" if g.lag is None else g.lag,
                            "last": g.last_delivered,
                            "trimmed": g.trimmed_unread,
                        }
                        for g in p.groups
                    ],
                    "error": unreadable(ClusterqError(p.error)) if p.error else None,
                }
            )
        streams = [
            {
                "name": name,
                "partitions": parts,
                "length": sum(p["length"] for p in parts),
                "dead": sum(p["dead"] for p in parts),
            }
            for name, parts in sorted(by_stream.items())
        ]
        return self.ui.page(request, "streams.html", streams=streams, error=error)

    # ------------------------------------------------------------------ partitions

    def partitions(self, request: Request) -> Response:
        read_layouts, error = attempt(self.admin.layouts)
        layouts = read_layouts or {}
        queues = []
        for name, layout in sorted(layouts.items()):
            infos, read_error = attempt(partial(self.admin.queues, layout.members))
            by_name = {q.queue: q for q in infos or []}
            rows = []
            for role, members in (("current", layout.queues), ("draining", layout.draining)):
                for index, member in enumerate(members):
                    q = by_name.get(member)
                    rows.append(
                        {
                            "index": index if role == "current" else "-",
                            "name": member,
                            "role": role,
                            "keyslot": q.keyslot if q else "-",
                            "master": (q.master or "-") if q else "-",
                            "pending": q.pending if q else 0,
                            "active": q.active if q else 0,
                            "scheduled": q.scheduled if q else 0,
                            "retry": q.retry if q else 0,
                            "archived": q.archived if q else 0,
                            "error": unreadable(ClusterqError(q.error)) if q and q.error else None,
                        }
                    )
            pending = [int(r["pending"] or 0) for r in rows if r["role"] == "current"]
            queues.append(
                {
                    "name": name,
                    "version": layout.version,
                    "changed": when(layout.changed_ms / 1000),
                    "rows": rows,
                    "skew": skew(pending),
                    "masters": len({r["master"] for r in rows if r["role"] == "current"}),
                    "error": read_error,
                }
            )
        return self.ui.page(request, "partitions.html", queues=queues, error=error)

    # ------------------------------------------------------------------ workflows

    def workflow(self, request: Request) -> Response:
        workflow_id = request.query_params.get("id", "").strip()
        if not workflow_id:
            return self.ui.page(request, "workflow.html", wf=None, workflow_id="")
        try:
            info = self.admin.workflow(workflow_id)
        except (WorkflowGone, InvalidName) as exc:
            missing = f"no workflow {workflow_id!r}" + (
                ": it never existed, or it ended and its state expired"
                if isinstance(exc, WorkflowGone)
                else f": {exc}"
            )
            return self.ui.page(
                request, "workflow.html", status=404, wf=None, workflow_id=workflow_id,
                missing=missing,
            )  # fmt: skip
        except (ClusterqError, redis.RedisError, OSError) as exc:
            return self.ui.page(
                request, "workflow.html", wf=None, workflow_id=workflow_id, error=unreadable(exc)
            )
        return self.ui.page(
            request,
            "workflow.html",
            wf=_workflow_view(info),
            workflow_id=workflow_id,
            svg=workflow_svg(info.steps) if len(info.steps) <= GRAPH_STEPS else None,
        )


def skew(pending: Sequence[int]) -> float | None:
    """The largest over the mean (None: nothing pending)."""
    mean = statistics.fmean(pending) if pending else 0.0
    return max(pending) / mean if mean > 0 else None


def _firing(f: dict[str, Any]) -> dict[str, Any]:
    note = ""
    if f.get("already_enqueued"):
        note = "already enqueued"
    elif f.get("redriven"):
        note = "re-driven"
    return {
        "tick": when(f.get("tick")),
        "task": str(f.get("task_id", "-")),
        "queue": str(f.get("queue", "-")),
        "fired": when(f.get("fired_at")),
        "scheduler": str(f.get("scheduler", "-")),
        "note": note,
    }


def _workflow_view(info: WorkflowInfo) -> dict[str, Any]:
    steps = [
        {
            "id": s.id,
            "type": s.type,
            "queue": s.queue,
            "state": s.state,
            "task_id": s.task_id,
            "deps": ", ".join(s.deps) or "-",
            "result": shorten(s.result) if s.state == "done" else "",
            "error": shorten(s.error) if s.error else "",
            "depth": d,
        }
        for s, d in zip(info.steps, depths(info.steps), strict=True)
    ]
    steps.sort(key=lambda s: (s["depth"], s["id"]))
    return {
        "id": info.id,
        "status": info.status,
        "created": when(info.created),
        "expires_in": info.expires_in,
        "result": shorten(info.result) if info.status == "succeeded" else "",
        "steps": steps[:TABLE_STEPS],
        "more": max(0, len(steps) - TABLE_STEPS),
        "count": len(steps),
    }


def depths(steps: Sequence[StepInfo]) -> list[int]:
    """Each step's depth: 0 without deps, else one more than its deepest dep (deps that
    are not steps are left out; a cycle, which no workflow has, is cut)."""
    by_id = {s.id: s for s in steps}
    found: dict[str, int] = {}
    for step in steps:
        stack: list[tuple[str, bool]] = [(step.id, False)]
        on_path: set[str] = set()
        while stack:
            node, expanded = stack.pop()
            if node in found:
                continue
            deps = [d for d in by_id[node].deps if d in by_id and d != node]
            if expanded:
                on_path.discard(node)
                found[node] = 1 + max((found.get(d, -1) for d in deps), default=-1)
                continue
            on_path.add(node)
            stack.append((node, True))
            stack += [(d, False) for d in deps if d not in found and d not in on_path]
    return [found[s.id] for s in steps]


def workflow_svg(steps: Sequence[StepInfo]) -> str:
    """The steps as boxes in columns by depth, an arrow from each dep, each box in its
    state's colour. Every text is escaped."""
    levels = depths(steps)
    columns: dict[int, list[StepInfo]] = {}
    for step, level in zip(steps, levels, strict=True):
        columns.setdefault(level, []).append(step)
    at: dict[str, tuple[float, float]] = {}
    for level, column in columns.items():
        for row, step in enumerate(sorted(column, key=lambda s: s.id)):
            at[step.id] = (PAD + level * (BOX_W + GAP_X), PAD + row * (BOX_H + GAP_Y))
    width = PAD * 2 + (max(columns, default=0) + 1) * (BOX_W + GAP_X) - GAP_X
    height = PAD * 2 + max((len(c) for c in columns.values()), default=1) * (BOX_H + GAP_Y)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="workflow" viewBox="0 0 {width} '
        f'{height}" width="{width}" height="{height}" role="img" aria-label="workflow steps">'
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
        'markerHeight="7" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#888"/></marker>'
        "</defs>"
    ]
    for step in steps:
        x, y = at[step.id]
        for dep in step.deps:
            if dep in at:
                dx, dy = at[dep]
                parts.append(
                    f'<line class="dep" data-from="{escape(dep)}" data-to="{escape(step.id)}" '
                    f'x1="{dx + BOX_W}" y1="{dy + BOX_H / 2}" x2="{x}" y2="{y + BOX_H / 2}" '
                    'stroke="#888" stroke-width="1.5" marker-end="url(#arrow)"/>'
                )
    for step in steps:
        x, y = at[step.id]
        colour = STATE_COLOURS.get(step.state, "#ffffff")
        tip = f"step {step.id}: {step.type} on {step.queue}, {step.state}"
        if step.error:
            tip += f" — {shorten(step.error)}"
        label = step.type if len(step.type) <= 22 else step.type[:21] + "…"
        parts.append(
            f'<g class="step" data-step="{escape(step.id)}" data-state="{escape(step.state)}">'
            f"<title>{escape(tip)}</title>"
            f'<rect x="{x}" y="{y}" width="{BOX_W}" height="{BOX_H}" rx="5" fill="{colour}" '
            'stroke="#555"/>'
            f'<text x="{x + 8}" y="{y + 16}" font-size="12" font-weight="600">'
            f"{escape(step.id)} · {escape(step.state)}</text>"
            f'<text x="{x + 8}" y="{y + 32}" font-size="11">{escape(label)}</text></g>'
        )
    parts.append("</svg>")
    return "".join(parts)
