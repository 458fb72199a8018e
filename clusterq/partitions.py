"""Partitioned queues: one logical queue spread over many slots, and so over the masters.

A plain queue lives in one slot (its hash tag), so one master carries all of it. A
partitioned queue ``clicks`` with 12 partitions is 12 ordinary queues (``clicks~0of12.41``
...), each with its own hash tag, chosen so that partition ``i`` hashes to a slot near
``(i + 0.5) * 16384 / 12``: spread evenly over the slot space, they spread over the
masters under any even split of the slots, whatever the number of masters.

The declaration (the :class:`Layout`) is stored in the cluster, one JSON value per
logical queue in the hash ``<prefix>:layouts``, so every producer and worker agrees.
Producers cache it for :data:`LAYOUT_TTL`; workers re-read it as often.

- A task with a ``key`` goes to partition ``crc32(key) % n`` (same key, same partition);
  a unique task without a key goes by its payload's digest (so uniqueness holds over the
  whole logical queue); other tasks take the partitions in turn.
- A worker serving ``clicks`` fetches from every *member* of the layout: the current
  partitions, the partitions of earlier layouts that still drain, and the plain queue
  ``clicks`` itself (where a producer that had not yet read the declaration sent).
- Changing the partition count writes a new layout (version + 1): new tasks go to the
  new partitions, the old ones become *draining*. A worker retires a draining partition
  (removes it from the layout) once it is empty and :data:`RETIRE_GRACE` has passed since
  the change, longer than any producer keeps an old layout.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import time
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from clusterq.errors import ConfigError, InvalidName
from clusterq.keys import MAX_QUEUE_NAME_LENGTH, validate_queue_name
from clusterq.slots import SLOT_COUNT, keyslot

log = logging.getLogger("clusterq.partitions")

MAX_PARTITIONS = 256
#: Seconds a producer or worker keeps a layout before reading it again.
LAYOUT_TTL = 5.0
#: Seconds after a change before an emptied old partition may be retired.
RETIRE_GRACE = 30.0
#: Compare-and-set attempts of a declaration before giving up (others kept changing it).
DECLARE_ATTEMPTS = 10
#: Characters the partitions' names add to the logical name (``~255of256.999999``).
_SUFFIX_ROOM = 20
PARTITION_MARK = "~"


def partition_name(name: str, index: int, count: int) -> str:
    """The name of partition ``index`` of ``count``: its hash tag lands near the middle
    of the ``index``-th of ``count`` equal stretches of the slot space."""
    step = SLOT_COUNT / count
    target = int((index + 0.5) * step)
    tolerance = max(1, int(step / 8))
    best: tuple[int, str] | None = None
    for k in itertools.count():
        candidate = f"{name}{PARTITION_MARK}{index}of{count}.{k}"
        distance = abs(keyslot(candidate) - target)
        if distance <= tolerance:
            return candidate
        if best is None or distance < best[0]:
            best = (distance, candidate)
        if k >= 200_000:  # never reached for count <= MAX_PARTITIONS: a closer one exists
            return best[1]
    raise AssertionError("unreachable")


@functools.lru_cache(maxsize=256, typed=True)
def partition_names(name: str, count: int) -> tuple[str, ...]:
    """The ``count`` partitions of logical queue ``name`` (deterministic)."""
    check_partitions(name, count)
    if count == 1:
        return (name,)
    return tuple(partition_name(name, i, count) for i in range(count))


def check_plain_name(name: str) -> str:
    """A queue name given by a user (to enqueue into, to declare): not a partition's
    name, which only the partitioned queue's declaration chooses."""
    if PARTITION_MARK in name:
        base = name.partition(PARTITION_MARK)[0]
        raise InvalidName(
            f"invalid queue name {name!r}: {PARTITION_MARK!r} marks the partitions of a "
            f"partitioned queue (enqueue into {base!r}: its declaration picks the partition)"
        )
    return name


