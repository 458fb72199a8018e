"""Fair groups on the operator's surface: ``clusterq queue limit`` with the per-group
options (set, show, replace, clear, bad input), the per-group part of ``queue ls``'s
Limits column, and the groups table and ``groups`` key of ``queue inspect``. The CLI
runs as the installed script, against the standalone server and the cluster.

Tasks are sorted into their groups by one dequeue call on a queue whose groups may
each start one task an hour: each group starts one and keeps the rest waiting, and
stays in its turn (its rate) even with none left."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

import pytest
from click.testing import CliRunner

from clusterq import Client, Inspector, Limits
from clusterq.broker.facade import Broker
from clusterq.cli import main
from clusterq.cli.render import clock
from clusterq.cluster.abackend import AsyncBackend
from clusterq.ops.groupinfo import QueueGroups
from clusterq.ops.queueinfo import compact_limits
from clusterq.tools.devcluster import LocalServer
from tests.helpers import on_node
from tests.test_limits_cli import _json, _ls_line, _ok, _one_line_error, _run


def _take(url: str, prefix: str, queues: Iterable[str], count: int) -> list[str]:
    """One dequeue call on each of ``queues`` (up to ``count`` tasks each): what it
    started."""

    async def take() -> list[str]:
        backend = await AsyncBackend.connect(url, prefix=prefix)
        try:
            started = []
            for queue in queues:
                got = await Broker(backend).dequeue(backend.keys.queue(queue), count, 60_000, "op")
                started += [task_id for task_id, _ in got.tasks]
            return started
        finally:
            await backend.aclose()

    return asyncio.run(take())


def _table(output: str, title: str) -> tuple[list[str], list[list[str]]]:
    """The header and rows (cells as text) of the table titled ``title`` in ``output``."""
    lines = output.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == title)
    header: list[str] = []
    rows: list[list[str]] = []
    for line in lines[start + 1 :]:
        if line.startswith("└"):
            break
        if line.startswith("┃"):
            header = [c.strip() for c in line.split("┃")[1:-1]]
        elif line.startswith("│"):
            rows.append([c.strip() for c in line.split("│")[1:-1]])
    return header, rows


def _limits_cell(output: str, queue: str) -> str:
    """The Limits cell (the last) of ``queue``'s line in ``queue ls``."""
    return [c.strip() for c in _ls_line(output, queue).split("│")][-2]


# ---------------------------------------------------------------------- queue limit


def test_compact_limits_puts_the_groups_after_the_queue() -> None:
    assert compact_limits(None) == "-"
    assert compact_limits(Limits.of("200/s", 20, 5)) == "200/s b20 · max 5"
    assert compact_limits(Limits.of(concurrency=5)) == "max 5"
    both = Limits.of("200/s", 20, 5, rate_per_group="5/s", burst_per_group=1,
                     concurrency_per_group=2)  # fmt: skip
    assert compact_limits(both) == "200/s b20 · max 5 · per group 5/s b1 · max 2/group"
    assert compact_limits(Limits.of(rate_per_group="50/s")) == "per group 50/s b5"
    assert compact_limits(Limits.of(concurrency_per_group=3)) == "max 3/group"
    typed = Limits.of(type_rates={"a": "1/s", "b": "2/s"}, type_concurrency={"c": 1})
    assert compact_limits(typed) == "2 type rates · 1 type cap"
    assert compact_limits(Limits.of(type_rates={"a": "1/s"})) == "1 type rate"


PER_GROUP = {"rate": "5/s", "rate_per_second": 5.0, "burst": 1, "concurrency": 2}


