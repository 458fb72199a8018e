"""What changed between two cluster maps: typed events from :func:`diff`.

Workers log them and pass them to subscribers; ``clusterq cluster watch`` streams them;
the backends drop connections to nodes that lost their slots. Pure functions of two
:class:`~clusterq.cluster.topology.Topology` snapshots.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from clusterq.cluster.topology import FAILED, NodeInfo, SlotRange, Topology
from clusterq.slots import SLOT_COUNT, keyslot


@dataclass(frozen=True)
class TopologyEvent:
    """Something that changed between two snapshots."""

    kind: ClassVar[str] = "event"

    def describe(self) -> str:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        return {"event": self.kind, "message": self.describe()}


def _fmt_ranges(ranges: Sequence[SlotRange]) -> str:
    return ",".join(f"{lo}" if lo == hi else f"{lo}-{hi}" for lo, hi in ranges)


def _queues_phrase(queues: Sequence[str]) -> str:
    if not queues:
        return ""
    return (
        " (queue " + ", ".join(queues) + ")"
        if len(queues) == 1
        else (" (queues " + ", ".join(queues) + ")")
    )


@dataclass(frozen=True)
class MasterChanged(TopologyEvent):
    """A replica took over its master's slots (failover)."""

    kind: ClassVar[str] = "master_changed"
    slots: tuple[SlotRange, ...]
    queues: tuple[str, ...]
    old: NodeInfo
    new: NodeInfo
    #: What the old master is in the new snapshot: "failed", "replica", "master" (still
    #: called master, without these slots), or "gone".
    old_state: str = ""

    def describe(self) -> str:
        state = f"; {self.old.addr} is {self.old_state}" if self.old_state else ""
        return (
            f"master of slots {_fmt_ranges(self.slots)}{_queues_phrase(self.queues)} changed "
            f"from {self.old.addr} to {self.new.addr} (failover{state})"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            **super().to_dict(),
            "slots": [list(r) for r in self.slots],
            "queues": list(self.queues),
            "old": self.old.addr,
            "old_id": self.old.id,
            "old_state": self.old_state,
            "new": self.new.addr,
            "new_id": self.new.id,
        }


def _state_of(node: NodeInfo | None) -> str:
    if node is None:
        return "gone"
    return FAILED if node.health == FAILED else node.role


@dataclass(frozen=True)
class SlotsMoved(TopologyEvent):
    """Slots moved to another master (resharding), or lost or gained an owner."""

    kind: ClassVar[str] = "slots_moved"
    slots: tuple[SlotRange, ...]
    queues: tuple[str, ...]
    old: NodeInfo | None
    new: NodeInfo | None

    def describe(self) -> str:
        old = self.old.addr if self.old else "no master"
        new = self.new.addr if self.new else "no master"
        where = f"{_fmt_ranges(self.slots)}{_queues_phrase(self.queues)}"
        return f"slots {where} moved from {old} to {new}"

    def to_dict(self) -> dict[str, Any]:
        return {
            **super().to_dict(),
            "slots": [list(r) for r in self.slots],
            "queues": list(self.queues),
            "old": self.old.addr if self.old else None,
            "new": self.new.addr if self.new else None,
        }


@dataclass(frozen=True)
class _NodeEvent(TopologyEvent):
    node: NodeInfo
    verb: ClassVar[str] = ""

    def describe(self) -> str:
        return f"{self.node.role} {self.node.addr} ({self.node.id[:8]}) {self.verb}"

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "node": self.node.addr, "node_id": self.node.id}


@dataclass(frozen=True)
class NodeFailed(_NodeEvent):
    kind: ClassVar[str] = "node_failed"
    verb: ClassVar[str] = "failed"


@dataclass(frozen=True)
class NodeRecovered(_NodeEvent):
    kind: ClassVar[str] = "node_recovered"
    verb: ClassVar[str] = "recovered"


@dataclass(frozen=True)
class NodeAdded(_NodeEvent):
    kind: ClassVar[str] = "node_added"
    verb: ClassVar[str] = "joined the cluster"


@dataclass(frozen=True)
class NodeRemoved(_NodeEvent):
    kind: ClassVar[str] = "node_removed"
    verb: ClassVar[str] = "left the cluster"


