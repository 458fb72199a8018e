"""Enqueue preparation shared by both clients, without I/O: options checked once per
type, payloads encoded and size-checked, task ids drawn, enqueues grouped by slot into
batches, and the servers' replies applied to the :class:`~clusterq.task.TaskInfo` that
the caller gets back. :mod:`clusterq.client` and :mod:`clusterq.aclient` only send.
"""

from __future__ import annotations

import base64
import hashlib
import math
import os
import secrets
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypedDict

from clusterq.broker import enqueue as enqueue_script
from clusterq.broker.script import first_error
from clusterq.durability import Durability
from clusterq.errors import DuplicateTask
from clusterq.headers import validate_headers
from clusterq.keys import (
    KeySchema,
    QueueKeys,
    validate_group_name,
    validate_queue_name,
    validate_task_id,
)
from clusterq.partitions import Layout, Layouts, check_plain_name
from clusterq.serialization import get_codec, too_large
from clusterq.task import (
    STATES,
    TaskInfo,
    TaskState,
    record_meta,
    with_enqueued,
)

DEFAULT_QUEUE = "default"
DEFAULT_MAX_RETRY = 25
MAX_RETRY = 1_000_000
MAX_TYPE_LENGTH = 256

_ID_BATCH = 256
_spare_ids: list[str] = []


def _forget_ids() -> None:
    _spare_ids.clear()  # a forked child must never hand out its parent's ids


os.register_at_fork(after_in_child=_forget_ids)


def new_task_id() -> str:
    """A random, URL-safe id of 16 characters (96 bits from ``secrets``), never
    starting with ``-``.

    Drawn 256 at a time: one system call instead of one per task."""
    try:
        return _spare_ids.pop()
    except IndexError:
        text = base64.urlsafe_b64encode(secrets.token_bytes(12 * _ID_BATCH)).decode()
        # never a leading "-": an id is a command-line argument too (`task inspect ID`)
        ids = [_no_dash(text[i : i + 16]) for i in range(0, len(text), 16)]
        _spare_ids.extend(ids[1:])
        return ids[0]


def _no_dash(task_id: str) -> str:
    return "A" + task_id[1:] if task_id.startswith("-") else task_id


#: The longest duration an option takes (100 years): beyond it Redis refuses expiry
#: times, and no queue means it.
MAX_SECONDS = 100 * 365 * 24 * 3600.0


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{what} must be a number of seconds, got {value!r}")
    seconds = float(value)
    if not math.isfinite(seconds):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return seconds


def _seconds(value: float | timedelta | None, what: str) -> float | None:
    """A duration option: seconds (or a timedelta), 0 to MAX_SECONDS."""
    if value is None:
        return None
    seconds = value.total_seconds() if isinstance(value, timedelta) else _number(value, what)
    if not 0 <= seconds <= MAX_SECONDS:
        raise ValueError(
            f"{what} must be between 0 and {MAX_SECONDS:.0f} seconds (100 years), got {seconds}"
        )
    return seconds


def _epoch(value: datetime | float | None, what: str) -> float | None:
    """A point in time option: a datetime or unix seconds, within 100 years of now."""
    if value is None:
        return None
    at = value.timestamp() if isinstance(value, datetime) else _number(value, what)
    if abs(at - time.time()) > MAX_SECONDS:
        raise ValueError(f"{what} must be within 100 years of now, got {value!r}")
    return at


def _ms(seconds: float | None) -> int | None:
    return None if seconds is None else int(seconds * 1000)


def validate_task_type(task_type: object) -> str:
    if not isinstance(task_type, str) or not task_type:
        raise ValueError(f"task type must be a non-empty string, got {task_type!r}")
    if len(task_type) > MAX_TYPE_LENGTH or not task_type.isprintable():
        raise ValueError(
            f"invalid task type {task_type[:40]!r}: printable, at most {MAX_TYPE_LENGTH} chars"
        )
    return task_type


class EnqueueOptions(TypedDict, total=False):
    """The options of an enqueue, typed (``client.enqueue(type, payload, **options)``):
    see :meth:`Producer.template`; ``task_id`` makes a retried enqueue safe."""

    queue: str
    max_retry: int
    process_in: float | timedelta | None
    process_at: datetime | float | None
    timeout: float | timedelta | None
    deadline: datetime | float | None
    unique_for: float | timedelta | None
    retention: float | timedelta | None
    task_id: str | None
    key: str | None
    group: str | None
    headers: dict[str, str] | None


