"""The operator's CLI over the admin API (``queue inspect|pause|unpause|purge|rm``,
``task ls|inspect|delete|archive|run``, ``stats``), run in-process with click's runner
against the standalone node and the cluster."""

from __future__ import annotations

import json
import time
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

from clusterq import Client, TaskState
from clusterq.cli import main
from clusterq.ops.admin import Admin
from clusterq.producer import TaskSpec


def _cli(url: str, prefix: str, *args: str, input: str | None = None) -> Result:
    # --url and --prefix after the subcommand: accepted there as well as before it
    return CliRunner().invoke(main, [*args, "--url", url, "--prefix", prefix], input=input)


def _json(result: Result) -> Any:
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def _archived(client: Client, queue: str, count: int, task_type: str) -> list[str]:
    ids = [
        info.id
        for info in client.enqueue_many(
            [TaskSpec(task_type, i, {"queue": queue, "process_in": 600}) for i in range(count)]
        )
    ]
    with Admin(backend=client.backend) as admin:
        assert set(admin.archive(queue, ids).values()) == {"ok"}
    return ids


def test_task_commands(url: str, prefix: str) -> None:
    with Client(url, prefix=prefix) as client:
        broken = _archived(client, "ops", 5, "broken")
        other = _archived(client, "ops", 2, "other")
        pending = client.enqueue("fine", {"a": 1}, queue="ops").id

        listed = _json(
            _cli(url, prefix, "task", "ls", "-q", "ops", "--state", "archived", "--json")
        )
        assert {t["id"] for t in listed} == set(broken + other)
        page = _json(
            _cli(url, prefix, "task", "ls", "-q", "ops", "--state", "archived", "--limit", "3",
                 "--json")
        )  # fmt: skip
        assert len(page) == 3
        shown = _cli(url, prefix, "task", "ls", "-q", "ops")
        assert shown.exit_code == 0 and pending in shown.output and "fine" in shown.output

        detail = _json(_cli(url, prefix, "task", "inspect", pending, "-q", "ops", "--json"))
        assert detail["state"] == "pending" and detail["payload"] == {"a": 1}
        missing = _cli(url, prefix, "task", "inspect", "nope", "-q", "ops")
        assert missing.exit_code == 1 and "error: no task 'nope'" in missing.output

        # one by one: a task the action does not apply to is named, exit 1
        ran = _cli(url, prefix, "task", "run", broken[0], pending, "-q", "ops", "--yes")
        assert ran.exit_code == 1
        assert f"{broken[0]}: made pending" in ran.output
        assert f"{pending}: left alone: it is pending" in ran.output

        # in bulk by state and type, asking first
        refused = _cli(url, prefix, "task", "delete", "-q", "ops", "--all", "--state",
                       "archived", "--type", "broken", input="n\n")  # fmt: skip
        assert refused.exit_code == 1 and "cancelled: nothing was changed" in refused.output
        assert client.info(broken[1], queue="ops").state == TaskState.ARCHIVED
        deleted = _cli(url, prefix, "task", "delete", "-q", "ops", "--all", "--state",
                       "archived", "--type", "broken", input="y\n")  # fmt: skip
        assert deleted.exit_code == 0, deleted.output
        assert "deleted: 4 task(s); left alone: 2" in deleted.output
        run_all = _json(
            _cli(url, prefix, "task", "run", "-q", "ops", "--all", "--state", "archived",
                 "--yes", "--json")
        )  # fmt: skip
        assert run_all == {"done": 2, "skipped": 0, "statuses": {"ok": 2}}
        assert {client.info(i, queue="ops").state for i in other} == {TaskState.PENDING}

        both = _cli(url, prefix, "task", "archive", pending, "-q", "ops", "--all", "--yes")
        assert both.exit_code == 1 and "not both" in both.output


def _memory_of(client: Client, queue: str) -> int:
    qk = client.keys.queue(queue)

    def usage(node: Any) -> int:
        keys = list(node.scan_iter(match=f"{qk.base}:*", count=1000))
        return sum(int(node.memory_usage(key, samples=5) or 0) for key in keys)

    return int(client.backend.execute(qk.slot, usage))


