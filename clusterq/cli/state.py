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
from clusterq.task import STATES

#: ``--state`` choices.
STATE_CHOICE = click.Choice(list(STATES))


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


def _override(name: str) -> Any:
    def callback(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
        if value is not None:
            state = ctx.find_object(CliState)
            if state is not None:
                state.close()  # a backend built from the global options is dropped
                setattr(state, name, value)

    return callback


def connection_options(fn: Any) -> Any:
    """``--url`` and ``--prefix`` accepted after the subcommand too
    (``clusterq queue ls --url …``), overriding the global ones."""
    fn = click.option(
        "--prefix",
        default=None,
        expose_value=False,
        is_eager=True,
        callback=_override("prefix"),
        help="Key prefix (same as the global --prefix).",
    )(fn)
    return click.option(
        "--url",
        default=None,
        expose_value=False,
        is_eager=True,
        callback=_override("url"),
        help="Seed URL (same as the global --url, which it overrides).",
    )(fn)


def log_options(fn: Any) -> Any:
    """``--log-level`` and ``--log-format`` (text, or JSON lines for log shippers)."""
    fn = click.option(
        "--log-format",
        type=click.Choice(["text", "json"]),
        default="text",
        show_default=True,
        help="json: one object per line, events under 'event' (for log shippers).",
    )(fn)
    return click.option(
        "--log-level",
        type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
        default="INFO",
        show_default=True,
        help="Log level.",
    )(fn)


def confirm(yes: bool, question: str) -> None:
    """Ask before a destructive action unless ``--yes``; stop with exit 1 on no, or
    when nobody answers (no input)."""
    if yes:
        return
    try:
        agreed = click.confirm(question, default=False, err=True)
    except click.Abort:
        agreed = False
    if not agreed:
        raise CliError("cancelled: nothing was changed (pass --yes to skip this question)")
