"""A worker's partitioned queues: which queues it fetches from for each queue it serves,
kept up to date while it runs (see :mod:`clusterq.partitions`).

At start, and every ``LAYOUT_TTL`` after, the worker reads the declarations. For a
partitioned queue it fetches from every member of the layout (a fetch loop each, sharing
the queue's weight); a member that appears later (the partition count changed) gets its
loop then. A draining partition that is empty :data:`~clusterq.partitions.RETIRE_GRACE`
after the change is retired: removed from the declaration (compare-and-set, so of several
workers one does it), and this worker stops fetching from it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

from clusterq.broker import layout as layout_script
from clusterq.cluster.abackend import AsyncBackend
from clusterq.partitions import LAYOUT_TTL, RETIRE_GRACE, Layout, Layouts, without
from clusterq.slots import keyslot
from clusterq.worker.fetcher import Fetcher
from clusterq.worker.state import RunState

log = logging.getLogger("clusterq.worker")


class PartitionWatch:
    """Expands the worker's queues into the queues it fetches from."""

    def __init__(
        self,
        backend: AsyncBackend,
        weights: Mapping[str, int],
        fetcher: Fetcher,
        strict: bool,
        run_state: RunState,
        *,
        interval: float | None = None,
        retire_grace: float | None = None,
    ) -> None:
        self.backend = backend
        self.weights = dict(weights)
        self.strict = strict
        self.serve = fetcher.serve
        self.retire = fetcher.retire
        self.run_state = run_state
        self.interval = LAYOUT_TTL if interval is None else interval
        self.retire_grace = RETIRE_GRACE if retire_grace is None else retire_grace
        self.layouts = Layouts(ttl=self.interval)
        #: The queues fetched from, per queue served.
        self.members: dict[str, tuple[str, ...]] = {}

    async def load(self) -> None:
        """Read the declarations and serve every member (and every plain queue)."""
        key = self.backend.keys.layouts
        entries = await self.backend.execute_key(key, lambda c: c.hgetall(key))
        self.layouts.loaded(entries)
        self._apply()

    def _apply(self) -> None:
        for name, weight in self.weights.items():
            members = self.layouts.members(name)
            known = self.members.get(name, ())
            share = weight if self.strict else weight / len(members)
            for member in members:
                self.serve(member, share)
            for gone in set(known) - set(members):
                self.retire(gone)
            if known and members != known:
                layout = self.layouts.get(name)
                log.warning(
                    "queue %s: now fetching from %d queues (layout version %s)",
                    name,
                    len(members),
                    layout.version if layout is not None else "-",
                )
            self.members[name] = members

    async def loop(self) -> None:
        """Re-read the declarations every ``interval``; retire drained partitions."""
        failing = False
        while not self.run_state.stopping:
            await asyncio.sleep(self.interval)
            try:
                await self.load()
                for name in self.weights:
                    layout = self.layouts.get(name)
                    if layout is not None and layout.draining:
                        await self._retire_drained(layout)
            except Exception as exc:  # the declarations' master is down: keep what we have
                if not failing:
                    log.warning("could not read the partitioned-queue declarations: %s", exc)
                failing = True
            else:
                failing = False

    async def _retire_drained(self, layout: Layout) -> None:
        now_ms = int(time.time() * 1000)
        if now_ms < layout.changed_ms + self.retire_grace * 1000:
            return
        empty = [q for q in layout.draining if await self._is_empty(q)]
        if not empty:
            return
        new = without(layout, empty, now_ms)
        script_keys, args = layout_script.put(self.backend.keys, new, layout.version)
        key = self.backend.keys.layouts
        reply = await self.backend.run_script(layout_script.SCRIPT, keyslot(key), script_keys, args)
        if layout_script.written(reply, new):
            log.warning("queue %s: retired drained partitions %s", layout.name, ", ".join(empty))
            self.layouts.put(new)
            self._apply()

    async def _is_empty(self, queue: str) -> bool:
        qk = self.backend.keys.queue(queue)
        commands: list[tuple[Any, ...]] = [("LLEN", qk.pending)] + [
            ("ZCARD", key)
            for key in (qk.scheduled, qk.retry, qk.active, qk.archived, qk.completed, qk.fair)
        ]

        async def counts(client: Any) -> list[Any]:
            return list(await client.fast_pipeline(commands))

        return not any(int(n) for n in await self.backend.execute(qk.slot, counts))
