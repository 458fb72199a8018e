"""Task lifecycle events: an opt-in, capped record of every task's transitions.

While a queue's events are on (:func:`set_events`: its ``evcfg`` key holds the cap), each
Lua script that changes a task's state appends an event per task to the queue's
``events`` stream, in the same call as the transition: the stream is exactly as durable
as the task's state (replicated the same way), and a transition never happens without
its event or the other way round. Off, the scripts' whole cost is one ``GET`` per call.

A call's events share one stream entry (up to 64 an entry; one ``XADD`` per call costs a
fraction of one per event), whose fields are ``worker`` (the worker's id where one is
involved: it started, finished or lost the tasks) and ``events``, a JSON array of
``[event, id, type, retries, state]`` arrays, with ``error`` after them for a failure and
the fraction last for ``progress``. ``event`` is below, ``id`` the task, ``retries`` the
retries so far (the attempt number is one more), ``state`` the task's state after the
event (``deleted`` for a task gone). The events' time is the entry's stream id's. Each
``XADD`` trims the stream with ``MAXLEN ~ cap / (the entry's events)``, so the stream keeps
about ``cap`` events when its entries are alike. Entries of one event in fields of their
own (``event``, ``id``, ``type``, ``retries``, ``worker``, ``state``, ``error``), as
written before, are read too.

========== =========================================== ==========================
event      when                                        script
========== =========================================== ==========================
enqueued   created (pending or scheduled)              push.lua, enqueue.lua
started    a worker took it (an attempt begins)        dequeue.lua
succeeded  its handler returned                        ack.lua
retried    its handler failed; it will run again       fail.lua
failed     its handler failed for the last time        fail.lua
recovered  its worker's lease expired; taken back      fail.lua (recovery)
requeued   a stopping worker handed it back            requeue.lua
archived   an operator archived it                     manage.lua
deleted    an operator deleted it                      manage.lua
run        an operator made it pending now             manage.lua
cancelled  an operator asked its worker to cancel it   manage.lua
========== =========================================== ==========================

A partitioned queue's partitions are queues of their own, each with its own stream in
its own slot: :func:`read` on the partitioned name reads them all, merged in time order
(the order of two events of one task is always kept: a task lives in one partition).
"""

from __future__ import annotations

import heapq
import json
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from clusterq.cluster.abackend import AsyncBackend
from clusterq.cluster.backend import Backend
from clusterq.errors import ClusterqError
from clusterq.keys import KeySchema
from clusterq.partitions import Layout

#: The cap of a queue's stream when none is given (entries, approximately: MAXLEN ~).
DEFAULT_MAXLEN = 10_000
#: The largest cap the scripts accept (nine digits).
MAX_MAXLEN = 999_999_999
#: Entries read per XRANGE/XREAD call.
PAGE = 500
#: The longest one blocking XREAD waits (s); kept well under the socket timeout.
BLOCK_SECONDS = 1.0

EVENTS = (
    "enqueued", "started", "succeeded", "retried", "failed", "recovered", "requeued",
    "archived", "deleted", "run", "cancelled", "progress",
)  # fmt: skip


@dataclass(frozen=True)
class TaskEvent:
    """One entry of a queue's events stream. ``garbled`` describes an entry that is not
    what clusterq writes (its other fields then hold what could be read)."""

    queue: str
    stream_id: str
    event: str
    task_id: str
    type: str = ""
    retries: int = 0
    worker: str | None = None
    state: str = ""
    error: str | None = None
    garbled: str | None = None
    #: A ``progress`` event's fraction (``task.progress()``).
    progress: float | None = None

    @property
    def time(self) -> float:
        """When it happened (Unix time, s; the server's clock, from the stream id)."""
        return stream_id_ms(self.stream_id) / 1000.0

    @property
    def attempt(self) -> int:
        """The attempt the event belongs to (1 for the first run)."""
        return self.retries + 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "queue": self.queue,
            "stream_id": self.stream_id,
            "time": self.time,
            "event": self.event,
            "task_id": self.task_id,
            "type": self.type,
            "retries": self.retries,
            "worker": self.worker,
            "state": self.state,
            "error": self.error,
            "garbled": self.garbled,
            "progress": self.progress,
        }


def stream_id_ms(stream_id: str) -> int:
    head = stream_id.partition("-")[0]
    return int(head) if head.isdigit() else 0


