"""What every command shares: the global options (and the backend built from them) and
the one-line error that a failure prints. Commands import this; :mod:`clusterq.cli.app`
imports the commands: no loop."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import click
import redis

from clusterq.cluster.backend import Backend
from clusterq.cluster.connection import Mode, redact_url, translate_error
from clusterq.errors import ClusterqError
from clusterq.serialization import json_value
from clusterq.task import STATES

#: ``--state`` choices.
STATE_CHOICE = click.Choice(list(STATES))


class CliError(click.ClickException):
    """Printed as ``error: <message>`` on stderr; exit status 1."""

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {one_line(self.format_message())}", err=True)


def json_argument(text: str, name: str = "PAYLOAD_JSON") -> Any:
    """A command-line argument that holds a JSON value, parsed; else a one-line error."""
    try:
        return json_value(text)
    except ValueError as exc:
        raise CliError(f"{name} is not valid JSON: {one_line(str(exc))}") from None


def one_line(text: str, most: int = 1000) -> str:
    """``text`` as one line of at most ``most`` characters (for an error message)."""
    flat = " ".join(text.split())
    return flat if len(flat) <= most else flat[: most - 3] + "..."


class ClusterqGroup(click.Group):
    """Turns clusterq and redis errors raised by any subcommand into one-line messages.
    Anything else is a bug: said in one line too (``CLUSTERQ_DEBUG=1`` shows the
    traceback)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except ClusterqError as exc:
            raise CliError(one_line(str(exc))) from exc
        except ValueError as exc:
            raise CliError(one_line(str(exc))) from exc
        except redis.RedisError as exc:
            state = ctx.find_object(CliState)
            where = redact_url(state.url) if state else "server"
            raise CliError(one_line(str(translate_error(exc, where)))) from exc
        except OSError as exc:  # a port in use, a name that does not resolve, a file
            raise CliError(one_line(str(exc))) from exc
        except Exception as exc:
            if os.environ.get("CLUSTERQ_DEBUG") == "1":
                raise
            raise CliError(
                f"internal error: {type(exc).__name__}: {one_line(str(exc))} (a bug in "
                "clusterq: please report it; CLUSTERQ_DEBUG=1 shows the traceback)"
            ) from exc


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