def test_set_show_replace_clear_per_group_limits(url: str, prefix: str, clusterq_bin: str) -> None:
    run = lambda *a: _ok(clusterq_bin, url, prefix, *a)  # noqa: E731
    as_json = lambda *a: _json(clusterq_bin, url, prefix, *a)  # noqa: E731
    with Client(url, prefix=prefix) as client:
        client.enqueue("x", queue="api", group="tenant-42")

        said = run("queue", "limit", "api", "--rate", "200/s", "--burst", "20",
                   "--concurrency", "5", "--rate-per-group", "5/s", "--burst-per-group", "1",
                   "--concurrency-per-group", "2")  # fmt: skip
        assert said.strip() == (
            "queue api: 200/s (burst 20), 5 at once, per group 5/s (burst 1), 2 at once per group"
        )
        assert client.limits("api") == Limits.of(
            "200/s", 20, 5, rate_per_group="5/s", burst_per_group=1, concurrency_per_group=2
        )
        shown = as_json("queue", "limit", "api")["limits"]
        assert shown["per_group"] == PER_GROUP and shown["concurrency"] == 5
        listed = run("queue", "ls")
        assert _limits_cell(listed, "api") == "200/s b20 · max 5 · per group 5/s b1 · max 2/group"

        # options not given are removed, as set_limits does
        only_cap = run("queue", "limit", "api", "--concurrency-per-group", "3")
        assert only_cap.strip() == "queue api: 3 at once per group"
        assert client.limits("api") == Limits.of(concurrency_per_group=3)
        assert _limits_cell(run("queue", "ls"), "api") == "max 3/group"

        only_rate = as_json("queue", "limit", "api", "--rate-per-group", "10/m")
        assert only_rate["limits"]["per_group"] == {
            "rate": "10/m", "rate_per_second": round(10 / 60, 6), "burst": 1, "concurrency": None,
        }  # fmt: skip
        assert only_rate["limits"]["rate"] is None
        assert client.limits("api") == Limits.of(rate_per_group="10/m")
        assert _limits_cell(run("queue", "ls"), "api") == "per group 10/m b1"

        assert run("queue", "limit", "api", "--clear").strip() == "queue api: no limits"
        assert client.limits("api") is None


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("--rate-per-group", "fast"), "rate_per_group: invalid rate 'fast'"),
        (("--rate-per-group", "0/s"), "invalid rate '0/s'"),
        (("--rate-per-group", "5/s", "--burst-per-group", "0"), "invalid burst_per_group 0"),
        (("--rate-per-group", "5/s", "--burst-per-group", "x"), "invalid burst_per_group 'x'"),
        (("--burst-per-group", "3"), "a burst_per_group needs a rate_per_group"),
        (("--concurrency-per-group", "0"), "invalid concurrency_per_group 0"),
        (("--concurrency-per-group", "2.5"), "invalid concurrency_per_group '2.5'"),
        (("--clear", "--rate-per-group", "1/s"), "--clear"),
        (("--clear", "--burst-per-group", "2"), "--clear"),
        (("--clear", "--concurrency-per-group", "2"), "--clear"),
    ],
)
def test_bad_per_group_input_is_one_line_and_writes_nothing(
    url: str, prefix: str, clusterq_bin: str, args: tuple[str, ...], fragment: str
) -> None:
    before = Limits.of("7/s", None, 3, rate_per_group="2/s", concurrency_per_group=4)
    with Client(url, prefix=prefix) as client:
        client.set_limits("api", rate="7/s", concurrency=3, rate_per_group="2/s",
                          concurrency_per_group=4)  # fmt: skip
        assert client.limits("api") == before
        _one_line_error(_run(clusterq_bin, url, prefix, "queue", "limit", "api", *args), fragment)
        assert client.limits("api") == before


# ---------------------------------------------------------------------- queue inspect


