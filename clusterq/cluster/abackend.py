"""The asyncio twin of :mod:`clusterq.cluster.backend`: routing by slot, retries, refresh.

The decisions (what an error means, how long to back off, whom to ask for a new map)
are those of :mod:`clusterq.cluster.routing`; only the I/O differs: a frozen node costs
a topology read 0.1 s (the next candidate is asked in parallel), and a refresh after a
call gave up runs in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import redis
import redis.asyncio

from clusterq.broker.script import LuaScript
from clusterq.cluster import topology as topo
from clusterq.cluster.changes import TopologyEvent
from clusterq.cluster.connection import (
    Addr,
    Mode,
    RedisURL,
    foreign_key_error,
    format_addr,
    translate_error,
)
from clusterq.cluster.routing import (
    DEFAULT_DOWN_TIMEOUT,
    DEFAULT_RETRY_TIMEOUT,
    TOPOLOGY_STAGGER,
    TOPOLOGY_TIMEOUT,
    RouteState,
    mode_of,
    no_seed_answered,
)
from clusterq.cluster.wire import AsyncNodeClient
from clusterq.errors import ConnectionFailed, ShardDown
from clusterq.keys import DEFAULT_PREFIX
from clusterq.slots import keyslot

T = TypeVar("T")
log = logging.getLogger("clusterq.backend")


def _ignore_result(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


class AsyncBackend(RouteState):
    """Asynchronous access to a cluster or standalone server, routed by slot.

    Create with ``backend = await AsyncBackend.connect(url)``.
    """

    def __init__(
        self,
        url: str | RedisURL,
        *,
        prefix: str = DEFAULT_PREFIX,
        retry_timeout: float = DEFAULT_RETRY_TIMEOUT,
        down_timeout: float = DEFAULT_DOWN_TIMEOUT,
    ) -> None:
        super().__init__(prefix, retry_timeout, down_timeout)
        self.url = url if isinstance(url, RedisURL) else RedisURL.parse(url)
        self._clients: dict[Addr, AsyncNodeClient] = {}
        self._topo_clients: dict[Addr, AsyncNodeClient] = {}
        self._watcher: asyncio.Task[None] | None = None
        self._closing = False
        self._refreshing: asyncio.Task[list[TopologyEvent]] | None = None

    @classmethod
    async def connect(
        cls,
        url: str | RedisURL,
        *,
        mode: Mode | None = None,
        prefix: str = DEFAULT_PREFIX,
        retry_timeout: float = DEFAULT_RETRY_TIMEOUT,
        down_timeout: float = DEFAULT_DOWN_TIMEOUT,
    ) -> AsyncBackend:
        backend = cls(url, prefix=prefix, retry_timeout=retry_timeout, down_timeout=down_timeout)
        try:
            await backend._detect(mode)
        except BaseException:
            await backend.aclose()
            raise
        return backend

    async def _detect(self, expected: Mode | None) -> None:
        """See :func:`clusterq.cluster.backend.detect_mode`."""
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
            self.mode = mode_of(info, expected, addr, self.url.db)
            self.topology = await self._read_topology([addr])
            return
        raise no_seed_answered(errors)

    # ------------------------------------------------------------------ nodes

    def node(self, addr: Addr) -> AsyncNodeClient:
        client = self._clients.get(addr)
        if client is None:
            client = self.url.async_node_client(addr)
            self._clients[addr] = client
        return client

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
                            topo.afetch(
                                self._topology_client(addr), self.mode, addr, tls=self.url.ssl
                            )
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
    ) -> list[TopologyEvent]:
        """Read the map again; concurrent callers share one read. See
        :meth:`Backend.refresh_topology`."""
        if self._refreshing is not None:
            return await asyncio.shield(self._refreshing)
        if not self.refresh_due(force):
            return []
        self._refreshing = asyncio.ensure_future(self._refresh(avoid))
        try:
            return await asyncio.shield(self._refreshing)
        finally:
            self._refreshing = None

    def refresh_soon(self, avoid: Addr | None = None) -> None:
        """Start a (rate-limited) refresh in the background."""
        if self._refreshing is None and self.refresh_allowed():
            task = asyncio.ensure_future(self.refresh_topology(force=False, avoid=avoid))
            task.add_done_callback(_ignore_result)

    async def _refresh(self, avoid: Addr | None) -> list[TopologyEvent]:
        new = await self._read_topology(self.candidates(avoid, self.url.seeds))
        events, stale = self.install(new)
        for addr in stale:
            client = self._clients.pop(addr, None)
            if client is not None:
                await client.drop_connections()
        if events:
            self.announce(new, events)
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
        attempts = self.attempts(timeout)
        while True:
            addr = self.master_addr(slot)
            try:
                return await fn(self.node(addr))
            except Exception as exc:
                decision = attempts.after(exc, self._route, self.down_reason(slot, exc))
                if decision.action == "moved":
                    continue
                if decision.action in ("raise", "down"):
                    if decision.refresh:
                        self.refresh_soon(avoid=addr)
                    if decision.action == "down":
                        raise ShardDown(decision.reason) from exc
                    raise self.give_up(exc, addr, slot) from exc
                log.debug("transient error on %s (%s); retrying", format_addr(addr), exc)
                with contextlib.suppress(ConnectionFailed):
                    await self.refresh_topology(force=False, avoid=addr)
                await asyncio.sleep(decision.delay)

    async def execute_key(
        self, key: str, fn: Callable[[AsyncNodeClient], Awaitable[T]], **kwargs: Any
    ) -> T:
        """:meth:`execute` on ``key``'s slot; a ``WRONGTYPE`` names ``key``."""
        try:
            return await self.execute(keyslot(key), fn, **kwargs)
        except redis.ResponseError as exc:
            raise foreign_key_error(exc, key) from exc

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
