"""Routing of every Redis call to the node that owns its slot.

clusterq does not use redis-py's ``RedisCluster``: every operation of a queue touches one
slot, so routing is "queue -> slot -> master" from our own :mod:`clusterq.cluster.topology`, with
one plain client (and connection pool) per node. That keeps the same code for a
standalone server (one node owns all slots), lets a write and the ``WAIT`` that follows
it share one connection, and puts retries, backoff and topology refresh in one place:

- ``MOVED``: remember the new owner of that slot, refresh the map, retry at once;
- connection errors, timeouts, ``CLUSTERDOWN``, ``TRYAGAIN``, ``READONLY``, ``LOADING``,
  ``-UNBLOCKED``: refresh the map (rate-limited) and retry with exponential backoff and
  jitter until the operation's deadline;
- ``NOSCRIPT``: load the script on that one node and call it again.

The pure decision logic (:func:`classify`, :func:`backoff`) is shared with the asyncio
backend in :mod:`clusterq.cluster.abackend`.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal, TypeVar

import redis

from clusterq.cluster import topology as topo
from clusterq.cluster.connection import (
    Addr,
    Mode,
    RedisURL,
    call_node,
    detect_mode,
    format_addr,
    translate_error,
)
from clusterq.cluster.wire import NodeClient
from clusterq.errors import ConnectionFailed, TopologyError
from clusterq.keys import DEFAULT_PREFIX, KeySchema
from clusterq.slots import keyslot

T = TypeVar("T")
log = logging.getLogger("clusterq.cluster.backend")

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

_TRANSIENT_PREFIXES = ("UNBLOCKED", "CLUSTERDOWN", "TRYAGAIN", "MASTERDOWN", "LOADING", "READONLY")


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


def backoff(attempt: int, *, base: float = 0.025, cap: float = 0.5) -> float:
    """Exponential backoff with full jitter: a random delay in [0, min(cap, base*2^n)]."""
    return random.uniform(0, min(cap, base * (2 ** min(attempt, 16))))


def moved_target(exc: BaseException) -> tuple[int, Addr] | None:
    """Slot and new owner named by a ``MOVED`` error."""
    if isinstance(exc, redis.exceptions.MovedError):
        return int(exc.slot_id), (str(exc.host), int(exc.port))
    return None


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


def replaced_nodes(events: Sequence[topo.TopologyEvent]) -> set[Addr]:
    """Nodes whose open connections should be dropped: masters that lost slots, failed
    nodes. Calls still waiting on them (a frozen master never answers) then fail at
    once and are routed to the new owner."""
    out: set[Addr] = set()
    for event in events:
        if isinstance(event, topo.MasterChanged | topo.SlotsMoved) and event.old is not None:
            out.add(event.old.address)
        elif isinstance(event, topo.NodeFailed):
            out.add(event.node.address)
    return out


TopologyListener = Callable[[topo.Topology, list[topo.TopologyEvent]], None]


def route_to(route: dict[int, Addr], topology: topo.Topology, slot: int) -> Addr:
    """The master of ``slot`` in ``topology``, remembered in ``route`` (slot -> address,
    also filled from MOVED; cleared when the topology is read again)."""
    master = topology.master_for_slot(slot)
    if master is None:
        raise TopologyError(f"no master owns slot {slot}")
    route[slot] = master.address
    return master.address


class Backend:
    """Synchronous access to a cluster or standalone server, routed by slot."""

    def __init__(
        self,
        url: str | RedisURL,
        *,
        mode: Mode | None = None,
        prefix: str = DEFAULT_PREFIX,
        retry_timeout: float = DEFAULT_RETRY_TIMEOUT,
    ) -> None:
        self.url = RedisURL.parse(url) if isinstance(url, str) else url
        self.keys = KeySchema(prefix)
        self.retry_timeout = retry_timeout
        self.mode, first = detect_mode(self.url, mode)
        self._clients: dict[Addr, NodeClient] = {}
        self._topo_clients: dict[Addr, NodeClient] = {}
        self._lock = threading.Lock()
        #: slot -> master: from MOVED, or looked up in the topology (cleared on refresh).
        self._route: dict[int, Addr] = {}
        self._last_refresh = 0.0
        self._listeners: list[TopologyListener] = []
        self._known_queues: set[str] = set()
        self.topology = self._read_topology([first])

    # ------------------------------------------------------------------ nodes

    def node(self, addr: Addr) -> NodeClient:
        """The client of the node at ``addr`` (created on first use)."""
        client = self._clients.get(addr)
        if client is None:
            with self._lock:
                client = self._clients.get(addr)
                if client is None:
                    client = self.url.node_client(addr)
                    self._clients[addr] = client
        return client

    def master_addr(self, slot: int) -> Addr:
        return self._route.get(slot) or route_to(self._route, self.topology, slot)

    def close(self) -> None:
        with self._lock:
            clients = [*self._clients.values(), *self._topo_clients.values()]
            self._clients, self._topo_clients = {}, {}
        for client in clients:
            client.close()

    def __enter__(self) -> Backend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ topology

    def subscribe(self, listener: TopologyListener) -> None:
        """Call ``listener(new_topology, events)`` after every refresh that changed something."""
        self._listeners.append(listener)

    def note_queues(self, queues: Iterable[str]) -> None:
        """Queues to name in topology events."""
        self._known_queues.update(queues)

    def _topology_client(self, addr: Addr) -> NodeClient:
        client = self._topo_clients.get(addr)
        if client is None:
            client = self.url.node_client(
                addr, db=0, socket_timeout=TOPOLOGY_TIMEOUT, socket_connect_timeout=0.5
            )
            self._topo_clients[addr] = client
        return client

    def _read_topology(self, candidates: Sequence[Addr]) -> topo.Topology:
        errors: list[str] = []
        for addr in candidates:
            client = self._topology_client(addr)
            try:
                return call_node(addr, lambda c=client, a=addr: topo.fetch(c, self.mode, a))  # type: ignore[misc]
            except ConnectionFailed as exc:
                errors.append(str(exc))
            except redis.RedisError as exc:
                errors.append(f"{format_addr(addr)}: {exc}")
        raise ConnectionFailed("could not read the cluster map: " + "; ".join(errors[:4]))

    def refresh_topology(
        self, *, force: bool = True, avoid: Addr | None = None
    ) -> list[topo.TopologyEvent]:
        """Read the map again and return what changed (rate-limited unless ``force``).

        Connections to masters that were replaced are dropped, so that nothing keeps
        waiting on a node that no longer owns its slots.
        """
        now = time.monotonic()
        if not force and now - self._last_refresh < REFRESH_INTERVAL:
            return []
        self._last_refresh = now
        old = self.topology
        new = self._read_topology(refresh_candidates(old, self.url.seeds, avoid))
        self.topology = new
        self._route.clear()
        events = topo.diff(old, new, self._known_queues)
        if events:
            for addr in replaced_nodes(events):
                with self._lock:
                    stale = self._clients.pop(addr, None)
                if stale is not None:
                    stale.drop_connections()
            for event in events:
                log.debug("topology: %s", event.describe())
            for listener in list(self._listeners):
                listener(new, events)
        return events

    # ------------------------------------------------------------------ calls

    def execute(
        self, slot: int, fn: Callable[[NodeClient], T], *, timeout: float | None = None
    ) -> T:
        """Run ``fn(client)`` on the master of ``slot``, following MOVED and failovers.

        ``fn`` may be called more than once, so it must be safe to repeat (every clusterq
        script is). Transient errors are retried with backoff until ``timeout`` (default:
        the backend's retry timeout; 0 means one attempt). MOVED is always followed.
        """
        deadline = time.monotonic() + (self.retry_timeout if timeout is None else timeout)
        attempt = hops = 0
        while True:
            addr = self.master_addr(slot)
            try:
                return fn(self.node(addr))
            except Exception as exc:
                kind = classify(exc)
                if kind in ("fatal", "noscript"):
                    raise translate_error(exc, addr) from exc
                if kind == "moved" and hops < MAX_MOVED_HOPS:
                    hops += 1
                    target = moved_target(exc)
                    if target is not None:
                        self._route[target[0]] = target[1]
                    continue
                with contextlib.suppress(ConnectionFailed):
                    self.refresh_topology(force=False, avoid=addr)
                if time.monotonic() >= deadline:
                    raise translate_error(exc, addr) from exc
                attempt += 1
                log.debug("transient error on %s (%s); retrying", format_addr(addr), exc)
                time.sleep(backoff(attempt))

    def execute_key(self, key: str, fn: Callable[[NodeClient], T], **kwargs: Any) -> T:
        return self.execute(keyslot(key), fn, **kwargs)

    def call(self, key: str, *command: Any) -> Any:
        """One command on the master of ``key``'s slot, over the fast path, retried through
        failovers like every call here (so a command that is not idempotent may, rarely,
        run twice)."""
        return self.execute_key(key, lambda c: c.fast(*command))
