"""Event streams: Redis Streams with consumer groups, partitioned over the masters.

A stream ``orders`` with 6 partitions is 6 Redis streams, one per partition, each under
its own hash tag chosen like a partitioned queue's (:func:`~clusterq.partitions.partition_names`),
so the partitions spread over the masters. The declaration (a :class:`StreamLayout`) is
stored in the hash ``<prefix>:streams``.

- ``publish(stream, payload, key=...)``: ``XADD`` on the key's partition (no key: the
  partitions in turn), trimmed with ``MAXLEN ~`` when the stream has a ``maxlen``.
- Consumers are declared on the router (``@router.consumer("orders", group="billing")``)
  and run inside ``clusterq worker``: every group receives every event; within a group
  each event goes to one consumer and is ``XACK``-ed after its handler returns.
- Events of a consumer that died (pending longer than the lease) are claimed by a live one;
  an event delivered ``max_deliveries`` times without success goes to the partition's
  dead-letter stream (``<stream key>:dead``).
- ``ordered=True``: each partition is owned by one consumer of the group at a time (a
  lease with a fencing token), which handles its events one by one in stream order, so
  events with the same key are handled in publish order; ownership is rebalanced when
  consumers join or leave.

The number of partitions of a stream is fixed when it is declared: moving events between
partitions would break the per-key order, so a different count is refused (declare a new
stream instead).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from clusterq.errors import ConfigError, InvalidName
from clusterq.keys import KeySchema, validate_queue_name
from clusterq.partitions import check_partitions, partition_names, partition_of
from clusterq.serialization import get_codec, json_bytes, reply_text, too_large

#: Field names of a published event: its key (may be absent) and its JSON payload.
KEY_FIELD = b"k"
DATA_FIELD = b"d"
HEADERS_FIELD = b"h"
DEFAULT_MAX_DELIVERIES = 5


def validate_group(group: object) -> str:
    """A consumer group name: a valid queue-like name (printable, no braces)."""
    try:
        return validate_queue_name(group)
    except InvalidName as exc:
        raise InvalidName(str(exc).replace("queue name", "consumer group name")) from None


@dataclass
class StreamLayout:
    """The declaration of one stream: its partitions (Redis streams) and trimming."""

    name: str
    partitions: tuple[str, ...]
    #: Approximate length each partition is trimmed to on publish (None: never trimmed).
    maxlen: int | None = None
    version: int = 1
    _turn: int = field(default=0, repr=False, compare=False)

    def pick(self, key: str | bytes | None = None) -> int:
        """The partition (index) of an event: by ``key``, else the next in turn."""
        if key is not None:
            return partition_of(key, len(self.partitions))
        self._turn += 1
        return (self._turn - 1) % len(self.partitions)

    def to_json(self) -> str:
        return json.dumps(
            {
                "name": self.name,
                "partitions": list(self.partitions),
                "maxlen": self.maxlen,
                "version": self.version,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> StreamLayout:
        try:
            data = json.loads(raw)
            maxlen = data.get("maxlen")
            layout = cls(
                name=validate_queue_name(data["name"]),
                partitions=tuple(validate_queue_name(p) for p in data["partitions"]),
                maxlen=int(maxlen) if maxlen is not None else None,
                version=int(data.get("version", 1)),
            )
        except (ValueError, KeyError, TypeError, InvalidName) as exc:
            raise ConfigError(f"unreadable stream declaration {raw!r:.200}: {exc}") from exc
        if not layout.partitions:
            raise ConfigError(f"stream declaration of {layout.name!r} has no partitions")
        return layout


def stream_layout(name: str, partitions: int, maxlen: int | None) -> StreamLayout:
    """The declaration of a new stream (partition names as for a partitioned queue)."""
    check_partitions(name, partitions)
    if maxlen is not None and (isinstance(maxlen, bool) or not isinstance(maxlen, int)
                               or maxlen < 1):  # fmt: skip
        raise ValueError(f"maxlen must be a positive integer or None, got {maxlen!r}")
    return StreamLayout(name, partition_names(name, partitions), maxlen)


def redeclare(stored: StreamLayout | None, wanted: StreamLayout) -> StreamLayout | None:
    """What to store for ``wanted`` given the stored declaration: None when nothing
    changes. The partition count cannot change (events with a key would change order)."""
    if stored is None:
        return wanted
    if stored.partitions != wanted.partitions:
        raise ConfigError(
            f"stream {wanted.name!r} has {len(stored.partitions)} partitions; its partition "
            "count cannot change (events with a key would change order): declare a new stream"
        )
    if stored.maxlen == wanted.maxlen:
        return None
    return StreamLayout(wanted.name, wanted.partitions, wanted.maxlen, stored.version + 1)


def read_stream_layout(name: str, raw: str | bytes | None) -> StreamLayout:
    """The stored declaration of ``name`` (an HGET reply); ConfigError when there is none."""
    if raw is None:
        raise ConfigError(f"stream {name!r} is not declared: call declare_stream() first")
    return StreamLayout.from_json(raw)


@dataclass(frozen=True)
class Event:
    """One event as a consumer's handler gets it."""

    stream: str
    #: Index of the partition it was published to.
    partition: int
    id: str
    key: str | None
    payload: Any
    #: The consumer group handling it, and how many times the group delivered it: 1 the
    #: first time; more on a retry, or when a consumer that died had it (ordered groups
    #: too: the stream's delivery counter of the event, plus retries in place).
    group: str
    deliveries: int = 1
    #: The publisher's trace context, where it was traced (see :mod:`clusterq.tracing`).
    headers: Mapping[str, str] = field(default_factory=dict)


