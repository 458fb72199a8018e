"""``clusterq reference``: every command's help, from click itself (it cannot drift)."""

from __future__ import annotations

from collections.abc import Iterator

import click


def walk(
    command: click.Command, ctx: click.Context, path: tuple[str, ...]
) -> Iterator[tuple[tuple[str, ...], str]]:
    """(command path, help text) for ``command`` and every command below it, in order."""
    yield path, command.get_help(ctx)
    if isinstance(command, click.Group):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is None or sub.hidden:
                continue
            sub_ctx = click.Context(sub, info_name=name, parent=ctx)
            yield from walk(sub, sub_ctx, (*path, name))


@click.command("reference")
@click.option("--markdown", is_flag=True, help="Markdown: a heading and a code block each.")
@click.pass_context
def reference(ctx: click.Context, markdown: bool) -> None:
    """Print the help of every clusterq command (the whole CLI reference)."""
    root = ctx.find_root()
    top = click.Context(root.command, info_name="clusterq")
    for path, text in walk(root.command, top, ("clusterq",)):
        if markdown:
            click.echo(f"{'#' * min(len(path) + 1, 4)} `{' '.join(path)}`\n\n```\n{text}\n```\n")
        else:
            click.echo(f"{'=' * 8} {' '.join(path)}\n{text}\n")
