"""Event streams: partitioned Redis Streams with consumer groups."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from clusterq import Client, ConfigError, Event, Inspector, Router, Worker
from clusterq.cli import main
from clusterq.cluster.topology import fetch
from clusterq.errors import InvalidName
from clusterq.keys import KeySchema
from clusterq.serialization import PayloadError
from clusterq.slots import keyslot
from clusterq.streams import (
    decode_event,
    encode_event,
    redeclare,
    select_consumers,
    stream_layout,
    trimmed_unread,
)
from clusterq.tools.devcluster import HOST, LocalCluster
from tests.helpers import FAST, StartWorker, await_for, running_worker, wait_for
from tests.workload import read_events

# ---------------------------------------------------------------------- pure functions


def test_a_stream_declaration_and_its_rules() -> None:
    layout = stream_layout("orders", 6, 1000)
    assert len(layout.partitions) == 6 and layout.maxlen == 1000
    assert redeclare(None, layout) is layout
    assert redeclare(layout, stream_layout("orders", 6, 1000)) is None
    changed = redeclare(layout, stream_layout("orders", 6, 50))
    assert changed is not None and changed.maxlen == 50 and changed.version == 2
    with pytest.raises(ConfigError, match="cannot change"):
        redeclare(layout, stream_layout("orders", 8, 1000))
    with pytest.raises(ValueError, match="maxlen"):
        stream_layout("orders", 6, 0)
    with pytest.raises(InvalidName):
        stream_layout("or{ders", 6, None)
    assert {layout.pick(f"c{n % 7}") for n in range(70) if n % 7 == 3} == {layout.pick("c3")}


def test_events_are_json_and_foreign_entries_are_refused() -> None:
    fields = encode_event({"total": 12}, "customer-7")
    event = decode_event("orders", 2, "billing", b"1-0", fields, 3)
    assert (event.payload, event.key, event.partition, event.deliveries) == (
        {"total": 12},
        "customer-7",
        2,
        3,
    )
    with pytest.raises(ValueError, match="no 'd' field"):
        decode_event("orders", 0, "g", "1-0", {b"x": b"1"})
    with pytest.raises(ValueError):
        decode_event("orders", 0, "g", "1-0", {b"d": b"\x80not json"})


def test_trimmed_unread_counts_what_a_group_never_saw() -> None:
    # 1000 added, 120 left (the first is the 881st); billing read 700, audit 990.
    info = {"entries-added": 1000, "length": 120, "recorded-first-entry-id": b"5-881"}
    groups = [
        {"name": b"billing", "entries-read": 700, "last-delivered-id": b"5-700"},
        {"name": "audit", "entries-read": 990, "last-delivered-id": "5-990"},
        {"name": "new", "entries-read": None, "last-delivered-id": "0-0"},
    ]
    assert trimmed_unread(info, groups, "billing") == 180
    assert trimmed_unread(info, groups, "audit") == 0
    assert trimmed_unread(info, groups, "new") == 880
    assert trimmed_unread({"length": 3}, groups, "new") == 0  # an older server: no figures


def test_a_worker_runs_the_consumers_it_is_told() -> None:
    router = Router()
    router.consumer("orders", group="billing")(lambda event: None)
    router.consumer("orders", group="audit", ordered=True)(lambda event: None)
    assert [s.label for s in select_consumers(router, None)] == ["orders:billing", "orders:audit"]
    assert select_consumers(router, "none") == []
    assert [s.label for s in select_consumers(router, "orders:audit")] == ["orders:audit"]
    with pytest.raises(ValueError, match="no consumer of orders:ship"):
        select_consumers(router, ["orders:ship"])
    with pytest.raises(ValueError, match="already registered"):
        router.consumer("orders", group="billing")(lambda event: None)


# ---------------------------------------------------------------------- against servers


def _recording_router(seen: dict[str, list[tuple[str, str, str | None, int]]]) -> Router:
    router = Router()

    def note(group: str, event: Event) -> None:
        seen[group].append((event.id, current_worker_name(), event.key, event.payload["seq"]))

    @router.consumer("orders", group="billing")
    async def billing(event: Event) -> None:
        note("billing", event)

    @router.consumer("orders", group="audit")
    def audit(event: Event) -> None:
        note("audit", event)

    @router.consumer("orders", group="ship", ordered=True)
    async def ship(event: Event) -> None:
        await asyncio.sleep(0)
        note("ship", event)

    return router


def settled(client: Client, layout: Any, groups: tuple[str, ...], *workers: Any) -> bool:
    """Whether no event of ``groups`` is pending on any partition (read from the
    streams) and no handler of ``workers`` runs: no event can be handled again."""
    for name in layout.partitions:
        sk = client.keys.stream(name)
        for group in groups:
            if client.backend.call(sk.events, "XPENDING", sk.events, group)[0]:
                return False
    return not any(ids for w in workers for c in w.consumers.running for ids in c.inflight)


def current_worker_name() -> str:
    from clusterq import current_worker

    try:
        return current_worker().id
    except RuntimeError:  # a sync handler runs in a thread without the context
        return "thread"


@pytest.mark.both_servers
def test_3000_events_two_groups_of_two_each_handle_all_exactly_once(url: str, prefix: str) -> None:
    seen: dict[str, list[tuple[str, str, str | None, int]]] = defaultdict(list)
    router = _recording_router(seen)

    async def scenario() -> None:
        with Client(url, prefix=prefix) as client:
            layout = client.declare_stream("orders", 6)
            async with (
                running_worker(url, router, prefix=prefix, name="w1", lease=5.0) as w1,
                running_worker(url, router, prefix=prefix, name="w2", lease=5.0) as w2,
            ):

                def owned(worker: Any) -> int:
                    return sum(len(c.tokens) for c in worker.consumers.running if c.spec.ordered)

                # ordered: the two consumers share the six partitions before events come
                await await_for(lambda: owned(w1) == owned(w2) == 3, 30, "the partitions split")
                published = client.publish_many(
                    "orders", [({"seq": n}, f"customer-{n % 40}") for n in range(3000)]
                )
                assert Counter(p.partition for p in published).keys() == set(range(6))
                # an event id is unique within its partition
                assert len({(p.partition, p.id) for p in published}) == 3000
                await await_for(
                    lambda: all(len(seen[g]) >= 3000 for g in ("billing", "audit", "ship")),
                    60,
                    "every group to handle every event",
                )
                # once every event is acked and no handler runs, none can run again
                await await_for(
                    lambda: settled(client, layout, ("billing", "audit", "ship"), w1, w2),
                    60,
                    "every event acked, no handler running",
                )
            assert len(layout.partitions) == 6

    asyncio.run(scenario())
    for group in ("billing", "audit", "ship"):
        handled = Counter(seq for *_, seq in seen[group])
        assert set(handled) == set(range(3000)) and set(handled.values()) == {1}, group
    # each event of a group went to one consumer; both consumers took part
    assert {w for _, w, _, _ in seen["billing"]} == {"w1", "w2"}
    assert {w for _, w, _, _ in seen["ship"]} == {"w1", "w2"}
    # ordered: every key's events in publish order
    order: dict[str | None, list[int]] = defaultdict(list)
    for _, _, key, seq in seen["ship"]:
        order[key].append(seq)
    assert all(seqs == sorted(seqs) for seqs in order.values())


def test_publish_to_an_undeclared_stream_or_too_big_is_refused(
    standalone: Any, prefix: str
) -> None:
    with Client(standalone.seed_url, prefix=prefix, max_payload_bytes=100) as client:
        with pytest.raises(ConfigError, match="not declared"):
            client.publish("nowhere", 1)
        client.declare_stream("orders", 2)
        with pytest.raises(PayloadError):
            client.publish("orders", "x" * 200)


@pytest.mark.both_servers
def test_a_failing_event_goes_to_the_dead_letters(standalone: Any, prefix: str) -> None:
    url = standalone.seed_url
    router = Router()
    tries: Counter[Any] = Counter()

    @router.consumer("orders", group="billing", max_deliveries=3)
    async def billing(event: Event) -> None:
        tries[event.payload] += 1
        if event.payload == "bad":
            raise RuntimeError("cannot bill this")

    async def scenario() -> None:
        with Client(url, prefix=prefix) as client:
            client.declare_stream("orders", 2)
            bad = client.publish("orders", "bad")
            good = client.publish("orders", "good")
            async with running_worker(url, router, prefix=prefix, lease=0.3):
                sk = client.keys.stream(client.stream_layout("orders").partitions[bad.partition])

                def dead() -> list[Any]:
                    return client.backend.call(sk.dead, "XRANGE", sk.dead, "-", "+")  # type: ignore[no-any-return]

                [(_, fields)] = await await_for(dead, 20, "the dead letter")
            record = dict(zip(fields[::2], fields[1::2], strict=True))
            assert record[b"id"].decode() == bad.id and record[b"group"] == b"billing"
            assert b"cannot bill this" in record[b"reason"]
            assert json.loads(record[b"d"]) == "bad"
            assert tries == {"bad": 3, "good": 1}
            assert good.id
            with Inspector(url, prefix=prefix) as inspector:
                parts = inspector.streams(["orders"])
            assert sum(p.dead for p in parts) == 1
            assert all(g.pending == 0 for p in parts for g in p.groups)

    asyncio.run(scenario())


@pytest.mark.both_servers
def test_trimming_past_a_group_is_reported(standalone: Any, prefix: str, caplog: Any) -> None:
    url = standalone.seed_url
    router = Router()
    handled: list[int] = []
    router.consumer("orders", group="slow")(lambda event: handled.append(event.payload["seq"]))

    async def scenario() -> None:
        with Client(url, prefix=prefix) as client:
            layout = client.declare_stream("orders", 1, maxlen=100)
            sk = client.keys.stream(layout.partitions[0])
            client.backend.call(sk.events, "XGROUP", "CREATE", sk.events, "slow", "0", "MKSTREAM")
            client.publish_many("orders", [({"seq": n}, None) for n in range(1000)])
            held = int(client.backend.call(sk.events, "XLEN", sk.events))  # the newest ones
            assert 0 < held < 1000
            with Inspector(url, prefix=prefix) as inspector:
                [part] = inspector.streams(["orders"])
            [group] = part.groups
            assert part.length == held and group.trimmed_unread == 1000 - held
            import clusterq.worker.consumer as consumer

            consumer.LAG_CHECK_INTERVAL = 0.0
            try:
                async with running_worker(url, router, prefix=prefix) as worker:
                    await await_for(lambda: len(handled) >= held, 30, "the events still held")
                    await await_for(lambda: worker.consumers.stats.trimmed_unread > 0, 10, "lag")
            finally:
                consumer.LAG_CHECK_INTERVAL = 5.0
            # the handlers saw the newest events, each once; the others were never read,
            # and that is what the worker counted
            assert sorted(handled) == list(range(1000 - held, 1000))
            assert worker.consumers.stats.trimmed_unread == 1000 - len(handled)
            assert "were trimmed before the group read them" in caplog.text
            assert "the group lags 100 events behind on partition 0" in caplog.text

    asyncio.run(scenario())


def test_stream_cli_lists_partitions_with_the_cluster_fields(
    cluster: LocalCluster, prefix: str
) -> None:
    url = cluster.seed_url
    args = ["--url", url, "--prefix", prefix]
    made = CliRunner().invoke(main, ["stream", "create", "orders", "--partitions", "6", *args])
    assert made.exit_code == 0 and "6 partitions" in made.output, made.output
    sent = CliRunner().invoke(
        main, ["stream", "publish", "orders", '{"total": 3}', "--key", "c7", *args]
    )
    assert sent.exit_code == 0 and "published: event" in sent.output, sent.output
    listed = CliRunner().invoke(main, ["stream", "ls", "--cluster", "--json", *args])
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.output)
    assert [r["partition"] for r in rows] == list(range(6))
    for row in rows:
        assert row["keyslot"] == keyslot(f"{{{row['name']}}}")
        assert row["master"] and len(row["replicas"]) == 1
    assert len({r["master"] for r in rows}) == 3
    assert sum(r["length"] for r in rows) == 1
    shown = CliRunner().invoke(main, ["stream", "inspect", "orders", *args])
    assert shown.exit_code == 0 and "stream orders" in shown.output, shown.output
    again = CliRunner().invoke(main, ["stream", "create", "orders", "--partitions", "4", *args])
    assert again.exit_code == 1 and "cannot change" in again.output


# ---------------------------------------------------------------------- a consumer dies


@pytest.mark.slow
def test_kill_9_of_a_consumer_mid_run_loses_nothing_and_keeps_order(
    cluster: LocalCluster, prefix: str, start_worker: StartWorker, log_dir: Path
) -> None:
    url = cluster.seed_url
    with Client(url, prefix=prefix) as client:
        client.declare_stream("orders", 6)
        published = client.publish_many(
            "orders", [({"seq": n}, f"customer-{n % 30}") for n in range(3000)]
        )
    assert len(published) == 3000
    first = start_worker(url, queues="default=1")
    start_worker(url, queues="default=1")

    def handled(group: str) -> list[tuple[str, str, int]]:
        """(event id, key, seq) in the order the handlers ran, over both processes."""
        out = []
        for kind, rest in read_events(log_dir):
            if kind == f"ev:{group}":
                event_id, key, seq, at = rest.split(" ")
                out.append((int(at), event_id, key, int(seq)))
        return [(event_id, key, seq) for _, event_id, key, seq in sorted(out)]

    wait_for(lambda: len(handled("ship")) >= 600, 60, "a fifth of the events")
    first.kill()  # SIGKILL: its pending events and its partitions are left behind
    first.wait(timeout=10)
    for group in ("billing", "ship"):
        wait_for(
            lambda g=group: {s for _, _, s in handled(g)} >= set(range(3000)),
            90,
            f"{group} to finish",
        )
    with Client(url, prefix=prefix) as client:
        layout = client.stream_layout("orders")
        # the survivor acks what it took over (the order is checked on what ran)
        wait_for(lambda: settled(client, layout, ("billing", "ship")), 60, "every event acked")
    order: dict[str, list[int]] = defaultdict(list)
    for _, key, seq in handled("ship"):
        if seq not in order[key]:  # at least once: a taken-over event may run again
            order[key].append(seq)
    assert all(seqs == sorted(seqs) for seqs in order.values())
    assert sum(len(v) for v in order.values()) == 3000


def test_a_foreign_entry_is_set_aside_once_and_the_partition_goes_on(
    standalone: Any, prefix: str
) -> None:
    url = standalone.seed_url
    router = Router()
    handled: list[Any] = []

    @router.consumer("orders", group="ship", ordered=True)
    async def ship(event: Event) -> None:
        handled.append(event.payload)

    async def scenario() -> None:
        with Client(url, prefix=prefix) as client:
            layout = client.declare_stream("orders", 1)
            sk = client.keys.stream(layout.partitions[0])
            client.backend.call(sk.events, "XADD", sk.events, "*", "x", "not ours")
            client.publish("orders", "after")
            async with running_worker(url, router, prefix=prefix):
                await await_for(lambda: handled == ["after"], 20, "the next event")
            dead = client.backend.call(sk.dead, "XRANGE", sk.dead, "-", "+")
            assert (
                len(dead) == 1
                and b"unreadable"
                in dict(zip(dead[0][1][::2], dead[0][1][1::2], strict=True))[b"reason"]
            )

    asyncio.run(scenario())


@pytest.mark.both_servers
def test_an_ordered_event_handled_again_after_its_owner_died_counts_its_deliveries(
    standalone: Any, prefix: str
) -> None:
    """The owner of the partition reads two events and dies in the first one's handler
    (its worker aborted: no ack, no retry, its lease left to expire); the next owner
    handles the first again and sees ``deliveries == 2`` (it used to see 1: it could not
    tell a redelivery), then 3 on a retry in place. The second, which always fails, is
    dead-lettered once delivered ``max_deliveries`` (3) times in all, the dead owner's
    delivery included: the group's delivery counter counts, not the local attempt."""
    url = standalone.seed_url
    first, second = Router(), Router()
    seen: list[tuple[str, int, int]] = []
    dying: list[asyncio.Event] = []

    @first.consumer("orders", group="ship", ordered=True)
    async def dies(event: Event) -> None:
        seen.append(("first", event.payload, event.deliveries))
        dying.append(asyncio.Event())
        await dying[0].wait()  # until the worker is being aborted
        raise RuntimeError("killed mid-handler")

    @second.consumer("orders", group="ship", ordered=True, max_deliveries=3)
    async def ship(event: Event) -> None:
        seen.append(("second", event.payload, event.deliveries))
        if len(seen) == 2 or event.payload == 2:
            raise RuntimeError("cannot ship")

    async def scenario() -> None:
        with Client(url, prefix=prefix) as client:
            layout = client.declare_stream("orders", 1)
            sk = client.keys.stream(layout.partitions[0])
            client.publish_many("orders", [(1, "c1"), (2, "c1")])
            worker = Worker(url, first, prefix=prefix, name="w1", **FAST)
            await worker.start()
            try:
                await await_for(lambda: dying, 30, "the first owner to take the event")
            finally:
                # abort waits for the handler: let it fail once nothing retries it
                aborted = asyncio.create_task(worker.abort())
                [consumer] = worker.consumers.running
                await await_for(lambda: consumer.run_state.stopping, 10, "the abort")
                if dying:
                    dying[0].set()
                await aborted
            assert client.backend.call(sk.events, "XPENDING", sk.events, "ship")[0] == 2
            async with running_worker(url, second, prefix=prefix, name="w2"):
                await await_for(
                    lambda: client.backend.call(sk.events, "XPENDING", sk.events, "ship")[0] == 0,
                    60,
                    "the second owner to settle both",
                )
            [(_, fields)] = client.backend.call(sk.dead, "XRANGE", sk.dead, "-", "+")
            record = dict(zip(fields[::2], fields[1::2], strict=True))
            assert json.loads(record[b"d"]) == 2
            assert record[b"reason"].startswith(b"delivered 3 times: RuntimeError: cannot ship")

    asyncio.run(scenario())
    assert seen == [
        ("first", 1, 1),
        ("second", 1, 2),
        ("second", 1, 3),
        ("second", 2, 2),
        ("second", 2, 3),
    ]


