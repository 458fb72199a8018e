"""``clusterq web``: serve the web UI (the ``web`` extra; see :mod:`clusterq.ops.web`)."""

from __future__ import annotations

import click

from clusterq.cli.state import CliError, CliState, connection_options


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
@connection_options
@click.pass_obj
def web(
    state: CliState, host: str, port: int, read_only: bool, root_path: str, auth: str | None
) -> None:
    """The cluster seen from a browser: queues by master, the slot map, each queue."""
    try:
        import uvicorn

        from clusterq.ops.web import create_app
    except ImportError as exc:
        raise CliError(
            f"clusterq web needs the web extra: pip install 'clusterq[web]' ({exc})"
        ) from None
    credentials = None
    if auth is not None:
        user, sep, password = auth.partition(":")
        if not sep or not user or not password:
            raise CliError("invalid --auth: give USER:PASSWORD")
        credentials = (user, password)
    backend = state.backend(retry_timeout=1.0)
    backend.refresh_topology()  # an unreachable URL is a one-line error, not a server
    app = create_app(backend=backend, read_only=read_only, auth=credentials, prefix=state.prefix)
    click.echo(f"clusterq web on http://{host}:{port}{root_path}/ ({state.url})", err=True)
    uvicorn.run(app, host=host, port=port, root_path=root_path, log_level="warning")