ConsumerHandler: TypeAlias = Callable[[Event], Any] | Callable[[Event], Coroutine[Any, Any, Any]]


@dataclass(frozen=True)
class ConsumerSpec:
    """A consumer declared on a router: ``@router.consumer(stream, group=...)``."""

    stream: str
    group: str
    handler: ConsumerHandler
    ordered: bool = False
    max_deliveries: int = DEFAULT_MAX_DELIVERIES

    @property
    def label(self) -> str:
        return f"{self.stream}:{self.group}"


def encode_event(payload: Any, key: str | None, headers: bytes | None = None) -> dict[bytes, bytes]:
    """The fields of a published event: its payload as JSON, by the rules of task
    payloads (no NaN or infinities, no lone surrogates, nothing JSON cannot hold, not
    nested deeper than can be read back: :class:`PayloadError`); never pickle.
    ``headers``: a JSON map of strings (the publisher's trace context)."""
    fields = {DATA_FIELD: get_codec("json").encode(payload)}
    if headers is not None:
        fields[HEADERS_FIELD] = headers
    if key is not None:
        if not isinstance(key, str):
            raise TypeError(f"key must be a string, got {key!r}")
        fields[KEY_FIELD] = key.encode()
    return fields


def decode_event(
    stream: str, partition: int, group: str, event_id: Any, fields: Mapping[Any, Any],
    deliveries: int = 1,
) -> Event:  # fmt: skip
    """An :class:`Event` from an XREADGROUP/XCLAIM entry; raises ValueError when the
    entry was not written by ``publish`` (its payload is not JSON)."""
    raw = {(k if isinstance(k, bytes) else str(k).encode()): v for k, v in fields.items()}
    data = raw.get(DATA_FIELD)
    if data is None:
        raise ValueError(f"event {event_id!r} has no {DATA_FIELD.decode()!r} field")
    key = raw.get(KEY_FIELD)
    headers = _headers(raw.get(HEADERS_FIELD))
    return Event(
        stream=stream,
        partition=partition,
        id=event_id.decode() if isinstance(event_id, bytes) else str(event_id),
        key=key.decode(errors="replace") if isinstance(key, bytes) else key,
        payload=json.loads(data),
        group=group,
        deliveries=deliveries,
        headers=headers,
    )


def _headers(raw: Any) -> dict[str, str]:
    """An event's headers; none where the field is absent or not a map of strings (a
    foreign writer's: the event is still handled)."""
    if raw is None:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        return {}
    return value


