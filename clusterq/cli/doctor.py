"""``clusterq doctor``: check that the URL's user may run what clusterq needs."""

from __future__ import annotations

import click

from clusterq.cli.render import console, print_json, table
from clusterq.cli.state import CliState, connection_options
from clusterq.ops.doctor import check
from clusterq.ops.permissions import ROLES, Role, acl_rules


@click.command()
@click.option(
    "--role",
    "roles",
    multiple=True,
    type=click.Choice(ROLES),
    help="Check only these roles (repeatable). Default: all three.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@connection_options
@click.pass_obj
def doctor(state: CliState, roles: tuple[Role, ...], as_json: bool) -> None:
    """Check the ACL permissions of the URL's user for each role (producer, worker,
    operator); exit 1 naming what is missing."""
    chosen = roles or ROLES
    report = check(state.url, prefix=state.prefix, roles=chosen)
    if as_json:
        print_json(report.to_dict())
    else:
        rows = []
        for role in chosen:
            missing = report.missing(role)
            unchecked = sorted(set(report.to_dict()["roles"][role]["unchecked"]))
            verdict = "ok" if report.ok(role) else "MISSING"
            detail = ", ".join(missing) + (
                f" (not checked: {', '.join(unchecked)})" if unchecked else ""
            )
            rows.append([role, verdict, detail or "-"])
        console().print(table(f"{report.url} ({report.mode})", ["Role", "", "Missing"], rows))
        if not all(report.ok(role) for role in chosen):
            click.echo(
                "grant them with: ACL SETUSER <user> " + acl_rules(state.prefix, chosen),
                err=True,
            )
    if not all(report.ok(role) for role in chosen):
        raise SystemExit(1)