def test_inspect_shows_the_groups_and_their_waiting_tasks(
    url: str, prefix: str, clusterq_bin: str
) -> None:
    queue = "fair"
    with Client(url, prefix=prefix) as client:
        client.set_limits(queue, rate_per_group="1/h")
        for i in range(6):
            client.enqueue("job", i, queue=queue, group=f"t{i % 3}")
        client.enqueue("job", "a", queue=queue)  # ungrouped: group ""
        client.enqueue("job", "b", queue=queue)
        client.enqueue("job", "x", queue="plain")
        assert len(_take(url, prefix, [queue], 10)) == 4  # each group's one token
        client.enqueue("job", "c", queue=queue)  # ungrouped: not sorted yet
        qk = client.keys.queue(queue)
        assert on_node(client, qk.pending, "LLEN") == 1
        hold_ms = int(time.time() * 1000) + 600_000  # as RateLimited(600, scope="group")
        on_node(client, qk.groups, "HSET", "h:t1", hold_ms)
        hold = hold_ms / 1000

    shown = _ok(clusterq_bin, url, prefix, "queue", "inspect", queue)
    assert shown.index("queue fair") < shown.index("fair groups")  # after what it showed
    header, rows = _table(shown, "fair groups")
    assert header == ["Group", "Waiting", "Running", "Next turn", "Held until"]
    assert {row[0]: row[1] for row in rows} == {"t0": "1", "t1": "1", "t2": "1", "(no group)": "1"}
    assert {row[0]: row[4] for row in rows} == {
        "t0": "-", "t1": clock(hold), "t2": "-", "(no group)": "-",
    }  # fmt: skip
    for _, _, running, next_turn, _ in rows:
        assert running == "-"  # no cap per group
        assert next_turn.startswith("in ") and ("m" in next_turn or "h" in next_turn)
    assert "1 pending task(s) not yet sorted into groups" in shown

    data = _json(clusterq_bin, url, prefix, "queue", "inspect", queue)
    (only,) = data["groups"]
    assert {k: only[k] for k in ("queue", "unsorted", "truncated")} == {
        "queue": queue, "unsorted": 1, "truncated": False,
    }  # fmt: skip
    assert {g["group"]: g["waiting"] for g in only["groups"]} == {"t0": 1, "t1": 1, "t2": 1, "": 1}
    now = time.time()
    for group in only["groups"]:
        assert group["queue"] == queue and group["running"] is None
        assert now + 3000 < group["next_turn"] <= now + 3601
        assert group["held_until"] == (pytest.approx(hold) if group["group"] == "t1" else None)
    assert "groups_error" not in data and data["pending"] == 5

    # a queue not served fairly shows no groups, whatever it has pending
    plain = _ok(clusterq_bin, url, prefix, "queue", "inspect", "plain")
    assert "groups" not in plain and "not yet sorted" not in plain
    plain_json = _json(clusterq_bin, url, prefix, "queue", "inspect", "plain")
    assert plain_json["groups"] == [
        {"queue": "plain", "unsorted": 1, "truncated": False, "groups": []}
    ]


def test_inspect_shows_a_cap_per_group_and_twenty_groups_at_most(
    url: str, prefix: str, clusterq_bin: str
) -> None:
    queue = "many"
    with Client(url, prefix=prefix) as client:
        client.set_limits(queue, rate_per_group="1/h", concurrency_per_group=1)
        ids = {}
        for i in range(23):
            pair = client.enqueue_many([("job", i), ("job", i)], queue=queue, group=f"g{i:02d}")
            ids.update({task.id: f"g{i:02d}" for task in pair})
        started = _take(url, prefix, [queue], 50)
        assert sorted(ids[i] for i in started) == sorted(set(ids.values()))  # one each
        (before,) = _json(clusterq_bin, url, prefix, "queue", "inspect", queue)["groups"]
        assert all(g["running"] == 1 and g["waiting"] == 1 for g in before["groups"])
        first = before["groups"][0]["group"]  # the first to take its turn: the first row
        ended = next(i for i in started if ids[i] == first)
        on_node(client, client.keys.queue(queue).active, "ZREM", ended)  # as if it ended

    shown = _ok(clusterq_bin, url, prefix, "queue", "inspect", queue)
    _, rows = _table(shown, "fair groups")
    assert len(rows) == 20
    assert {row[0] for row in rows} < set(ids.values())
    assert rows[0][:3] == [first, "1", "0"]  # group, waiting, running against the cap
    assert all(row[1:3] == ["1", "1"] for row in rows[1:])
    assert "... and 3 more groups" in shown
    assert "not yet sorted" not in shown
    (only,) = _json(clusterq_bin, url, prefix, "queue", "inspect", queue)["groups"]
    assert len(only["groups"]) == 23  # JSON: every group read
    assert {g["group"]: g["running"] for g in only["groups"]} == {
        group: 0 if group == first else 1 for group in ids.values()
    }


def test_inspect_of_a_partitioned_queue_names_each_groups_partition(
    url: str, prefix: str, clusterq_bin: str
) -> None:
    with Client(url, prefix=prefix) as client:
        layout = client.declare_queue("pq", partitions=3)
        client.set_limits("pq", rate_per_group="1/h")
        placed = {}
        for i in range(8):
            group = f"tenant-{i}"
            placed[group] = client.enqueue_many([("job", 1), ("job", 2)], queue="pq",
                                                group=group)[0].queue  # fmt: skip
        assert len(set(placed.values())) > 1
        assert len(_take(url, prefix, layout.queues, 10)) == 8

    shown = _ok(clusterq_bin, url, prefix, "queue", "inspect", "pq")
    header, rows = _table(shown, "fair groups")
    assert header == ["Group", "Queue", "Waiting", "Running", "Next turn", "Held until"]
    assert {row[0]: (row[1], row[2]) for row in rows} == {
        group: (partition, "1") for group, partition in placed.items()
    }
    found = _json(clusterq_bin, url, prefix, "queue", "inspect", "pq")["groups"]
    assert [q["queue"] for q in found] == list(layout.members)
    assert {g["group"]: g["queue"] for q in found for g in q["groups"]} == placed


