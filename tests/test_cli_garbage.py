"""Every CLI command, given garbage, huge and deeply nested arguments one at a time:
each answer is a result or a one-line error, never a Python traceback (nor the
last-resort "internal error" line, which only a bug reaches).

Commands that talk to Redis run against the session's standalone server (a prefix of
their own) or, for those that would run on (a benchmark, a drill, a server of metrics,
the dashboard, the web UI), against a port where nothing listens. ``dev up``/``dev down`` get only
values that cannot start or stop anything."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import click
import pytest
from click.testing import CliRunner

from clusterq.cli import main
from clusterq.tools.devcluster import LocalServer

DEEP = "[" * 10_000 + "]" * 10_000
HUGE = "x" * 100_000
TEXT = ["", " ", "\x00", "{a}", "\x1b[31mred", HUGE, DEEP, "-", "nan", "é\ud800"]
NUMBERS = ["x", "", "-1", "0", "nan", "inf", "1e400", "99999999999999999999", DEEP]
#: Commands that run until stopped: against a dead port they stop at once.
RUN_ON = {
    ("bench",),
    ("drill", "failover"),
    ("metrics",),
    ("dash",),
    ("cluster", "watch"),
    ("web",),
}
#: Commands never run without a bad argument: as they are, they would start (or stop) a
#: local cluster on the default ports.
NEVER_BARE = {("dev", "up"), ("dev", "down")}
#: Values given to an argument when another parameter is the one under test.
PLAIN_ARGUMENT = {"payload_json": "1", "router_spec": "nomodule:router"}


def _commands(group: click.Group, path: tuple[str, ...] = ()) -> Iterator[Any]:
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            yield from _commands(command, (*path, name))
        else:
            yield (*path, name), command


def _values(param: click.Parameter, path: tuple[str, ...]) -> list[str]:
    if path in (("dev", "up"), ("dev", "down")):
        # only what cannot start or stop servers: refused by click, or no directory
        if isinstance(param.type, click.Path):
            return ["\x00", HUGE]
        return ["x", ""] if param.type.name in ("integer", "float") else []
    if isinstance(param.type, click.Choice):
        return ["bogus", ""]
    if param.type.name in ("integer", "float", "integer range", "float range"):
        return NUMBERS
    return TEXT


def _base(command: click.Command, skip: str) -> list[str]:
    """The command's arguments, each a plain value, but ``skip``."""
    out: list[str] = []
    for param in command.params:
        if isinstance(param, click.Argument) and param.name != skip:
            out.append(PLAIN_ARGUMENT.get(param.name or "", "x"))
    return out


def _invocations() -> Iterator[tuple[tuple[str, ...], list[str]]]:
    for path, command in _commands(main):
        if path not in NEVER_BARE:
            yield path, []
        for param in command.params:
            if isinstance(param, click.Option) and (param.is_flag or param.count):
                continue
            for value in _values(param, path):
                if isinstance(param, click.Argument):
                    args = _base(command, param.name or "")
                    position = [p.name for p in command.params if isinstance(p, click.Argument)]
                    args.insert(position.index(param.name), value)
                    yield path, args
                else:
                    yield path, [*_base(command, ""), f"{param.opts[0]}={value}"]


INVOCATIONS = list(_invocations())


def _by_command() -> dict[tuple[str, ...], list[list[str]]]:
    out: dict[tuple[str, ...], list[list[str]]] = {}
    for path, args in INVOCATIONS:
        out.setdefault(path, []).append(args)
    return out


BY_COMMAND = sorted(_by_command().items())


@pytest.mark.parametrize(
    ("path", "calls"), BY_COMMAND, ids=[" ".join(path) for path, _ in BY_COMMAND]
)
def test_garbage_arguments_never_show_a_traceback(
    standalone: LocalServer, dead_port: int, prefix: str, path: tuple[str, ...], calls: Any
) -> None:
    live = path not in RUN_ON and path[0] != "dev"
    url = standalone.seed_url if live else f"redis://127.0.0.1:{dead_port}"
    runner = CliRunner()
    for args in calls:
        argv = ["--url", url, "--prefix", prefix, *path, *args]
        if path == ("metrics",):
            argv += ["--duration", "0.1"]
        result = runner.invoke(main, argv)
        shown = f"clusterq {' '.join(a[:40] for a in argv[4:])} -> {result.output[-400:]!r}"
        assert result.exception is None or isinstance(result.exception, SystemExit), (
            f"{shown}: {type(result.exception).__name__}: {result.exception}"
        )
        assert "Traceback" not in result.output, shown
        assert "internal error" not in result.output, shown
        assert result.exit_code in (0, 1, 2), shown
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        for line in errors:
            assert len(line) < 2000, shown  # one line, not the argument echoed whole


def test_garbage_global_options(standalone: LocalServer) -> None:
    runner = CliRunner()
    for value in TEXT:
        for option in ("--url", "--prefix"):
            result = runner.invoke(main, [option, value, "queue", "ls"])
            shown = f"{option}={value[:40]!r} -> {result.output[-300:]!r}"
            assert result.exception is None or isinstance(result.exception, SystemExit), shown
            assert "Traceback" not in result.output and "internal error" not in result.output


def test_a_port_in_use_or_a_bad_host_is_one_line(standalone: LocalServer, prefix: str) -> None:
    runner = CliRunner()
    base = ["--url", standalone.seed_url, "--prefix", prefix]
    taken = str(standalone.port)  # the server listens there
    for args in (
        ["metrics", "--port", taken, "--duration", "0.1"],
        ["metrics", "--host", "999.1.1.1", "--port", "19", "--duration", "0.1"],
        ["worker", "run", "tests.workload:router", "--metrics-port", taken],
    ):
        result = runner.invoke(main, [*base, *args])
        assert result.exit_code == 1, result.output
        assert isinstance(result.exception, SystemExit), result.exception
        assert result.output.startswith("error: cannot serve metrics on"), result.output
        assert len(result.output.strip().splitlines()) == 1


def test_a_module_that_raises_at_import_is_one_line(
    standalone: LocalServer, prefix: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "raising_module.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    runner = CliRunner()
    base = ["--url", standalone.seed_url, "--prefix", prefix]
    for args in (["scheduler", "raising_module:ENTRIES"], ["worker", "run", "raising_module:r"]):
        result = runner.invoke(main, [*base, *args])
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
        assert "RuntimeError: boom at import" in result.output
        assert result.output.startswith("error: cannot import 'raising_module'")
