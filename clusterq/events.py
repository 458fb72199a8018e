"""Events a worker reports: the topology changes it saw, and its queues going down and
coming back. Each event has ``describe()`` (plain words, also written to the worker's
log) and ``to_dict()`` (for JSON). Subscribe with :meth:`clusterq.Worker.subscribe`.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from clusterq.cluster.changes import (
    MasterChanged,
    NodeAdded,
    NodeFailed,
    NodeRecovered,
    NodeRemoved,
    ReplicaAdded,
    ReplicaRemoved,
    SlotsMoved,
    TopologyEvent,
)


@dataclass(frozen=True)
class QueueUnavailable(TopologyEvent):
    """A worker could not fetch from a queue's master."""

    kind: ClassVar[str] = "queue_unavailable"
    queue: str
    node: str
    error: str
    at: float = field(default_factory=time.time)

    def describe(self) -> str:
        return f"queue {self.queue}: master {self.node} unavailable ({self.error}); retrying"

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "queue": self.queue, "node": self.node, "at": self.at}


@dataclass(frozen=True)
class QueueResumed(TopologyEvent):
    """Fetching from a queue works again, possibly on a new master."""

    kind: ClassVar[str] = "queue_resumed"
    queue: str
    node: str
    outage: float
    at: float = field(default_factory=time.time)

    def describe(self) -> str:
        return f"queue {self.queue}: resumed on {self.node} after {self.outage:.2f}s"

    def to_dict(self) -> dict[str, Any]:
        return {
            **super().to_dict(),
            "queue": self.queue,
            "node": self.node,
            "outage": self.outage,
            "at": self.at,
        }


@dataclass(frozen=True)
class LoopStopped(TopologyEvent):
    """One of a worker's loops (a queue's fetch loop, the heartbeat, the recoverer, the
    announcer) ended while the worker was running; it is started again."""

    kind: ClassVar[str] = "loop_stopped"
    loop: str
    error: str
    at: float = field(default_factory=time.time)

    def describe(self) -> str:
        return f"worker loop {self.loop} stopped ({self.error}); starting it again"

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "loop": self.loop, "error": self.error, "at": self.at}


@dataclass(frozen=True)
class WorkerLeaving(TopologyEvent):
    """A worker stops by itself to be replaced by a fresh process: it took its
    ``max_tasks_per_process``, its memory passed ``max_memory_per_process``, or a sync
    handler ran on past its timeout (see :mod:`clusterq.worker.recycle`)."""

    kind: ClassVar[str] = "worker_leaving"
    worker: str
    reason: str
    #: ``max_tasks``, ``memory`` or ``hard_timeout``.
    cause: str
    at: float = field(default_factory=time.time)

    @property
    def routine(self) -> bool:
        """Planned (it took its tasks): logged at INFO, not WARNING."""
        return self.cause == "max_tasks"

    def describe(self) -> str:
        return f"worker {self.worker} stops to be replaced: {self.reason}"

    def to_dict(self) -> dict[str, Any]:
        return {
            **super().to_dict(),
            "worker": self.worker,
            "reason": self.reason,
            "cause": self.cause,
            "at": self.at,
        }


EventListener = Callable[[TopologyEvent], None]

__all__ = [
    "EventListener",
    "LoopStopped",
    "MasterChanged",
    "NodeAdded",
    "NodeFailed",
    "NodeRecovered",
    "NodeRemoved",
    "QueueResumed",
    "QueueUnavailable",
    "ReplicaAdded",
    "ReplicaRemoved",
    "SlotsMoved",
    "TopologyEvent",
    "WorkerLeaving",
]


#: Fields of an event's dict that differ between the workers that saw the same change.
_VOLATILE = ("at", "outage", "message", "error")


def timeline_record(event: TopologyEvent) -> tuple[str, str]:
    """An event as the failover timeline keeps it: its signature (the same for every
    worker that saw the same change: what changed, on which nodes, slots and queues)
    and its JSON."""
    data = event.to_dict()
    same = {k: v for k, v in data.items() if k not in _VOLATILE}
    signature = hashlib.sha1(json.dumps(same, sort_keys=True).encode()).hexdigest()[:20]
    return signature, json.dumps(data, default=str)
