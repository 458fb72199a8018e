"""Sharing a worker's concurrency among its queues: weighted or strict priority.

Each queue has its own fetch loop (so queues on different masters are fetched
concurrently and a slow shard never stalls the others). Before it dequeues, a loop asks
:class:`Capacity` for slots. Free slots go to the queues that are waiting for them, one
queue at a time, each taking as many as it asked for: in weighted mode the next queue
is drawn at random in proportion to the queues' weights (weight 6 is drawn about 6x as
often as weight 1, so over many grants it gets about 6x the slots); in strict mode the
waiting queue with the highest weight goes first. A queue whose loop is idle (its queue
is empty) does not wait here, so it takes nothing.

Grants are made once per event-loop turn, so slots freed together are handed out
together and a queue dequeues them in one batch: handing every waiting queue a few of
them instead made batches of a handful of tasks when several queues were busy, and the
fixed cost of each script call (and of its replication) then dominated.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass
class _Waiter:
    queue: str
    want: int
    future: asyncio.Future[int]
    granted: int = 0


class Capacity:
    def __init__(self, total: int, weights: Mapping[str, float], *, strict: bool = False) -> None:
        if total < 1:
            raise ValueError("concurrency must be at least 1")
        self.total = total
        self.free = total
        self.weights: dict[str, float] = dict(weights)
        self.strict = strict
        self._waiters: dict[str, _Waiter] = {}
        self._scheduled = False
        self._closed = False
        self._rng = random.Random()

    @property
    def in_use(self) -> int:
        return self.total - self.free

    async def acquire(self, queue: str, want: int) -> int:
        """Wait for 1..``want`` slots for ``queue``; returns 0 once closed."""
        if self._closed:
            return 0
        if queue in self._waiters:
            raise RuntimeError(f"queue {queue!r} is already waiting for capacity")
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._waiters[queue] = _Waiter(queue, max(1, want), future)
        self._schedule()
        try:
            return await future
        except asyncio.CancelledError:
            waiter = self._waiters.pop(queue, None)
            if waiter is not None and waiter.granted:
                self.release(waiter.granted)
            elif future.done() and not future.cancelled():
                self.release(future.result())
            raise

    def release(self, count: int = 1) -> None:
        if count <= 0:
            return
        self.free = min(self.total, self.free + count)
        self._schedule()

    def close(self) -> None:
        """Wake every waiter with 0 slots; later acquires return 0 at once."""
        self._closed = True
        for waiter in self._waiters.values():
            if not waiter.future.done():
                self.free += waiter.granted
                waiter.future.set_result(0)
        self._waiters.clear()

    def _schedule(self) -> None:
        if not self._scheduled and not self._closed:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._dispatch)

    def _pick(self, candidates: list[_Waiter]) -> _Waiter:
        if self.strict:
            return max(candidates, key=lambda w: self.weights.get(w.queue, 1))
        weights = [self.weights.get(w.queue, 1) for w in candidates]
        return self._rng.choices(candidates, weights=weights)[0]

    def _dispatch(self) -> None:
        self._scheduled = False
        if self._closed:
            return
        hungry = [w for w in self._waiters.values() if not w.future.done()]
        while self.free > 0 and hungry:
            # One waiter at a time takes all it asked for: the slots freed in one turn
            # make one batch (one dequeue call), not a few slots for every queue.
            waiter = hungry[0] if len(hungry) == 1 else self._pick(hungry)
            grant = min(self.free, waiter.want - waiter.granted)
            waiter.granted += grant
            self.free -= grant
            hungry.remove(waiter)
        for queue, waiter in list(self._waiters.items()):
            if waiter.granted and not waiter.future.done():
                del self._waiters[queue]
                waiter.future.set_result(waiter.granted)
