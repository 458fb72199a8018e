"""Workers: fetch tasks, run their handlers, ack or fail them, keep their leases alive.

- :mod:`~clusterq.worker.worker`: :class:`Worker`, the lifecycle (start, stop, signals);
- :mod:`~clusterq.worker.fetcher`: one fetch loop per queue, its idle wait, probes;
- :mod:`~clusterq.worker.wakeups`: what wakes an idle queue (sharded pub/sub, survey);
- :mod:`~clusterq.worker.runner`: running a handler, timeouts, middleware, threads;
- :mod:`~clusterq.worker.outcomes`: acks (batched), failures and retries, hand-backs;
- :mod:`~clusterq.worker.leases`: the heartbeat that renews leases;
- :mod:`~clusterq.worker.recoverer`: sweeps, and tasks of expired leases taken back;
- :mod:`~clusterq.worker.announce`: the announcement in ``<prefix>:workers``;
- :mod:`~clusterq.worker.state`: settings, counters and per-queue state they share;
- :mod:`~clusterq.worker.processes`: :func:`run_processes`, N workers under a supervisor
  (:mod:`~clusterq.worker.child`: one of them; :mod:`~clusterq.worker.recycle`: when one
  is replaced, :class:`ProcessLimits`).
"""

from clusterq.worker.announce import WorkerAnnouncement
from clusterq.worker.processes import run_processes
from clusterq.worker.recycle import ProcessLimits
from clusterq.worker.state import (
    DEFAULT_DEDUP_WINDOW,
    DEFAULT_LEASE,
    DEFAULT_POLL_INTERVAL,
    DEFAULT_RECOVER_INTERVAL,
    DEFAULT_SURVEY_INTERVAL,
    WorkerSettings,
    WorkerStats,
    parse_queues,
)
from clusterq.worker.worker import Worker, current_worker

__all__ = [
    "DEFAULT_DEDUP_WINDOW",
    "DEFAULT_LEASE",
    "DEFAULT_POLL_INTERVAL",
    "DEFAULT_RECOVER_INTERVAL",
    "DEFAULT_SURVEY_INTERVAL",
    "ProcessLimits",
    "Worker",
    "WorkerAnnouncement",
    "WorkerSettings",
    "WorkerStats",
    "current_worker",
    "parse_queues",
    "run_processes",
]