@dataclass(frozen=True)
class TaskSpec:
    """One task for :meth:`Client.enqueue_many`: type, payload and enqueue options."""

    type: str
    payload: Any = None
    options: dict[str, Any] = field(default_factory=dict)


def spec_given() -> TypeError:
    """What ``enqueue(TaskSpec(...))`` raises."""
    return TypeError(
        "enqueue takes a task type and a payload: enqueue(spec.type, spec.payload, "
        "**spec.options), or enqueue_many([spec]) for TaskSpecs"
    )


@dataclass(slots=True)
class PreparedEnqueue:
    """An enqueue ready to be sent: validated, encoded, keyed."""

    queue: str
    qk: QueueKeys
    new: enqueue_script.NewTask
    type: str
    payload: Any
    max_retry: int
    timeout: float | None = None
    deadline: float | None = None
    #: When the client built the record (its ``e`` field), ms since the epoch.
    enqueued_ms: int = 0
    headers: dict[str, str] | None = None

    def guess(self) -> TaskInfo:
        """The TaskInfo of a task that is created (pending, or scheduled if delayed); a
        reply that says otherwise is applied with :meth:`settle`."""
        new = self.new
        delayed = new.delay_ms > 0 or new.due_ms > 0
        info = TaskInfo(  # positional, in field order: once per task of an enqueue_many
            new.id,
            self.queue,
            self.type,
            TaskState.SCHEDULED if delayed else TaskState.PENDING,
            self.payload,
            self.max_retry,
            0,
            self.enqueued_ms / 1000.0 if self.enqueued_ms else None,
            None,
            self.timeout,
            self.deadline,
        )
        if self.headers is not None:
            info.headers = dict(self.headers)
        return info

    def settle(
        self, info: TaskInfo, outcome: enqueue_script.EnqueueOutcome, *, raise_duplicate: bool
    ) -> None:
        if outcome.duplicate_of is not None and raise_duplicate:
            raise DuplicateTask(
                f"a unique task {self.type!r} with the same payload is already in queue "
                f"{self.queue!r} (task {outcome.duplicate_of})",
                outcome.duplicate_of,
            )
        info.state = STATES.get(outcome.state, TaskState.PENDING)
        info.already_enqueued = not outcome.created
        if not outcome.created:
            info.enqueued_at = None  # the first enqueue's time is in the stored record
        info.duplicate_of = outcome.duplicate_of


@dataclass(slots=True)
class _Template:
    """What enqueues of one type with the same options share: validated once."""

    queue: str
    qk: QueueKeys
    type: str
    max_retry: int
    timeout: float | None
    deadline: float | None
    delay_ms: int
    due_ms: int
    #: 0 for tasks that are not unique.
    unique_ttl_ms: int
    #: The record's meta JSON without its last field (the enqueue time, see
    #: :func:`~clusterq.task.with_enqueued`); None for unique tasks (it holds the lock's key,
    #: which depends on the payload).
    open: bytes | None
    #: record_meta()'s options, for unique tasks.
    meta: dict[str, Any]
    #: The declaration of a partitioned queue: each task picks its partition.
    layout: Layout | None = None