@pytest.mark.both_servers
def test_a_stale_owners_ack_is_refused_and_the_event_stays_pending_for_the_new_owner(
    standalone: Any, prefix: str, caplog: Any
) -> None:
    """While the owner of the partition is in its handler, its lease goes to another
    consumer (here the test, through the same script), which takes the event over. The
    old owner's ack, sent with its old token, is refused: the event stays pending for the
    new owner, whose ack (with the current token) goes through."""
    from clusterq.broker import stream as stream_script

    url = standalone.seed_url
    router = Router()
    started: list[str] = []
    finish = asyncio.Event()

    @router.consumer("orders", group="ship", ordered=True)
    async def ship(event: Event) -> None:
        started.append(event.id)
        await finish.wait()

    def run(build: Any, sk: Any, *args: Any) -> Any:
        keys, argv = build(sk, "ship", *args)
        return client.backend.call(keys[0], "EVAL", stream_script.SCRIPT.source, len(keys),
                                   *keys, *argv)  # fmt: skip

    async def scenario() -> None:
        layout = client.declare_stream("orders", 1)
        sk = client.keys.stream(layout.partitions[0])
        event = client.publish("orders", {"n": 1}, key="c1")
        async with running_worker(url, router, prefix=prefix, name="w1") as worker:
            await await_for(lambda: started == [event.id], 30, "the owner to take the event")
            [consumer] = worker.consumers.running
            [old] = consumer.tokens.values()
            # the lease ends (as if the owner had been paused past it) and is taken over
            client.backend.call(sk.owner("ship"), "DEL", sk.owner("ship"))
            new = stream_script.text(run(stream_script.acquire, sk, "usurper", 60_000))
            assert new is not None and new != old
            client.backend.call(sk.events, "XCLAIM", sk.events, "ship", "usurper", 0, event.id,
                                "JUSTID")  # fmt: skip
            finish.set()  # the old owner's handler returns; it acks with its old token

            def pending() -> Any:
                return client.backend.call(sk.events, "XPENDING", sk.events, "ship", "-", "+", 10)

            await await_for(
                lambda: "not acked" in caplog.text or not pending(), 30, "the old owner's ack"
            )
            held = pending()
            assert held, "the stale owner's ack was accepted"
            [(eid, consumer_name, _, _)] = held
            assert (eid.decode(), consumer_name) == (event.id, b"usurper")
            assert run(stream_script.ack, sk, old, [event.id]) == -1  # refused again
            assert run(stream_script.ack, sk, new, [event.id]) == 1  # the new owner's
            assert pending() == []
            assert started == [event.id]  # the old owner did not take it again
            assert f"partition 0 was taken over; event {event.id} not acked" in caplog.text

    with Client(url, prefix=prefix) as client:
        asyncio.run(scenario())


