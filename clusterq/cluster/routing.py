"""Routing decisions, in pure code: which master a slot goes to, what an error means,
whether to follow a redirection, refresh the map, back off and retry, or give up.

clusterq does not use redis-py's ``RedisCluster``: every operation of a queue touches one
slot, so routing is "queue -> slot -> master" from our own topology, with one plain
client per node. That keeps one code path for a standalone server (one node owns all
slots), lets a write and the ``WAIT`` after it share a connection, and puts retries,
backoff and topology refresh here, once:

- ``MOVED``: remember the new owner of that slot and try again at once;
- connection errors, timeouts, ``CLUSTERDOWN``, ``TRYAGAIN``, ``ASK``, ``READONLY``,
  ``LOADING``, ``-UNBLOCKED``: re-read the map (rate-limited) and retry with exponential
  backoff and jitter until the call's deadline, then give up (``SlotMigrating`` for a
  slot in migration: following ``ASK`` would not help, the target refuses a multi-key
  command with a key it does not have yet);
- anything else (and ``NOSCRIPT``, which a script's own wrapper handles by loading the
  script on that node): raise at once.

:class:`RouteState` holds what both backends share apart from I/O: the current map, the
slot -> master routes, the listeners and the rate limit of refreshes.
:class:`~clusterq.cluster.backend.Backend` and
:class:`~clusterq.cluster.abackend.AsyncBackend` only send, await and sleep.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import redis

from clusterq.cluster import changes
from clusterq.cluster import topology as topo
from clusterq.cluster.connection import (
    Addr,
    Mode,
    check_mode,
    format_addr,
    info_mode,
    translate_error,
)
from clusterq.errors import ConfigError, ConnectionFailed, SlotMigrating, TopologyError
from clusterq.keys import DEFAULT_PREFIX, KeySchema
from clusterq.slots import SLOT_COUNT, keyslot

log = logging.getLogger("clusterq.backend")

ErrorKind = Literal["moved", "transient", "noscript", "fatal"]

#: How long an operation keeps retrying through a failover before it gives up. Promotion
#: takes cluster-node-timeout + 1-2 s; the local cluster uses a 3 s timeout.
DEFAULT_RETRY_TIMEOUT = 15.0
#: The shortest time between two topology reads triggered by errors.
REFRESH_INTERVAL = 0.1
#: Socket timeout of the connections that read the cluster map: a frozen node must not
#: hold up the discovery of its replacement.
TOPOLOGY_TIMEOUT = 1.0
#: The asyncio backend asks the next candidate if one has not answered within this.
TOPOLOGY_STAGGER = 0.1
#: MOVED redirections followed per call, even past its deadline.
MAX_MOVED_HOPS = 5
#: How long a call keeps retrying once the cluster map says its shard cannot come back
#: by itself (master failed, no replica left to take over): then it fails with
#: :class:`~clusterq.errors.ShardDown` instead of waiting for its whole retry timeout.
DEFAULT_DOWN_TIMEOUT = 3.0

_TRANSIENT_PREFIXES = ("UNBLOCKED", "CLUSTERDOWN", "TRYAGAIN", "MASTERDOWN", "LOADING", "READONLY")

TopologyListener = Callable[[topo.Topology, list[changes.TopologyEvent]], None]


def classify(exc: BaseException) -> ErrorKind:
    """What to do about an error from one node."""
    if isinstance(exc, redis.AuthenticationError):
        return "fatal"
    if isinstance(exc, redis.exceptions.MovedError):
        return "moved"
    if isinstance(exc, redis.exceptions.NoScriptError):
        return "noscript"
    if isinstance(
        exc,
        redis.ConnectionError
        | redis.TimeoutError
        | redis.exceptions.ClusterDownError
        | redis.exceptions.TryAgainError
        | redis.exceptions.ReadOnlyError
        | redis.exceptions.BusyLoadingError
        | redis.exceptions.MasterDownError
        | redis.exceptions.AskError
        | OSError,
    ):
        return "transient"
    if isinstance(exc, redis.ResponseError) and str(exc).upper().startswith(_TRANSIENT_PREFIXES):
        return "transient"
    return "fatal"


def timed_out(exc: BaseException) -> bool:
    """Whether ``exc`` says a node sent nothing back in time (frozen, or cut off)."""
    return isinstance(exc, redis.TimeoutError | TimeoutError)


def backoff(attempt: int, *, base: float = 0.025, cap: float = 0.5) -> float:
    """Exponential backoff with full jitter: a random delay in [0, min(cap, base*2^n)]."""
    return random.uniform(0, min(cap, base * (2 ** min(attempt, 16))))


def migrating(exc: BaseException) -> bool:
    """Whether ``exc`` says the slot is being migrated: ``ASK`` (the keys left already)
    or ``TRYAGAIN`` (a multi-key command while the keys are split or missing)."""
    if isinstance(exc, redis.exceptions.MovedError):
        return False
    return isinstance(exc, redis.exceptions.AskError | redis.exceptions.TryAgainError) or (
        str(exc).upper().startswith("TRYAGAIN")
    )


def give_up_error(
    exc: BaseException, addr: Addr, slot: int, queues: Iterable[str] = ()
) -> Exception:
    """The error a call raises when it stops retrying ``exc`` (from ``addr``): a slot
    migration in words, else the one-line translation of the connection error."""
    if not migrating(exc):
        return translate_error(exc, addr)
    named = sorted(q for q in queues if keyslot(q) == slot)
    which = f" (queue {', '.join(named)})" if named else ""
    if isinstance(exc, redis.exceptions.AskError):
        where = f"from {format_addr(addr)} to {exc.host}:{exc.port}"
    else:
        where = f"on {format_addr(addr)}"
    return SlotMigrating(
        f"slot {slot}{which} is being migrated {where}: its queue cannot be served until "
        "the migration ends (Redis refuses multi-key commands on a slot in migration); "
        "move a queue's slot in one step (redis-cli --cluster reshard does)"
    )


def moved_target(exc: BaseException) -> tuple[int, Addr] | None:
    """Slot and new owner named by a ``MOVED`` error."""
    if isinstance(exc, redis.exceptions.MovedError):
        return int(exc.slot_id), (str(exc.host), int(exc.port))
    return None


@dataclass(frozen=True)
class Decision:
    """What a backend does after an error: ``raise`` it (translated), try the slot's
    (new) master again at once (``moved``), ``retry`` after ``delay`` seconds, or give
    up because the shard is ``down`` (raise :class:`ShardDown` with ``reason``).
    ``refresh``: re-read the cluster map first (rate-limited; in the background when
    giving up, where the transport allows)."""

    action: Literal["raise", "moved", "retry", "down"]
    delay: float = 0.0
    refresh: bool = False
    reason: str = ""


_RAISE = Decision("raise")
_MOVED = Decision("moved")
_GIVE_UP = Decision("raise", refresh=True)


class CallAttempts:
    """The retry state of one call: the one place that decides what follows an error."""

    __slots__ = ("attempt", "deadline", "down_timeout", "first_error", "hops")

    def __init__(self, timeout: float, down_timeout: float = DEFAULT_DOWN_TIMEOUT) -> None:
        self.deadline = time.monotonic() + timeout
        self.down_timeout = down_timeout
        self.first_error = 0.0
        self.attempt = 0
        self.hops = 0

    def after(
        self, exc: BaseException, routes: dict[int, Addr], down: str | None = None
    ) -> Decision:
        """Decide what to do about ``exc``; a ``MOVED`` target goes into ``routes``.
        ``down``: why the map says the call's shard cannot come back by itself, if so."""
        kind = classify(exc)
        if kind in ("fatal", "noscript"):
            return _RAISE
        if kind == "moved" and self.hops < MAX_MOVED_HOPS:
            self.hops += 1
            target = moved_target(exc)
            if target is not None:
                routes[target[0]] = target[1]
            return _MOVED
        now = time.monotonic()
        self.first_error = self.first_error or now
        if down is not None and now - self.first_error >= self.down_timeout:
            return Decision("down", refresh=True, reason=down)
        if now >= self.deadline:
            return _GIVE_UP
        self.attempt += 1
        return Decision("retry", backoff(self.attempt), refresh=True)


