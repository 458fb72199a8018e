"""What ``clusterq stream ls | inspect`` show: each stream partition's node, length and
dead letters, and per consumer group its consumers, pending events and lag."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import redis

from clusterq.cluster.backend import Backend
from clusterq.errors import ClusterqError, ConfigError
from clusterq.serialization import reply_text
from clusterq.streams import StreamLayout, trimmed_unread


@dataclass(frozen=True)
class StreamGroupInfo:
    """One consumer group on one stream partition."""

    group: str
    consumers: int
    #: Delivered and not yet acked.
    pending: int
    #: Events not yet delivered to the group (None when the server cannot tell).
    lag: int | None
    last_delivered: str
    #: Events trimmed before the group read them.
    trimmed_unread: int = 0


@dataclass(frozen=True)
class StreamPartitionInfo:
    """One partition of a stream: where it lives, its length, its groups."""

    stream: str
    partition: int
    name: str
    keyslot: int
    master: str | None
    replicas: list[str] = field(default_factory=list)
    length: int = 0
    #: Events in the partition's dead-letter stream.
    dead: int = 0
    groups: list[StreamGroupInfo] = field(default_factory=list)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def read_stream_layouts(backend: Backend, timeout: float) -> dict[str, StreamLayout]:
    """Every declared stream, by name (unreadable declarations left out)."""
    key = backend.keys.streams
    entries = backend.execute_key(key, lambda c: c.hgetall(key), timeout=timeout)
    out = {}
    for raw in entries.values():
        try:
            layout = StreamLayout.from_json(raw)
        except ConfigError:
            continue
        out[layout.name] = layout
    return dict(sorted(out.items()))


def stream_partitions(
    backend: Backend, names: Iterable[str] | None, timeout: float
) -> list[StreamPartitionInfo]:
    """One :class:`StreamPartitionInfo` per partition of each stream (or of ``names``)."""
    layouts = read_stream_layouts(backend, timeout)
    chosen = list(layouts) if names is None else list(names)
    out = []
    for name in chosen:
        layout = layouts.get(name)
        if layout is None:
            raise ConfigError(f"stream {name!r} is not declared")
        out += [partition_info(backend, layout, i, timeout) for i in range(len(layout.partitions))]
    return out


def partition_info(
    backend: Backend, layout: StreamLayout, index: int, timeout: float
) -> StreamPartitionInfo:
    """Where one partition lives, its length, dead letters and groups."""
    partition = layout.partitions[index]
    sk = backend.keys.stream(partition)
    location = backend.topology.locate(partition)
    where: dict[str, Any] = {
        "stream": layout.name,
        "partition": index,
        "name": partition,
        "keyslot": sk.slot,
        "master": location.master.addr if location.master else None,
        "replicas": [r.addr for r in location.replicas],
    }

    def read(client: redis.Redis) -> list[Any]:
        pipe = client.pipeline(transaction=False)
        pipe.xlen(sk.events)
        pipe.xlen(sk.dead)
        pipe.xinfo_groups(sk.events)
        pipe.xinfo_stream(sk.events)
        return pipe.execute(raise_on_error=False)

    try:
        length, dead, groups, info = backend.execute(sk.slot, read, timeout=timeout)
    except (ClusterqError, redis.RedisError) as exc:
        return StreamPartitionInfo(**where, error=str(exc))
    if isinstance(groups, Exception) or isinstance(info, Exception):
        groups, info = [], {}  # no stream yet (nothing published, no group)
    return StreamPartitionInfo(
        **where,
        length=int(length) if not isinstance(length, Exception) else 0,
        dead=int(dead) if not isinstance(dead, Exception) else 0,
        groups=[
            StreamGroupInfo(
                group=reply_text(g["name"]),
                consumers=int(g["consumers"]),
                pending=int(g["pending"]),
                lag=int(g["lag"]) if g.get("lag") is not None else None,
                last_delivered=reply_text(g["last-delivered-id"]),
                trimmed_unread=trimmed_unread(info, [g], reply_text(g["name"])),
            )
            for g in groups
        ],
    )
