"""The asyncio twin of :mod:`clusterq.backend`: routing by slot, retries, topology refresh.

The decisions (what an error means, how long to back off, whom to ask for a new map)
are the pure functions of :mod:`clusterq.backend`; only the I/O differs.
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

from clusterq import topology as topo
from clusterq.backend import (
    DEFAULT_RETRY_TIMEOUT,
    REFRESH_INTERVAL,
    TopologyListener,
    backoff,
    classify,
    moved_target,
    refresh_candidates,
)
from clusterq.broker.script import LuaScript
from clusterq.connection import (
    Addr,
    Mode,
    RedisURL,
    check_mode,
    format_addr,
    info_mode,
    translate_error,
)
from clusterq.errors import ConfigError, ConnectionFailed, TopologyError
from clusterq.keys import DEFAULT_PREFIX, KeySchema
from clusterq.slots import keyslot

T = TypeVar("T")
log = logging.getLogger("clusterq.backend")


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
        self._clients: dict[Addr, redis.asyncio.Redis] = {}
        self._moved: dict[int, Addr] = {}
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

    def node(self, addr: Addr) -> redis.asyncio.Redis:
        client = self._clients.get(addr)
        if client is None:
            client = self.url.async_node_client(addr)
            self._clients[addr] = client
        return client

    def master_addr(self, slot: int) -> Addr:
        moved = self._moved.get(slot)
        if moved is not None:
            return moved
        master = self.topology.master_for_slot(slot)
        if master is None:
            raise TopologyError(f"no master owns slot {slot}")
        return master.address

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            with contextlib.suppress(Exception):
                await client.aclose()

    # ------------------------------------------------------------------ topology

    def subscribe(self, listener: TopologyListener) -> None:
        self._listeners.append(listener)

    def note_queues(self, queues: Iterable[str]) -> None:
        self._known_queues.update(queues)

    async def _read_topology(self, candidates: Sequence[Addr]) -> topo.Topology:
        errors: list[str] = []
        for addr in candidates:
            try:
                return await topo.afetch(self.node(addr), self.mode, addr)
            except (redis.RedisError, OSError) as exc:
                errors.append(f"{format_addr(addr)}: {exc}")
        raise ConnectionFailed("could not read the cluster map: " + "; ".join(errors[:4]))

    async def refresh_topology(self, *, force: bool = True) -> list[topo.TopologyEvent]:
        """Read the map again; concurrent callers share one read."""
        if self._refreshing is not None:
            return await asyncio.shield(self._refreshing)
        now = time.monotonic()
        if not force and now - self._last_refresh < REFRESH_INTERVAL:
            return []
        self._last_refresh = now
        self._refreshing = asyncio.ensure_future(self._refresh())
        try:
            return await asyncio.shield(self._refreshing)
        finally:
            self._refreshing = None

    async def _refresh(self) -> list[topo.TopologyEvent]:
        old = self.topology
        new = await self._read_topology(refresh_candidates(old, self.url.seeds))
        self.topology = new
        self._moved.clear()
        events = topo.diff(old, new, self._known_queues)
        if events:
            for event in events:
                log.info("topology: %s", event.describe())
            for listener in list(self._listeners):
                listener(new, events)
        return events

    # ------------------------------------------------------------------ calls

    async def execute(
        self,
        slot: int,
        fn: Callable[[redis.asyncio.Redis], Awaitable[T]],
        *,
        timeout: float | None = None,
    ) -> T:
        """Run ``fn(client)`` on the master of ``slot``; see :meth:`Backend.execute`."""
        deadline = time.monotonic() + (self.retry_timeout if timeout is None else timeout)
        attempt = 0
        while True:
            addr = self.master_addr(slot)
            try:
                return await fn(self.node(addr))
            except Exception as exc:
                kind = classify(exc)
                if kind in ("fatal", "noscript") or time.monotonic() >= deadline:
                    raise translate_error(exc, addr) from exc
                attempt += 1
                if kind == "moved":
                    target = moved_target(exc)
                    if target is not None:
                        self._moved[target[0]] = target[1]
                    if attempt > 1:
                        await asyncio.sleep(backoff(attempt))
                    continue
                log.debug("transient error on %s (%s); retrying", format_addr(addr), exc)
                with contextlib.suppress(ConnectionFailed):
                    await self.refresh_topology(force=False)
                await asyncio.sleep(backoff(attempt))

    async def execute_key(
        self, key: str, fn: Callable[[redis.asyncio.Redis], Awaitable[T]], **kwargs: Any
    ) -> T:
        return await self.execute(keyslot(key), fn, **kwargs)

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