class Producer:
    """Validation and encoding of enqueues (no I/O), shared by both clients."""

    def __init__(self, keys: KeySchema, codec: str, max_payload_bytes: int) -> None:
        self.keys = keys
        self.codec = get_codec(codec)
        self.max_payload_bytes = max_payload_bytes
        self._queues: dict[str, QueueKeys] = {}
        self._types: set[str] = set()
        self._plain: dict[tuple[str, str, int], _Template] = {}
        self._encode = self.codec.encode
        #: The client's cache of partitioned-queue declarations.
        self.layouts: Layouts | None = None

    def forget_templates(self) -> None:
        """Drop the kept templates (a partitioned queue's declaration changed)."""
        self._plain.clear()

    def prepare(
        self,
        type: str,
        payload: Any = None,
        *,
        task_id: str | None = None,
        key: str | None = None,
        headers: dict[str, str] | None = None,
        **options: Any,
    ) -> PreparedEnqueue:
        """Check and encode one enqueue; ``options`` are those of :meth:`template`.

        ``task_id`` (default: a new random id) makes a retried enqueue safe. ``key``: on a
        partitioned queue, tasks with the same key go to the same partition. ``headers``:
        a small map of strings carried beside the payload (``task.headers``).
        """
        if options.keys() <= _PLAIN:  # templates of plain enqueues are kept
            t = self._plain_template(type, options)
        else:
            t = self.template(type, **options)
        if headers is None:
            now_ms = int(time.time() * 1000)
            return self._one(t, payload, task_id, now_ms, _head(t, now_ms), key)
        extra = validate_headers(headers)
        now_ms = int(time.time() * 1000)
        prepared = self._one(t, payload, task_id, now_ms, _head(t, now_ms), key, extra)
        prepared.headers = headers
        return prepared

    def prepare_options(self, type: str, payload: Any, options: dict[str, Any]) -> PreparedEnqueue:
        """``prepare(type, payload, **options)``, the options read from the dict as given
        (a client's ``enqueue`` passes its own ``**options``: not copied, not changed).

        The most common enqueue, a task with a new id into a plain queue and no options
        but ``queue`` and ``max_retry``, takes the shortest way: the kept template's
        record head, the payload, an id."""
        if not options.keys() <= _PLAIN:
            return self.prepare(type, payload, **options)
        max_retry = options.get("max_retry", DEFAULT_MAX_RETRY)
        try:  # _plain_template(), the lookup inline: once per enqueue
            kept = (type, options.get("queue", DEFAULT_QUEUE), max_retry)
            t = self._plain.get(kept) if max_retry.__class__ is int else None
        except TypeError:
            t = None
        if t is None:
            t = self._plain_template(type, options)
        if t.open is None or t.layout is not None:  # a partitioned queue: _one picks
            now_ms = int(time.time() * 1000)
            return self._one(t, payload, None, now_ms, _head(t, now_ms))
        data = self._encode(payload)
        if len(data) > self.max_payload_bytes:
            raise too_large(len(data), self.max_payload_bytes)
        now_ms = int(time.time() * 1000)
        record = t.open + b',"e":%d}\n' % now_ms + data  # with_enqueued(), inline
        new = enqueue_script.NewTask(new_task_id(), record, t.delay_ms, t.due_ms, None, 0, True)
        return PreparedEnqueue(
            t.queue, t.qk, new, t.type, payload, t.max_retry, t.timeout, t.deadline, now_ms
        )

    def _plain_template(self, type: str, options: dict[str, Any]) -> _Template:
        """The template of an enqueue with no options but ``queue`` and ``max_retry``
        (kept: checked once)."""
        max_retry = options.get("max_retry", DEFAULT_MAX_RETRY)
        kept = (type, options.get("queue", DEFAULT_QUEUE), max_retry)
        try:
            t = self._plain.get(kept) if max_retry.__class__ is int else None
        except TypeError:  # not hashable: not a name; template() says which
            return self.template(type, **options)
        if t is None:
            t = self.template(type, **options)
            self._remember(self._plain, kept, t)
        return t

    def template(
        self,
        type: str,
        *,
        queue: str = DEFAULT_QUEUE,
        max_retry: int = DEFAULT_MAX_RETRY,
        process_in: float | timedelta | None = None,
        process_at: datetime | float | None = None,
        timeout: float | timedelta | None = None,
        deadline: datetime | float | None = None,
        unique_for: float | timedelta | None = None,
        retention: float | timedelta | None = None,
        group: str | None = None,
    ) -> _Template:
        """Check the options of an enqueue of ``type``.

        ``process_in`` (seconds or timedelta) or ``process_at`` (datetime or unix time)
        delay the task; ``timeout`` limits one attempt; ``deadline`` is when the task
        must no longer run; ``unique_for`` refuses an identical task (same type,
        payload and queue) for that long; ``retention`` keeps the completed task and its
        result that long. A duration of 0 is the same as None (no time limit, not kept,
        not unique).
        """
        if not isinstance(queue, str):
            validate_queue_name(queue)  # raises, naming it
        if not isinstance(type, str):
            validate_task_type(type)
        qk = self._queue_keys(check_plain_name(queue))
        layout = self.layouts.get(queue) if self.layouts is not None else None
        if type not in self._types:
            self._remember(self._types, validate_task_type(type))
        if max_retry.__class__ is not int or not 0 <= max_retry <= MAX_RETRY:  # not a bool
            raise ValueError(
                f"max_retry must be an integer from 0 to {MAX_RETRY}, got {max_retry!r}"
            )
        codec = self.codec.name
        if (
            process_in is None
            and process_at is None
            and timeout is None
            and deadline is None
            and unique_for is None
            and retention is None
            and group is None
        ):  # the common case, kept short
            plain = record_meta(type, codec=codec, max_retry=max_retry)
            return _Template(queue, qk, type, max_retry, None, None, 0, 0, 0, plain, {}, layout)
        if process_in is not None and process_at is not None:
            raise ValueError("give process_in or process_at, not both")
        delay = _seconds(process_in, "process_in") or 0.0
        due = _epoch(process_at, "process_at")
        timeout_s = _seconds(timeout, "timeout") or None
        deadline_s = _epoch(deadline, "deadline")
        unique_s = _seconds(unique_for, "unique_for") or None
        if group is not None:
            validate_group_name(group)
        meta: dict[str, Any] = {
            "group": group,
            "codec": codec,
            "max_retry": max_retry,
            "timeout_ms": _ms(timeout_s),
            "deadline_ms": _ms(deadline_s),
            "retention_ms": _ms(_seconds(retention, "retention") or None),
        }
        return _Template(
            queue,
            qk,
            type,
            max_retry,
            timeout_s,
            deadline_s,
            int(delay * 1000),
            int(due * 1000) if due is not None else 0,
            int((unique_s or 0) * 1000),
            None if unique_s else record_meta(type, **meta),
            meta,
            layout,
        )

    def _one(
        self,
        t: _Template,
        payload: Any,
        task_id: str | None,
        enqueued_ms: int,
        head: bytes | None,
        key: str | None = None,
        extra: bytes | None = None,
    ) -> PreparedEnqueue:
        """``head``: ``_head(t, enqueued_ms)``, made once for a batch; ``extra``: the
        headers' part of the meta (:func:`validate_headers`), if any."""
        data = self._encode(payload)
        if len(data) > self.max_payload_bytes:
            raise too_large(len(data), self.max_payload_bytes)
        if key is not None and not isinstance(key, str):
            raise TypeError(f"key must be a string, got {key!r}")
        queue, qk = t.queue, t.qk
        unique_key = None
        digest = ""
        if head is None:
            digest = hashlib.sha256(t.type.encode() + b"\0" + data).hexdigest()
        if t.layout is not None:
            # Without a key, a unique task goes by its digest (the same task always meets
            # its lock) and a task with an id by its id (an enqueue retried with the same
            # id meets the first one); others take the partitions in turn.
            if key is None:
                key = t.meta.get("group")
            queue = t.layout.pick(key if key is not None else digest or task_id)
            qk = self._queue_keys(queue)
        if head is not None:
            if extra is not None:
                assert t.open is not None
                head = with_enqueued(t.open + extra, enqueued_ms)
            record = head + data
        else:
            unique_key = qk.unique(digest[:32])
            meta = record_meta(t.type, unique_key=unique_key, **t.meta)
            record = with_enqueued(meta + (extra or b""), enqueued_ms) + data
        fresh = task_id is None and unique_key is None
        task_id = new_task_id() if task_id is None else validate_task_id(task_id)
        new = enqueue_script.NewTask(
            task_id,
            record,
            t.delay_ms,
            t.due_ms,
            unique_key,
            t.unique_ttl_ms,
            fresh,
            t.meta.get("group") is not None,
        )
        return PreparedEnqueue(
            queue, qk, new, t.type, payload, t.max_retry, t.timeout, t.deadline, enqueued_ms
        )

    def _queue_keys(self, queue: str) -> QueueKeys:
        qk = self._queues.get(queue)
        if qk is None:
            qk = self.keys.queue(queue)  # validates the name
            self._remember(self._queues, queue, qk)
        return qk

    @staticmethod
    def _remember(cache: Any, key: Any, value: Any = None) -> None:
        """Cache what passed validation (bounded: names could come from user input)."""
        if len(cache) >= 4096:
            cache.clear()
        if isinstance(cache, set):
            cache.add(key)
        else:
            cache[key] = value

    def prepare_many(
        self, items: Iterable[TaskSpec | tuple[str, Any]], defaults: dict[str, Any]
    ) -> list[PreparedEnqueue]:
        """Check and encode a batch; all of it or (on the first bad item) nothing."""
        options = dict(defaults)
        task_id = options.pop("task_id", None)
        key = options.pop("key", None)
        headers = options.pop("headers", None)
        extra = None if headers is None else validate_headers(headers)
        now_ms = int(time.time() * 1000)  # one clock reading per batch
        templates: dict[str, tuple[_Template, bytes | None]] = {}  # checked once per type
        one = self._one
        out = []
        for item in items:
            if isinstance(item, TaskSpec):
                if item.options:
                    own = {**options, **item.options}
                    if task_id is not None:
                        own.setdefault("task_id", task_id)
                    if key is not None:
                        own.setdefault("key", key)
                    mine = item.options.get("headers")
                    if headers is not None and isinstance(mine, dict):
                        own["headers"] = {**headers, **mine}  # the spec's own win
                    elif headers is not None:
                        own.setdefault("headers", headers)
                    out.append(self.prepare(item.type, item.payload, **own))
                    continue
                task_type, payload = item.type, item.payload
            else:
                task_type, payload = item
            if not isinstance(task_type, str):
                validate_task_type(task_type)  # raises, naming it
            known = templates.get(task_type)
            if known is None:
                t = self.template(task_type, **options)
                known = templates[task_type] = (t, _head(t, now_ms))
            prepared = one(known[0], payload, task_id, now_ms, known[1], key, extra)
            if headers is not None:
                prepared.headers = headers
            out.append(prepared)
        return out


