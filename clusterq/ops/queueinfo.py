"""What ``clusterq queue ls``, ``queue inspect`` and ``stats`` show of queues: one
queue's row (sizes per state, counters, latency, where it lives, its limits and the
limiter's state), the sums per master, per-minute history, and how a row is read in one
round trip. A key holding what clusterq does not write is that row's ``error``, naming
the key; the other rows render.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from clusterq.keys import QueueKeys
from clusterq.limits import Limits, text_fields
from clusterq.serialization import json_value

#: Minutes of per-minute history a queue keeps (``HISTORY_MINUTES`` in ``_prelude.lua``).
HISTORY_MINUTES = 360


@dataclass(frozen=True)
class QueueInfo:
    """A queue's location in the cluster and the number of tasks in each state."""

    queue: str
    keyslot: int
    master: str | None
    master_id: str | None
    replicas: list[str] = field(default_factory=list)
    pending: int = 0
    scheduled: int = 0
    retry: int = 0
    active: int = 0
    archived: int = 0
    completed: int = 0
    paused: bool = False
    #: Tasks acknowledged / failed attempts, since the queue was first used.
    processed: int = 0
    failed: int = 0
    #: Seconds since the oldest pending task was enqueued (0 with nothing pending).
    latency: float = 0.0
    error: str | None = None
    #: A partition: the partitioned queue it belongs to, and its index in the current
    #: layout (None while it drains after a change of the partition count).
    partition_of: str | None = None
    partition: int | None = None
    #: A partitioned queue's own name: its number of partitions (0 for a plain queue).
    partitions: int = 0
    #: The limits declared on the queue (a partition: on its partitioned queue); None:
    #: none (see :mod:`clusterq.limits`).
    limits: Limits | None = None
    #: The concurrency cap this queue enforces against its ``active`` count (a
    #: partition: its share of the declared cap); None: no cap.
    concurrency_cap: int | None = None
    #: Unix time (s) until which nothing of the queue starts (a handler's
    #: ``RateLimited(..., scope="queue")``); None: no hold in force when read.
    hold_until: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["limits"] = self.limits.as_dict() if self.limits is not None else None
        return out

    @property
    def size(self) -> int:
        """Tasks in the queue, completed ones aside."""
        return self.pending + self.scheduled + self.retry + self.active + self.archived


@dataclass(frozen=True)
class NodeTotals:
    """The sums over the queues one master owns."""

    master: str
    queues: int = 0
    pending: int = 0
    active: int = 0
    scheduled: int = 0
    retry: int = 0
    archived: int = 0
    processed: int = 0
    failed: int = 0
    #: The highest latency among its queues.
    latency: float = 0.0


@dataclass(frozen=True)
class Summary:
    """``clusterq stats``: per master, per queue, and the workers."""

    nodes: list[NodeTotals]
    queues: list[QueueInfo]
    workers: int
    running: int
    concurrency: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "nodes": [asdict(n) for n in self.nodes],
            "queues": [q.to_dict() for q in self.queues],
            "workers": self.workers,
            "running": self.running,
            "concurrency": self.concurrency,
        }


@dataclass(frozen=True)
class Minute:
    """Counts of one minute of a queue's history."""

    at: float
    processed: int
    failed: int


