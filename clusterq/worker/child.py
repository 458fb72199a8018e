"""One worker process of ``clusterq worker run --processes N``: it runs a worker as a
process on its own would, and keeps its supervisor (:mod:`clusterq.worker.processes`)
told — a beat with its metrics every ``BEAT_EVERY`` seconds, and at once when it stops
to be replaced. When the supervisor's end of the socket closes (the supervisor died),
the worker stops gracefully.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
from typing import Any

from clusterq.events import TopologyEvent, WorkerLeaving
from clusterq.worker.recycle import EXIT_REPLACE
from clusterq.worker.worker import Worker, serve

log = logging.getLogger("clusterq.worker")

#: Seconds between two beats to the supervisor.
BEAT_EVERY = 0.5
#: Bytes kept for a supervisor that does not read (beyond, beats are dropped).
MAX_UNSENT = 1 << 20
#: Seconds a leaving worker may need beyond its shutdown timeout (acks, hand-backs).
LEAVE_MARGIN = 10.0


def run_child(worker: Worker, sock: socket.socket, supervisor_id: str, index: int) -> int:
    """Run ``worker`` as process ``index`` of ``supervisor_id``; its exit status."""
    link = ChildLink(worker, sock, supervisor_id, index)
    asyncio.run(link.main())
    recycler = worker.recycler
    return EXIT_REPLACE if recycler is not None and recycler.reason is not None else 0


class ChildLink:
    """What a worker process tells its supervisor."""

    def __init__(self, worker: Worker, sock: socket.socket, supervisor_id: str, index: int):
        self.worker = worker
        self.sock = sock
        self.index = index
        self._unsent = bytearray()
        self._tasks: list[asyncio.Task[Any]] = []
        worker.labels.update(supervisor=supervisor_id, process=index)
        worker.subscribe(self._on_event)

    async def main(self) -> None:
        self.sock.setblocking(False)
        try:
            await serve(self.worker, self._started)
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            stats = self.worker.stats
            self._send(
                {
                    "t": "bye",
                    "processed": stats.processed,
                    "failed": stats.failed,
                    "returned": stats.returned,
                }
            )

    def _started(self) -> None:
        self._tasks = [
            asyncio.ensure_future(self._beat()),
            asyncio.ensure_future(self._watch_supervisor()),
        ]

    def _on_event(self, event: TopologyEvent) -> None:
        if isinstance(event, WorkerLeaving):
            within = self.worker.settings.shutdown_timeout + LEAVE_MARGIN
            self._send(
                {"t": "leaving", "reason": event.reason, "cause": event.cause, "within": within}
            )

    async def _beat(self) -> None:
        while True:
            message: dict[str, Any] = {"t": "beat", "id": self.worker.id}
            metrics = self.worker.metrics
            if metrics is not None:
                message["metrics"] = metrics.exposition()
            self._send(message)
            await asyncio.sleep(BEAT_EVERY)

    async def _watch_supervisor(self) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError):
            while await loop.sock_recv(self.sock, 4096):
                pass  # the supervisor sends nothing; its end closing is the message
        log.warning("worker %s: its supervisor is gone; stopping", self.worker.id)
        await self.worker.stop()

    def _send(self, message: dict[str, Any]) -> None:
        if len(self._unsent) > MAX_UNSENT and message.get("t") == "beat":
            return  # a supervisor that does not read (stopped): beats wait for nobody
        self._unsent += json.dumps(message).encode() + b"\n"
        self._flush()

    def _flush(self) -> None:
        try:
            while self._unsent:
                sent = self.sock.send(self._unsent)
                del self._unsent[:sent]
        except BlockingIOError:
            pass  # the rest goes with the next beat
        except OSError:
            self._unsent.clear()  # the supervisor is gone
