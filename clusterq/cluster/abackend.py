"""The asyncio twin of :mod:`clusterq.cluster.backend`: routing by slot, retries, topology refresh.

The decisions (what an error means, how long to back off, whom to ask for a new map)
are the pure functions of :mod:`clusterq.cluster.backend`; only the I/O differs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

import redis
import redis.asyncio

from clusterq.broker.script import LuaScript
from clusterq.cluster import topology as topo
from clusterq.cluster.backend import (
    DEFAULT_RETRY_TIMEOUT,
    MAX_MOVED_HOPS,
    REFRESH_INTERVAL,
    TOPOLOGY_STAGGER,
    TOPOLOGY_TIMEOUT,
    TopologyListener,
    backoff,
    classify,
    moved_target,
    refresh_candidates,
    replaced_nodes,
    route_to,
)
from clusterq.cluster.connection import (
    Addr,
    Mode,
    RedisURL,
    check_mode,
    format_addr,
    info_mode,
    translate_error,
)
from clusterq.cluster.wire import AsyncNodeClient
from clusterq.errors import ConfigError, ConnectionFailed
from clusterq.keys import DEFAULT_PREFIX, KeySchema
from clusterq.slots import keyslot

T = TypeVar("T")
log = logging.getLogger("clusterq.cluster.backend")


def _ignore_result(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


class AsyncBackend:
    """Asynchronous access to a cluster or standalone server, routed by slot.

    Create with ``backend = await AsyncBackend.connect(url)``.
    """

    def __init__(
        self,
        url: str | RedisURL,
        *,
        prefix: str = DEFAULT_PREFIX,
        retry_timeout: float = DEFAULT_RETRY_TIMEOUT,
    ) -> None:
        self.url = RedisURL.parse(url) if isinstance(url, str) else url
        self.keys = KeySchema(prefix)
        self.retry_timeout = retry_timeout
        self.mode: Mode = "standalone"
        self.topology: topo.Topology = topo.Topology("standalone", (), ())
        self._clients: dict[Addr, AsyncNodeClient] = {}
        self._topo_clients: dict[Addr, AsyncNodeClient] = {}
        self._watcher: asyncio.Task[None] | None = None
        self._closing = False
        #: slot -> master: from MOVED, or looked up in the topology (cleared on refresh).
        self._route: dict[int, Addr] = {}
        self._last_refresh = 0.0
        self._refreshing: asyncio.Task[list[topo.TopologyEvent]] | None = None
        self._listeners: list[TopologyListener] = []
        self._known_queues: set[str] = set()

    @classmethod
    async def connect(
        cls,
        url: str | RedisURL,
        *,
        mode: Mode | None = None,
        prefix: str = DEFAULT_PREFIX,
        retry_timeout: float = DEFAULT_RETRY_TIMEOUT,
    ) -> AsyncBackend:
        backend = cls(url, prefix=prefix, retry_timeout=retry_timeout)
        try:
            await backend._detect(mode)
        except BaseException:
            await backend.aclose()
            raise
        return backend

    async def _detect(self, expected: Mode | None) -> None:
        errors: list[str] = []
        for addr in self.url.seeds:
            client = self.node(addr)
            try:
                info = await client.info("cluster")
            except (redis.ConnectionError, redis.TimeoutError, redis.AuthenticationError) as exc:
                translated = translate_error(exc, addr)
                if not isinstance(translated, ConnectionFailed):
                    raise translated from exc
                errors.append(str(translated))
                continue
            self.mode = check_mode(info_mode(info), expected, addr)
            if self.mode == "cluster" and self.url.db:
                raise ConfigError(
                    f"database {self.url.db} requested, but a cluster only has database 0"
                )
            self.topology = await self._read_topology([addr])
            return
        raise ConnectionFailed("no seed node answered: " + "; ".join(errors))

    # ------------------------------------------------------------------ nodes

    def node(self, addr: Addr) -> AsyncNodeClient:
        client = self._clients.get(addr)
        if client is None:
            client = self.url.async_node_client(addr)
            self._clients[addr] = client
        return client

    def master_addr(self, slot: int) -> Addr:
        return self._route.get(slot) or route_to(self._route, self.topology, slot)

    async def aclose(self) -> None:
        self._closing = True
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.wait({self._watcher}, timeout=2)
            self._watcher = None
        clients = [*self._clients.values(), *self._topo_clients.values()]
        self._clients, self._topo_clients = {}, {}
        for client in clients:
            with contextlib.suppress(Exception):
                await client.aclose()

    # ------------------------------------------------------------------ topology

    def subscribe(self, listener: TopologyListener) -> None:
        self._listeners.append(listener)

    def note_queues(self, queues: Iterable[str]) -> None:
        self._known_queues.update(queues)

    def _topology_client(self, addr: Addr) -> AsyncNodeClient:
        client = self._topo_clients.get(addr)
        if client is None:
            client = self.url.async_node_client(
                addr, db=0, socket_timeout=TOPOLOGY_TIMEOUT, socket_connect_timeout=0.5
            )
            self._topo_clients[addr] = client
        return client

    async def _read_topology(self, candidates: Sequence[Addr]) -> topo.Topology:
        """Ask the candidates in order, starting the next one whenever the previous has
        not answered within TOPOLOGY_STAGGER: a frozen node (SIGSTOP) costs 0.1 s, not
        a full timeout. The first answer wins."""
        errors: list[str] = []
        pending: set[asyncio.Task[topo.Topology]] = set()
        queue = list(candidates)
        try:
            while queue or pending:
                if queue:
                    addr = queue.pop(0)
                    pending.add(
                        asyncio.ensure_future(
                            topo.afetch(self._topology_client(addr), self.mode, addr)
                        )
                    )
                done, pending = await asyncio.wait(
                    pending,
                    timeout=TOPOLOGY_STAGGER if queue else None,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                for finished in done:
                    exc = finished.exception()
                    if exc is None:
                        return finished.result()
                    errors.append(str(exc))
        finally:
            for task in pending:
                task.cancel()
        raise ConnectionFailed("could not read the cluster map: " + "; ".join(errors[:4]))

    async def refresh_topology(
        self, *, force: bool = True, avoid: Addr | None = None
    ) -> list[topo.TopologyEvent]:
        """Read the map again; concurrent callers share one read. See
        :meth:`Backend.refresh_topology`."""
        if self._refreshing is not None:
            return await asyncio.shield(self._refreshing)
        now = time.monotonic()
        if not force and now - self._last_refresh < REFRESH_INTERVAL:
            return []
        self._last_refresh = now
        self._refreshing = asyncio.ensure_future(self._refresh(avoid))
        try:
            return await asyncio.shield(self._refreshing)
        finally:
            self._refreshing = None

    def refresh_soon(self, avoid: Addr | None = None) -> None:
        """Start a (rate-limited) refresh in the background."""
        if self._refreshing is None and time.monotonic() - self._last_refresh >= REFRESH_INTERVAL:
            task = asyncio.ensure_future(self.refresh_topology(force=False, avoid=avoid))
            task.add_done_callback(_ignore_result)

    async def _refresh(self, avoid: Addr | None) -> list[topo.TopologyEvent]:
        old = self.topology
        new = await self._read_topology(refresh_candidates(old, self.url.seeds, avoid))
        self.topology = new
        self._route.clear()
        events = topo.diff(old, new, self._known_queues)
        if events:
            for addr in replaced_nodes(events):
                stale = self._clients.pop(addr, None)
                if stale is not None:
                    await stale.drop_connections()
            for event in events:
                log.debug("topology: %s", event.describe())
            for listener in list(self._listeners):
                listener(new, events)
        return events

    def start_watching(self, interval: float) -> None:
        """Re-read the map every ``interval`` seconds in the background (and emit events)."""
        if self._watcher is None:
            self._watcher = asyncio.create_task(self._watch(interval), name="topology-watch")

    async def _watch(self, interval: float) -> None:
        while not self._closing:
            await asyncio.sleep(interval)
            try:
                await self.refresh_topology(force=False)
            except Exception as exc:
                log.debug("topology watch: %s", exc)

    # ------------------------------------------------------------------ calls

    async def execute(
        self,
        slot: int,
        fn: Callable[[AsyncNodeClient], Awaitable[T]],
        *,
        timeout: float | None = None,
    ) -> T:
        """Run ``fn(client)`` on the master of ``slot``; see :meth:`Backend.execute`."""
        deadline = time.monotonic() + (self.retry_timeout if timeout is None else timeout)
        attempt = hops = 0
        while True:
            addr = self.master_addr(slot)
            try:
                return await fn(self.node(addr))
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
                if time.monotonic() >= deadline:
                    self.refresh_soon(avoid=addr)
                    raise translate_error(exc, addr) from exc
                attempt += 1
                log.debug("transient error on %s (%s); retrying", format_addr(addr), exc)
                with contextlib.suppress(ConnectionFailed):
                    await self.refresh_topology(force=False, avoid=addr)
                await asyncio.sleep(backoff(attempt))

    async def execute_key(
        self, key: str, fn: Callable[[AsyncNodeClient], Awaitable[T]], **kwargs: Any
    ) -> T:
        return await self.execute(keyslot(key), fn, **kwargs)

    async def call(self, key: str, *command: Any) -> Any:
        """One command on the master of ``key``'s slot, over the node's lane (the fast path
        of :mod:`clusterq.cluster.wire`), retried through failovers like every call here: for
        handlers that need Redis, e.g. ``await current_worker().backend.call(k, "INCR", k)``.
        Not for commands that block (``BLPOP``...): they would hold up the lane. A command
        that is not idempotent may, rarely, run twice (sent again after a lost reply)."""
        return await self.execute_key(key, lambda c: c.fast(*command))

    async def run_script(
        self,
        script: LuaScript,
        slot: int,
        keys: Sequence[Any],
        args: Sequence[Any],
        *,
        timeout: float | None = None,
    ) -> Any:
        """EVALSHA ``script`` on the master of ``slot``, loading it there on NOSCRIPT."""
        return await self.execute(slot, lambda c: script.acall(c, keys, args), timeout=timeout)