def _head(t: _Template, enqueued_ms: int) -> bytes | None:
    return None if t.open is None else with_enqueued(t.open, enqueued_ms)


_PLAIN = frozenset(("queue", "max_retry"))


#: Indexes into the prepared enqueues of one group, and that group's queue and tasks.
Batch = tuple[list[int], QueueKeys, list[enqueue_script.NewTask]]


def plan_batches(prepared: Sequence[PreparedEnqueue]) -> dict[int, list[Batch]]:
    """Group enqueues by slot into batches of one queue and at most MAX_BATCH tasks.

    Returns slot -> batches: one pipeline per slot, one step (script call or
    transaction) per batch.
    """
    by_queue: dict[str, list[int]] = defaultdict(list)
    for index, item in enumerate(prepared):
        by_queue[item.queue].append(index)
    plan: dict[int, list[Batch]] = defaultdict(list)
    for indexes in by_queue.values():
        qk = prepared[indexes[0]].qk
        for start in range(0, len(indexes), enqueue_script.MAX_BATCH):
            chunk = indexes[start : start + enqueue_script.MAX_BATCH]
            plan[qk.slot].append((chunk, qk, [prepared[i].new for i in chunk]))
    return plan


def attempts_for(batches: list[Batch], level: Durability) -> enqueue_script.Attempts:
    return enqueue_script.Attempts(
        [(qk, tasks) for _, qk, tasks in batches], durable=level != "none"
    )


