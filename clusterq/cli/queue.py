"""``clusterq queue``: list, inspect, pause, unpause, purge and remove queues; show or
set their limits (``queue limit``: a rate and a concurrency cap, rates per task type,
and a rate and a cap for each fair group, see :mod:`clusterq.limits`); ``queue
inspect`` also shows a queue's fair groups (:mod:`clusterq.ops.groupinfo`)."""

from __future__ import annotations

import time

import click
import redis

from clusterq.cli.render import (
    clock,
    console,
    human_bytes,
    print_json,
    progress_bar,
    safe_text,
    table,
)
from clusterq.cli.state import STATE_CHOICE, CliError, CliState, confirm, connection_options
from clusterq.client import Client
from clusterq.errors import ClusterqError
from clusterq.limits import Limits
from clusterq.ops.admin import Admin
from clusterq.ops.groupinfo import MAX_GROUPS, GroupInfo, QueueGroups, group_label
from clusterq.ops.inspector import Inspector, QueueInfo
from clusterq.ops.queueinfo import compact_limits


@click.group()
def queue() -> None:
    """Inspect queues and act on them."""


@queue.command("ls")
@connection_options
@click.option(
    "--cluster", "show_cluster", is_flag=True, help="Also show keyslot, master and replicas."
)
@click.option(
    "--json", "as_json", is_flag=True, help="Print JSON (always with the cluster fields)."
)
@click.pass_obj
def ls(state: CliState, show_cluster: bool, as_json: bool) -> None:
    """Every known queue and its size (like `asynq queue ls --cluster`)."""
    inspector = Inspector(backend=state.backend())
    infos = inspector.queues()
    if inspector.skipped:
        shown = ", ".join(safe_text(repr(name)) for name in inspector.skipped[:5])
        click.echo(
            f"warning: {len(inspector.skipped)} registry entries are not queue names and "
            f"were skipped: {shown}",
            err=True,
        )
    members: dict[str, list[QueueInfo]] = {}
    for info in infos:
        if info.partition_of is not None:
            members.setdefault(info.partition_of, []).append(info)
    groups = {
        name: sorted(group, key=lambda q: (q.partition is None, q.partition or 0, q.queue))
        for name, group in members.items()
    }
    if as_json:
        print_json(
            [
                _declared(info, groups.get(info.queue, [])) if info.partitions else info.to_dict()
                for info in infos
            ]
        )
        return
    columns = [
        "Queue",
        "Pending",
        "Active",
        "Scheduled",
        "Retry",
        "Archived",
        "Completed",
        "Paused",
        "Limits",
    ]
    if show_cluster:
        columns += ["KeySlot", "Master", "Replicas"]
    rows = []
    for info in infos:
        if info.partition_of is not None:
            continue  # listed under its partitioned queue
        if info.partitions:
            group = groups.get(info.queue, [])
            rows.append(_total_row(info, group, show_cluster))
            for member in [*group, info]:
                rows.append(_queue_row(member, show_cluster, indent=True))
        else:
            rows.append(_queue_row(info, show_cluster))
    if not rows:
        click.echo("no queues yet (queues register themselves when first used)")
        return
    console().print(table(None, columns, rows))


def _queue_row(info: QueueInfo, show_cluster: bool, *, indent: bool = False) -> list[object]:
    label = info.queue
    if indent:
        if info.partitions:
            label = f"{info.queue} (not partitioned)"
        elif info.partition is None:
            label = f"{info.queue} (draining)"
        label = f"  {label}"
    if info.error:
        row: list[object] = [label, f"error: {info.error}", "", "", "", "", "", "", ""]
    else:
        row = [
            label,
            info.pending,
            info.active,
            info.scheduled,
            info.retry,
            info.archived,
            info.completed,
            "yes" if info.paused else "no",
            compact_limits(info.limits),
        ]
    if show_cluster:
        row += [info.keyslot, info.master or "-", ", ".join(info.replicas) or "-"]
    return row


