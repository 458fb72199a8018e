"""Periodic tasks: the entries' ticks (pure), and several schedulers against the cluster —
one fires each tick, exactly once, through a leader killed with -9 and through a
failover of the master that holds the scheduler's state."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import signal
import subprocess
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from clusterq import Inspector, Router, Task, TaskSpec
from clusterq.broker import cron
from clusterq.cluster.backend import Backend
from clusterq.errors import ConfigError, TaskNotFound
from clusterq.keys import MAX_TASK_ID_LENGTH, KeySchema
from clusterq.ops.croninfo import cron_history, cron_status
from clusterq.ops.inspector import MAX_PAGE
from clusterq.scheduler import MAX_ENTRY_NAME_LENGTH, Periodic, Scheduler, now_ms
from clusterq.slots import keyslot
from clusterq.tools.devcluster import LocalCluster
from tests.cron_entries import ENTRIES, QUEUE
from tests.helpers import await_for, running_worker, wait_for

SPEC = TaskSpec("t", None, {"queue": "q"})


def _ms(text: str, tz: str = "UTC") -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=ZoneInfo(tz)).timestamp() * 1000)


def test_every_ticks_are_aligned_to_the_epoch() -> None:
    entry = Periodic("e", SPEC, every=30)
    assert entry.ticks(_ms("2026-01-01T00:00:10"), _ms("2026-01-01T00:01:30")) == [
        _ms("2026-01-01T00:00:30"),
        _ms("2026-01-01T00:01:00"),
        _ms("2026-01-01T00:01:30"),
    ]
    assert entry.task_id(1000) == "cron:e:1000"


def test_cron_ticks_with_seconds_and_a_time_zone() -> None:
    every_ten_seconds = Periodic("s", SPEC, cron="*/10 * * * * *")
    start = _ms("2026-01-01T00:00:05")
    assert every_ten_seconds.ticks(start, start + 20_000) == [start + 5000, start + 15000]
    nine_paris = Periodic("p", SPEC, cron="0 9 * * *", tz="Europe/Paris")
    assert nine_paris.next_tick(_ms("2026-06-01T00:00:00")) == _ms(
        "2026-06-01T09:00:00", "Europe/Paris"
    )
    assert nine_paris.next_tick(_ms("2026-06-01T00:00:00")) == _ms("2026-06-01T07:00:00")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"cron": "nope"}, "invalid cron expression"),
        ({"cron": "* * * * *", "every": 5}, "not both"),
        ({}, "not both"),
        ({"every": 0}, "every must be"),
        ({"every": 5, "tz": "Mars/Base"}, "unknown time zone"),
    ],
)
def test_bad_entries_are_refused_with_the_reason(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Periodic("x", SPEC, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="chooses the task id"):
        Periodic("x", TaskSpec("t", None, {"task_id": "mine"}), every=1)


def _ticks_ran(ran: Counter[str]) -> list[int]:
    return sorted(int(task_id.rsplit(":", 1)[1]) for task_id in ran)


def _all_ran(history: list[dict[str, Any]], ran: Counter[str]) -> bool:
    """Has every task the history says was enqueued run (counted by the handler)?"""
    return all(h["task_id"] in ran for h in history)


def _assert_every_tick_once(ran: Counter[str], history: list[dict[str, object]]) -> list[int]:
    ticks = _ticks_ran(ran)
    assert set(ran.values()) == {1}, [t for t, n in ran.items() if n > 1]
    gaps = [b - a for a, b in itertools.pairwise(ticks) if b - a != 1000]
    assert not gaps, f"ticks missing: {gaps}"
    fresh = Counter(h["tick"] for h in history if not h.get("already_enqueued"))
    assert set(fresh.values()) == {1}, fresh  # no tick enqueued twice
    # only a new leader re-driving a claim left in flight meets an id already enqueued:
    # no second scheduler fires a tick the leader fired
    assert all(h.get("redriven") for h in history if h.get("already_enqueued")), history
    return ticks


@pytest.mark.slow
def test_three_schedulers_fire_each_tick_once_through_a_leader_killed(
    cluster: LocalCluster, prefix: str, clusterq_bin: str
) -> None:
    url = cluster.seed_url
    ran: Counter[str] = Counter()
    router = Router()

    @router.task("cron:tick")
    async def tick(task: Task) -> None:
        ran[task.id] += 1

    procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(name: str) -> None:
        procs[name] = subprocess.Popen(
            [clusterq_bin, "--url", url, "--prefix", prefix, "scheduler",
             "tests.cron_entries:ENTRIES", "--lease", "2", "--catch-up", "30", "--name", name],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip

    backend = Backend(url, prefix=prefix)

    def leader() -> str | None:
        token, _ = cron_status(backend)
        return token.rsplit(":", 1)[0] if token else None

    async def scenario() -> tuple[str, str]:
        async with running_worker(url, router, queues=[QUEUE], prefix=prefix):
            for name in ("s1", "s2", "s3"):
                start(name)
            first = await await_for(leader, 20, "a leader")
            await await_for(lambda: len(ran) >= 6, 20, "six ticks")
            procs[first].send_signal(signal.SIGKILL)
            procs[first].wait(timeout=10)
            killed_at = len(ran)
            second = await await_for(lambda: (w := leader()) != first and w, 20, "a new leader")
            await await_for(lambda: len(ran) >= killed_at + 10, 30, "ten more ticks")
            for proc in procs.values():
                proc.terminate()
            for proc in procs.values():
                proc.wait(timeout=10)
            fired = await asyncio.to_thread(cron_history, backend, "tick", 100)
            await await_for(lambda: _all_ran(fired, ran), 20, "every tick enqueued to run")
        return first, str(second)

    try:
        first, second = asyncio.run(scenario())
        history = cron_history(backend, "tick", 100)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
        backend.close()
    assert first != second
    ticks = _assert_every_tick_once(ran, history)
    assert len(ticks) >= 16
    schedulers = {h["scheduler"] for h in history}
    assert first in schedulers and second in schedulers


@pytest.mark.slow
def test_a_failover_of_the_schedulers_master_fires_no_tick_twice(
    fresh_cluster: Callable[[], LocalCluster], prefix: str
) -> None:
    cluster = fresh_cluster()
    url = cluster.seed_url
    ran: Counter[str] = Counter()
    router = Router()

    @router.task("cron:tick")
    async def tick(task: Task) -> None:
        ran[task.id] += 1

    backend = Backend(url, prefix=prefix)
    inspector = Inspector(backend=backend)
    slot = keyslot(KeySchema(prefix).cron.base)
    location = backend.topology.shard_for_slot(slot)
    assert location is not None and location.replicas

    async def scenario() -> None:
        schedulers = [
            Scheduler(url, ENTRIES, prefix=prefix, lease=2, catch_up=30, name=f"s{n}")
            for n in range(3)
        ]
        async with running_worker(url, router, queues=[QUEUE], prefix=prefix):
            serving = [asyncio.create_task(s.serve()) for s in schedulers]
            await await_for(lambda: len(ran) >= 5, 20, "five ticks")
            replica = cluster.client(location.replicas[0].port)
            await asyncio.to_thread(replica.execute_command, "CLUSTER", "FAILOVER")
            replica.close()

            def promoted() -> bool:
                backend.refresh_topology()
                new = backend.topology.master_for_slot(slot)
                return new is not None and new.id == location.replicas[0].id

            await asyncio.to_thread(wait_for, promoted, 30, "the failover")
            after = len(ran)
            await await_for(lambda: len(ran) >= after + 6, 30, "six ticks after the failover")
            for s in schedulers:
                s.stop()
            await asyncio.gather(*serving)
            fired = await asyncio.to_thread(cron_history, backend, "tick", 100)
            await await_for(lambda: _all_ran(fired, ran), 20, "every tick enqueued to run")
            # nothing enqueued is left: each task the schedulers enqueued ran
            info = await asyncio.to_thread(inspector.queue, QUEUE)
            assert (info.pending, info.scheduled, info.active, info.retry) == (0, 0, 0, 0)

    try:
        asyncio.run(scenario())
        history = cron_history(backend, "tick", 100)
    finally:
        backend.close()
    _assert_every_tick_once(ran, history)


def test_cron_ls_and_history_show_the_entries(url: str, prefix: str) -> None:
    from click.testing import CliRunner

    from clusterq.cli import main

    async def scenario() -> Scheduler:
        scheduler = Scheduler(url, ENTRIES, prefix=prefix, lease=1, name="only")
        serving = asyncio.create_task(scheduler.serve())
        with Inspector(url, prefix=prefix) as inspector:  # no worker: the tasks stay
            await await_for(
                lambda: asyncio.to_thread(lambda: len(_queued(inspector, QUEUE)) >= 2),
                20,
                "two tasks enqueued",
            )
        listing = CliRunner().invoke(
            main, ["--url", url, "--prefix", prefix, "cron", "ls", "--json"]
        )
        assert listing.exit_code == 0, listing.output
        data = json.loads(listing.output)
        assert data["leader"].startswith("only:")
        [entry] = data["entries"]
        assert entry["name"] == "tick" and entry["queue"] == QUEUE
        assert entry["next_tick"] > entry["last_tick"]
        scheduler.stop()
        await serving
        return scheduler

    scheduler = asyncio.run(scenario())
    shown = CliRunner().invoke(main, ["--url", url, "--prefix", prefix, "cron", "history", "tick"])
    assert shown.exit_code == 0 and "cron:tick:" in shown.output and "only" in shown.output
    assert scheduler.token is None  # gave up the lead on the way out
    listing = CliRunner().invoke(main, ["--url", url, "--prefix", prefix, "cron", "ls"])
    assert "leader: none" in listing.output


# ---------------------------------------------------------------------- what a queue holds


def _queued(inspector: Inspector, queue: str) -> list[str]:
    """The ids of the tasks pending in ``queue``, oldest first, read from the queue itself
    (not from the scheduler's counters)."""
    ids: list[str] = []
    while True:
        page = inspector.task_ids(queue, "pending", offset=len(ids), limit=MAX_PAGE)
        ids += page
        if len(page) < MAX_PAGE:
            return ids


def _ticks(ids: list[str], entry: str) -> list[int]:
    """The ticks (ms) of the entry's task ids ``cron:<entry>:<tick>``, in order."""
    return sorted(int(i.rsplit(":", 1)[1]) for i in ids if i.startswith(f"cron:{entry}:"))


def _state(backend: Backend) -> dict[str, str]:
    key = backend.keys.cron.state
    raw = backend.execute_key(key, lambda c: c.hgetall(key))
    return {k.decode(): v.decode() for k, v in raw.items()}


# ---------------------------------------------------------------------- bad entries


@pytest.mark.parametrize(
    "name,task,reason",
    [
        ("spaced", TaskSpec("t", None, {"queue": "bad queue"}), "invalid queue name 'bad queue'"),
        ("nan", TaskSpec("t", {"x": float("nan")}), "payload is not JSON-serialisable"),
        ("n" * 120, SPEC, "120 characters, at most 109"),
        ("option", TaskSpec("t", None, {"priority": 1}), "unknown task option(s) priority"),
        ("late", TaskSpec("t", None, {"process_in": -1}), "process_in must be between"),
        ("big", TaskSpec("t", "x" * 600_000), "more than the limit"),
        ("untyped", TaskSpec("", None), "task type must be a non-empty string"),
        ("durable", TaskSpec("t", None, {"durability": "all"}), "durability must be"),
    ],
)
def test_an_entry_that_could_never_be_enqueued_is_refused_in_one_line(
    name: str, task: TaskSpec, reason: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        Periodic(name, task, every=1)
    message = str(caught.value)
    assert reason in message, message
    assert "\n" not in message and name[:20] in message


def test_the_longest_entry_name_still_makes_valid_task_ids() -> None:
    assert MAX_ENTRY_NAME_LENGTH == 109
    entry = Periodic("n" * MAX_ENTRY_NAME_LENGTH, SPEC, every=1)
    assert len(entry.task_id(9_999_999_999_999)) == MAX_TASK_ID_LENGTH
    with pytest.raises(ConfigError, match="every must be"):
        Periodic("e", SPEC, every=1e12)  # its ticks would pass the 13 digits


def test_the_scheduler_command_refuses_a_bad_entry_in_one_line(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from clusterq.cli import main

    module = f"bad_entries_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{module}.py").write_text(
        "from clusterq import Periodic, TaskSpec\n"
        "ENTRIES = [Periodic('nan', TaskSpec('t', float('nan')), every=1)]\n"
    )
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["--url", "redis://127.0.0.1:1", "scheduler",
                                       f"{module}:ENTRIES"])  # fmt: skip
    assert result.exit_code == 1, result.output
    assert result.output.strip().count("\n") == 0, result.output
    assert "periodic entry 'nan'" in result.output and "not JSON-serialisable" in result.output


GOOD, BAD = "cron-good", "cron-bad"


def _good_and_bad(every: float) -> list[Periodic]:
    # the bad entry first: each pass meets it before the good one
    return [
        Periodic("bad", TaskSpec("cron:bad", None, {"queue": BAD}), every=every),
        Periodic("good", TaskSpec("cron:good", None, {"queue": GOOD}), every=every),
    ]


def test_an_entry_whose_enqueue_fails_holds_up_no_other(
    url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The bad entry's queue holds foreign data (what no check at start can see): its
    claimed tick fails at each pass and at each takeover, and is logged with its
    traceback; the good entry fires every tick, through a change of leader; once the
    foreign key is gone, the bad entry's tick in flight is enqueued (late, once)."""
    caplog.set_level(logging.ERROR, logger="clusterq.scheduler")
    every = 0.5
    inspector = Inspector(url, prefix=prefix)
    backend = inspector.backend
    bad_pending = backend.keys.queue(BAD).pending
    backend.execute_key(bad_pending, lambda c: c.set(bad_pending, "not a list"))

    def good_count() -> int:
        return len(_queued(inspector, GOOD))

    def leader() -> str | None:
        token, _ = cron_status(backend)
        return token.rsplit(":", 1)[0] if token else None

    async def scenario() -> int:
        schedulers = {
            f"s{n}": Scheduler(url, _good_and_bad(every), prefix=prefix, lease=1, name=f"s{n}")
            for n in range(3)
        }
        serving = {name: asyncio.create_task(s.serve()) for name, s in schedulers.items()}
        try:
            await await_for(
                lambda: asyncio.to_thread(
                    lambda: "inflight:bad" in _state(backend) and good_count() >= 3
                ),
                30,
                "the bad entry's tick in flight and three good ticks",
            )
            first = await asyncio.to_thread(leader)
            assert first is not None
            schedulers[first].stop()  # its successor takes over the bad claim in flight
            await serving.pop(first)
            handed_over = await asyncio.to_thread(good_count)
            await await_for(
                lambda: asyncio.to_thread(lambda: (w := leader()) is not None and w != first),
                30,
                "a new leader",
            )
            await await_for(
                lambda: asyncio.to_thread(lambda: good_count() >= handed_over + 4),
                30,
                "four more good ticks under the new leader",
            )
            stuck = int((await asyncio.to_thread(_state, backend))["inflight:bad"])
            with pytest.raises(TaskNotFound):  # (its pending list cannot be read)
                await asyncio.to_thread(inspector.task, BAD, f"cron:bad:{stuck}")
            # the foreign data removed: the tick in flight is enqueued at last
            await asyncio.to_thread(
                backend.execute_key, bad_pending, lambda c: c.delete(bad_pending)
            )
            await await_for(
                lambda: asyncio.to_thread(_queued, inspector, BAD), 30, "the bad entry's tick"
            )
        finally:
            for s in schedulers.values():
                s.stop()
            await asyncio.gather(*serving.values())
        return stuck

    try:
        stuck = asyncio.run(scenario())
        good = _ticks(_queued(inspector, GOOD), "good")
        bad = _queued(inspector, BAD)
    finally:
        inspector.close()
    gaps = [b - a for a, b in itertools.pairwise(good) if b - a != every * 1000]
    assert not gaps, f"good ticks missed: {gaps}"
    assert bad[0] == f"cron:bad:{stuck}"  # the tick claimed first, once
    assert len(set(bad)) == len(bad)
    reports = [
        r for r in caplog.records if r.levelno == logging.ERROR and "entry bad:" in r.getMessage()
    ]
    assert all(r.exc_info for r in reports)
    # the first leader's failing tick, and its successor's re-drive of it, each reported
    assert len({r.args[0] for r in reports if isinstance(r.args, tuple)}) >= 2, reports


# ---------------------------------------------------------------------- fencing, catch-up


def test_a_stale_leader_claims_and_forgets_nothing(url: str, prefix: str) -> None:
    """A leader frozen after its renewal, whose lease expired and was taken: its claims
    and its publishing are refused by the token check in cron.lua."""
    queue = "cron-stale"
    entry = Periodic("stale", TaskSpec("cron:stale", None, {"queue": queue}), every=0.2)
    extra = Periodic("extra", TaskSpec("cron:extra", None, {"queue": queue}), every=3600)
    inspector = Inspector(url, prefix=prefix)
    backend = inspector.backend
    leader_key = backend.keys.cron.leader

    def expire_lease() -> bool:
        backend.execute_key(leader_key, lambda c: c.pexpire(leader_key, 1))
        return wait_for(
            lambda: not backend.execute_key(leader_key, lambda c: c.exists(leader_key)),
            10,
            "the lease expired",
        )

    async def scenario() -> None:
        a = Scheduler(url, [entry], prefix=prefix, lease=60, name="a", forget_after=0.001)
        b = Scheduler(url, [entry, extra], prefix=prefix, lease=60, name="b")
        async with a._connected() as a_keys:
            await a._round(a_keys)
            assert a.leading
            stale = a.token
            await asyncio.to_thread(expire_lease)
            async with b._connected() as b_keys:
                await b._round(b_keys)
                assert b.leading and b.token != stale
                fired = b._last["stale"]
                next_tick = entry.next_tick(fired)
                await await_for(lambda: now_ms() > next_tick + 50, 10, "a tick b did not claim")
                before = await asyncio.to_thread(_queued, inspector, queue)
                await a._fire_due(a_keys)  # a wakes up: claims the ticks due
                after = await asyncio.to_thread(_queued, inspector, queue)
                assert after == before, "a stale leader enqueued a tick"
                assert int((await asyncio.to_thread(_state, backend))["last:stale"]) == fired
                assert not a.leading
                a.token = stale  # and publishes: "extra" is a ghost to it
                await a._publish(a_keys)
                _, listed = await asyncio.to_thread(cron_status, backend)
                assert [e.name for e in listed] == ["extra", "stale"], "a stale leader forgot"
                assert not a.leading

    try:
        asyncio.run(scenario())
    finally:
        inspector.close()


def test_ticks_older_than_the_catch_up_window_are_skipped(url: str, prefix: str) -> None:
    """The entry last fired an hour ago: the ticks of the last ``catch_up`` seconds are
    fired, the older ones not."""
    queue = "cron-late"
    entry = Periodic("late", TaskSpec("cron:late", None, {"queue": queue}), every=1)
    inspector = Inspector(url, prefix=prefix)
    backend = inspector.backend
    state_key = backend.keys.cron.state
    started = now_ms()
    backend.execute_key(state_key, lambda c: c.hset(state_key, "last:late", started - 3_600_000))
    catch_up = 20

    async def scenario() -> None:
        scheduler = Scheduler(url, [entry], prefix=prefix, catch_up=catch_up, name="late")
        serving = asyncio.create_task(scheduler.serve())
        await await_for(
            lambda: asyncio.to_thread(
                lambda: any(t >= started for t in _ticks(_queued(inspector, queue), "late"))
            ),
            30,
            "a tick after the start",
        )
        scheduler.stop()
        await serving

    try:
        asyncio.run(scenario())
        ticks = _ticks(_queued(inspector, queue), "late")
    finally:
        inspector.close()
    oldest_allowed = started - catch_up * 1000 - 1000
    assert ticks[0] >= oldest_allowed, f"a tick {started - ticks[0]} ms old fired"
    assert ticks[0] < started - 5000, "the missed ticks within the window were not fired"
    assert all(b - a == 1000 for a, b in itertools.pairwise(ticks)), ticks


# ---------------------------------------------------------------------- ghosts


def test_entries_no_scheduler_declares_are_forgotten(url: str, prefix: str) -> None:
    """A deployment drops an entry: it stays listed within ``forget_after`` of its last
    declaration, then its description, state and history go; the others stay."""
    from click.testing import CliRunner

    from clusterq.cli import main

    queue = "cron-forget"
    tick = Periodic("tick", TaskSpec("cron:tick", None, {"queue": queue}), every=0.5)
    ghost = Periodic("ghost", TaskSpec("cron:ghost", None, {"queue": queue}), every=0.5)
    backend = Backend(url, prefix=prefix)
    keys = backend.keys.cron

    def history_exists(name: str) -> bool:
        key = keys.history(name)
        return bool(backend.execute_key(key, lambda c: c.exists(key)))

    def fired_by(entry: str, scheduler: str) -> bool:
        return any(h["scheduler"] == scheduler for h in cron_history(backend, entry, 100))

    def listed() -> list[str]:
        return [e.name for e in cron_status(backend)[1]]

    async def run(entries: list[Periodic], name: str, until: Callable[[], bool], **kw: Any) -> None:
        scheduler = Scheduler(url, entries, prefix=prefix, lease=1, name=name, **kw)
        serving = asyncio.create_task(scheduler.serve())
        try:
            await await_for(lambda: asyncio.to_thread(until), 30, f"{name}: {until.__name__}")
        finally:
            scheduler.stop()
            await serving

    def publish_as_leader(ghosts: list[str], grace_ms: int) -> int:
        def run_script(built: tuple[list[str], list[Any]]) -> Any:
            return backend.execute(keyslot(keys.base), lambda c: cron.SCRIPT.call(c, *built))

        token = cron.text(run_script(cron.acquire(keys, "probe", 60_000)))
        assert token is not None
        try:
            now = now_ms()
            return int(run_script(cron.publish(keys, token, now, now - grace_ms, {}, ghosts)))
        finally:
            run_script(cron.release(keys, token))

    def both_fired() -> bool:
        return fired_by("ghost", "old") and fired_by("tick", "old")

    def tick_fired() -> bool:
        return fired_by("tick", "new")

    def ghost_gone() -> bool:
        return "ghost" not in listed()

    try:
        asyncio.run(run([tick, ghost], "old", both_fired))
        asyncio.run(run([tick], "new", tick_fired))  # the default grace: a day
        assert listed() == ["ghost", "tick"] and history_exists("ghost")
        # cron.lua itself keeps a ghost seen within the grace, whatever the caller asks
        assert publish_as_leader(["ghost"], grace_ms=3_600_000) == 0
        assert listed() == ["ghost", "tick"] and history_exists("ghost")
        asyncio.run(run([tick], "newer", ghost_gone, forget_after=0.5))
        assert listed() == ["tick"]
        assert not history_exists("ghost") and history_exists("tick")
        assert not [f for f in _state(backend) if f.endswith(":ghost")], _state(backend)
        shown = CliRunner().invoke(main, ["--url", url, "--prefix", prefix, "cron", "ls"])
        assert shown.exit_code == 0 and "ghost" not in shown.output and "tick" in shown.output
    finally:
        backend.close()