def raise_first(replies: Sequence[Any]) -> list[Any]:
    error = first_error(replies)
    if error is not None:
        raise error  # MOVED, connection loss...: the backend retries the whole (idempotent) batch
    return list(replies)


def one_info(prepared: PreparedEnqueue, one: enqueue_script.One, reply: Any) -> TaskInfo:
    """The TaskInfo of a one-task enqueue that ``one`` sent, from its latest reply."""
    info = prepared.guess()
    if one.pushed:  # created, as guessed
        return info
    assert one.sent is not None
    outcome = enqueue_script.parse(one.sent, reply, 1)[0]
    if outcome is not enqueue_script.CREATED or info.state is not TaskState.PENDING:
        prepared.settle(info, outcome, raise_duplicate=True)
    return info


def settle_replies(
    infos: list[TaskInfo],
    prepared: Sequence[PreparedEnqueue],
    batches: list[Batch],
    attempts: enqueue_script.Attempts,
    replies: Sequence[Any],
    replicas: int | None,
    raise_duplicate: bool,
) -> None:
    """Apply the replies (to the steps of the latest attempt) to the guessed TaskInfos."""
    created = enqueue_script.CREATED
    pending = TaskState.PENDING
    for (indexes, _, _), step, reply in zip(batches, attempts.sent, replies, strict=True):
        outcomes = enqueue_script.parse(step, reply, len(indexes))
        for index, outcome in zip(indexes, outcomes, strict=True):
            info = infos[index]
            if outcome is not created or info.state is not pending:
                prepared[index].settle(info, outcome, raise_duplicate=raise_duplicate)
            if replicas is not None:
                info.replicas = replicas
