"""Live pages without load: one poller per UI process reads the queues (``Admin.queues``)
every ``interval`` seconds while at least one page listens, and pushes the same answer
to every open page over server-sent events (``GET /live/queues``). Ten open browsers
cost what one does; none cost nothing. The overview's rows are updated in place by
``static/live.js`` (a script of the UI's own, as the Content Security Policy requires)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.concurrency import run_in_threadpool

log = logging.getLogger("clusterq.web")

#: Answers a slow page may fall behind by before it is skipped to the latest.
BACKLOG = 2


class LivePoller:
    """Polls ``read()`` (in a thread) while anyone subscribes; each subscriber gets
    every answer as a JSON string (or, if it lags, the latest ones)."""

    def __init__(self, read: Callable[[], Any], interval: float) -> None:
        self.read = read
        self.interval = interval
        #: How many reads were made (one per interval, however many subscribers).
        self.polls = 0
        self.latest: str | None = None
        self._subscribers: set[asyncio.Queue[str]] = set()
        self._task: asyncio.Task[None] | None = None

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    async def subscribe(self) -> AsyncIterator[str]:
        queue: asyncio.Queue[str] = asyncio.Queue(maxsize=BACKLOG)
        self._subscribers.add(queue)
        if self.latest is not None:
            queue.put_nowait(self.latest)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._poll())
        try:
            while True:
                yield await queue.get()
        finally:
            self._subscribers.discard(queue)

    async def _poll(self) -> None:
        while self._subscribers:
            try:
                data = json.dumps(await run_in_threadpool(self.read), default=str)
            except Exception as exc:  # a bad minute: said on the page, the loop goes on
                log.warning("live update failed: %s", exc)
                data = json.dumps({"error": str(exc)})
            self.polls += 1
            self.latest = data
            for queue in list(self._subscribers):
                if queue.full():
                    queue.get_nowait()  # a slow page skips to the latest
                queue.put_nowait(data)
            await asyncio.sleep(self.interval)
        self._task = None


async def sse(poller: LivePoller, disconnected: Callable[[], Any]) -> AsyncIterator[str]:
    """Server-sent events of ``poller``'s answers, until the page goes away."""
    yield f"retry: {int(poller.interval * 1000) + 1000}\n\n"
    async for data in poller.subscribe():
        if await disconnected():
            return
        yield f"data: {data}\n\n"