# ---------------------------------------------------------------------- a master dies


@pytest.mark.slow
@pytest.mark.both_servers
@pytest.mark.parametrize("how", ["kill", "stop"])
def test_a_dead_master_holds_up_only_its_own_partitions(
    fresh_cluster: Callable[..., LocalCluster], prefix: str, how: str
) -> None:
    """A stream of 6 partitions over 3 masters, an unordered and an ordered group. The
    master of two partitions is killed (-9) or frozen (SIGSTOP), and no replica may take
    its place (``cluster-replica-no-failover``): it stays down while the test runs. Events
    published to the other four partitions meanwhile are all handled by both groups. The
    dead master also holds the ordered group's membership hash, so the ordered owner's
    leases of the live partitions must not wait on it."""
    cluster = fresh_cluster(["cluster-replica-no-failover yes"])
    seeds = "redis://" + ",".join(f"{HOST}:{p}" for p in cluster.ports)
    topology = cluster.topology()

    def master_of(key: str) -> str:
        shard = topology.shard_for_slot(keyslot(key))
        assert shard is not None and shard.master is not None
        return shard.master.addr

    # a prefix whose stream declarations live apart from the membership hash (a producer
    # reads the declarations again every few seconds: that master must stay up here)
    keys = next(
        k
        for k in (KeySchema(f"{prefix}{n}") for n in range(100))
        if master_of(k.streams) != master_of(k.stream_consumers("orders", "ship"))
    )
    victim = master_of(keys.stream_consumers("orders", "ship"))
    seen: dict[str, set[int]] = defaultdict(set)
    router = Router()

    @router.consumer("orders", group="billing")
    async def billing(event: Event) -> None:
        seen["billing"].add(event.payload)

    @router.consumer("orders", group="ship", ordered=True)
    async def ship(event: Event) -> None:
        seen["ship"].add(event.payload)

    async def scenario() -> None:
        with Client(seeds, prefix=keys.prefix) as client:
            layout = client.declare_stream("orders", 6)
            dead = {i for i, p in enumerate(layout.partitions) if master_of(p) == victim}
            assert 0 < len(dead) < 6
            live_keys = [k for k in (f"c{n}" for n in range(200)) if layout.pick(k) not in dead]
            async with running_worker(seeds, router, prefix=keys.prefix, lease=2.0) as worker:
                [ordered] = [c for c in worker.consumers.running if c.spec.ordered]
                await await_for(lambda: len(ordered.tokens) == 6, 60, "the ordered owner")
                before = client.publish_many("orders", [(n, f"c{n}") for n in range(60)])
                assert {p.partition for p in before} == set(range(6))
                for group in ("billing", "ship"):
                    await await_for(lambda g=group: len(seen[g]) == 60, 60, f"{group}: all 60")

                port = int(victim.rsplit(":", 1)[1])
                cluster.kill_node(port, signal.SIGKILL if how == "kill" else signal.SIGSTOP)
                killed = time.monotonic()
                live = set(range(6)) - dead
                try:
                    for wave in (range(60, 210), range(210, 360)):
                        after = client.publish_many(
                            "orders", [(n, live_keys[n % len(live_keys)]) for n in wave]
                        )
                        assert {p.partition for p in after} <= live
                        for group in ("billing", "ship"):
                            await await_for(
                                lambda g=group, w=wave: seen[g] >= set(w),
                                120,
                                f"{group}: the events of the live partitions",
                            )
                        # the second wave comes after any lease held at the kill would
                        # have run out: the owner renews the live partitions' leases
                        await await_for(
                            lambda: all(
                                ordered.valid_until.get(i, 0) > killed + 2 * ordered.lease
                                for i in live
                            ),
                            120,
                            "the live partitions' leases renewed",
                        )
                    # still down, and nothing took its place meanwhile
                    if how == "kill":
                        assert cluster.pid(port) is None
                    other = next(p for p in cluster.ports if p != port)
                    node = cluster.client(other)
                    try:
                        now = fetch(node, "cluster", (HOST, other))
                    finally:
                        node.close()
                    shard = now.shard_for_slot(keyslot(layout.partitions[min(dead)]))
                    assert shard is not None and shard.master is not None
                    assert shard.master.addr == victim
                finally:
                    if how == "stop":
                        cluster.kill_node(port, signal.SIGCONT)

    asyncio.run(scenario())
    for group in ("billing", "ship"):
        assert seen[group] == set(range(360)), group


