"""``clusterq web``: serve the web UI (the ``web`` extra; see :mod:`clusterq.ops.web`)."""

from __future__ import annotations

import os
from typing import Any

import click

from clusterq.cli.state import CliError, CliState, connection_options
from clusterq.cluster.backend import Backend


@click.command("web")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8089, show_default=True, type=int, help="Port to listen on.")
@click.option("--read-only", is_flag=True, help="Show everything, allow no action (POST: 403).")
@click.option(
    "--root-path", default="", help="The path a proxy serves it under, such as /q (links use it)."
)
@click.option(
    "--auth",
    metavar="USER:PASSWORD",
    envvar="CLUSTERQ_WEB_AUTH",
    default=None,
    help="Ask every request for HTTP basic authentication (or set CLUSTERQ_WEB_AUTH).",
)
@click.option(
    "--viewer",
    "viewers",
    metavar="USER:PASSWORD",
    multiple=True,
    help="A user who may look but not act (repeat for several); needs --auth or a token.",
)
@click.option(
    "--interval",
    default=2.0,
    show_default=True,
    type=click.FloatRange(0.2, 3600),
    help="Seconds between live updates (one poll shared by every open page).",
)
@click.option(
    "--cluster",
    "clusters",
    metavar="NAME=URL",
    multiple=True,
    help="Several clusters or prefixes in one UI, each under /c/NAME/: NAME=URL, or "
    "NAME=URL#PREFIX for another prefix than --prefix; repeat. Without it: --url alone.",
)
@connection_options
@click.pass_obj
def web(
    state: CliState,
    host: str,
    port: int,
    read_only: bool,
    root_path: str,
    auth: str | None,
    viewers: tuple[str, ...],
    interval: float,
    clusters: tuple[str, ...],
) -> None:
    """The cluster seen from a browser: queues by master, the slot map, each queue."""
    try:
        import uvicorn

        from clusterq.ops.web import create_app, create_multi_app
    except ImportError as exc:
        raise CliError(
            f"clusterq web needs the web extra: pip install 'clusterq[web]' ({exc})"
        ) from None
    from clusterq.ops.web.security import parse_user

    try:
        operator = parse_user(auth, "operator") if auth is not None else None
        watchers = [parse_user(v, "viewer") for v in viewers]
    except ValueError as exc:
        raise CliError(f"invalid --auth/--viewer: {exc}") from None
    token = os.environ.get("CLUSTERQ_WEB_TOKEN") or None
    if watchers and operator is None and token is None:
        raise CliError("--viewer needs --auth (or CLUSTERQ_WEB_TOKEN) for the operators")
    credentials = (operator.name, operator.password) if operator is not None else None
    common: dict[str, Any] = {
        "read_only": read_only,
        "auth": credentials,
        "viewers": [(v.name, v.password) for v in watchers],
        "token": token,
        "prefix": state.prefix,
        "interval": interval,
    }
    if clusters:
        targets: dict[str, str | Backend] = {}
        for spec in clusters:
            name, sep, target = spec.partition("=")
            url, _, own_prefix = target.partition("#")
            if not sep or not name or not url:
                raise CliError(f"invalid --cluster {spec[:60]!r}: give NAME=URL[#PREFIX]")
            backend = Backend(url, prefix=own_prefix or state.prefix, retry_timeout=1.0)
            backend.refresh_topology()  # unreachable: a one-line error, not a server
            targets[name] = backend
        app = create_multi_app(targets, **common)
    else:
        backend = state.backend(retry_timeout=1.0)
        backend.refresh_topology()  # an unreachable URL is a one-line error, not a server
        app = create_app(backend=backend, **common)
    click.echo(f"clusterq web on http://{host}:{port}{root_path}/ ({state.url})", err=True)
    uvicorn.run(app, host=host, port=port, root_path=root_path, log_level="warning")
