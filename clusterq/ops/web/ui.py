"""What every page of the web UI shares (:class:`Ui`: the admin API, templates, the
CSRF token, roles, the audit, the nav) and the core pages: the overview, the cluster, a
queue, its pause/unpause, the audit, the theme, the live updates."""

from __future__ import annotations

import hashlib
import hmac
import statistics
import time
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

import redis
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    RedirectResponse,
    Response,
    StreamingResponse,
)

from clusterq.cluster.topology import NodeInfo
from clusterq.errors import ClusterqError
from clusterq.keys import validate_queue_name
from clusterq.ops.admin import Admin
from clusterq.ops.groupinfo import group_label
from clusterq.ops.inspector import QueueInfo
from clusterq.ops.queueinfo import compact_limits
from clusterq.ops.timeline import read_timeline
from clusterq.ops.web.charts import render as render_chart
from clusterq.ops.web.live import LivePoller, sse
from clusterq.ops.web.security import AuditLog, same_origin
from clusterq.ops.web.slotmap import render as render_slotmap
from clusterq.ops.web.slotmap import spans
from clusterq.task import STATES

TEMPLATES = Path(__file__).with_name("templates")
#: The tab's icon: three squares, a master each.
ICON = (
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">'
    '<rect x="1" y="5" width="4" height="6" fill="#4e79a7"/>'
    '<rect x="6" y="5" width="4" height="6" fill="#f28e2b"/>'
    '<rect x="11" y="5" width="4" height="6" fill="#59a14f"/></svg>'
)
#: The UI's one script (see :mod:`.live`), read once.
SCRIPT = (Path(__file__).parent / "static" / "live.js").read_text()