def shard_down(topology: topo.Topology, slot: int, queues: Iterable[str] = ()) -> str | None:
    """Why ``slot`` cannot be served until someone repairs the cluster, or None: nobody
    owns it, or its master failed and every replica failed too (no one can be promoted).
    Replicas still syncing ("loading") may be promoted, so they count as alive."""
    shard = topology.shard_for_slot(slot)
    if shard is None:
        return f"no master owns slot {slot}"
    if shard.master.health != topo.FAILED:
        return None
    if any(r.health != topo.FAILED for r in shard.replicas):
        return None  # a failover can still happen
    named = [q for q in sorted(queues) if shard.slots and _holds(shard, q)]
    which = f" (queues {', '.join(named)})" if named else ""
    replicas = ", ".join(r.addr for r in shard.replicas) or "none"
    ranges = ",".join(f"{lo}-{hi}" if lo != hi else str(lo) for lo, hi in shard.slots)
    return (
        f"shard of slots {ranges}{which} is down: master {shard.master.addr} failed and "
        f"no replica can take over (replicas: {replicas})"
    )


def cluster_down(topology: topo.Topology, queues: Iterable[str] = ()) -> str | None:
    """Why the whole cluster refuses calls (``CLUSTERDOWN``) for good, or None: some shard
    is down while ``cluster-require-full-coverage`` is ``yes`` (the server default)."""
    for shard in topology.shards:
        reason = shard_down(topology, shard.slots[0][0], queues) if shard.slots else None
        if reason is not None:
            return (
                f"the cluster refuses every call (CLUSTERDOWN): {reason}; with "
                "cluster-require-full-coverage no, the other shards would keep serving"
            )
    if topology.mode == "cluster" and topology.slots_covered < SLOT_COUNT:
        return (
            f"the cluster refuses every call (CLUSTERDOWN): only {topology.slots_covered} "
            f"of {SLOT_COUNT} slots have a master"
        )
    return None


