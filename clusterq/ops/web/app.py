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

import secrets

from starlette.applications import Starlette
from starlette.routing import Route

from clusterq.cluster.backend import Backend
from clusterq.errors import ClusterqError
from clusterq.keys import DEFAULT_PREFIX
from clusterq.ops.admin import Admin
from clusterq.ops.web import runtime, tasks
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
    ui.live = LivePoller(lambda: [q.to_dict() for q in admin.queues()], interval)
    routes = [
        Route("/", ui.overview),
        Route("/cluster", ui.cluster),
        Route("/queue", ui.queue),
        Route("/queue/{action}", ui.act, methods=["POST"]),
        Route("/api/queues", ui.api_queues),
        Route("/audit", ui.audit_page),
        Route("/timeline", ui.timeline),
        Route("/live/queues", ui.live_queues),
        Route("/static/live.js", ui.script),
        Route("/favicon.svg", ui.icon),
        Route("/theme", ui.theme),
        *tasks.routes(ui),
        *runtime.routes(ui),
    ]
    ui.nav.append(("Audit", "/audit"))
    app = Starlette(routes=routes)
    users = [User(auth[0], auth[1], "operator")] if auth is not None else []
    users += [User(name, password, "viewer") for name, password in viewers or []]
    app.add_middleware(Guard, users=users, token=token, read_only=read_only)
    app.state.admin = admin
    app.state.live = ui.live
    return app