def xadd_command(
    layout: StreamLayout, partition_key: str, fields: Mapping[bytes, bytes]
) -> tuple[Any, ...]:
    """The XADD of one event into the partition whose events key is ``partition_key``."""
    trim: tuple[Any, ...] = ("MAXLEN", "~", layout.maxlen) if layout.maxlen else ()
    flat = [part for pair in fields.items() for part in pair]
    return ("XADD", partition_key, *trim, "*", *flat)


def plan_publish(
    layout: StreamLayout,
    keys: KeySchema,
    items: Iterable[tuple[Any, str | None]],
    max_bytes: int,
    headers: Mapping[str, str] | None = None,
) -> dict[int, list[tuple[int, int, tuple[Any, ...]]]]:
    """Per slot: (item index, partition, XADD) for each event, checked and encoded first
    (all or, on the first bad one, nothing). ``headers`` go with every event."""
    plan: dict[int, list[tuple[int, int, tuple[Any, ...]]]] = {}
    encoded = json_bytes(dict(headers)) if headers else None
    for index, (payload, key) in enumerate(items):
        fields = encode_event(payload, key, encoded)
        size = len(fields[DATA_FIELD])
        if size > max_bytes:
            raise too_large(size, max_bytes)
        partition = layout.pick(key)
        sk = keys.stream(layout.partitions[partition])
        plan.setdefault(sk.slot, []).append(
            (index, partition, xadd_command(layout, sk.events, fields))
        )
    return plan


@dataclass
class Published:
    """Where ``publish`` put an event: the stream, the partition and the event id."""

    stream: str
    partition: int
    id: str

    def to_dict(self) -> dict[str, Any]:
        return {"stream": self.stream, "partition": self.partition, "id": self.id}


def select_consumers(
    router: Any, chosen: Iterable[str | tuple[str, str]] | str | None
) -> list[ConsumerSpec]:
    """The router's consumers a worker runs: all by default; ``"none"`` for none; else
    the ``stream:group`` names given (each must be on the router)."""
    consumers: dict[str, ConsumerSpec] = router.consumers
    if chosen is None:
        return list(consumers.values())
    if isinstance(chosen, str):
        if chosen.strip().lower() == "none":
            return []
        pairs = parse_consumers(chosen) or []
    else:
        pairs = []
        for c in chosen:
            if isinstance(c, str):
                stream, _, group = c.partition(":")
                pairs.append((stream, group))
            else:
                pairs.append((c[0], c[1]))
    out = []
    for stream, group in pairs:
        spec = consumers.get(f"{stream}:{group}")
        if spec is None:
            known = ", ".join(consumers) or "none"
            raise ValueError(f"no consumer of {stream}:{group} on the router (it has: {known})")
        out.append(spec)
    return out


def parse_consumers(text: str | None) -> list[tuple[str, str]] | None:
    """``"orders:billing,orders:audit"`` -> [(stream, group), ...]; None stays None."""
    if text is None:
        return None
    out = []
    for part in text.split(","):
        stream, sep, group = part.strip().partition(":")
        if not sep or not stream or not group:
            raise ValueError(f"invalid consumer {part!r}: expected stream:group")
        out.append((validate_queue_name(stream), validate_group(group)))
    return out


def trimmed_unread(info: dict[Any, Any], groups: list[dict[Any, Any]], group: str) -> int:
    """From XINFO STREAM and XINFO GROUPS (Redis >= 7): how many events the stream lost
    to trimming before ``group`` read them (0 when none, or when the server cannot say).

    Visible while the group's last delivered id is older than the stream's first entry:
    its next read jumps over the gap (and Redis then counts the lost events as read)."""
    added, first = info.get("entries-added"), info.get("recorded-first-entry-id")
    if added is None or first is None:
        first_entry = info.get("first-entry")
        first = first_entry[0] if first_entry else None
    if added is None or first is None:
        return 0
    for g in groups:
        if reply_text(g.get("name")) == group:
            if stream_id(g.get("last-delivered-id", "0-0")) >= stream_id(first):
                return 0
            read = int(g.get("entries-read") or 0)
            return max(0, int(added) - int(info.get("length", 0)) - read)
    return 0


def stream_id(value: Any) -> tuple[int, int]:
    """A stream entry id as (ms, seq), for comparing."""
    ms, _, seq = reply_text(value).partition("-")
    return int(ms or 0), int(seq or 0)