def test_the_consumers_of_workers_gone_are_removed_from_the_group(
    standalone: Any, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each worker start adds a consumer to every partition's group: those of workers no
    longer alive are removed once idle (here at once) and holding nothing pending. One
    that still holds an event keeps it until a live consumer claimed it (it is handled,
    not lost); then it goes too. The live worker's own consumer stays (where the server
    made one: a read that returns nothing makes none)."""
    import clusterq.worker.consumer as consumer_module

    monkeypatch.setattr(consumer_module, "FORGET_AFTER", 0.0)
    monkeypatch.setattr(consumer_module, "FORGET_CHECK_INTERVAL", 0.0)
    url = standalone.seed_url
    node = standalone.client()
    seen: list[Any] = []
    router = Router()

    @router.consumer("orders", group="billing")
    def bill(event: Event) -> None:
        seen.append(event.payload)

    with Client(url, prefix=prefix) as client:
        layout = client.declare_stream("orders", 2)
        events = [client.keys.stream(p).events for p in layout.partitions]
        for key in events:
            node.xgroup_create(key, "billing", id="0", mkstream=True)
            node.xreadgroup("billing", "gone-idle", {key: ">"}, count=1)  # nothing yet
        client.publish("orders", {"held": True}, key="k")
        holding = next(k for k in events if node.xlen(k))
        node.xreadgroup("billing", "gone-holding", {holding: ">"}, count=1)

    def consumers(key: str) -> set[str]:
        return {c["name"].decode() for c in node.xinfo_consumers(key, "billing")}

    async def scenario() -> None:
        async with running_worker(url, router, prefix=prefix, name="alive", lease=1.0):
            await await_for(
                lambda: all(consumers(k) <= {"alive"} for k in events),
                60,
                "the gone consumers to be removed",
            )

    asyncio.run(scenario())
    assert seen == [{"held": True}]  # the event the gone consumer held was handled
    assert all(node.xpending(k, "billing")["pending"] == 0 for k in events)
