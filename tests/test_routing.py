"""The routing core, as pure functions: what follows each kind of error, where a slot
goes, whom to ask for a new map, which connections go stale (no server needed)."""

from __future__ import annotations

import time

import pytest
import redis

from clusterq.cluster import changes, routing
from clusterq.cluster import topology as topo
from clusterq.errors import TopologyError
from clusterq.slots import keyslot

A = topo.NodeInfo("a", "127.0.0.1", 7000, "master")
B = topo.NodeInfo("b", "127.0.0.1", 7001, "master")
A_REP = topo.NodeInfo("ar", "127.0.0.1", 7003, "replica", master_id="a")
DEAD = topo.NodeInfo("d", "127.0.0.1", 7009, "master", health=topo.FAILED)
SNAP = topo.Topology(
    "cluster",
    (topo.Shard(((0, 8191),), A, (A_REP,)), topo.Shard(((8192, 16383),), B, ())),
    (A, B, A_REP, DEAD),
)


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (redis.AuthenticationError("WRONGPASS"), "fatal"),
        (redis.exceptions.MovedError("3999 127.0.0.1:7001"), "moved"),
        (redis.exceptions.NoScriptError("NOSCRIPT"), "noscript"),
        (redis.ConnectionError("refused"), "transient"),
        (redis.TimeoutError("late"), "transient"),
        (redis.exceptions.ClusterDownError("CLUSTERDOWN"), "transient"),
        (redis.exceptions.TryAgainError("TRYAGAIN"), "transient"),
        (redis.exceptions.ReadOnlyError("READONLY"), "transient"),
        (redis.exceptions.BusyLoadingError("LOADING"), "transient"),
        (redis.exceptions.AskError("3999 127.0.0.1:7001"), "transient"),
        (OSError("broken pipe"), "transient"),
        (redis.ResponseError("UNBLOCKED force unblock"), "transient"),
        (redis.ResponseError("MASTERDOWN link down"), "transient"),
        (redis.ResponseError("WRONGTYPE Operation"), "fatal"),
        (ValueError("bug"), "fatal"),
    ],
)
def test_classify(error: BaseException, kind: str) -> None:
    assert routing.classify(error) == kind


def test_moved_is_followed_and_remembered_a_bounded_number_of_times() -> None:
    attempts = routing.CallAttempts(timeout=0)  # deadline already passed
    routes: dict[int, tuple[str, int]] = {}
    moved = redis.exceptions.MovedError("3999 127.0.0.1:7001")
    for _ in range(routing.MAX_MOVED_HOPS):
        decision = attempts.after(moved, routes)
        assert decision.action == "moved" and not decision.refresh
        assert routes == {3999: ("127.0.0.1", 7001)}
    # Past the hop limit, a MOVED is one more transient error: past the deadline, give up.
    assert attempts.after(moved, routes) == routing.Decision("raise", refresh=True)


def test_transient_errors_back_off_until_the_deadline_then_give_up() -> None:
    attempts = routing.CallAttempts(timeout=60)
    delays = []
    for n in range(1, 6):
        decision = attempts.after(redis.ConnectionError("refused"), {})
        assert decision.action == "retry" and decision.refresh
        assert 0 <= decision.delay <= min(0.5, 0.025 * 2**n)
        delays.append(decision.delay)
        assert attempts.attempt == n
    attempts.deadline = time.monotonic() - 1
    assert attempts.after(redis.TimeoutError(), {}) == routing.Decision("raise", refresh=True)


def test_fatal_errors_raise_at_once_without_refresh() -> None:
    attempts = routing.CallAttempts(timeout=60)
    for error in (redis.ResponseError("ERR syntax"), redis.exceptions.NoScriptError("x")):
        assert attempts.after(error, {}) == routing.Decision("raise")
    assert attempts.attempt == 0


def test_backoff_grows_and_is_capped() -> None:
    for attempt in range(30):
        delay = routing.backoff(attempt, base=0.01, cap=0.2)
        assert 0 <= delay <= min(0.2, 0.01 * 2 ** min(attempt, 16))
    # Defaults: 25 ms doubling per attempt, full jitter, at most 0.5 s.
    samples = {n: [routing.backoff(n) for _ in range(400)] for n in (1, 4, 40)}
    assert max(samples[1]) <= 0.05 and max(samples[40]) <= 0.5
    assert max(samples[4]) > 0.3  # up to 0.4 at the 4th attempt: it grows as 2**n
    assert max(samples[40]) > 0.45 and min(samples[40]) < 0.05  # capped, still jittered


