"""``task.progress(fraction, data)`` in a worker: each report written to the task's
progress key, fenced by the attempt's lease token (:mod:`clusterq.broker.progress`).

From an async handler (the loop's thread) the report is written in the background and
the call returns at once; reports of one task that come faster than they are written are
coalesced, the latest kept. From a plain ``def`` handler (a handler thread) it is
written before the call returns, over the worker's blocking backend. A report refused
because the lease was lost, or that could not be written, is logged and counted; it
never fails the task."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

from clusterq.broker import progress as progress_script
from clusterq.broker.facade import Broker
from clusterq.cluster.backend import Backend
from clusterq.progress import encode_progress
from clusterq.task import Task

log = logging.getLogger("clusterq.worker")

#: One report waiting to be written: queue, task id, attempt, the report, its fraction.
_Report = tuple[str, str, str, bytes, float]


class ProgressWriter:
    def __init__(self, broker: Broker, sync_backend: Callable[[], Backend]) -> None:
        self.broker = broker
        self.sync_backend = sync_backend
        self.loop_thread = threading.get_ident()
        #: Reports written, and refused because the attempt no longer held its lease.
        self.written = 0
        self.refused = 0
        #: (queue, task id) -> the latest report not yet written, for async handlers.
        self._latest: dict[tuple[str, str], _Report] = {}
        self._writing: set[asyncio.Task[None]] = set()

    def report(self, task: Task, fraction: float, data: dict[str, Any] | None) -> None:
        """What ``task.progress()`` calls; raises ValueError for a bad ``fraction``/``data``."""
        report = encode_progress(fraction, data, task.attempt)
        item = (task.queue, task.id, task.attempt, report, float(fraction))
        if threading.get_ident() != self.loop_thread:
            self._write_now(item)
            return
        key = (task.queue, task.id)
        waiting = key in self._latest
        self._latest[key] = item
        if not waiting:
            writing = asyncio.get_running_loop().create_task(self._write_latest(key))
            self._writing.add(writing)
            writing.add_done_callback(self._writing.discard)

    async def _write_latest(self, key: tuple[str, str]) -> None:
        while True:
            item = self._latest[key]
            queue, task_id, attempt, report, fraction = item
            qk = self.broker.backend.keys.queue(queue)
            try:
                keys, args = progress_script.build(qk, task_id, attempt, report, fraction)
                reply = await self.broker.backend.run_script(
                    progress_script.SCRIPT, qk.slot, keys, args
                )
                self._count(progress_script.parse(reply), item)
            except Exception as exc:  # a report is never worth failing the task
                log.warning("progress of task %s in %r not written: %s", task_id, queue, exc)
            if self._latest.get(key) is item:
                del self._latest[key]
                return

    def _write_now(self, item: _Report) -> None:
        queue, task_id, attempt, report, fraction = item
        try:
            backend = self.sync_backend()
            qk = backend.keys.queue(queue)
            keys, args = progress_script.build(qk, task_id, attempt, report, fraction)
            script = progress_script.SCRIPT
            reply = backend.execute(qk.slot, lambda c: script.call(c, keys, args))
            self._count(progress_script.parse(reply), item)
        except Exception as exc:
            log.warning("progress of task %s in %r not written: %s", task_id, queue, exc)

    def _count(self, written: bool, item: _Report) -> None:
        if written:
            self.written += 1
            return
        self.refused += 1
        log.info(
            "progress of task %s in %r refused: attempt %s no longer holds its lease",
            item[1],
            item[0],
            item[2],
        )