class Ui:
    """What every page shares: the admin API, templates, the CSRF token, the nav."""

    def __init__(self, admin: Admin, *, read_only: bool, secret: str) -> None:
        self.admin = admin
        self.read_only = read_only
        self.csrf = hmac.new(secret.encode(), b"clusterq-web-csrf", hashlib.sha256).hexdigest()
        self.env = Environment(
            loader=FileSystemLoader(TEMPLATES),
            autoescape=select_autoescape(default=True, default_for_string=True),
        )
        self.env.filters["clock"] = clock
        self.live: LivePoller | None = None
        #: The failover timeline's latest entries, pushed to open timeline pages.
        self.live_timeline = LivePoller(
            lambda: [e.to_dict() for e in read_timeline(admin.backend, admin.keys, count=50)],
            1.0,
        )
        self.audit_log = AuditLog()
        #: With several clusters in one UI: their names, and this one's.
        self.clusters: list[str] = []
        self.cluster_name: str | None = None
        #: The nav bar: (label, path), in order; each page module adds its own.
        self.nav: list[tuple[str, str]] = [
            ("Overview", "/"),
            ("Cluster", "/cluster"),
            ("Timeline", "/timeline"),
        ]

    def viewer(self, request: Request) -> bool:
        """Whether the caller may only look (read-only mode, or the viewer role)."""
        return self.read_only or request.scope.get("clusterq.role") == "viewer"

    def page(self, request: Request, template: str, status: int = 200, **context: Any) -> Response:
        """``template`` rendered with ``context`` (and what every page gets)."""
        root = request.scope.get("root_path", "")
        html = self.env.get_template(template).render(
            root=root,
            read_only=self.viewer(request),
            csrf=self.csrf,
            nav=self.nav,
            user=request.scope.get("clusterq.user", "-"),
            theme=request.cookies.get("theme", ""),
            clusters=self.clusters,
            cluster=self.cluster_name,
            base=root[: -len(f"/c/{self.cluster_name}")] if self.cluster_name else root,
            **context,
        )
        return HTMLResponse(html, status_code=status)

    def audit(self, request: Request, action: str, target: str, outcome: str = "done") -> None:
        """Record an operator's action (see :class:`.security.AuditLog`)."""
        client = request.client.host if request.client else "-"
        user = str(request.scope.get("clusterq.user", "-"))
        self.audit_log.record(user, client, action, target, outcome)

    async def refused(self, request: Request) -> tuple[Response | None, dict[str, list[str]]]:
        """For a POST: a 403 in read-only mode or without the form's CSRF token (else
        None), and the urlencoded form (parsed here: Starlette's form parser needs
        another library)."""
        if self.viewer(request):
            return Response("read-only: no actions", status_code=403), {}
        if not same_origin(request.headers.get("origin"), request.headers.get("host")):
            return Response("a POST from another origin", status_code=403), {}
        form = parse_qs((await request.body())[:65536].decode(errors="replace"))
        token = (form.get("csrf") or [""])[0]
        if not hmac.compare_digest(token.encode(), self.csrf.encode()):
            return Response("missing or wrong CSRF token", status_code=403), form
        return None, form

    # ------------------------------------------------------------------ pages

    def overview(self, request: Request) -> Response:
        infos = self.admin.queues()
        by_master: dict[str, list[QueueInfo]] = {}
        for info in infos:
            by_master.setdefault(info.master or "(no master)", []).append(info)
        masters = []
        for master, queues in sorted(by_master.items()):
            masters.append(
                {
                    "name": master,
                    "queues": [queue_row(q) for q in sorted(queues, key=lambda q: q.queue)],
                    "pending": sum(q.pending for q in queues),
                    "active": sum(q.active for q in queues),
                    "archived": sum(q.archived for q in queues),
                }
            )
        pending = [sum(q.pending for q in queues) for queues in by_master.values()]
        mean = statistics.fmean(pending) if pending else 0.0
        skew = max(pending) / mean if mean > 0 else None
        return self.page(request, "overview.html", masters=masters, skew=skew)

    def cluster(self, request: Request) -> Response:
        topology = self.admin.refresh()
        infos = self.admin.queues()
        marks = [(q.queue, q.keyslot) for q in infos]
        _, colours = spans(topology)
        with_replica = {n.master_id for n in topology.nodes if n.master_id}
        by_id = {n.id: n for n in topology.nodes}
        nodes = [
            {
                "id": n.id[:8],
                "addr": n.addr,
                "role": n.role,
                "health": n.health,
                "epoch": n.config_epoch,
                "colour": colours.get(n.addr, ""),
                "lonely": n.role == "master" and n.id not in with_replica,
                "lag": _lag(n, by_id.get(n.master_id or "")),
                **self._node_info(n),
            }
            for n in sorted(topology.nodes, key=lambda n: (n.role != "master", n.addr))
        ]
        covered = topology.slots_covered
        svg = render_slotmap(topology, marks)
        return self.page(
            request, "cluster.html", svg=svg, nodes=nodes, covered=covered, mode=topology.mode
        )

    def _node_info(self, node: NodeInfo) -> dict[str, str]:
        """Memory and clients of one node (``INFO``, read from that node alone): "n/a"
        with the reason where it cannot be read, the rest of the page rendering."""
        if node.health == "fail":
            return {"memory": "n/a (failed)", "clients": "n/a"}
        try:
            client = self.admin.backend.node(node.address)
            memory, clients = client.info("memory"), client.info("clients")
        except redis.exceptions.NoPermissionError:
            return {"memory": "n/a (ACL)", "clients": "n/a (ACL)"}
        except Exception as exc:  # unreachable, timed out
            return {"memory": f"n/a ({str(exc)[:80]})", "clients": "n/a"}
        return {
            "memory": str(memory.get("used_memory_human", "?")),
            "clients": str(clients.get("connected_clients", "?")),
        }

    def queue(self, request: Request) -> Response:
        name = request.query_params.get("name", "")
        try:
            validate_queue_name(name)
        except ClusterqError as exc:
            return self.page(request, "error.html", status=404, message=str(exc))
        info = self.admin.queue(name)
        groups = [
            {"label": group_label(g.group), "waiting": g.waiting, "running": g.running}
            for part in self.admin.groups(name)
            for g in part.groups
        ]
        try:
            chart = render_chart(self.admin.history(name), label=name)
        except Exception as exc:  # its master down, an ACL refusal: said on the page
            chart = f'<p class="bad" id="no-history">history: {escape(str(exc))}</p>'
        return self.page(
            request,
            "queue.html",
            q=queue_row(info),
            groups=groups,
            chart=chart,
            states=[s for s in STATES if s != "active"],
        )

    async def act(self, request: Request) -> Response:
        """POST /queue/pause|unpause?name=NAME: refused in read-only mode and without the
        form's CSRF token; then back to the queue's page."""
        refusal, _ = await self.refused(request)
        if refusal is not None:
            return refusal
        name, action = request.query_params.get("name", ""), request.path_params["action"]
        try:
            validate_queue_name(name)
        except ClusterqError as exc:
            return Response(str(exc), status_code=404)
        if action not in ("pause", "unpause"):
            return Response(f"unknown action {action!r}", status_code=404)
        await run_in_threadpool(getattr(self.admin, action), name)
        self.audit(request, action, f"queue {name}")
        root = request.scope.get("root_path", "")
        return RedirectResponse(f"{root}/queue?{urlencode({'name': name})}", status_code=303)

    def live_timeline_stream(self, request: Request) -> Response:
        """Server-sent events: the timeline's latest entries, every second (one read
        shared by every open timeline page)."""
        return StreamingResponse(
            sse(self.live_timeline, request.is_disconnected),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store"},
        )

    def live_queues(self, request: Request) -> Response:
        """Server-sent events: the queues as /api/queues gives them, every interval."""
        assert self.live is not None
        return StreamingResponse(
            sse(self.live, request.is_disconnected),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-store"},
        )

    def icon(self, request: Request) -> Response:
        return Response(ICON, media_type="image/svg+xml")

    def script(self, request: Request) -> Response:
        return Response(SCRIPT, media_type="text/javascript")

    def timeline(self, request: Request) -> Response:
        """The failover timeline (newest first), refreshed every few seconds."""
        try:
            entries = [
                e.to_dict() for e in read_timeline(self.admin.backend, self.admin.keys, count=300)
            ]
            error = None
        except Exception as exc:  # the timeline's master down, an ACL refusal
            entries, error = [], str(exc)
        return self.page(request, "timeline.html", entries=entries, error=error)

    def audit_page(self, request: Request) -> Response:
        entries = [e.to_dict() for e in reversed(self.audit_log.entries)]
        return self.page(request, "audit.html", entries=entries)

    def theme(self, request: Request) -> Response:
        """GET /theme?to=dark|light|system: the choice kept in a cookie, then back."""
        choice = request.query_params.get("to", "")
        root = request.scope.get("root_path", "")
        back = RedirectResponse(f"{root}/", status_code=303)
        if choice in ("dark", "light"):
            back.set_cookie("theme", choice, max_age=365 * 86400, samesite="strict")
        else:
            back.delete_cookie("theme")
        return back

    def api_queues(self, request: Request) -> Response:
        return JSONResponse([q.to_dict() for q in self.admin.queues()])


def _lag(node: NodeInfo, master: NodeInfo | None) -> str:
    """A replica's replication lag behind its master, in bytes of the replication stream
    (from the offsets the cluster map gives); "" for a master, "?" where unknown."""
    if node.role == "master":
        return ""
    if master is None or master.replication_offset is None or node.replication_offset is None:
        return "?"
    return f"{max(0, master.replication_offset - node.replication_offset):,} B"


def clock(at: object) -> str:
    """A Unix time as local date and time (``-`` for none)."""
    if not isinstance(at, int | float) or isinstance(at, bool):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at))


def queue_row(q: QueueInfo) -> dict[str, Any]:
    return {
        "name": q.queue,
        "keyslot": q.keyslot,
        "master": q.master or "-",
        "replicas": ", ".join(q.replicas) or "-",
        "pending": q.pending,
        "scheduled": q.scheduled,
        "retry": q.retry,
        "active": q.active,
        "archived": q.archived,
        "completed": q.completed,
        "processed": q.processed,
        "failed": q.failed,
        "paused": q.paused,
        "latency": round(q.latency, 3),
        "limits": compact_limits(q.limits),
        "error": q.error,
    }