def test_retries_wait_a_jittered_while() -> None:
    attempts = routing.CallAttempts(timeout=60)
    delays = [attempts.after(redis.ConnectionError(), {}).delay for _ in range(8)]
    assert any(d > 0 for d in delays)


def test_refresh_candidates_masters_before_replicas() -> None:
    listed_replica_first = topo.Topology("cluster", SNAP.shards, (A_REP, A, B))
    order = routing.refresh_candidates(listed_replica_first, [])
    assert order == [A.address, B.address, A_REP.address]
    state = routing.RouteState()
    state.topology = listed_replica_first
    seeds = [("127.0.0.1", 7005)]
    assert state.candidates(A.address, seeds) == [B.address, A_REP.address, *seeds, A.address]


def test_refresh_candidates_online_masters_first_the_failed_node_last() -> None:
    seeds = [("127.0.0.1", 7005), ("127.0.0.1", 7000)]
    order = routing.refresh_candidates(SNAP, seeds, avoid=("127.0.0.1", 7001))
    assert order[:2] == [A.address, A_REP.address]  # online master, then online replica
    assert DEAD.address in order and order.index(DEAD.address) > order.index(A_REP.address)
    assert order[-1] == ("127.0.0.1", 7001)  # the node that just failed us: last
    assert ("127.0.0.1", 7005) in order and len(order) == len(set(order))
    assert routing.refresh_candidates(None, seeds) == seeds


def test_replaced_nodes_are_old_masters_and_failed_nodes() -> None:
    events: list[changes.TopologyEvent] = [
        changes.MasterChanged(((0, 10),), (), A, A_REP),
        changes.SlotsMoved(((11, 20),), (), B, A),
        changes.SlotsMoved(((21, 30),), (), None, A),
        changes.NodeFailed(DEAD),
        changes.NodeRecovered(B),
    ]
    assert routing.replaced_nodes(events) == {A.address, B.address, DEAD.address}


def test_route_state_routes_by_map_then_by_moved_and_forgets_on_install() -> None:
    state = routing.RouteState()
    state.topology = SNAP
    assert state.master_addr(100) == A.address and state.master_addr(9000) == B.address
    state._route[100] = B.address  # what a MOVED says wins until the next map
    assert state.master_addr(100) == B.address
    heard = []
    state.subscribe(lambda new, events: heard.append((new, events)))
    state.note_queues(["images"])
    moved = topo.Topology(
        "cluster", (topo.Shard(((0, 16383),), B, ()),), (A, B), taken_at=SNAP.taken_at
    )
    events, stale = state.install(moved)
    assert state.master_addr(100) == B.address and state._route == {100: B.address}
    assert any(isinstance(e, changes.SlotsMoved) for e in events) and A.address in stale
    state.announce(moved, events)
    assert heard == [(moved, events)]
    empty = routing.RouteState()
    with pytest.raises(TopologyError, match="no master owns slot 5"):
        empty.master_addr(5)


def test_refresh_rate_limit() -> None:
    state = routing.RouteState()
    assert state.refresh_allowed() and state.refresh_due(False)
    assert not state.refresh_allowed() and not state.refresh_due(False)
    assert state.refresh_due(True)  # forced
    state._last_refresh -= routing.REFRESH_INTERVAL
    assert state.refresh_due(False)


def test_mode_of_checks_expectation_and_database() -> None:
    from clusterq.errors import ConfigError, ModeMismatch

    addr = ("127.0.0.1", 7000)
    assert routing.mode_of({"cluster_enabled": "1"}, None, addr, 0) == "cluster"
    assert routing.mode_of({"cluster_enabled": 0}, "standalone", addr, 3) == "standalone"
    with pytest.raises(ModeMismatch, match="standalone server"):
        routing.mode_of({"cluster_enabled": "0"}, "cluster", addr, 0)
    with pytest.raises(ConfigError, match="database 2 requested"):
        routing.mode_of({"cluster_enabled": "1"}, None, addr, 2)
    assert str(routing.no_seed_answered(["one"])) == "one"
    assert "no seed node answered: a; b" in str(routing.no_seed_answered(["a", "b"]))