@dataclass(frozen=True)
class _ReplicaEvent(TopologyEvent):
    master: NodeInfo | None
    replica: NodeInfo
    verb: ClassVar[str] = ""

    def describe(self) -> str:
        master = self.master.addr if self.master else "its old master"
        return f"replica {self.replica.addr} {self.verb} {master}"

    def to_dict(self) -> dict[str, Any]:
        return {
            **super().to_dict(),
            "master": self.master.addr if self.master else None,
            "replica": self.replica.addr,
        }


@dataclass(frozen=True)
class ReplicaAdded(_ReplicaEvent):
    kind: ClassVar[str] = "replica_added"
    verb: ClassVar[str] = "now replicates"


@dataclass(frozen=True)
class ReplicaRemoved(_ReplicaEvent):
    kind: ClassVar[str] = "replica_removed"
    verb: ClassVar[str] = "no longer replicates"


def _group(
    changes: Iterable[tuple[int, str | None, str | None]],
) -> dict[tuple[str | None, str | None], list[SlotRange]]:
    groups: dict[tuple[str | None, str | None], list[SlotRange]] = {}
    for slot, old, new in changes:
        ranges = groups.setdefault((old, new), [])
        if ranges and ranges[-1][1] == slot - 1:
            ranges[-1] = (ranges[-1][0], slot)
        else:
            ranges.append((slot, slot))
    return groups


def _slot_owners(topology: Topology) -> list[str | None]:
    owners: list[str | None] = [None] * SLOT_COUNT
    for shard in topology.shards:
        for lo, hi in shard.slots:
            owners[lo : hi + 1] = [shard.master.id] * (hi - lo + 1)
    return owners


def _in_ranges(slot: int, ranges: Sequence[SlotRange]) -> bool:
    return any(lo <= slot <= hi for lo, hi in ranges)


def diff(old: Topology, new: Topology, queues: Iterable[str] = ()) -> list[TopologyEvent]:
    """Events that lead from ``old`` to ``new``; ``queues`` are named in slot events."""
    events: list[TopologyEvent] = []
    old_nodes = {n.id: n for n in old.nodes}
    new_nodes = {n.id: n for n in new.nodes}

    for node_id, node in new_nodes.items():
        before = old_nodes.get(node_id)
        if before is None:
            events.append(NodeAdded(node))
        elif before.online and node.health == FAILED:
            events.append(NodeFailed(node))
        elif before.health == FAILED and node.online:
            events.append(NodeRecovered(node))
    events.extend(NodeRemoved(n) for i, n in old_nodes.items() if i not in new_nodes)

    old_owner, new_owner = _slot_owners(old), _slot_owners(new)
    changed = (
        (slot, a, b) for slot, (a, b) in enumerate(zip(old_owner, new_owner, strict=True)) if a != b
    )
    groups = _group(changed) if old_owner != new_owner else {}
    queue_slots = [(q, keyslot(q)) for q in sorted(set(queues))] if groups else []
    promoted: set[tuple[str, str]] = set()
    for (old_id, new_id), ranges in groups.items():
        affected = tuple(q for q, s in queue_slots if _in_ranges(s, ranges))
        before = old_nodes.get(old_id) if old_id else None
        after = new_nodes.get(new_id) if new_id else None
        was_replica = (
            old_id is not None
            and new_id is not None
            and old_nodes.get(new_id) is not None
            and old_nodes[new_id].master_id == old_id
        )
        if before is not None and after is not None and was_replica:
            old_now = _state_of(new_nodes.get(old_id or ""))
            events.append(MasterChanged(tuple(ranges), affected, before, after, old_now))
            promoted.add((old_id or "", new_id or ""))
        else:
            events.append(SlotsMoved(tuple(ranges), affected, before, after))

    for node_id, node in new_nodes.items():
        before = old_nodes.get(node_id)
        if (
            node.role == "replica"
            and node.master_id
            and (before is None or before.role != "replica" or before.master_id != node.master_id)
        ):
            events.append(ReplicaAdded(new_nodes.get(node.master_id), node))
    for node_id, before in old_nodes.items():
        if before.role != "replica" or not before.master_id:
            continue
        after = new_nodes.get(node_id)
        if after is not None and after.role == "replica" and after.master_id == before.master_id:
            continue
        if (before.master_id, node_id) in promoted:
            continue  # explained by MasterChanged
        events.append(ReplicaRemoved(old_nodes.get(before.master_id), before))
    return events