def _total_row(head: QueueInfo, group: list[QueueInfo], show_cluster: bool) -> list[object]:
    """A partitioned queue's line: its sizes summed over its partitions and plain queue."""
    everything = [*group, head]
    paused = {q.paused for q in everything}
    row: list[object] = [
        f"{head.queue} ({head.partitions} partitions)",
        *(
            sum(getattr(q, state) for q in everything)
            for state in ("pending", "active", "scheduled", "retry", "archived", "completed")
        ),
        "yes" if paused == {True} else "partly" if True in paused else "no",
        compact_limits(_declaration(head, group)),
    ]
    if show_cluster:
        masters = {q.master for q in group if q.master}
        row += ["-", f"{len(masters)} masters", "-"]
    return row


def _declaration(head: QueueInfo, group: list[QueueInfo]) -> Limits | None:
    """A partitioned queue's declared limits: those stored in its first partition (each
    member holds the declaration beside its own share)."""
    first = next((q for q in group if q.partition is not None), None)
    return (first or head).limits


def _declared(head: QueueInfo, group: list[QueueInfo]) -> dict[str, object]:
    """A partitioned queue's own row as JSON, with the declaration of its partitions."""
    out = head.to_dict()
    limits = _declaration(head, group)
    out["limits"] = limits.as_dict() if limits is not None else None
    return out


@queue.command("create")
@click.argument("name")
@click.option(
    "--partitions",
    type=int,
    required=True,
    help="How many partitions (1..256); 1 makes it a plain queue again.",
)
@connection_options
@click.pass_obj
def create(state: CliState, name: str, partitions: int) -> None:
    """Declare a partitioned queue, or change its partition count (old partitions drain)."""
    with Client(backend=state.backend()) as client:
        try:
            layout = client.declare_queue(name, partitions)
        except (ValueError, ClusterqError) as exc:
            raise CliError(str(exc)) from None
    drain = f"; {len(layout.draining)} old partitions drain" if layout.draining else ""
    if layout.partitions == 1:
        click.echo(f"queue {name}: a plain queue (layout version {layout.version}){drain}")
    else:
        click.echo(
            f"queue {name}: {layout.partitions} partitions (layout version {layout.version}){drain}"
        )


#: Groups the ``queue inspect`` table shows at most (those whose turn comes first).
SHOWN_GROUPS = 20


@queue.command("inspect")
@click.argument("name")
@click.option("--types", is_flag=True, help="Also count the tasks by type (reads every record).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (see below).")
@connection_options
@click.pass_obj
def inspect(state: CliState, name: str, types: bool, as_json: bool) -> None:
    """One queue: sizes, counters, latency, memory, where it lives, its limits and where
    its limiter stands (a hold in force, tasks running against the cap), recent
    history, and its fair groups (the first 20 to take their turn).

    With --json, "groups" holds one object per queue read (a partitioned queue: each
    partition and its plain queue): {"queue", "unsorted" (pending tasks not sorted into
    their groups yet), "truncated" (true: only the first 1000 groups were read),
    "groups": [{"group", "queue", "waiting", "running" (null unless the queue caps
    groups), "next_turn" and "held_until" (unix seconds or null)}]}; "groups" is null
    and "groups_error" says why when they cannot be read."""
    inspector = Inspector(backend=state.backend())
    detail = inspector.queue_detail(name, types=types)
    limiter = _limiter(inspector, detail.info)
    info = detail.info
    if info.error and not as_json:
        raise CliError(f"queue {name!r}: {info.error}")
    found, unreadable = _read_groups(inspector, name)
    if as_json:
        data = detail.to_dict()
        declared = limiter.pop("declared")
        data["limits"] = declared.as_dict() if isinstance(declared, Limits) else None
        data["limiter"] = limiter
        data["groups"] = None if found is None else [_groups_dict(g) for g in found]
        if unreadable is not None:
            data["groups_error"] = unreadable
        print_json(data)
        return
    rows: list[list[object]] = [
        ["Keyslot", info.keyslot],
        ["Master", info.master or "-"],
        ["Replicas", ", ".join(info.replicas) or "-"],
        ["Paused", "yes" if info.paused else "no"],
        ["Pending", info.pending],
        ["Active", info.active],
        ["Scheduled", info.scheduled],
        ["Retry", info.retry],
        ["Archived", info.archived],
        ["Completed", info.completed],
        ["Processed (total)", info.processed],
        ["Failed (total)", info.failed],
        ["Latency", f"{info.latency:.3f}s"],
        ["Memory", human_bytes(detail.memory) if detail.memory is not None else "-"],
        *_limiter_rows(limiter),
    ]
    out = console()
    out.print(table(f"queue {name}", ["", ""], rows, header=False))
    recent = detail.history[-10:]
    if recent:
        out.print(
            table(
                "last minutes with activity",
                ["Minute", "Processed", "Failed"],
                [
                    [time.strftime("%H:%M", time.localtime(m.at)), m.processed, m.failed]
                    for m in recent
                ],
            )
        )
    if detail.types is not None:
        out.print(table("tasks by type", ["Type", "Tasks"], list(detail.types.items())))
    if found is None:
        raise CliError(f"queue {name!r}: its fair groups cannot be read: {unreadable}")
    _print_groups(found)