def test_a_shard_with_no_one_left_to_take_over_is_down() -> None:
    failed_master = topo.NodeInfo("a", "127.0.0.1", 7000, "master", health=topo.FAILED)
    loading = topo.NodeInfo("ar", "127.0.0.1", 7003, "replica", topo.LOADING, master_id="a")
    dead_replica = topo.NodeInfo("ar", "127.0.0.1", 7003, "replica", topo.FAILED, master_id="a")

    def snap(*replicas: topo.NodeInfo) -> topo.Topology:
        shards = (
            topo.Shard(((0, 8191),), failed_master, replicas),
            topo.Shard(((8192, 16383),), B, ()),
        )
        return topo.Topology("cluster", shards, (failed_master, B, *replicas))

    # A replica still there (even one still syncing) can be promoted: not down yet.
    assert routing.shard_down(snap(loading), 5) is None
    assert routing.shard_down(SNAP, 5) is None  # master online
    reason = routing.shard_down(snap(dead_replica), 5, ["images", "webhooks"])
    assert reason is not None and "slots 0-8191" in reason and "127.0.0.1:7000 failed" in reason
    assert "(queues webhooks)" in reason  # webhooks' slot 4418 is in the shard, images' not
    assert routing.shard_down(snap(dead_replica), 9000) is None  # the other shard is fine
    whole = routing.cluster_down(snap(dead_replica))
    assert whole is not None and "cluster-require-full-coverage no" in whole
    assert routing.cluster_down(SNAP) is None
    uncovered = topo.Topology("cluster", (topo.Shard(((0, 100),), A, ()),), (A,))
    assert "only 101 of 16384 slots" in (routing.cluster_down(uncovered) or "")
    assert routing.shard_down(uncovered, 500) == "no master owns slot 500"


def test_a_down_shard_fails_the_call_after_the_down_timeout() -> None:
    attempts = routing.CallAttempts(timeout=60, down_timeout=0.2)
    error = redis.ConnectionError("refused")
    assert attempts.after(error, {}, down="shard down").action == "retry"  # just now
    attempts.first_error -= 0.2
    decision = attempts.after(error, {}, down="shard down")
    assert decision == routing.Decision("down", refresh=True, reason="shard down")
    assert attempts.after(error, {}, down=None).action == "retry"  # map says it may heal
    assert routing.CallAttempts(60, 0).after(redis.ResponseError("ERR x"), {}, "d").action == (
        "raise"
    )


def test_route_state_explains_why_a_slot_cannot_be_served() -> None:
    failed = topo.NodeInfo("a", "127.0.0.1", 7000, "master", health=topo.FAILED)
    dead = topo.NodeInfo("ar", "127.0.0.1", 7003, "replica", topo.FAILED, master_id="a")
    state = routing.RouteState()
    assert (state.retry_timeout, state.down_timeout) == (15.0, 3.0)
    assert state.mode == "standalone" and state.topology.shards == ()
    state.topology = topo.Topology(
        "cluster",
        (topo.Shard(((0, 8191),), failed, (dead,)), topo.Shard(((8192, 16383),), B, ())),
        (failed, dead, B),
    )
    state.note_queues(["webhooks", "images"])
    lost = redis.ConnectionError("refused")
    assert "(queues webhooks)" in (state.down_reason(4418, lost) or "")
    assert state.down_reason(9450, lost) is None  # images' shard is fine
    assert state.down_reason(4418, redis.ResponseError("ERR syntax")) is None  # not an outage
    down = redis.exceptions.ClusterDownError("CLUSTERDOWN The cluster is down")
    for slot in (4418, 9450):  # every slot hears CLUSTERDOWN: the reason is the same
        assert "cluster-require-full-coverage no" in (state.down_reason(slot, down) or "")
    attempts = state.attempts(None)
    assert attempts.down_timeout == 3.0 and attempts.deadline > time.monotonic() + 14


def test_the_down_message_names_slots_queues_and_nodes_exactly() -> None:
    failed = topo.NodeInfo("a", "127.0.0.1", 7000, "master", health=topo.FAILED)
    webhooks, images = keyslot("webhooks"), keyslot("images")  # 4418, 9450
    shard = topo.Shard(((webhooks, webhooks), (images, images + 5)), failed, ())
    snap = topo.Topology("cluster", (shard,), (failed,))
    queues = ["images", "webhooks", "notifications"]
    assert routing.shard_down(snap, images, queues) == (
        f"shard of slots {webhooks},{images}-{images + 5} (queues images, webhooks) is down: "
        "master 127.0.0.1:7000 failed and no replica can take over (replicas: none)"
    )
    whole = routing.cluster_down(snap, queues) or ""
    assert whole.startswith("the cluster refuses every call (CLUSTERDOWN): shard of slots")
    assert "(queues images, webhooks)" in whole
    state = routing.RouteState(down_timeout=1.5)
    state.topology = snap
    state.note_queues(queues)
    plain = redis.ResponseError("CLUSTERDOWN The cluster is down")  # not the class
    said = state.down_reason(images, plain) or ""
    assert said.startswith("the cluster refuses") and "(queues images, webhooks)" in said
    assert state.attempts(None).down_timeout == 1.5
    named = state.install(SNAP)[0]
    assert any("images" in getattr(e, "queues", ()) for e in named)