def _holds(shard: topo.Shard, queue: str) -> bool:
    slot = keyslot(queue)
    return any(lo <= slot <= hi for lo, hi in shard.slots)


def refresh_candidates(
    current: topo.Topology | None, seeds: Sequence[Addr], avoid: Addr | None = None
) -> list[Addr]:
    """Nodes to ask for a new map: online masters, other known nodes, the seeds; the
    node that just failed us (``avoid``) last."""
    order: list[Addr] = []
    if current is not None:
        nodes = sorted(current.nodes, key=lambda n: (not n.online, n.role != "master"))
        order.extend(n.address for n in nodes)
    order.extend(seeds)
    seen: set[Addr] = set()
    unique = [a for a in order if not (a in seen or seen.add(a))]  # type: ignore[func-returns-value]
    if avoid in seen:
        unique.remove(avoid)
        unique.append(avoid)
    return unique


def replaced_nodes(events: Sequence[changes.TopologyEvent]) -> set[Addr]:
    """Nodes whose open connections should be dropped: masters that lost slots, failed
    nodes. Calls still waiting on them (a frozen master never answers) then fail at
    once and are routed to the new owner."""
    out: set[Addr] = set()
    for event in events:
        if isinstance(event, changes.MasterChanged | changes.SlotsMoved) and event.old is not None:
            out.add(event.old.address)
        elif isinstance(event, changes.NodeFailed):
            out.add(event.node.address)
    return out


def mode_of(info: dict[str, object], expected: Mode | None, addr: Addr, db: int) -> Mode:
    """The mode a seed's ``INFO cluster`` shows, checked against what the caller expects
    and against the URL's database (a cluster only has database 0)."""
    mode = check_mode(info_mode(info), expected, addr)
    if mode == "cluster" and db:
        raise ConfigError(f"database {db} requested, but a cluster only has database 0")
    return mode