def _read_groups(inspector: Inspector, name: str) -> tuple[list[QueueGroups] | None, str | None]:
    """The fair groups of ``name`` (read once), or None and why not: a key of theirs
    holding what clusterq does not write (the rest of ``queue inspect`` still shows)."""
    try:
        return inspector.groups(name), None
    except redis.ResponseError as exc:
        return None, str(exc)


def _groups_dict(found: QueueGroups) -> dict[str, object]:
    return {
        "queue": found.queue,
        "unsorted": found.unsorted,
        "truncated": found.truncated,
        "groups": [g.to_dict() for g in found.groups],
    }


def _print_groups(found: list[QueueGroups]) -> None:
    """The Groups table of ``queue inspect``: nothing for a queue not served fairly
    (no group has tasks or limiter state: pending tasks alone are those of any queue)."""
    groups = sorted((g for q in found for g in q.groups), key=lambda g: g.next_turn)
    if not groups:
        return
    partitioned = len(found) > 1
    now = time.time()
    columns = ["Group", *(["Queue"] if partitioned else []), "Waiting", "Running"]
    rows = [_group_row(g, partitioned, now) for g in groups[:SHOWN_GROUPS]]
    console().print(table("fair groups", [*columns, "Next turn", "Held until"], rows))
    more = len(groups) - SHOWN_GROUPS
    if more > 0:
        click.echo(f"... and {more} more group{'s' if more > 1 else ''}")
    truncated = sum(1 for q in found if q.truncated)
    if truncated:
        click.echo(f"(only the first {MAX_GROUPS} groups of {truncated} queue(s) were read)")
    unsorted = sum(q.unsorted for q in found)
    if unsorted:
        click.echo(f"{unsorted} pending task(s) not yet sorted into groups (the next take does)")


def _group_row(group: GroupInfo, partitioned: bool, now: float) -> list[object]:
    return [
        group_label(group.group),
        *([group.queue] if partitioned else []),
        group.waiting,
        "-" if group.running is None else group.running,
        _from_now(group.next_turn, now),
        clock(group.held_until),
    ]


def _from_now(at: float, now: float) -> str:
    """When ``at`` (unix s) comes, from ``now``: ``now``, ``in 2.3s``, ``in 12m 5s``,
    ``in 1h 0m``."""
    wait = at - now
    if wait < 0.05:
        return "now"
    if wait < 60:
        return f"in {wait:.1f}s"
    seconds = round(wait)
    if seconds < 3600:
        return f"in {seconds // 60}m {seconds % 60}s"
    return f"in {seconds // 3600}h {seconds % 3600 // 60}m"


def _limiter(inspector: Inspector, info: QueueInfo) -> dict[str, object]:
    """The limits of ``info``'s queue and where its limiter stands: a hold in force
    (until when), the tasks running against the concurrency cap. A partitioned queue:
    its declaration, the tasks running over its partitions and plain queue, and the
    declared cap (its current partitions share it; the plain queue and draining
    partitions, which hold stray tasks, each enforce the smallest share besides)."""
    rows = [info]
    if inspector.layouts().get(info.queue) is not None:
        rows = [q for q in inspector.queues([info.queue]) if not q.error]
    group = [q for q in rows if q.partition_of is not None]
    group.sort(key=lambda q: (q.partition is None, q.partition or 0))
    declared = _declaration(info, group) if group else info.limits
    held = [q.hold_until for q in rows if q.hold_until is not None]
    cap = info.concurrency_cap
    if group:
        cap = declared.concurrency if declared is not None else None
    return {
        "declared": declared,
        "queues": len(rows),
        "active": sum(q.active for q in rows),
        "concurrency_cap": cap,
        "hold_until": max(held) if held else None,
        "held_queues": len(held),
    }