def _order(stream_id: str) -> tuple[int, int]:
    head, _, tail = stream_id.partition("-")
    return (int(head) if head.isdigit() else 0, int(tail) if tail.isdigit() else 0)


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return str(value)


def decode(queue: str, stream_id: Any, fields: Any) -> list[TaskEvent]:
    """The events of one stream entry (a script call's, or one written by an earlier
    version: one event in fields of its own); never raises: an entry or an event clusterq
    did not write comes back as an event whose ``garbled`` says what is wrong with it."""
    sid = _text(stream_id)
    if not isinstance(fields, dict):
        return [TaskEvent(queue, sid, "?", "", garbled=f"entry {sid}: not a field map")]
    got = {_text(k): _text(v) for k, v in fields.items()}
    if "events" not in got:
        return [_decode_one(queue, sid, got)]
    worker = got.get("worker") or None
    try:
        items = json.loads(got["events"])
    except ValueError as exc:
        items = exc
    if not isinstance(items, list):
        why = f"events is not a JSON array ({str(items)[:60]})"
        return [TaskEvent(queue, sid, "?", "", worker=worker, garbled=f"entry {sid}: {why}")]
    return [_decode_item(queue, sid, worker, item) for item in items]


#: An event of an ``events`` array: [event, id, type, retries, state, error, fraction].
_ITEM = ("event", "id", "type", "retries", "state", "error", "progress")


def _decode_item(queue: str, sid: str, worker: str | None, item: Any) -> TaskEvent:
    if not isinstance(item, list):
        return TaskEvent(queue, sid, "?", "", worker=worker, garbled=f"entry {sid}: not a list")
    got = {
        name: str(value) if value is not None else ""
        for name, value in zip(_ITEM, item, strict=False)
    }
    if worker:
        got["worker"] = worker
    return _decode_one(queue, sid, got)


def _decode_one(queue: str, sid: str, got: dict[str, str]) -> TaskEvent:
    problems = []
    event = got.get("event", "?")
    if event not in EVENTS:
        problems.append(f"unknown event {event[:40]!r}")
    task_id = got.get("id", "")
    if not task_id:
        problems.append("no task id")
    raw_retries = got.get("retries", "0")
    retries = int(raw_retries) if raw_retries.isdigit() else 0
    if not raw_retries.isdigit():
        problems.append(f"retries {raw_retries[:20]!r} is not a count")
    return TaskEvent(
        queue=queue,
        stream_id=sid,
        event=event,
        task_id=task_id,
        type=got.get("type", ""),
        retries=retries,
        worker=got.get("worker") or None,
        state=got.get("state", ""),
        error=got.get("error") or None,
        garbled=f"entry {sid}: " + "; ".join(problems) if problems else None,
        progress=_fraction(got.get("progress")),
    )


def _fraction(text: str | None) -> float | None:
    try:
        return None if text is None else float(text)
    except ValueError:
        return None


def check_maxlen(maxlen: object) -> int:
    if isinstance(maxlen, bool) or not isinstance(maxlen, int):
        raise ClusterqError(f"events maxlen must be an integer, got {maxlen!r}")
    if not 1 <= maxlen <= MAX_MAXLEN:
        raise ClusterqError(f"events maxlen must be between 1 and {MAX_MAXLEN}, got {maxlen}")
    return maxlen


def _cap(value: Any) -> int | None:
    text = _text(value) if value is not None else ""
    return int(text) if text.isdigit() and int(text) > 0 else None


def start_id(since: float | str | None) -> str:
    """The first stream id to read: ``since`` as a Unix time (s) or a stream id."""
    if since is None:
        return "-"
    if isinstance(since, str):
        return since
    return f"{max(0, int(since * 1000))}-0"


@dataclass
class _Cursor:
    """Where the reading of one queue's stream stands."""

    queue: str
    key: str
    slot: int
    last: str | None  # the last id read (None: nothing yet)


