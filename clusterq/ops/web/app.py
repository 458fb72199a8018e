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

import re
import secrets

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Mount, Route

from clusterq.cluster.backend import Backend
from clusterq.errors import ClusterqError
from clusterq.keys import DEFAULT_PREFIX
from clusterq.ops.admin import Admin
from clusterq.ops.web import jobs, runtime, tasks
from clusterq.ops.web.live import LivePoller
from clusterq.ops.web.security import Guard, User
from clusterq.ops.web.ui import Ui


def create_app(
    url: str | None = None,
    *,
    backend: Backend | None = None,
    prefix: str = DEFAULT_PREFIX,
    read_only: bool = False,
    auth: tuple[str, str] | None = None,
    viewers: list[tuple[str, str]] | None = None,
    token: str | None = None,
    secret: str | None = None,
    interval: float = 2.0,
    _among: tuple[list[str], str] | None = None,
) -> Starlette:
    """The web UI as an ASGI app, for ``url`` (or an existing ``backend``). Mount it
    anywhere; behind a proxy, serve it with the proxy's path as ``root_path``.
    ``auth``: an operator's (user, password); ``viewers``: users who may look but not
    act; ``token``: a bearer token for an operator (see :mod:`.security`). ``secret``
    signs the CSRF token (default: a random one per app). ``interval``: seconds between
    the live pages' updates (one poll shared by every open page)."""
    if backend is None and url is None:
        raise ClusterqError("create_app needs a url or a backend")
    admin = Admin(prefix=prefix, backend=backend) if backend else Admin(url or "", prefix=prefix)
    ui = Ui(admin, read_only=read_only, secret=secret or secrets.token_hex(16))
    if _among is not None:  # one of several clusters (create_multi_app): no guard of its own
        ui.clusters, ui.cluster_name = _among
    ui.live = LivePoller(lambda: [q.to_dict() for q in admin.queues()], interval)
    job_pages = jobs.JobPages(ui)
    routes = [
        Route("/", ui.overview),
        Route("/cluster", ui.cluster),
        Route("/queue", ui.queue),
        *jobs.routes(job_pages),  # /queue/purge and /queue/remove before /queue/{action}
        Route("/queue/{action}", ui.act, methods=["POST"]),
        Route("/api/queues", ui.api_queues),
        Route("/audit", ui.audit_page),
        Route("/timeline", ui.timeline),
        Route("/live/queues", ui.live_queues),
        Route("/live/timeline", ui.live_timeline_stream),
        Route("/static/live.js", ui.script),
        Route("/favicon.svg", ui.icon),
        Route("/theme", ui.theme),
        *tasks.routes(ui, job_pages),
        *runtime.routes(ui),
    ]
    ui.nav.append(("Audit", "/audit"))
    app = Starlette(routes=routes)
    if _among is None:
        _guard(app, auth, viewers, token, read_only)
    app.state.admin = admin
    app.state.live = ui.live
    app.state.jobs = job_pages.jobs
    return app


#: A cluster's name in ``create_multi_app`` (and ``clusterq web --cluster NAME=URL``).
CLUSTER_NAME = re.compile(r"[A-Za-z0-9._-]{1,40}")


def create_multi_app(
    clusters: dict[str, str | Backend],
    *,
    prefix: str = DEFAULT_PREFIX,
    read_only: bool = False,
    auth: tuple[str, str] | None = None,
    viewers: list[tuple[str, str]] | None = None,
    token: str | None = None,
    secret: str | None = None,
    interval: float = 2.0,
) -> Starlette:
    """Several clusters (or prefixes) in one UI: each cluster's pages under
    ``/c/<name>/`` (a switcher in every page's nav), ``/`` going to the first. The
    options are :func:`create_app`'s, the same for all; authentication is checked once,
    here."""
    if not clusters:
        raise ClusterqError("create_multi_app needs at least one cluster")
    names = list(clusters)
    for name in names:
        if not CLUSTER_NAME.fullmatch(name):
            raise ClusterqError(
                f"invalid cluster name {name[:40]!r}: 1-40 letters, digits, '.', '_' or '-'"
            )
    secret = secret or secrets.token_hex(16)
    mounts = []
    for name, target in clusters.items():
        backend = target if isinstance(target, Backend) else None
        url = target if isinstance(target, str) else None
        sub = create_app(
            url,
            backend=backend,
            prefix=prefix,
            read_only=read_only,
            secret=secret,
            interval=interval,
            _among=(names, name),
        )
        mounts.append(Mount(f"/c/{name}", app=sub, name=name))

    def first(request: Request) -> Response:
        root = request.scope.get("root_path", "")
        return RedirectResponse(f"{root}/c/{names[0]}/", status_code=307)

    app = Starlette(routes=[Route("/", first), *mounts])
    _guard(app, auth, viewers, token, read_only)
    return app


def _guard(
    app: Starlette,
    auth: tuple[str, str] | None,
    viewers: list[tuple[str, str]] | None,
    token: str | None,
    read_only: bool,
) -> None:
    users = [User(auth[0], auth[1], "operator")] if auth is not None else []
    users += [User(name, password, "viewer") for name, password in viewers or []]
    app.add_middleware(Guard, users=users, token=token, read_only=read_only)