@pytest.mark.parametrize("as_json", [False, True])
def test_inspect_reads_the_groups_once(
    standalone: LocalServer, prefix: str, monkeypatch: pytest.MonkeyPatch, as_json: bool
) -> None:
    calls: list[str] = []
    read = Inspector.groups

    def counted(self: Inspector, queue: str) -> list[QueueGroups]:
        calls.append(queue)
        return read(self, queue)

    monkeypatch.setattr(Inspector, "groups", counted)
    with Client(standalone.seed_url, prefix=prefix) as client:
        client.set_limits("once", rate_per_group="1/h")
        client.enqueue("job", 1, queue="once", group="A")
    args = ["--url", standalone.seed_url, "--prefix", prefix, *(["--json"] if as_json else [])]
    done = CliRunner().invoke(main, ["queue", "inspect", "once", *args])
    assert done.exit_code == 0, done.output
    assert calls == ["once"]


def test_foreign_data_in_the_turns_key_is_named_and_the_rest_shown(
    url: str, prefix: str, clusterq_bin: str
) -> None:
    queue = "foreign"
    with Client(url, prefix=prefix) as client:
        client.enqueue("job", 1, queue=queue, group="A")
        turns = client.keys.queue(queue).turns
        on_node(client, turns, "SET", "not a zset")
    done = _run(clusterq_bin, url, prefix, "queue", "inspect", queue)
    assert done.returncode == 1 and "queue foreign" in done.stdout  # the rest is shown
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert "fair groups cannot be read" in lines[0] and "WRONGTYPE" in lines[0]
    data = _json(clusterq_bin, url, prefix, "queue", "inspect", queue)
    assert data["groups"] is None and "WRONGTYPE" in data["groups_error"]
    assert data["pending"] == 1 and data["error"] is None


# ---------------------------------------------------------------------- caps per task type


def test_queue_limit_sets_shows_and_refuses_caps_per_type(
    url: str, prefix: str, clusterq_bin: str
) -> None:
    q = "typed"
    with Client(url, prefix=prefix) as client:
        client.enqueue("b", 1, queue=q)  # registered: queue ls lists it
    shown = _ok(
        clusterq_bin, url, prefix, "queue", "limit", q,
        "--type-concurrency", "report:build=2", "--type-concurrency", "b=1",
    )  # fmt: skip
    assert shown.strip() == f"queue {q}: type b 1 at once, type report:build 2 at once"
    data = _json(clusterq_bin, url, prefix, "queue", "limit", q)
    assert data["limits"]["type_concurrency"] == {"b": 1, "report:build": 2}
    assert "2 type caps" in _ls_line(_ok(clusterq_bin, url, prefix, "queue", "ls"), q)
    for bad, says in [
        ("nope", "invalid --type-concurrency 'nope': give TYPE=N"),
        ("=2", "invalid --type-concurrency '=2'"),
        ("a=many", "invalid --type-concurrency of 'a' 'many'"),
        ("a=0", "task type 'a': invalid concurrency 0"),
    ]:
        _one_line_error(
            _run(clusterq_bin, url, prefix, "queue", "limit", q, "--type-concurrency", bad), says
        )
    with Client(url, prefix=prefix) as client:  # what was refused wrote nothing
        assert client.limits(q) == Limits.of(type_concurrency={"b": 1, "report:build": 2})
    _one_line_error(
        _run(
            clusterq_bin, url, prefix, "queue", "limit", q, "--clear", "--type-concurrency", "a=1"
        ),
        "--clear removes every limit",
    )


def test_group_labels_name_the_ungrouped_tasks() -> None:
    from clusterq.ops.groupinfo import group_label

    assert group_label("") == "(no group)"
    assert group_label("{report:build") == "(type report:build)"
    assert group_label("tenant-42") == "tenant-42"