def test_queue_commands(url: str, prefix: str) -> None:
    with Client(url, prefix=prefix) as client:
        _archived(client, "q1", 3, "x")
        client.enqueue("x", queue="q1")

        assert _cli(url, prefix, "queue", "pause", "q1").exit_code == 0
        info = _json(_cli(url, prefix, "queue", "inspect", "q1", "--types", "--json"))
        assert info["paused"] is True
        assert (info["pending"], info["archived"]) == (1, 3)
        assert info["types"] == {"x": 4}
        # what the server says its keys take (MEMORY USAGE of each key SCAN finds there)
        assert info["memory"] == _memory_of(client, "q1") > 0
        shown = _cli(url, prefix, "queue", "inspect", "q1")
        assert shown.exit_code == 0 and "Keyslot" in shown.output
        assert _cli(url, prefix, "queue", "unpause", "q1").exit_code == 0
        assert not _json(_cli(url, prefix, "queue", "inspect", "q1", "--json"))["paused"]

        purged = _cli(url, prefix, "queue", "purge", "q1", "--state", "archived", "--yes")
        assert purged.exit_code == 0 and "deleted 3 task(s)" in purged.output

        refused = _cli(url, prefix, "queue", "rm", "q1", "--yes")
        assert refused.exit_code == 1 and "still holds 1 task" in refused.output
        removed = _cli(url, prefix, "queue", "rm", "q1", "--force", "--yes")
        assert removed.exit_code == 0 and "removed with 1 task" in removed.output
        names = [q["queue"] for q in _json(_cli(url, prefix, "queue", "ls", "--json"))]
        assert "q1" not in names


def test_stats(url: str, prefix: str) -> None:
    with Client(url, prefix=prefix) as client:
        for queue in ("images", "webhooks", "notifications"):
            client.enqueue("x", queue=queue)
    summary = _json(_cli(url, prefix, "stats", "--json"))
    assert sum(n["pending"] for n in summary["nodes"]) == 3
    assert sum(n["queues"] for n in summary["nodes"]) == 3
    assert len(summary["nodes"]) == (3 if "," in url or _is_cluster(url) else 1)
    shown = _cli(url, prefix, "stats")
    assert shown.exit_code == 0 and "per master" in shown.output


def _is_cluster(url: str) -> bool:
    with Client(url) as client:
        return client.backend.mode == "cluster"


def _commands(group: click.Group, path: str = "") -> list[tuple[str, click.Command]]:
    out = []
    for name, command in group.commands.items():
        out.append((f"{path} {name}".strip(), command))
        if isinstance(command, click.Group):
            out += _commands(command, f"{path} {name}")
    return out


@pytest.mark.parametrize("name,command", _commands(main), ids=lambda v: str(v))
def test_every_option_has_help_text(name: str, command: click.Command) -> None:
    for param in command.params:
        if isinstance(param, click.Option):
            assert param.help, f"clusterq {name} {param.opts[0]} has no help text"


def test_enqueue_json_says_when_the_task_was_enqueued(url: str, prefix: str) -> None:
    before = time.time()
    first = _json(_cli(url, prefix, "enqueue", "x", "1", "--task-id", "t-1", "--json"))
    assert before - 1 <= first["enqueued_at"] <= time.time() + 1
    again = _json(_cli(url, prefix, "enqueue", "x", "1", "--task-id", "t-1", "--json"))
    assert again["already_enqueued"] is True and again["enqueued_at"] is None


def test_cluster_watch_refuses_a_bad_interval_before_printing_anything(
    url: str, prefix: str
) -> None:
    refused = _cli(url, prefix, "cluster", "watch", "--interval", "-1")
    assert refused.exit_code == 2 and "--interval" in refused.output
    assert "Slots" not in refused.output


def test_the_reference_is_every_commands_own_help() -> None:
    from click.testing import CliRunner

    from clusterq.cli import main

    result = CliRunner().invoke(main, ["reference"])
    assert result.exit_code == 0, result.output
    sections = result.output.split("======== ")[1:]
    paths = [s.split("\n", 1)[0].split()[1:] for s in sections]
    assert ["queue", "create"] in paths and ["stream", "inspect"] in paths
    assert ["worker"] in paths and ["reference"] in paths and len(paths) > 40
    for section, path in zip(sections, paths, strict=True):
        own = CliRunner().invoke(main, [*path, "--help"], prog_name="clusterq", terminal_width=80)
        assert own.exit_code == 0, own.output
        assert section.split("\n", 1)[1].strip() == own.output.strip(), path
    markdown = CliRunner().invoke(main, ["reference", "--markdown"]).output
    assert "#### `clusterq stream ls`" in markdown and "```\nUsage: clusterq stream ls" in markdown