class EventReader:
    """What :func:`read` and :func:`aread` share: the cursors, the filter, the count."""

    def __init__(
        self,
        keys: KeySchema,
        members: Sequence[str],
        *,
        task_id: str | None,
        since: float | str | None,
        count: int | None,
    ) -> None:
        self.cursors = []
        for name in members:
            qk = keys.queue(name)
            self.cursors.append(_Cursor(name, qk.events, qk.slot, None))
        self.task_id = task_id
        self.first = start_id(since)
        self.left = count

    def done(self) -> bool:
        return self.left is not None and self.left <= 0

    def keep(self, event: TaskEvent) -> bool:
        """Whether ``event`` is one to hand out (and count)."""
        if self.task_id is not None and event.task_id != self.task_id:
            return False
        if self.left is not None:
            self.left -= 1
        return True

    def range_args(self, cursor: _Cursor) -> tuple[str, str]:
        low = self.first if cursor.last is None else f"({cursor.last}"
        return low, "+"

    def took(self, cursor: _Cursor, entries: Any) -> list[TaskEvent]:
        out = []
        for sid, fields in entries or []:
            out += decode(cursor.queue, sid, fields)
            cursor.last = _text(sid)
        return out

    def read_from(self, cursor: _Cursor) -> str:
        """The id XREAD reads after (exclusive) for ``cursor``."""
        if cursor.last is not None:
            return cursor.last
        if self.first == "-":
            return "0-0"
        ms, seq = _order(self.first)
        return f"{ms}-{seq - 1}" if seq > 0 else (f"{ms - 1}-18446744073709551615" if ms else "0-0")

    def block_ms(self) -> int:
        return max(50, int(BLOCK_SECONDS * 1000 / len(self.cursors)))


def _xrange(key: str, low: str, high: str) -> Callable[[Any], Any]:
    return lambda c: c.xrange(key, low, high, count=PAGE)


def _xread(key: str, after: str, block_ms: int) -> Callable[[Any], Any]:
    return lambda c: c.xread({key: after}, count=PAGE, block=block_ms)


def _fast(command: tuple[Any, ...]) -> Callable[[Any], Any]:
    return lambda c: c.fast(*command)


def _merge(parts: list[list[TaskEvent]]) -> Iterator[TaskEvent]:
    if len(parts) == 1:
        return iter(parts[0])
    return heapq.merge(*parts, key=lambda e: _order(e.stream_id))


def set_events(backend: Backend, queues: Iterable[str], on: bool, maxlen: int) -> None:
    """Turn the events of ``queues`` (plain queues: partitions each) on or off."""
    cap = check_maxlen(maxlen)
    for name in queues:
        qk = backend.keys.queue(name)
        command: tuple[Any, ...] = ("SET", qk.evcfg, cap) if on else ("DEL", qk.evcfg)
        backend.call(qk.evcfg, *command)


async def aset_events(backend: AsyncBackend, queues: Iterable[str], on: bool, maxlen: int) -> None:
    """Asynchronous :func:`set_events`."""
    cap = check_maxlen(maxlen)
    for name in queues:
        qk = backend.keys.queue(name)
        command: tuple[Any, ...] = ("SET", qk.evcfg, cap) if on else ("DEL", qk.evcfg)
        await backend.execute_key(qk.evcfg, _fast(command))


def events_cap(backend: Backend, queue: str) -> int | None:
    """The cap of ``queue``'s events stream while its events are on, else None (a flag
    that is not a positive integer counts as off, as the scripts read it)."""
    qk = backend.keys.queue(queue)
    return _cap(backend.call(qk.evcfg, "GET", qk.evcfg))


def read(
    backend: Backend,
    members: Sequence[str],
    *,
    task_id: str | None = None,
    follow: bool = False,
    since: float | str | None = None,
    count: int | None = None,
    stop: Callable[[], bool] | None = None,
) -> Iterator[TaskEvent]:
    """The events of the queues ``members`` (a queue, or a partitioned queue's
    partitions), oldest first, merged by time; with ``follow``, then those that come
    after, waiting on the server (XREAD BLOCK, at most :data:`BLOCK_SECONDS` at a time)
    until ``stop()`` says so or ``count`` events were handed out."""
    reader = EventReader(backend.keys, members, task_id=task_id, since=since, count=count)
    parts = []
    for cursor in reader.cursors:
        part: list[TaskEvent] = []
        while True:
            low, high = reader.range_args(cursor)
            entries = backend.execute_key(cursor.key, _xrange(cursor.key, low, high))
            got = reader.took(cursor, entries)
            part += got
            if len(got) < PAGE:
                break
        parts.append(part)
    for event in _merge(parts):
        if reader.done():
            return
        if reader.keep(event):
            yield event
    while follow and not reader.done() and not (stop is not None and stop()):
        for cursor in reader.cursors:
            after = reader.read_from(cursor)
            block = reader.block_ms()
            reply = backend.execute_key(
                cursor.key,
                _xread(cursor.key, after, block),
            )
            for event in reader.took(cursor, _entries(reply)):
                if reader.done():
                    return
                if reader.keep(event):
                    yield event