@dataclass(frozen=True)
class QueueDetail:
    """:class:`QueueInfo` and what ``queue inspect`` adds: memory, history, task types."""

    info: QueueInfo
    #: Bytes used by the queue's keys (``MEMORY USAGE``, sampled), None if not allowed.
    memory: int | None
    #: Per minute, oldest first, minutes without activity left out.
    history: list[Minute]
    #: Tasks per type (completed aside), when asked for.
    types: dict[str, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = self.info.to_dict()
        out["memory"] = self.memory
        out["history"] = [asdict(m) for m in self.history]
        out["types"] = self.types
        return out


def history_from_stats(fields: dict[Any, Any], now: float) -> list[Minute]:
    """The per-minute counters of a stats hash (fields ``p:<minute>``/``f:<minute>``)
    within the last :data:`HISTORY_MINUTES`, oldest first."""
    oldest = int(now // 60) - HISTORY_MINUTES
    minutes: dict[int, list[int]] = {}
    for key, value in fields.items():
        name = key.decode(errors="replace") if isinstance(key, bytes) else str(key)
        kind, _, minute = name.partition(":")
        if kind not in ("p", "f") or not minute.isdigit() or int(minute) <= oldest:
            continue
        counts = minutes.setdefault(int(minute), [0, 0])
        try:
            counts[0 if kind == "p" else 1] += int(value)
        except ValueError:
            continue
    return [Minute(at=m * 60.0, processed=p, failed=f) for m, (p, f) in sorted(minutes.items())]


#: The sizes a queue's row shows: (field, key attribute, command).
_SIZES = (
    ("pending", "pending", "LLEN"),
    ("scheduled", "scheduled", "ZCARD"),
    ("retry", "retry", "ZCARD"),
    ("active", "active", "ZCARD"),
    ("archived", "archived", "ZCARD"),
    ("completed", "completed", "ZCARD"),
)


def count_commands(qk: QueueKeys) -> list[tuple[Any, ...]]:
    """What one queue's row reads, in one round trip: sizes, paused, counters, the
    limits hash, the tasks waiting in fair groups (how many, and the first), and the
    oldest pending id (last)."""
    commands: list[tuple[Any, ...]] = [(verb, getattr(qk, key)) for _, key, verb in _SIZES]
    return [
        *commands,
        ("EXISTS", qk.paused),
        ("HMGET", qk.stats, "processed", "failed"),
        ("HGETALL", qk.limits),
        ("ZCARD", qk.fair),
        ("ZRANGE", qk.fair, 0, 0),
        ("LINDEX", qk.pending, -1),
    ]


def read_counts(
    qk: QueueKeys, values: list[Any], *, now: float | None = None
) -> tuple[dict[str, Any], list[str]]:
    """The row's fields from the replies to :func:`count_commands`, and the problems met
    (each naming its key): a key of another type, a counter that is not an integer, a
    limits hash whose fields are not what clusterq writes. ``now``: the time a hold is
    compared with (default: the local clock)."""
    problems: list[str] = []

    def read(index: int, key: str) -> Any:
        value = values[index]
        if isinstance(value, Exception):
            problems.append(f"{key}: {value}")
            return None
        return value

    fields: dict[str, Any] = {
        field: int(read(i, getattr(qk, key)) or 0) for i, (field, key, _) in enumerate(_SIZES)
    }
    fields["paused"] = bool(read(len(_SIZES), qk.paused))
    counters = read(len(_SIZES) + 1, qk.stats) or [None, None]
    for name, value in zip(("processed", "failed"), counters, strict=True):
        fields[name] = _counter(qk.stats, name, value, problems)
    limits = read(len(_SIZES) + 2, qk.limits)
    at = time.time() if now is None else now
    fields.update(read_limits(qk.limits, limits or {}, at, problems))
    fields["pending"] += int(read(len(_SIZES) + 3, qk.fair) or 0)
    fields["latency"] = 0.0
    return fields, problems


#: Fields of a limits hash that hold numbers (see :mod:`clusterq.limits`).
_NUMBERS = ("interval", "burst", "concurrency", "tat", "hold")


def read_limits(key: str, raw: Any, now: float, problems: list[str]) -> dict[str, Any]:
    """The row's ``limits``, ``concurrency_cap`` and ``hold_until`` from a limits hash as
    ``HGETALL`` returns it (a mapping, or a flat list of fields and values); a field
    clusterq reads that does not hold what it writes is named in ``problems`` (fields it
    does not read are left alone, as the scripts leave them)."""
    fields = text_fields(raw)
    numbers: dict[str, float] = {}
    for name in _NUMBERS:
        if name not in fields:
            continue
        try:
            number = float(fields[name])
        except ValueError:
            number = math.nan
        if math.isfinite(number):
            numbers[name] = number
        else:
            problems.append(f"{key}: field {name!r} is not a number ({fields[name][:40]!r})")
    limits = Limits.from_fields(fields)
    if limits is None and fields.get("spec"):
        shown = fields["spec"][:40]
        problems.append(f"{key}: field 'spec' is not a limits declaration ({shown!r})")
    cap = numbers.get("concurrency")
    hold = numbers.get("hold")
    return {
        "limits": limits,
        "concurrency_cap": int(cap) if cap is not None else None,
        "hold_until": hold / 1000.0 if hold is not None and hold / 1000.0 > now else None,
    }


def compact_limits(limits: Limits | None) -> str:
    """A queue's limits in a table cell: ``200/s b20 · max 5``, with those of each fair
    group after them (``· per group 5/s b1 · max 2/group``), and how many types have a
    rate or a cap (``· 2 type rates · 1 type cap``); ``-`` without limits."""
    if limits is None or limits.empty:
        return "-"
    parts = []
    if limits.rate is not None:
        parts.append(f"{limits.rate.text} b{limits.effective_burst}")
    if limits.concurrency is not None:
        parts.append(f"max {limits.concurrency}")
    if limits.rate_per_group is not None:
        parts.append(f"per group {limits.rate_per_group.text} b{limits.group_burst}")
    if limits.concurrency_per_group is not None:
        parts.append(f"max {limits.concurrency_per_group}/group")
    if limits.type_rates:
        parts.append(
            f"{len(limits.type_rates)} type rate{'s' if len(limits.type_rates) > 1 else ''}"
        )
    if limits.type_caps:
        parts.append(f"{len(limits.type_caps)} type cap{'s' if len(limits.type_caps) > 1 else ''}")
    return " · ".join(parts)


def _counter(key: str, field: str, value: Any, problems: list[str]) -> int:
    """A counter of a stats hash (0 if absent); one that is not an integer is named in
    ``problems`` and counted as 0."""
    if value is None:
        return 0
    try:
        return int(value)
    except (TypeError, ValueError):
        shown = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
        problems.append(f"{key}: field {field!r} is not an integer ({shown[:40]!r})")
        return 0


def stored_meta(raw: Any) -> dict[str, Any]:
    """The meta object of a stored record, or {} for one that is not readable."""
    if not isinstance(raw, bytes):
        return {}
    try:
        meta = json_value(raw.partition(b"\n")[0])
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}
