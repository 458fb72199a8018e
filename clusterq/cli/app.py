"""The top-level group, its global options and error handling."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import click
import redis

from clusterq import __version__
from clusterq.cluster.backend import Backend
from clusterq.cluster.connection import DEFAULT_URL, Mode, translate_error
from clusterq.errors import ClusterqError
from clusterq.keys import DEFAULT_PREFIX


class CliError(click.ClickException):
    """Printed as ``error: <message>`` on stderr; exit status 1."""

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", err=True)


class ClusterqGroup(click.Group):
    """Turns clusterq and redis errors raised by any subcommand into one-line messages."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ClusterqError as exc:
            raise CliError(str(exc)) from exc
        except ValueError as exc:
            raise CliError(str(exc)) from exc
        except redis.RedisError as exc:
            state = ctx.find_object(CliState)
            where = state.url if state else "server"
            raise CliError(str(translate_error(exc, where))) from exc


@dataclass
class CliState:
    """Global options, and the backend built from them on first use."""

    url: str
    mode: Mode | None
    prefix: str
    _backend: Backend | None = field(default=None, repr=False)

    def backend(self, *, retry_timeout: float = 3.0) -> Backend:
        if self._backend is None:
            self._backend = Backend(
                self.url, mode=self.mode, prefix=self.prefix, retry_timeout=retry_timeout
            )
        return self._backend

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None


@click.group(cls=ClusterqGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--url",
    envvar="CLUSTERQ_URL",
    default=DEFAULT_URL,
    show_default=True,
    help="redis:// or rediss:// URL of one or more seed nodes (comma-separated); "
    "user:password@ for ACL. Env: CLUSTERQ_URL.",
)
@click.option(
    "--cluster/--standalone",
    "mode",
    default=None,
    help="Insist on a cluster or a standalone server (default: ask the server).",
)
@click.option(
    "--prefix",
    envvar="CLUSTERQ_PREFIX",
    default=DEFAULT_PREFIX,
    show_default=True,
    help="Key prefix. Env: CLUSTERQ_PREFIX.",
)
@click.version_option(__version__, prog_name="clusterq")
@click.pass_context
def main(ctx: click.Context, url: str, mode: bool | None, prefix: str) -> None:
    """clusterq: background task queues at home on Redis Cluster."""
    chosen: Mode | None = None if mode is None else ("cluster" if mode else "standalone")
    state = CliState(url=url, mode=chosen, prefix=prefix)
    ctx.obj = state
    ctx.call_on_close(state.close)


def _register() -> None:
    from clusterq.cli import bench, cluster, dev, drill, queue, tasks, worker

    main.add_command(dev.dev)
    main.add_command(queue.queue)
    main.add_command(cluster.cluster)
    main.add_command(tasks.enqueue)
    main.add_command(worker.worker)
    main.add_command(drill.drill)
    main.add_command(bench.bench)


_register()
