"""A blocking connection for plain ``def`` handlers: ``current_worker().sync_backend``.

A sync handler runs in one of the worker's handler threads
(:mod:`clusterq.worker.threads`), where the worker's own
:class:`~clusterq.cluster.abackend.AsyncBackend` cannot be used (it belongs to the event
loop). The worker therefore keeps one synchronous
:class:`~clusterq.cluster.backend.Backend` for its handlers: connected lazily, on the
first use, from the calling thread (a worker without sync handlers never opens it),
shared by all handler threads (it is thread-safe: each node's client has a pool of
connections, one per thread that sends at the same time), routed by slot and retried
through failovers like every clusterq call, and closed when the worker closes::

    @router.task("counters:bump")
    def bump(task: Task) -> None:
        backend = current_worker().sync_backend
        key = task.payload["key"]
        backend.execute_key(key, lambda c: c.incr(key))  # c: a redis-py client of the node

``c``'s plain commands (``INCR`` here) skip redis-py's per-command layer
(:mod:`clusterq.cluster.fastcommands`). It connects to the worker's URL with the worker's
mode, prefix and retry timeout. Do not
use it from an ``async def`` handler: it would block the event loop (use
``current_worker().backend`` there).
"""

from __future__ import annotations

import threading

from clusterq.cluster.abackend import AsyncBackend
from clusterq.cluster.backend import Backend


class BlockingBackend:
    """The worker's lazily connected :class:`Backend` for sync handlers."""

    def __init__(self) -> None:
        self._backend: Backend | None = None
        self._lock = threading.Lock()
        self._closed = False

    @property
    def connected(self) -> bool:
        return self._backend is not None

    def get(self, source: AsyncBackend) -> Backend:
        """The backend, connected on the first call (in the calling thread, which blocks
        meanwhile) to ``source``'s URL with its mode, prefix and retry timeout."""
        backend = self._backend
        if backend is not None:
            return backend
        with self._lock:
            if self._closed:
                raise RuntimeError("the worker is closed: its sync backend is gone")
            if self._backend is None:
                self._backend = Backend(
                    source.url,
                    mode=source.mode,
                    prefix=source.keys.prefix,
                    retry_timeout=source.retry_timeout,
                    down_timeout=source.down_timeout,
                )
            return self._backend

    def close(self) -> None:
        """Close its connections (when the worker closes); a later :meth:`get` raises."""
        with self._lock:
            self._closed = True
            backend, self._backend = self._backend, None
        if backend is not None:
            backend.close()