def no_seed_answered(errors: Sequence[str]) -> ConnectionFailed:
    if len(errors) == 1:
        return ConnectionFailed(errors[0])
    return ConnectionFailed("no seed node answered: " + "; ".join(errors))


class RouteState:
    """What both backends keep apart from connections: the map, slot routes (from the
    map or from ``MOVED``), listeners of changes, and the refresh rate limit."""

    def __init__(
        self,
        prefix: str = DEFAULT_PREFIX,
        retry_timeout: float = DEFAULT_RETRY_TIMEOUT,
        down_timeout: float = DEFAULT_DOWN_TIMEOUT,
    ):
        self.keys = KeySchema(prefix)
        self.retry_timeout = retry_timeout
        self.down_timeout = down_timeout
        self.mode: Mode = "standalone"
        self.topology: topo.Topology = topo.Topology("standalone", (), ())
        #: slot -> master: from MOVED, or looked up in the topology (cleared on refresh).
        self._route: dict[int, Addr] = {}
        self._last_refresh = 0.0
        self._listeners: list[TopologyListener] = []
        self._known_queues: set[str] = set()

    def subscribe(self, listener: TopologyListener) -> None:
        """Call ``listener(new_topology, events)`` after every refresh that changed something."""
        self._listeners.append(listener)

    def note_queues(self, queues: Iterable[str]) -> None:
        """Queues to name in topology events."""
        self._known_queues.update(queues)

    def master_addr(self, slot: int) -> Addr:
        """The master of ``slot``: as ``MOVED`` said, else as the map says (remembered)."""
        addr = self._route.get(slot)
        if addr is None:
            master = self.topology.master_for_slot(slot)
            if master is None:
                raise TopologyError(f"no master owns slot {slot}")
            addr = self._route[slot] = master.address
        return addr

    def attempts(self, timeout: float | None) -> CallAttempts:
        return CallAttempts(self.retry_timeout if timeout is None else timeout, self.down_timeout)

    def give_up(self, exc: BaseException, addr: Addr, slot: int) -> Exception:
        return give_up_error(exc, addr, slot, self._known_queues)

    def down_reason(self, slot: int, exc: BaseException) -> str | None:
        """Why a call to ``slot`` that failed with ``exc`` cannot succeed by waiting."""
        if isinstance(exc, redis.exceptions.ClusterDownError) or str(exc).startswith("CLUSTERDOWN"):
            # (if no shard is down, none is: cluster_down looks at every shard)
            return cluster_down(self.topology, self._known_queues)
        if classify(exc) != "transient":
            return None
        return shard_down(self.topology, slot, self._known_queues)

    def refresh_allowed(self) -> bool:
        """Whether REFRESH_INTERVAL has passed since the latest read of the map."""
        return time.monotonic() - self._last_refresh >= REFRESH_INTERVAL

    def refresh_due(self, force: bool) -> bool:
        """Whether to read the map now (always if ``force``, else if allowed), and if
        so, count this as the latest read."""
        if not (force or self.refresh_allowed()):
            return False
        self._last_refresh = time.monotonic()
        return True

    def candidates(self, avoid: Addr | None, seeds: Sequence[Addr]) -> list[Addr]:
        return refresh_candidates(self.topology, seeds, avoid)

    def install(self, new: topo.Topology) -> tuple[list[changes.TopologyEvent], set[Addr]]:
        """Make ``new`` the current map; return what changed and the nodes whose
        connections are now stale."""
        old, self.topology = self.topology, new
        self._route.clear()
        events = changes.diff(old, new, self._known_queues)
        return events, replaced_nodes(events)

    def announce(self, new: topo.Topology, events: list[changes.TopologyEvent]) -> None:
        for event in events:
            log.debug("topology: %s", event.describe())
        for listener in list(self._listeners):
            listener(new, events)