async def aread(
    backend: AsyncBackend,
    members: Sequence[str],
    *,
    task_id: str | None = None,
    follow: bool = False,
    since: float | str | None = None,
    count: int | None = None,
) -> AsyncIterator[TaskEvent]:
    """Asynchronous :func:`read` (stop following by leaving the ``async for``)."""
    reader = EventReader(backend.keys, members, task_id=task_id, since=since, count=count)
    parts = []
    for cursor in reader.cursors:
        part: list[TaskEvent] = []
        while True:
            low, high = reader.range_args(cursor)
            entries = await backend.execute_key(cursor.key, _xrange(cursor.key, low, high))
            got = reader.took(cursor, entries)
            part += got
            if len(got) < PAGE:
                break
        parts.append(part)
    for event in _merge(parts):
        if reader.done():
            return
        if reader.keep(event):
            yield event
    while follow and not reader.done():
        for cursor in reader.cursors:
            after = reader.read_from(cursor)
            block = reader.block_ms()
            reply = await backend.execute_key(
                cursor.key,
                _xread(cursor.key, after, block),
            )
            for event in reader.took(cursor, _entries(reply)):
                if reader.done():
                    return
                if reader.keep(event):
                    yield event


def _entries(reply: Any) -> list[Any]:
    """The entries of an XREAD reply of one stream (RESP2 list or RESP3 map)."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return [entry for entries in reply.values() for entry in entries]
    return [entry for _, entries in reply for entry in entries]


class _Client(Protocol):
    backend: Backend

    def layout(self, name: str) -> Layout | None: ...
    def _members(self, layout: Layout | None, queue: str) -> tuple[str, ...]: ...


class _AsyncClient(Protocol):
    backend: AsyncBackend

    async def layout(self, name: str) -> Layout | None: ...
    def _members(self, layout: Layout | None, queue: str) -> tuple[str, ...]: ...


class ClientEvents:
    """The lifecycle-event methods of :class:`~clusterq.Client`."""

    def set_events(self: _Client, queue: str, on: bool, maxlen: int = DEFAULT_MAXLEN) -> None:
        """Turn ``queue``'s lifecycle events on or off (every partition of a partitioned
        queue): while on, each transition of its tasks is appended to its events stream,
        capped at about ``maxlen`` entries."""
        set_events(self.backend, self._members(self.layout(queue), queue), on, maxlen)

    def events(
        self: _Client,
        queue: str,
        *,
        task_id: str | None = None,
        follow: bool = False,
        since: float | str | None = None,
        count: int | None = None,
    ) -> Iterator[TaskEvent]:
        """``queue``'s lifecycle events, oldest first (a partitioned queue's partitions
        merged in time order); ``task_id``: one task's only; ``since``: from this Unix time
        (s) or stream id; ``count``: at most this many; ``follow``: then wait for new ones
        (each wait on the server at most a second) until the caller stops iterating."""
        members = self._members(self.layout(queue), queue)
        return read(self.backend, members, task_id=task_id, follow=follow, since=since, count=count)


class AsyncClientEvents:
    """The lifecycle-event methods of :class:`~clusterq.AsyncClient`."""

    async def set_events(
        self: _AsyncClient, queue: str, on: bool, maxlen: int = DEFAULT_MAXLEN
    ) -> None:
        """See :meth:`ClientEvents.set_events`."""
        members = self._members(await self.layout(queue), queue)
        await aset_events(self.backend, members, on, maxlen)

    async def events(
        self: _AsyncClient,
        queue: str,
        *,
        task_id: str | None = None,
        follow: bool = False,
        since: float | str | None = None,
        count: int | None = None,
    ) -> AsyncIterator[TaskEvent]:
        """See :meth:`ClientEvents.events` (``async for event in client.events(...)``)."""
        members = self._members(await self.layout(queue), queue)
        async for event in aread(
            self.backend, members, task_id=task_id, follow=follow, since=since, count=count
        ):
            yield event
