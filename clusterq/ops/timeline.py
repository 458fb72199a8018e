"""The failover timeline as operators read it: master changes, nodes failed and back,
slot moves, replicas, and the queues that went down and came back, as the workers saw
them (each change recorded once, by whichever worker saw it first:
``broker/timeline.lua``). Kept in the cluster (``<prefix>:{timeline}:events``), so the
history outlives any worker or UI restart."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from clusterq.cluster.backend import Backend
from clusterq.keys import KeySchema
from clusterq.serialization import reply_text


@dataclass(frozen=True)
class TimelineEntry:
    stream_id: str
    kind: str
    message: str
    data: dict[str, Any] = field(default_factory=dict)
    #: For a queue that came back: how long it was down; for a master change: how long
    #: after its old master was seen failing (when the timeline has that).
    duration: float | None = None

    @property
    def at(self) -> float:
        head = self.stream_id.partition("-")[0]
        return int(head) / 1000.0 if head.isdigit() else 0.0

    @property
    def queues(self) -> list[str]:
        if isinstance(self.data.get("queues"), list):
            return [str(q) for q in self.data["queues"]]
        return [str(self.data["queue"])] if "queue" in self.data else []

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.stream_id,
            "at": self.at,
            "event": self.kind,
            "message": self.message,
            "queues": self.queues,
            "duration": self.duration,
            "data": self.data,
        }


def decode(stream_id: Any, fields: Any) -> TimelineEntry:
    """An entry; one that is not what the workers write comes back described."""
    sid = reply_text(stream_id)
    raw = fields.get(b"event", fields.get("event")) if isinstance(fields, dict) else None
    try:
        data = json.loads(raw) if raw is not None else None
    except ValueError:
        data = None
    if not isinstance(data, dict):
        return TimelineEntry(sid, "?", f"an entry clusterq did not write: {str(fields)[:200]}")
    return TimelineEntry(sid, str(data.get("event", "?")), str(data.get("message", "")), data)


def read_timeline(backend: Backend, keys: KeySchema, count: int = 200) -> list[TimelineEntry]:
    """The latest ``count`` entries, newest first, with their durations."""
    stream, _ = keys.timeline
    reply = backend.execute_key(stream, lambda c: c.xrevrange(stream, "+", "-", count=count))
    entries = [decode(sid, fields) for sid, fields in reply or []]
    return with_durations(entries)


def with_durations(newest_first: list[TimelineEntry]) -> list[TimelineEntry]:
    out = []
    for n, entry in enumerate(newest_first):
        duration = None
        if entry.kind == "queue_resumed" and isinstance(entry.data.get("outage"), int | float):
            duration = float(entry.data["outage"])
        elif entry.kind == "master_changed":
            old = entry.data.get("old_id")
            for earlier in newest_first[n + 1 :]:
                if earlier.kind == "node_failed" and earlier.data.get("node_id") == old:
                    duration = max(0.0, entry.at - earlier.at)
                    break
        out.append(TimelineEntry(entry.stream_id, entry.kind, entry.message, entry.data, duration))
    return out
