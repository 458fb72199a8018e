"""What every command shares: the global options (and the backend built from them) and
the one-line error that a failure prints. Commands import this; :mod:`clusterq.cli.app`
imports the commands: no loop."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import click
import redis

from clusterq.cluster.backend import Backend
from clusterq.cluster.connection import Mode, redact_url, translate_error
from clusterq.errors import ClusterqError


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
            where = redact_url(state.url) if state else "server"
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
