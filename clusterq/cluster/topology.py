"""The cluster map: slot ranges -> master and replicas; queue -> keyslot -> nodes.

A :class:`Topology` is an immutable snapshot read from one node with ``CLUSTER SHARDS``
(``CLUSTER NODES`` on servers that lack it). A standalone server gives a snapshot with
one node owning all 16384 slots, so callers never need a second code path.
:mod:`clusterq.cluster.changes` compares two snapshots.

Parsing is pure; :func:`fetch` and :func:`afetch` do the I/O.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

import redis
import redis.asyncio

from clusterq.cluster.connection import Addr, Mode, acommand, command, format_addr
from clusterq.keys import validate_queue_name
from clusterq.serialization import reply_text
from clusterq.slots import SLOT_COUNT, keyslot

Role = Literal["master", "replica"]
SlotRange = tuple[int, int]

ONLINE = "online"
FAILED = "failed"
LOADING = "loading"


@dataclass(frozen=True)
class NodeInfo:
    """One server as the cluster sees it."""

    id: str
    host: str
    port: int
    role: Role
    health: str = ONLINE
    replication_offset: int | None = None
    master_id: str | None = None
    #: The node's config epoch (``CLUSTER NODES`` only): of two nodes that claim the same
    #: slots, the one with the higher epoch won the last failover.
    config_epoch: int | None = None

    @property
    def address(self) -> Addr:
        return (self.host, self.port)

    @property
    def addr(self) -> str:
        return format_addr(self.address)

    @property
    def online(self) -> bool:
        return self.health == ONLINE

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "addr": self.addr,
            "role": self.role,
            "health": self.health,
            "replication_offset": self.replication_offset,
            "master_id": self.master_id,
            "config_epoch": self.config_epoch,
        }


@dataclass(frozen=True)
class Shard:
    """A master, its replicas, and the slot ranges the master owns."""

    slots: tuple[SlotRange, ...]
    master: NodeInfo
    replicas: tuple[NodeInfo, ...] = ()

    @property
    def slot_count(self) -> int:
        return sum(hi - lo + 1 for lo, hi in self.slots)

    def to_dict(self) -> dict[str, Any]:
        return {
            "slots": [list(r) for r in self.slots],
            "master": self.master.to_dict(),
            "replicas": [r.to_dict() for r in self.replicas],
        }


@dataclass(frozen=True)
class QueueLocation:
    """Where a queue lives: its keyslot and the nodes that hold that slot."""

    queue: str
    keyslot: int
    master: NodeInfo | None
    replicas: tuple[NodeInfo, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "queue": self.queue,
            "keyslot": self.keyslot,
            "master": self.master.addr if self.master else None,
            "master_id": self.master.id if self.master else None,
            "replicas": [r.addr for r in self.replicas],
        }


@dataclass(frozen=True)
class Topology:
    """An immutable snapshot of who owns which slots."""

    mode: Mode
    shards: tuple[Shard, ...]
    nodes: tuple[NodeInfo, ...]
    source: str = ""
    taken_at: float = field(default_factory=time.time, compare=False)

    @cached_property
    def _slot_owner(self) -> tuple[int, ...]:
        owner = [-1] * SLOT_COUNT
        for index, shard in enumerate(self.shards):
            for lo, hi in shard.slots:
                owner[lo : hi + 1] = [index] * (hi - lo + 1)
        return tuple(owner)

    @cached_property
    def _by_id(self) -> dict[str, NodeInfo]:
        return {node.id: node for node in self.nodes}

    def shard_for_slot(self, slot: int) -> Shard | None:
        if not 0 <= slot < SLOT_COUNT:
            raise ValueError(f"slot {slot} out of range 0..{SLOT_COUNT - 1}")
        index = self._slot_owner[slot]
        return self.shards[index] if index >= 0 else None

    def master_for_slot(self, slot: int) -> NodeInfo | None:
        shard = self.shard_for_slot(slot)
        return shard.master if shard else None

    def node(self, node_id: str) -> NodeInfo | None:
        return self._by_id.get(node_id)

    def node_at(self, addr: str) -> NodeInfo | None:
        for node in self.nodes:
            if node.addr == addr:
                return node
        return None

    @property
    def masters(self) -> tuple[NodeInfo, ...]:
        return tuple(shard.master for shard in self.shards)

    def locate_slot_replicas(self, slot: int) -> tuple[NodeInfo, ...]:
        """The replicas of the master that owns ``slot`` (none if no master owns it),
        whatever their health."""
        shard = self.shard_for_slot(slot)
        return shard.replicas if shard else ()

    def live_replicas(self, slot: int) -> tuple[NodeInfo, ...]:
        """The replicas of ``slot``'s master that are online: those that can confirm a
        write (a failed or loading replica is no replica)."""
        return tuple(r for r in self.locate_slot_replicas(slot) if r.online)

    @property
    def slots_covered(self) -> int:
        return sum(shard.slot_count for shard in self.shards)

    def locate(self, queue: str) -> QueueLocation:
        """Keyslot, master and replicas of ``queue`` (whose keys are tagged ``{queue}``)."""
        slot = keyslot(validate_queue_name(queue))
        shard = self.shard_for_slot(slot)
        if shard is None:
            return QueueLocation(queue, slot, None, ())
        return QueueLocation(queue, slot, shard.master, shard.replicas)

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "source": self.source,
            "taken_at": self.taken_at,
            "slots_covered": self.slots_covered,
            "shards": [s.to_dict() for s in self.shards],
            "nodes": [n.to_dict() for n in self.nodes],
        }


# --------------------------------------------------------------------------- parsing


def _as_mapping(value: Any) -> dict[str, Any]:
    """RESP2 gives flat [k, v, k, v] lists, RESP3/redis-py callbacks give dicts."""
    if isinstance(value, Mapping):
        return {reply_text(k): v for k, v in value.items()}
    items = list(value)
    return {reply_text(items[i]): items[i + 1] for i in range(0, len(items) - 1, 2)}


def _health(value: str) -> str:
    value = value.lower()
    if value in ("fail", "failed"):
        return FAILED
    return value or ONLINE


def _ranges(flat: Sequence[Any]) -> tuple[SlotRange, ...]:
    values = [int(v) for v in flat]
    return tuple(sorted((values[i], values[i + 1]) for i in range(0, len(values) - 1, 2)))


def _finish(
    mode: Mode, shards: Iterable[Shard], nodes: Iterable[NodeInfo], source: str
) -> Topology:
    owning = tuple(sorted((s for s in shards if s.slots), key=lambda s: s.slots[0]))
    unique: dict[str, NodeInfo] = {}
    for node in nodes:
        unique.setdefault(node.id, node)
    ordered = tuple(sorted(unique.values(), key=lambda n: (n.host, n.port)))
    return Topology(mode=mode, shards=owning, nodes=ordered, source=source)


def parse_cluster_shards(
    reply: Sequence[Any], source: str = "", nodes_text: str | None = None, *, tls: bool = False
) -> Topology:
    """Build a snapshot from a ``CLUSTER SHARDS`` reply (Redis >= 7.0, Valkey).

    A shard may list more than one node with ``role master``: Valkey 8 keeps a failed
    master in its shard, still called master, beside the replica that replaced it, and
    may list it first. The master of the shard is the one that serves its slots: see
    :func:`shard_master`. Masters that lost are kept as nodes (their health shows) but
    are neither the shard's master nor its replicas. ``nodes_text`` (the same node's
    ``CLUSTER NODES``) settles a tie that health cannot: :func:`shards_ambiguous` says
    when it is needed. ``tls``: the client connects with TLS, so each node's
    ``tls-port`` is the one to use where a node lists one.
    """
    owners = _slot_owner_ids(nodes_text) if nodes_text is not None else []
    epochs = _epochs(nodes_text) if nodes_text is not None else {}
    shards: list[Shard] = []
    nodes: list[NodeInfo] = []
    for raw_shard in reply:
        shard = _as_mapping(raw_shard)
        slots = _ranges(shard.get("slots", []))
        members = [
            node
            for node in (_shard_node(raw, epochs, tls) for raw in shard.get("nodes", []))
            if node
        ]
        master = shard_master(members, slots, owners)
        if master is None:
            nodes.extend(members)
            continue
        replicas = tuple(
            NodeInfo(
                r.id,
                r.host,
                r.port,
                "replica",
                r.health,
                r.replication_offset,
                master.id,
                r.config_epoch,
            )
            for r in members
            if r.role == "replica"
        )
        nodes.append(master)
        nodes.extend(replicas)
        nodes.extend(m for m in members if m.role == "master" and m.id != master.id)
        shards.append(Shard(slots=slots, master=master, replicas=replicas))
    return _finish("cluster", shards, nodes, source)


def _shard_node(raw: Any, epochs: Mapping[str, int], tls: bool = False) -> NodeInfo | None:
    entry = _as_mapping(raw)
    endpoint = reply_text(entry.get("endpoint") or "")
    # The endpoint the cluster prefers (ip, hostname: cluster-preferred-endpoint-type),
    # unless it says it has none ("?"); then its ip.
    host = endpoint if endpoint and endpoint != "?" else reply_text(entry.get("ip") or "")
    # A TLS client needs the TLS port; a node serving both lists both.
    first, second = ("tls-port", "port") if tls else ("port", "tls-port")
    port = entry.get(first) or entry.get(second)
    if not host or port is None:
        return None
    role: Role = (
        "master" if reply_text(entry.get("role", "")) in ("master", "primary") else "replica"
    )
    offset = entry.get("replication-offset")
    node_id = reply_text(entry.get("id", ""))
    return NodeInfo(
        id=node_id,
        host=host,
        port=int(port),
        role=role,
        health=_health(reply_text(entry.get("health", ONLINE))),
        replication_offset=int(offset) if offset is not None else None,
        config_epoch=epochs.get(node_id),
    )


def shard_master(
    members: Sequence[NodeInfo],
    slots: Sequence[SlotRange] = (),
    owners: Sequence[tuple[int, int, str]] = (),
) -> NodeInfo | None:
    """The node that serves a shard's slots, among the shard's ``members``.

    One master: that one (even failed: nobody else serves the slots yet). Several: the
    one the answering node's slot table names as owner of the shard's first slot range
    (``owners``, from ``CLUSTER NODES``), else the online ones before failed or
    unreachable ones, then the highest config epoch (the last failover's winner), then
    the highest replication offset. Never a failed master while another is online.
    """
    masters = [m for m in members if m.role == "master"]
    if len(masters) <= 1:
        return masters[0] if masters else None
    if owners and slots:
        first = slots[0][0]
        owner = next((node_id for lo, hi, node_id in owners if lo <= first <= hi), None)
        for master in masters:
            if master.id == owner:
                return master
    return max(
        masters,
        key=lambda m: (
            m.health == ONLINE,
            m.health != FAILED,
            m.config_epoch if m.config_epoch is not None else -1,
            m.replication_offset if m.replication_offset is not None else -1,
        ),
    )


def shards_ambiguous(reply: Sequence[Any]) -> bool:
    """Whether some shard of a ``CLUSTER SHARDS`` reply lists several masters of which
    not exactly one is online: health alone cannot tell which serves the slots, and the
    caller should read ``CLUSTER NODES`` too (its slot table and config epochs do)."""
    for raw_shard in reply:
        shard = _as_mapping(raw_shard)
        masters = [
            node
            for node in (_shard_node(raw, {}) for raw in shard.get("nodes", []))
            if node is not None and node.role == "master"
        ]
        if len(masters) > 1 and sum(1 for m in masters if m.online) != 1:
            return True
    return False


def _nodes_lines(text: str) -> Iterable[list[str]]:
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 8:
            yield fields


def _epochs(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for fields in _nodes_lines(text):
        if fields[6].isdigit():
            out[fields[0]] = int(fields[6])
    return out


def _node_slots(fields: Sequence[str]) -> tuple[SlotRange, ...]:
    slots: list[SlotRange] = []
    for token in fields[8:]:
        if token.startswith("["):
            continue  # a slot being migrated or imported
        lo, _, hi = token.partition("-")
        slots.append((int(lo), int(hi or lo)))
    return tuple(sorted(slots))


def _slot_owner_ids(text: str) -> list[tuple[int, int, str]]:
    """(first slot, last slot, owner's id) of every range in ``CLUSTER NODES`` text."""
    return [(lo, hi, fields[0]) for fields in _nodes_lines(text) for lo, hi in _node_slots(fields)]


def parse_cluster_nodes(text: str, source: str = "") -> Topology:
    """Build a snapshot from ``CLUSTER NODES`` text (any cluster-enabled server).

    The slot ranges on each line are the answering node's slot table, so a failed
    master that lost its slots lists none: the owner is never ambiguous here.
    """
    parsed: list[tuple[NodeInfo, tuple[SlotRange, ...]]] = []
    for fields in _nodes_lines(text):
        node_id, address, flags_text, master_field = fields[0], fields[1], fields[2], fields[3]
        flags = set(flags_text.split(","))
        if "handshake" in flags or "noaddr" in flags:
            continue
        hostport = address.split("@", 1)[0].split(",", 1)[0]
        host, _, port_text = hostport.rpartition(":")
        host = host.strip("[]")
        if not host or not port_text.isdigit():
            continue
        role: Role = "master" if "master" in flags else "replica"
        health = FAILED if "fail" in flags else ONLINE
        node = NodeInfo(
            id=node_id,
            host=host,
            port=int(port_text),
            role=role,
            health=health,
            master_id=None if master_field == "-" else master_field,
            config_epoch=int(fields[6]) if fields[6].isdigit() else None,
        )
        parsed.append((node, _node_slots(fields)))
    replicas_of: dict[str, list[NodeInfo]] = {}
    for node, _ in parsed:
        if node.role == "replica" and node.master_id:
            replicas_of.setdefault(node.master_id, []).append(node)
    shards = [
        Shard(slots=slots, master=node, replicas=tuple(replicas_of.get(node.id, ())))
        for node, slots in parsed
        if node.role == "master"
    ]
    return _finish("cluster", shards, (n for n, _ in parsed), source)


def parse_standalone(
    server: Mapping[str, Any], replication: Mapping[str, Any], addr: Addr
) -> Topology:
    """A standalone server owns every slot; its replicas come from ``INFO replication``."""
    offset = replication.get("master_repl_offset")
    master = NodeInfo(
        id=reply_text(server.get("run_id", format_addr(addr))),
        host=addr[0],
        port=addr[1],
        role="master",
        replication_offset=int(offset) if offset is not None else None,
    )
    replicas: list[NodeInfo] = []
    for key, value in replication.items():
        if not (key.startswith("slave") and key[5:].isdigit()):
            continue
        entry = value if isinstance(value, Mapping) else _parse_info_fields(reply_text(value))
        host, port = reply_text(entry.get("ip", "")), entry.get("port")
        if not host or port is None:
            continue
        state = reply_text(entry.get("state", "online"))
        replicas.append(
            NodeInfo(
                id=f"{host}:{port}",
                host=host,
                port=int(port),
                role="replica",
                health=ONLINE if state == "online" else LOADING,
                replication_offset=int(entry["offset"]) if "offset" in entry else None,
                master_id=master.id,
            )
        )
    shard = Shard(slots=((0, SLOT_COUNT - 1),), master=master, replicas=tuple(replicas))
    return _finish("standalone", [shard], [master, *replicas], format_addr(addr))


def _parse_info_fields(text: str) -> dict[str, str]:
    return dict(part.split("=", 1) for part in text.split(",") if "=" in part)


def _is_unknown_command(exc: redis.ResponseError) -> bool:
    text = str(exc).lower()
    return "unknown subcommand" in text or "unknown command" in text


# --------------------------------------------------------------------------- I/O


def fetch(client: redis.Redis, mode: Mode, addr: Addr, *, tls: bool = False) -> Topology:
    """Read a snapshot through ``client``, a client of the node at ``addr`` (``tls``: the
    client's connections use TLS, so nodes are reached on their TLS ports)."""
    source = format_addr(addr)
    if mode == "standalone":
        return parse_standalone(client.info("server"), client.info("replication"), addr)
    try:
        reply = command(client, "CLUSTER", "SHARDS")
    except redis.ResponseError as exc:
        if not _is_unknown_command(exc):
            raise
        return parse_cluster_nodes(reply_text(command(client, "CLUSTER", "NODES")), source)
    nodes_text = (
        reply_text(command(client, "CLUSTER", "NODES")) if shards_ambiguous(reply) else None
    )
    return parse_cluster_shards(reply, source, nodes_text, tls=tls)


async def afetch(
    client: redis.asyncio.Redis, mode: Mode, addr: Addr, *, tls: bool = False
) -> Topology:
    """Asynchronous :func:`fetch`."""
    source = format_addr(addr)
    if mode == "standalone":
        return parse_standalone(await client.info("server"), await client.info("replication"), addr)
    try:
        reply = await acommand(client, "CLUSTER", "SHARDS")
    except redis.ResponseError as exc:
        if not _is_unknown_command(exc):
            raise
        return parse_cluster_nodes(reply_text(await acommand(client, "CLUSTER", "NODES")), source)
    nodes_text = (
        reply_text(await acommand(client, "CLUSTER", "NODES")) if shards_ambiguous(reply) else None
    )
    return parse_cluster_shards(reply, source, nodes_text, tls=tls)
