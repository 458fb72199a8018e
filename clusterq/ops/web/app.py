"""``clusterq web``: the cluster seen from a browser (the ``web`` extra: Starlette,
Jinja2, uvicorn). A thin layer over :class:`~clusterq.ops.admin.Admin`: it reads and acts
through the same public API as the CLI, never talks to Redis on its own.

Pages (a queue's name goes in the query string: names may hold any printable character
but braces and spaces): the overview (queues grouped by the master that owns their slot, totals per
master, the skew of pending tasks), the cluster (the slot map as an SVG, the nodes), a
queue (its counts, limits, fair groups, pause and unpause). ``/api/queues`` is the
overview as JSON.

Safety: templates escape everything (Jinja2 autoescape); every POST needs the form's
CSRF token (an HMAC of the app's secret) and is refused with 403 in read-only mode;
``auth=(user, password)`` asks for HTTP basic authentication on every request. Links
start with the ASGI ``root_path`` (``--root-path /q`` behind a proxy).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import statistics
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from clusterq.cluster.backend import Backend
from clusterq.errors import ClusterqError
from clusterq.keys import DEFAULT_PREFIX, validate_queue_name
from clusterq.ops.admin import Admin
from clusterq.ops.groupinfo import group_label
from clusterq.ops.inspector import QueueInfo
from clusterq.ops.queueinfo import compact_limits
from clusterq.ops.web import runtime, tasks
from clusterq.ops.web.slotmap import render as render_slotmap
from clusterq.ops.web.slotmap import spans

TEMPLATES = Path(__file__).with_name("templates")


def create_app(
    url: str | None = None,
    *,
    backend: Backend | None = None,
    prefix: str = DEFAULT_PREFIX,
    read_only: bool = False,
    auth: tuple[str, str] | None = None,
    secret: str | None = None,
) -> Starlette:
    """The web UI as an ASGI app, for ``url`` (or an existing ``backend``). Mount it
    anywhere; behind a proxy, serve it with the proxy's path as ``root_path``.
    ``secret`` signs the CSRF token (default: a random one per app)."""
    if backend is None and url is None:
        raise ClusterqError("create_app needs a url or a backend")
    admin = Admin(prefix=prefix, backend=backend) if backend else Admin(url or "", prefix=prefix)
    ui = Ui(admin, read_only=read_only, secret=secret or secrets.token_hex(16))
    routes = [
        Route("/", ui.overview),
        Route("/cluster", ui.cluster),
        Route("/queue", ui.queue),
        Route("/queue/{action}", ui.act, methods=["POST"]),
        Route("/api/queues", ui.api_queues),
        *tasks.routes(ui),
        *runtime.routes(ui),
    ]
    app = Starlette(routes=routes)
    if auth is not None:
        app.add_middleware(_BasicAuth, user=auth[0], password=auth[1])
    app.state.admin = admin
    return app


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
        #: The nav bar: (label, path), in order; each page module adds its own.
        self.nav: list[tuple[str, str]] = [("Overview", "/"), ("Cluster", "/cluster")]

    def page(self, request: Request, template: str, status: int = 200, **context: Any) -> Response:
        """``template`` rendered with ``context`` (and what every page gets)."""
        root = request.scope.get("root_path", "")
        html = self.env.get_template(template).render(
            root=root, read_only=self.read_only, csrf=self.csrf, nav=self.nav, **context
        )
        return HTMLResponse(html, status_code=status)

    async def refused(self, request: Request) -> tuple[Response | None, dict[str, list[str]]]:
        """For a POST: a 403 in read-only mode or without the form's CSRF token (else
        None), and the urlencoded form (parsed here: Starlette's form parser needs
        another library)."""
        if self.read_only:
            return Response("read-only: no actions", status_code=403), {}
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
        nodes = [
            {
                "id": n.id[:8],
                "addr": n.addr,
                "role": n.role,
                "health": n.health,
                "epoch": n.config_epoch,
                "colour": colours.get(n.addr, ""),
                "lonely": n.role == "master" and n.id not in with_replica,
            }
            for n in sorted(topology.nodes, key=lambda n: (n.role != "master", n.addr))
        ]
        covered = topology.slots_covered
        svg = render_slotmap(topology, marks)
        return self.page(
            request, "cluster.html", svg=svg, nodes=nodes, covered=covered, mode=topology.mode
        )

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
        return self.page(request, "queue.html", q=queue_row(info), groups=groups)

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
        root = request.scope.get("root_path", "")
        return RedirectResponse(f"{root}/queue?{urlencode({'name': name})}", status_code=303)

    def api_queues(self, request: Request) -> Response:
        return JSONResponse([q.to_dict() for q in self.admin.queues()])


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


class _BasicAuth:
    """HTTP basic authentication on every request (401 with a challenge otherwise)."""

    def __init__(self, app: Any, *, user: str, password: str) -> None:
        self.app = app
        self.expected = b"Basic " + base64.b64encode(f"{user}:{password}".encode())

    async def __call__(
        self, scope: dict[str, Any], receive: Callable[[], Awaitable[Any]], send: Any
    ) -> None:
        if scope["type"] == "http":
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = Response(
                    "authentication required",
                    status_code=401,
                    headers={"WWW-Authenticate": 'Basic realm="clusterq"'},
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