def check_partitions(name: str, count: object) -> int:
    validate_queue_name(name)
    if PARTITION_MARK in name:
        raise InvalidName(
            f"invalid partitioned queue name {name!r}: must not contain "
            f"{PARTITION_MARK!r} (it marks the partitions' names)"
        )
    if len(name) > MAX_QUEUE_NAME_LENGTH - _SUFFIX_ROOM:
        raise InvalidName(
            f"invalid partitioned queue name {name[:20]!r}...: at most "
            f"{MAX_QUEUE_NAME_LENGTH - _SUFFIX_ROOM} characters (the partitions add a suffix)"
        )
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_PARTITIONS:
        raise ValueError(f"partitions must be an integer from 1 to {MAX_PARTITIONS}, got {count!r}")
    return count


def partition_of(key: str | bytes, count: int) -> int:
    """The partition (0..count-1) of a task ``key``: CRC-32 of its UTF-8 bytes, mod count
    (the same in every process and language, unlike Python's ``hash``)."""
    data = key.encode("utf-8") if isinstance(key, str) else key
    return zlib.crc32(data) % count


@dataclass
class Layout:
    """The declaration of one partitioned queue."""

    name: str
    #: The current partitions: partition i is ``queues[i]``.
    queues: tuple[str, ...]
    #: Partitions of earlier layouts, served until they are empty and retired.
    draining: tuple[str, ...] = ()
    version: int = 1
    #: When (ms since the epoch) this layout was written.
    changed_ms: int = 0
    _turn: itertools.count[int] = field(default_factory=itertools.count, repr=False, compare=False)

    @property
    def partitions(self) -> int:
        return len(self.queues)

    @property
    def members(self) -> tuple[str, ...]:
        """Every queue a worker of this logical queue fetches from: the partitions, the
        draining ones, and the plain queue of the logical name."""
        return tuple(dict.fromkeys((*self.queues, *self.draining, self.name)))

    def pick(self, key: str | bytes | None = None) -> str:
        """The partition a task goes to: by ``key`` if given, else the next in turn."""
        if len(self.queues) == 1:
            return self.queues[0]
        if key is not None:
            return self.queues[partition_of(key, len(self.queues))]
        return self.queues[next(self._turn) % len(self.queues)]

    def to_json(self) -> str:
        return json.dumps(
            {
                "name": self.name,
                "partitions": self.partitions,
                "queues": list(self.queues),
                "draining": list(self.draining),
                "version": self.version,
                "changed_ms": self.changed_ms,
            },
            separators=(",", ":"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "partitions": self.partitions,
            "queues": list(self.queues),
            "draining": list(self.draining),
            "version": self.version,
            "changed": self.changed_ms / 1000.0,
        }

    @classmethod
    def from_json(cls, raw: str | bytes) -> Layout:
        try:
            data = json.loads(raw)
            layout = cls(
                name=validate_queue_name(data["name"]),
                queues=tuple(validate_queue_name(q) for q in data["queues"]),
                draining=tuple(validate_queue_name(q) for q in data.get("draining", ())),
                version=int(data["version"]),
                changed_ms=int(data.get("changed_ms", 0)),
            )
        except (ValueError, KeyError, TypeError, InvalidName) as exc:
            raise ConfigError(
                f"unreadable partitioned-queue declaration {raw!r:.200}: {exc}"
            ) from exc
        if not layout.queues:
            raise ConfigError(f"partitioned-queue declaration of {layout.name!r} has no partitions")
        return layout


def read_layout(raw: str | bytes | None) -> Layout | None:
    """The stored declaration (an HGET reply), or None."""
    return None if raw is None else Layout.from_json(raw)


def relayout(current: Layout | None, name: str, count: int, now_ms: int) -> Layout | None:
    """The layout that declares ``name`` with ``count`` partitions, given the stored one;
    None when ``current`` already has them."""
    queues = partition_names(name, count)
    if current is not None and current.queues == queues:
        return None
    draining: tuple[str, ...] = ()
    version = 1
    if current is not None:
        version = current.version + 1
        draining = tuple(
            q for q in dict.fromkeys((*current.draining, *current.queues))
            if q not in queues and q != name
        )  # fmt: skip
    return Layout(name, queues, draining, version, now_ms)


def without(layout: Layout, retired: Iterable[str], now_ms: int) -> Layout:
    """``layout`` with the draining partitions ``retired`` removed (version + 1)."""
    gone = set(retired)
    return replace(
        layout,
        draining=tuple(q for q in layout.draining if q not in gone),
        version=layout.version + 1,
        changed_ms=now_ms,
        _turn=itertools.count(),
    )


def parse_layouts(entries: Mapping[Any, Any]) -> dict[str, Layout]:
    """The layouts in the hash ``<prefix>:layouts`` (unreadable entries are left out)."""
    out: dict[str, Layout] = {}
    for raw_name, raw in entries.items():
        name = raw_name.decode() if isinstance(raw_name, bytes) else str(raw_name)
        try:
            layout = Layout.from_json(raw)
        except ConfigError as exc:
            _warn_once(name, raw, f"partitioned queue {name!r}: declaration skipped: {exc}")
            continue
        if layout.name == name:
            out[name] = layout
        else:
            _warn_once(
                name, raw, f"partitioned queue {name!r}: declaration names {layout.name!r}; skipped"
            )
    return out


#: The unreadable declarations said already (name, stored value): each is logged once
#: per process, not at every read (every few seconds, by every worker and command).
_SAID: set[tuple[str, Any]] = set()


def _warn_once(name: str, raw: Any, message: str) -> None:
    key = (name, raw if isinstance(raw, bytes | str) else repr(raw))
    if key in _SAID:
        return
    if len(_SAID) > 1000:
        _SAID.clear()
    _SAID.add(key)
    log.warning("%s", message)


def partition_marks(
    layouts: Iterable[Layout], chosen: set[str], *, every: bool
) -> dict[str, dict[str, Any]]:
    """For a listing of the queues in ``chosen``: adds the members of the partitioned
    queues listed (of every one with ``every``) to ``chosen``, and returns the fields that
    mark each (``partitions`` on the logical queue; ``partition_of``, ``partition`` on a
    partition, ``partition`` None while it drains)."""
    marks: dict[str, dict[str, Any]] = {}
    for layout in layouts:
        if not every and layout.name not in chosen:
            continue
        chosen.update(layout.members)
        marks[layout.name] = {"partitions": layout.partitions}
        for member in layout.members:
            if member != layout.name:
                index = layout.queues.index(member) if member in layout.queues else None
                marks[member] = {"partition_of": layout.name, "partition": index}
    return marks


class Layouts:
    """A producer's or worker's cache of the declarations (no I/O: the clients load it)."""

    def __init__(self, ttl: float = LAYOUT_TTL) -> None:
        self.ttl = ttl
        self.by_name: dict[str, Layout] = {}
        self.loaded_at: float | None = None
        self.retry_at = 0.0

    def due(self) -> bool:
        """True when the cache should be (re)loaded before the next enqueue."""
        now = time.monotonic()
        if self.loaded_at is None:
            return now >= self.retry_at
        return now - self.loaded_at >= self.ttl and now >= self.retry_at

    def loaded(self, entries: Mapping[Any, Any]) -> bool:
        """Take a fresh read; True when some layout changed."""
        fresh = parse_layouts(entries)
        changed = {n: lay.version for n, lay in fresh.items()} != {
            n: lay.version for n, lay in self.by_name.items()
        }
        if changed:
            # Keep each unchanged layout's turn counter (so the spread stays even).
            for n, lay in fresh.items():
                old = self.by_name.get(n)
                if old is not None and old.version == lay.version:
                    fresh[n] = old
            self.by_name = fresh
        self.loaded_at = time.monotonic()
        return changed

    def failed(self, holdoff: float) -> None:
        """A load failed: keep what we have, try again after ``holdoff`` seconds."""
        self.retry_at = time.monotonic() + holdoff

    def put(self, layout: Layout) -> None:
        self.by_name[layout.name] = layout

    def get(self, name: str) -> Layout | None:
        return self.by_name.get(name)

    def members(self, name: str) -> tuple[str, ...]:
        """The queues behind ``name``: a layout's members, or ``(name,)``."""
        layout = self.by_name.get(name)
        return layout.members if layout is not None else (name,)
