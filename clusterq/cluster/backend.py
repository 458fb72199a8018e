"""Synchronous access to a cluster or a standalone server, each call routed to its slot's
master. What to do after an error is decided in :mod:`clusterq.cluster.routing`; this
module only sends and sleeps (its asyncio twin is :mod:`clusterq.cluster.abackend`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import redis

from clusterq.cluster import topology as topo
from clusterq.cluster.changes import TopologyEvent
from clusterq.cluster.connection import (
    Addr,
    Mode,
    RedisURL,
    call_node,
    foreign_key_error,
    format_addr,
)
from clusterq.cluster.routing import (
    DEFAULT_DOWN_TIMEOUT,
    DEFAULT_RETRY_TIMEOUT,
    TOPOLOGY_TIMEOUT,
    RouteState,
    mode_of,
    no_seed_answered,
    timed_out,
)
from clusterq.cluster.wire import NodeClient
from clusterq.errors import ConnectionFailed, ShardDown
from clusterq.keys import DEFAULT_PREFIX
from clusterq.slots import keyslot

T = TypeVar("T")
log = logging.getLogger("clusterq.backend")


def detect_mode(url: RedisURL, expected: Mode | None = None) -> tuple[Mode, Addr]:
    """Ask the seeds, in order, whether they run in cluster mode.

    Returns the mode and the seed that answered. Raises :class:`ConnectionFailed` when no
    seed answers, :class:`AuthFailed` when one refuses the credentials and
    :class:`ModeMismatch` when ``expected`` is given and differs.
    """
    errors: list[str] = []
    for addr in url.seeds:
        client = url.node_client(addr, db=0)
        try:
            info = call_node(addr, lambda c=client: c.info("cluster"))  # type: ignore[misc]
        except ConnectionFailed as exc:
            errors.append(str(exc))
            continue
        finally:
            client.close()
        return mode_of(info, expected, addr, url.db), addr
    raise no_seed_answered(errors)


class Backend(RouteState):
    """Synchronous access to a cluster or standalone server, routed by slot."""

    def __init__(
        self,
        url: str | RedisURL,
        *,
        mode: Mode | None = None,
        prefix: str = DEFAULT_PREFIX,
        retry_timeout: float = DEFAULT_RETRY_TIMEOUT,
        down_timeout: float = DEFAULT_DOWN_TIMEOUT,
    ) -> None:
        super().__init__(prefix, retry_timeout, down_timeout)
        self.url = url if isinstance(url, RedisURL) else RedisURL.parse(url)
        self.mode, first = detect_mode(self.url, mode)
        self._clients: dict[Addr, NodeClient] = {}
        self._topo_clients: dict[Addr, NodeClient] = {}
        self._lock = threading.Lock()
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
            read = functools.partial(topo.fetch, client, self.mode, addr, tls=self.url.ssl)
            try:
                return call_node(addr, read)
            except ConnectionFailed as exc:
                errors.append(str(exc))
            except redis.RedisError as exc:
                errors.append(f"{format_addr(addr)}: {exc}")
        raise ConnectionFailed("could not read the cluster map: " + "; ".join(errors[:4]))

    def refresh_topology(
        self, *, force: bool = True, avoid: Addr | None = None
    ) -> list[TopologyEvent]:
        """Read the map again and return what changed (rate-limited unless ``force``).

        Connections to masters that were replaced are dropped, so that nothing keeps
        waiting on a node that no longer owns its slots.
        """
        if not self.refresh_due(force):
            return []
        new = self._read_topology(self.candidates(avoid, self.url.seeds))
        events, stale = self.install(new)
        for addr in stale:
            with self._lock:
                client = self._clients.pop(addr, None)
            if client is not None:
                client.drop_connections()
        if events:
            self.announce(new, events)
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
        attempts = self.attempts(timeout)
        while True:
            addr = self.master_addr(slot)
            try:
                return fn(self.node(addr))
            except Exception as exc:
                decision = attempts.after(exc, self._route, self.down_reason(slot, exc))
                if decision.action == "moved":
                    continue
                if decision.refresh:
                    with contextlib.suppress(ConnectionFailed):
                        self.refresh_topology(force=False, avoid=addr)
                if decision.action == "down":
                    raise ShardDown(decision.reason) from exc
                if decision.action == "raise":
                    raise self.give_up(exc, addr, slot) from exc
                log.debug("transient error on %s (%s); retrying", format_addr(addr), exc)
                if timed_out(exc):
                    self._until_answers_or_moves(slot, addr, attempts.deadline)
                time.sleep(decision.delay)

    def _until_answers_or_moves(self, slot: int, addr: Addr, deadline: float) -> None:
        """After a call to ``addr`` timed out (a frozen master: nothing comes back), the
        call is not sent there again to wait another socket timeout: the map is read
        again (from other nodes) and ``addr`` pinged (topology timeout, 1 s) until its
        slot has another master (promoted) or ``addr`` answers again, or ``deadline``."""
        while time.monotonic() < deadline:
            with contextlib.suppress(ConnectionFailed):
                self.refresh_topology(force=True, avoid=addr)
            if self.master_addr(slot) != addr:
                return
            try:
                call_node(addr, self._topology_client(addr).ping)
            except (ConnectionFailed, redis.RedisError, OSError):
                time.sleep(0.05)
                continue
            return

    def execute_key(self, key: str, fn: Callable[[NodeClient], T], **kwargs: Any) -> T:
        """:meth:`execute` on ``key``'s slot; a ``WRONGTYPE`` names ``key``."""
        try:
            return self.execute(keyslot(key), fn, **kwargs)
        except redis.ResponseError as exc:
            raise foreign_key_error(exc, key) from exc

    def call(self, key: str, *command: Any, timeout: float | None = None) -> Any:
        """One command on the master of ``key``'s slot, over the fast path, retried through
        failovers like every call here (so a command that is not idempotent may, rarely,
        run twice)."""
        return self.execute_key(key, lambda c: c.fast(*command), timeout=timeout)