def _limiter_rows(limiter: dict[str, object]) -> list[list[object]]:
    declared = limiter["declared"]
    cap, hold, queues = limiter["concurrency_cap"], limiter["hold_until"], limiter["queues"]
    rows: list[list[object]] = [
        ["Limits", declared.describe() if isinstance(declared, Limits) else "-"]
    ]
    spread = f" (over {queues} queues)" if isinstance(queues, int) and queues > 1 else ""
    if cap is not None:
        rows.append(["Running / cap", f"{limiter['active']} of {cap}{spread}"])
    if isinstance(hold, float):
        where = f" ({limiter['held_queues']} of {queues} queues)" if spread else ""
        rows.append(
            ["Held back", f"until {clock(hold)} (in {max(0.0, hold - time.time()):.1f}s){where}"]
        )
    elif isinstance(declared, Limits) or cap is not None:
        rows.append(["Held back", "no"])
    return rows


@queue.command("limit")
@click.argument("name")
@click.option(
    "--rate",
    metavar="COUNT/PERIOD",
    default=None,
    help="Tasks started per period across every worker: '200/s', '5000/m', '10/h', '3/10s'.",
)
@click.option(
    "--burst",
    metavar="N",
    default=None,
    help="Tasks that may start at once after a quiet time (needs --rate; default: a "
    "tenth of a second's worth, at least 1).",
)
@click.option(
    "--concurrency", metavar="N", default=None, help="Tasks running at once across every worker."
)
@click.option(
    "--type-rate",
    "type_rates",
    metavar="TYPE=RATE",
    multiple=True,
    help="Tasks of TYPE started per period, such as 'email:send=10/s' (repeatable; the "
    "burst is a tenth of a second's worth, at least 1).",
)
@click.option(
    "--type-concurrency",
    "type_caps",
    metavar="TYPE=N",
    multiple=True,
    help="Tasks of TYPE running at once across every worker, such as 'report:build=2' "
    "(repeatable).",
)
@click.option(
    "--rate-per-group",
    metavar="COUNT/PERIOD",
    default=None,
    help="Tasks each fair group (enqueue(..., group=...)) starts per period, such as '5/s'.",
)
@click.option(
    "--burst-per-group",
    metavar="N",
    default=None,
    help="Tasks a group may start at once after a quiet time (needs --rate-per-group; "
    "default: a tenth of a second's worth, at least 1).",
)
@click.option(
    "--concurrency-per-group",
    metavar="N",
    default=None,
    help="Tasks of each fair group running at once across every worker.",
)
@click.option("--clear", is_flag=True, help="Remove every limit of NAME.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@connection_options
@click.pass_obj
def limit(
    state: CliState,
    name: str,
    rate: str | None,
    burst: str | None,
    concurrency: str | None,
    type_rates: tuple[str, ...],
    type_caps: tuple[str, ...],
    rate_per_group: str | None,
    burst_per_group: str | None,
    concurrency_per_group: str | None,
    clear: bool,
    as_json: bool,
) -> None:
    """Show or set NAME's limits: a rate (with a burst), a concurrency cap, rates and
    caps per task type, and a rate (with a burst) and a cap for each fair group, enforced where
    workers take tasks, across all of them.

    Without options it shows them. With options it replaces them, as set_limits does in
    the API: a limit whose option is not given is removed (--rate 10/s alone drops a
    concurrency cap set before). --clear removes them all. A partitioned queue's
    partitions each enforce an even share of the queue's limits, and each group's
    limits whole (a group lives in one partition). Prints the limits now in force."""
    given = (rate, burst, concurrency, rate_per_group, burst_per_group, concurrency_per_group)
    setting = any(value is not None for value in given) or bool(type_rates or type_caps)
    if clear and setting:
        raise CliError(
            "--clear removes every limit: give it without --rate, --burst, --concurrency, "
            "--type-rate, --type-concurrency, --rate-per-group, --burst-per-group, "
            "--concurrency-per-group"
        )
    admin = Admin(backend=state.backend())
    if clear or setting:
        try:
            admin.set_limits(
                name,
                rate=rate,
                burst=_whole("burst", burst),
                concurrency=_whole("concurrency", concurrency),
                type_rates=_pairs("--type-rate", type_rates, "TYPE=RATE", "email:send=10/s")
                or None,
                type_concurrency=_type_caps(type_caps) or None,
                rate_per_group=rate_per_group,
                burst_per_group=_whole("burst_per_group", burst_per_group),
                concurrency_per_group=_whole("concurrency_per_group", concurrency_per_group),
            )
        except (ValueError, ClusterqError) as exc:
            raise CliError(str(exc)) from None
    limits = admin.limits(name)
    if as_json:
        print_json({"queue": name, "limits": limits.as_dict() if limits else None})
    elif limits is None:
        click.echo(f"queue {name}: no limits")
    else:
        click.echo(f"queue {name}: {limits.describe()}")


def _pairs(option: str, given: tuple[str, ...], form: str, example: str) -> dict[str, str]:
    """``TYPE=VALUE`` options as a mapping (the last one of a type wins); else a one-line
    error naming ``option`` and its ``form``."""
    out = {}
    for text in given:
        name, sep, value = text.rpartition("=")
        if not sep or not name:
            raise CliError(f"invalid {option} {text!r}: give {form}, such as '{example}'")
        out[name] = value
    return out


def _type_caps(given: tuple[str, ...]) -> dict[str, int]:
    caps = _pairs("--type-concurrency", given, "TYPE=N", "report:build=2")
    return {name: _whole(f"--type-concurrency of {name!r}", cap) or 0 for name, cap in caps.items()}


def _whole(what: str, text: str | None) -> int | None:
    """A whole number given as an option's text; else a one-line error naming it."""
    if text is None:
        return None
    try:
        return int(text.strip())
    except ValueError:
        raise CliError(f"invalid {what} {text!r}: must be a whole number of at least 1") from None


@queue.command("pause")
@click.argument("name")
@connection_options
@click.pass_obj
def pause(state: CliState, name: str) -> None:
    """Stop workers taking tasks from NAME (running ones finish; enqueues still work)."""
    Admin(backend=state.backend()).pause(name)
    click.echo(f"queue {name} paused")


@queue.command("unpause")
@click.argument("name")
@connection_options
@click.pass_obj
def unpause(state: CliState, name: str) -> None:
    """Let workers take tasks from NAME again."""
    Admin(backend=state.backend()).unpause(name)
    click.echo(f"queue {name} unpaused")


@queue.command("purge")
@click.argument("name")
@click.option(
    "--state",
    "task_state",
    type=STATE_CHOICE,
    required=True,
    help="Delete every task in this state (not active).",
)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@connection_options
@click.pass_obj
def purge(state: CliState, name: str, task_state: str, yes: bool) -> None:
    """Delete every task of NAME in one state."""
    admin = Admin(backend=state.backend())
    confirm(yes, f"delete every {task_state} task of queue {name}?")
    with progress_bar(f"deleting {task_state} tasks") as advance:
        result = admin.purge(name, task_state, progress=advance)
    click.echo(f"deleted {result.done} task(s); left {result.skipped} that changed meanwhile")


@queue.command("rm")
@click.argument("name")
@click.option("--force", is_flag=True, help="Remove it even if it holds tasks (all deleted).")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@connection_options
@click.pass_obj
def rm(state: CliState, name: str, force: bool, yes: bool) -> None:
    """Remove queue NAME: its keys and its registry entry (refused while it holds tasks,
    unless --force)."""
    admin = Admin(backend=state.backend())
    confirm(yes, f"remove queue {name}{' and every task in it' if force else ''}?")
    result = admin.remove_queue(name, force=force)
    click.echo(f"queue {name} removed" + (f" with {result.done} task(s)" if result.done else ""))
