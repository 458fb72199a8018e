"""Producers: :class:`Client` (sync) and :class:`AsyncClient` put tasks into queues.

Both share :class:`Producer`, which validates and encodes without I/O, and the reading
of task state in :func:`task_info`. Enqueue is idempotent by task id: a call retried
after a timeout (by you, or inside the client after a failover) never creates a second
task.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
import secrets
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

import redis
import redis.asyncio

from clusterq.broker import enqueue as enqueue_script
from clusterq.broker.script import Transaction, arun_pipelined, first_error, run_pipelined
from clusterq.cluster.abackend import AsyncBackend
from clusterq.cluster.backend import Backend
from clusterq.cluster.connection import DEFAULT_URL, Addr, Mode, RedisURL, command, format_addr
from clusterq.cluster.routing import DEFAULT_RETRY_TIMEOUT
from clusterq.cluster.wire import AsyncNodeClient, NodeClient
from clusterq.errors import (
    ConfigError,
    DuplicateTask,
    DurabilityError,
    ResultTimeout,
    TaskFailed,
    TaskNotFound,
)
from clusterq.keys import DEFAULT_PREFIX, KeySchema, QueueKeys, validate_task_id
from clusterq.serialization import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    PayloadError,
    get_codec,
    too_large,
)
from clusterq.task import (
    STATES,
    Record,
    TaskInfo,
    TaskState,
    ms_to_s,
    record_meta,
    with_enqueued,
)

log = logging.getLogger("clusterq.client")

Durability = Literal["none", "replica", "aof"]
DEFAULT_DURABILITY_TIMEOUT = 1.0
DEFAULT_QUEUE = "default"
DEFAULT_MAX_RETRY = 25
MAX_TYPE_LENGTH = 256

__all__ = ["AsyncClient", "Client", "DuplicateTask", "Producer", "TaskSpec"]


_ID_BATCH = 256
_spare_ids: list[str] = []


def _forget_ids() -> None:
    _spare_ids.clear()  # a forked child must never hand out its parent's ids


os.register_at_fork(after_in_child=_forget_ids)


def new_task_id() -> str:
    """A random, URL-safe id of 16 characters (96 bits from ``secrets``).

    Drawn 256 at a time: one system call instead of one per task."""
    try:
        return _spare_ids.pop()
    except IndexError:
        text = base64.urlsafe_b64encode(secrets.token_bytes(12 * _ID_BATCH)).decode()
        _spare_ids.extend(text[i : i + 16] for i in range(16, len(text), 16))
        return text[:16]


def _seconds(value: float | timedelta | None, what: str) -> float | None:
    if value is None:
        return None
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if seconds < 0:
        raise ValueError(f"{what} must not be negative, got {seconds}")
    return seconds


def _epoch(value: datetime | float | None) -> float | None:
    if value is None:
        return None
    return value.timestamp() if isinstance(value, datetime) else float(value)


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


@dataclass(frozen=True)
class TaskSpec:
    """One task for :meth:`Client.enqueue_many`: type, payload and enqueue options."""

    type: str
    payload: Any = None
    options: dict[str, Any] = field(default_factory=dict)


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

    def guess(self) -> TaskInfo:
        """The TaskInfo of a task that is created (pending, or scheduled if delayed); a
        reply that says otherwise is applied with :meth:`settle`."""
        new = self.new
        delayed = new.delay_ms > 0 or new.due_ms > 0
        return TaskInfo(  # positional, in field order: once per task of an enqueue_many
            new.id,
            self.queue,
            self.type,
            TaskState.SCHEDULED if delayed else TaskState.PENDING,
            self.payload,
            self.max_retry,
            0,
            None,
            None,
            self.timeout,
            self.deadline,
        )

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

    def prepare(
        self,
        type: str,
        payload: Any = None,
        *,
        task_id: str | None = None,
        **options: Any,
    ) -> PreparedEnqueue:
        """Check and encode one enqueue; ``options`` are those of :meth:`template`.

        ``task_id`` (default: a new random id) makes a retried enqueue safe.
        """
        if options.keys() <= _PLAIN:  # templates of plain enqueues are kept
            max_retry = options.get("max_retry", DEFAULT_MAX_RETRY)
            key = (type, options.get("queue", DEFAULT_QUEUE), max_retry)
            t = self._plain.get(key) if max_retry.__class__ is int else None
            if t is None:
                t = self.template(type, **options)
                self._remember(self._plain, key, t)
        else:
            t = self.template(type, **options)
        now_ms = int(time.time() * 1000)
        return self._one(t, payload, task_id, now_ms, _head(t, now_ms))

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
    ) -> _Template:
        """Check the options of an enqueue of ``type``.

        ``process_in`` (seconds or timedelta) or ``process_at`` (datetime or unix time)
        delay the task; ``timeout`` limits one attempt; ``deadline`` is when the task
        must no longer run; ``unique_for`` refuses an identical task (same type,
        payload and queue) for that long; ``retention`` keeps the completed task and its
        result that long.
        """
        qk = self._queue_keys(queue)
        if type not in self._types:
            self._remember(self._types, validate_task_type(type))
        if max_retry.__class__ is not int or max_retry < 0:  # bool is not a count either
            raise ValueError(f"max_retry must be a non-negative integer, got {max_retry!r}")
        codec = self.codec.name
        if (
            process_in is None
            and process_at is None
            and timeout is None
            and deadline is None
            and unique_for is None
            and retention is None
        ):  # the common case, kept short
            plain = record_meta(type, codec=codec, max_retry=max_retry)
            return _Template(queue, qk, type, max_retry, None, None, 0, 0, 0, plain, {})
        if process_in is not None and process_at is not None:
            raise ValueError("give process_in or process_at, not both")
        delay = _seconds(process_in, "process_in") or 0.0
        due = _epoch(process_at)
        timeout_s = _seconds(timeout, "timeout") or None
        deadline_s = _epoch(deadline)
        unique_s = _seconds(unique_for, "unique_for") or None
        meta: dict[str, Any] = {
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
        )

    def _one(
        self,
        t: _Template,
        payload: Any,
        task_id: str | None,
        enqueued_ms: int,
        head: bytes | None,
    ) -> PreparedEnqueue:
        """``head``: ``_head(t, enqueued_ms)``, made once for a batch."""
        data = self._encode(payload)
        if len(data) > self.max_payload_bytes:
            raise too_large(len(data), self.max_payload_bytes)
        unique_key = None
        if head is not None:
            record = head + data
        else:
            digest = hashlib.sha256(t.type.encode() + b"\0" + data).hexdigest()
            unique_key = t.qk.unique(digest[:32])
            meta = record_meta(t.type, unique_key=unique_key, **t.meta)
            record = with_enqueued(meta, enqueued_ms) + data
        fresh = task_id is None and unique_key is None
        task_id = new_task_id() if task_id is None else validate_task_id(task_id)
        new = enqueue_script.NewTask(
            task_id, record, t.delay_ms, t.due_ms, unique_key, t.unique_ttl_ms, fresh
        )
        return PreparedEnqueue(
            t.queue, t.qk, new, t.type, payload, t.max_retry, t.timeout, t.deadline
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
                    out.append(self.prepare(item.type, item.payload, **own))
                    continue
                task_type, payload = item.type, item.payload
            else:
                task_type, payload = item
            known = templates.get(task_type)
            if known is None:
                t = self.template(task_type, **options)
                known = templates[task_type] = (t, _head(t, now_ms))
            out.append(one(known[0], payload, task_id, now_ms, known[1]))
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


def _attempts(batches: list[Batch], level: Durability) -> enqueue_script.Attempts:
    return enqueue_script.Attempts(
        [(qk, tasks) for _, qk, tasks in batches], durable=level != "none"
    )


def _raise_first(replies: Sequence[Any]) -> list[Any]:
    error = first_error(replies)
    if error is not None:
        raise error  # MOVED, connection loss...: the backend retries the whole (idempotent) batch
    return list(replies)


# ----------------------------------------------------------------------- durability


def durability_commands(level: Durability, timeout: float) -> list[tuple[Any, ...]]:
    """What follows the writes on the same connection to confirm them.

    ``replica``: ``WAIT 1`` (one replica has the write in memory). ``aof``: ``WAITAOF 1 1``
    (fsynced to the master's and one replica's append-only file; Redis >= 7.2, Valkey).
    """
    ms = max(1, int(timeout * 1000))
    if level == "none":
        return []
    if level == "replica":
        return [("WAIT", 1, ms)]
    if level == "aof":
        return [("WAITAOF", 1, 1, ms)]
    raise ValueError(f"durability must be 'none', 'replica' or 'aof', got {level!r}")


def confirmed_replicas(level: Durability, tail: Sequence[Any]) -> int | None:
    """How many replicas confirmed the writes, from the replies to durability_commands.

    Raises the error a ``WAIT`` met (the backend retries transient ones)."""
    if level == "none":
        return None
    reply = tail[-1]
    if isinstance(reply, Exception):
        text = str(reply)
        if "unknown command" in text.lower():
            raise ConfigError(
                f"durability={level!r} is not supported by this server ({text}); "
                "the tasks were written but not confirmed"
            )
        raise reply
    if level == "aof":
        return int(reply[1])
    return int(reply)


def _one_info(prepared: PreparedEnqueue, attempts: enqueue_script.Attempts, reply: Any) -> TaskInfo:
    info = prepared.guess()
    step = attempts.sent[0]
    if isinstance(step, Transaction):  # created, as guessed
        return info
    outcome = enqueue_script.parse(step, reply, 1)[0]
    if outcome is not enqueue_script.CREATED or info.state is not TaskState.PENDING:
        prepared.settle(info, outcome, raise_duplicate=True)
    return info


def _settle(
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


def _require(
    level: Durability,
    replicas: int | None,
    prepared: Sequence[PreparedEnqueue],
    batches: list[Batch],
    where: Addr,
    timeout: float,
) -> None:
    if replicas is not None and replicas < 1:
        ids = [prepared[i].new.id for indexes, _, _ in batches for i in indexes]
        shown = ", ".join(ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
        raise DurabilityError(
            f"{len(ids)} task(s) written to {format_addr(where)} but no replica confirmed "
            f"them within {timeout:g}s (durability={level!r}); they may be lost if that "
            f"master fails: enqueue again with the same task_id ({shown})",
            ids,
            replicas,
        )


# ----------------------------------------------------------------------- reading tasks


def info_commands(qk: QueueKeys, task_id: str) -> list[tuple[str, ...]]:
    return [
        ("HGET", qk.tasks, task_id),
        ("HGET", qk.results, task_id),
        ("ZSCORE", qk.active, task_id),
        ("ZSCORE", qk.scheduled, task_id),
        ("ZSCORE", qk.retry, task_id),
        ("ZSCORE", qk.archived, task_id),
        ("ZSCORE", qk.completed, task_id),
    ]


def _decode(codec_name: str, data: bytes | None) -> Any:
    if data is None:
        return None
    try:
        return get_codec(codec_name).decode(data)
    except PayloadError:
        return data


def task_info(queue: str, task_id: str, values: Sequence[Any]) -> TaskInfo:
    """A :class:`TaskInfo` from the replies to :func:`info_commands`."""
    raw, result, active, scheduled, retry, archived, completed = values
    if raw is None:
        raise TaskNotFound(
            f"no task {task_id!r} in queue {queue!r} (a task enqueued without retention is "
            "deleted when it completes)"
        )
    record = Record.decode(bytes(raw))
    state, when = TaskState.PENDING, None
    for candidate, score in (
        (TaskState.ACTIVE, active),
        (TaskState.SCHEDULED, scheduled),
        (TaskState.RETRY, retry),
        (TaskState.ARCHIVED, archived),
        (TaskState.COMPLETED, completed),
    ):
        if score is not None:
            state, when = candidate, float(score) / 1000.0
            break
    return TaskInfo(
        id=task_id,
        queue=queue,
        type=record.type,
        state=state,
        payload=_decode(record.codec, record.payload),
        max_retry=record.max_retry,
        retried=record.retried,
        enqueued_at=ms_to_s(record.enqueued_ms),
        next_process_at=when
        if state in (TaskState.SCHEDULED, TaskState.RETRY, TaskState.ACTIVE)
        else None,
        timeout=ms_to_s(record.timeout_ms),
        deadline=ms_to_s(record.deadline_ms),
        last_error=record.last_error,
        last_failed_at=ms_to_s(record.failed_ms),
        retained_until=when if state == TaskState.COMPLETED else None,
        result=_decode(record.codec, bytes(result)) if result is not None else None,
    )


def _settled(info: TaskInfo) -> Any:
    """The result of a completed task; raises for an archived one; None if still going."""
    if info.state == TaskState.ARCHIVED:
        raise TaskFailed(
            f"task {info.id} in queue {info.queue!r} was archived after {info.retried} "
            f"retries: {info.last_error}",
            info.last_error,
        )
    return info.state == TaskState.COMPLETED


def _poll_delay(attempt: int) -> float:
    return min(0.2, 0.005 * 2.0 ** min(attempt, 10))


class _Base:
    def __init__(
        self,
        keys: KeySchema,
        codec: str,
        max_payload_bytes: int,
        durability: Durability,
        durability_timeout: float,
    ) -> None:
        self.keys = keys
        self.producer = Producer(keys, codec, max_payload_bytes)
        durability_commands(durability, durability_timeout)  # validates
        self.durability: Durability = durability
        self.durability_timeout = durability_timeout
        self._registered: set[str] = set()

    def _unregistered(self, queues: Iterable[str]) -> list[str]:
        return sorted(set(queues) - self._registered)

    @staticmethod
    def _locate(task: TaskInfo | str, queue: str | None) -> tuple[str, str]:
        if isinstance(task, TaskInfo):
            return task.id, queue or task.queue
        return task, queue or DEFAULT_QUEUE


class Client(_Base):
    """Enqueue tasks into a cluster or a standalone server (synchronous).

    >>> client = Client("redis://127.0.0.1:7000")
    >>> client.enqueue("email:send", {"to": "ada@example.com"}, queue="emails")
    """

    def __init__(
        self,
        url: str | RedisURL = DEFAULT_URL,
        *,
        mode: Mode | None = None,
        prefix: str = DEFAULT_PREFIX,
        codec: str = "json",
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        retry_timeout: float = DEFAULT_RETRY_TIMEOUT,
        durability: Durability = "none",
        durability_timeout: float = DEFAULT_DURABILITY_TIMEOUT,
        backend: Backend | None = None,
    ) -> None:
        self.backend = backend or Backend(
            url, mode=mode, prefix=prefix, retry_timeout=retry_timeout
        )
        self._owns_backend = backend is None
        super().__init__(
            self.backend.keys, codec, max_payload_bytes, durability, durability_timeout
        )

    def close(self) -> None:
        if self._owns_backend:
            self.backend.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def register_queues(self, queues: Iterable[str]) -> None:
        """Add queues to the registry of queue names (once per client and queue)."""
        new = self._unregistered(queues)
        if new:
            registry = self.keys.queues
            self.backend.execute_key(registry, lambda c: c.sadd(registry, *new))
            self._registered.update(new)
            self.backend.note_queues(new)

    def enqueue(
        self,
        type: str,
        payload: Any = None,
        *,
        durability: Durability | None = None,
        **options: Any,
    ) -> TaskInfo:
        """Enqueue one task; the options are those of :meth:`Producer.prepare`.

        Raises :class:`DuplicateTask` when ``unique_for`` refuses it. Retrying with the
        same ``task_id`` is safe: the second call returns ``already_enqueued=True``.
        ``durability="replica"`` (or the client's default) waits until a replica has the
        task and raises :class:`DurabilityError` if none confirms it in time.
        """
        prepared = self.producer.prepare(type, payload, **options)
        if prepared.queue not in self._registered:
            self.register_queues([prepared.queue])
        level = durability or self.durability
        if level != "none":
            return self._send([prepared], level, raise_duplicate=True)[0]
        attempts = enqueue_script.Attempts([(prepared.qk, [prepared.new])], durable=False)
        reply = self.backend.execute(prepared.qk.slot, attempts.run)
        return _one_info(prepared, attempts, reply)

    def enqueue_many(
        self,
        items: Iterable[TaskSpec | tuple[str, Any]],
        *,
        durability: Durability | None = None,
        **defaults: Any,
    ) -> list[TaskInfo]:
        """Enqueue many tasks: one pipeline per slot, up to 500 tasks per script call.

        ``items`` are ``(type, payload)`` pairs (using ``defaults`` as options) or
        :class:`TaskSpec`. Unique tasks that were refused come back with ``duplicate_of``
        set instead of raising. With durability, one ``WAIT`` per slot covers its batch.
        """
        prepared = self.producer.prepare_many(items, defaults)
        self.register_queues(p.queue for p in prepared)
        return self._send(prepared, durability or self.durability, raise_duplicate=False)

    def _send(
        self, prepared: Sequence[PreparedEnqueue], level: Durability, *, raise_duplicate: bool
    ) -> list[TaskInfo]:
        infos: list[TaskInfo] = []

        def guess() -> None:  # while the first slot's server runs the scripts
            if not infos:
                infos.extend([p.guess() for p in prepared])

        after = durability_commands(level, self.durability_timeout)
        for slot, batches in plan_batches(prepared).items():
            attempts = _attempts(batches, level)

            def run(
                client: NodeClient, attempts: enqueue_script.Attempts = attempts
            ) -> tuple[list[Any], int | None]:
                # Inside the retried call: a WAIT cut short by a failover (-UNBLOCKED,
                # a closed connection) re-runs the (idempotent) enqueue and the WAIT.
                replies, tail = run_pipelined(client, attempts.next(), after, meanwhile=guess)
                return _raise_first(replies), confirmed_replicas(level, tail)

            replies, replicas = self.backend.execute(slot, run)
            guess()
            _settle(infos, prepared, batches, attempts, replies, replicas, raise_duplicate)
            where = self.backend.master_addr(slot)
            _require(level, replicas, prepared, batches, where, self.durability_timeout)
        return infos

    def info(self, task: TaskInfo | str, *, queue: str | None = None) -> TaskInfo:
        """State and details of a task (``queue`` defaults to the TaskInfo's or "default")."""
        task_id, queue = self._locate(task, queue)
        qk = self.keys.queue(queue)
        commands = info_commands(qk, task_id)

        def read(client: redis.Redis) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for args in commands:
                command(pipe, *args)
            return pipe.execute()

        return task_info(queue, task_id, self.backend.execute(qk.slot, read))

    def result(
        self, task: TaskInfo | str, *, queue: str | None = None, timeout: float | None = 30.0
    ) -> Any:
        """Wait for a task to complete and return its result.

        Needs the task to have been enqueued with a ``retention`` (or it is gone when it
        completes). Raises :class:`TaskFailed` if it was archived, :class:`ResultTimeout`
        after ``timeout`` seconds (None: wait forever), :class:`TaskNotFound`.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        attempt = 0
        while True:
            info = self.info(task, queue=queue)
            if _settled(info):
                return info.result
            if deadline is not None and time.monotonic() >= deadline:
                raise ResultTimeout(f"task {info.id} is still {info.state} after {timeout}s")
            time.sleep(_poll_delay(attempt))
            attempt += 1


class AsyncClient(_Base):
    """The asyncio twin of :class:`Client`. Create with ``await AsyncClient.connect(url)``."""

    def __init__(
        self,
        backend: AsyncBackend,
        *,
        codec: str = "json",
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        durability: Durability = "none",
        durability_timeout: float = DEFAULT_DURABILITY_TIMEOUT,
        owns_backend: bool = False,
    ) -> None:
        self.backend = backend
        self._owns_backend = owns_backend
        self._background: set[asyncio.Future[None]] = set()
        super().__init__(backend.keys, codec, max_payload_bytes, durability, durability_timeout)

    @classmethod
    async def connect(
        cls,
        url: str | RedisURL = DEFAULT_URL,
        *,
        mode: Mode | None = None,
        prefix: str = DEFAULT_PREFIX,
        codec: str = "json",
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        retry_timeout: float = DEFAULT_RETRY_TIMEOUT,
        durability: Durability = "none",
        durability_timeout: float = DEFAULT_DURABILITY_TIMEOUT,
        watch_interval: float | None = None,
    ) -> AsyncClient:
        """``watch_interval``: re-read the cluster map that often in the background, so
        that calls stuck on a frozen master are re-routed soon after its replacement."""
        backend = await AsyncBackend.connect(
            url, mode=mode, prefix=prefix, retry_timeout=retry_timeout
        )
        if watch_interval and backend.mode == "cluster":
            backend.start_watching(watch_interval)
        return cls(
            backend,
            codec=codec,
            max_payload_bytes=max_payload_bytes,
            durability=durability,
            durability_timeout=durability_timeout,
            owns_backend=True,
        )

    async def aclose(self) -> None:
        if self._background:  # queue registrations still under way
            await asyncio.wait(set(self._background), timeout=self.backend.retry_timeout)
        if self._owns_backend:
            await self.backend.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def register_queues(self, queues: Iterable[str]) -> None:
        """Add queues to the registry of queue names (once per client and queue)."""
        new = self._unregistered(queues)
        if new:
            registry = self.keys.queues
            await self.backend.execute_key(registry, lambda c: c.sadd(registry, *new))
            self._registered.update(new)
            self.backend.note_queues(new)

    def _register_soon(self, queues: Iterable[str]) -> None:
        """Register new queue names in the background. The registry is one key, in one
        slot: while its master fails over, enqueues into queues on other masters must
        not wait for it. :meth:`aclose` waits for what is still running."""
        new = self._unregistered(queues)
        if not new:
            return
        self._registered.update(new)  # not twice at once; forgotten again on failure
        self.backend.note_queues(new)
        task = asyncio.ensure_future(self._register_in_background(new))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _register_in_background(self, new: list[str]) -> None:
        registry = self.keys.queues
        try:
            patience = max(60.0, self.backend.retry_timeout)
            await self.backend.execute_key(
                registry, lambda c: c.sadd(registry, *new), timeout=patience
            )
        except Exception as exc:
            self._registered.difference_update(new)
            log.warning("could not register queues %s: %s (retried on the next enqueue)", new, exc)

    async def enqueue(
        self,
        type: str,
        payload: Any = None,
        *,
        durability: Durability | None = None,
        **options: Any,
    ) -> TaskInfo:
        """See :meth:`Client.enqueue`."""
        prepared = self.producer.prepare(type, payload, **options)
        if prepared.queue not in self._registered:
            self._register_soon([prepared.queue])
        level = durability or self.durability
        if level != "none":
            return (await self._send([prepared], level, raise_duplicate=True))[0]
        attempts = enqueue_script.Attempts([(prepared.qk, [prepared.new])], durable=False)
        reply = await self.backend.execute(prepared.qk.slot, attempts.arun)
        return _one_info(prepared, attempts, reply)

    async def enqueue_many(
        self,
        items: Iterable[TaskSpec | tuple[str, Any]],
        *,
        durability: Durability | None = None,
        **defaults: Any,
    ) -> list[TaskInfo]:
        """See :meth:`Client.enqueue_many`; the slots are written concurrently."""
        prepared = self.producer.prepare_many(items, defaults)
        self._register_soon(p.queue for p in prepared)
        return await self._send(prepared, durability or self.durability, raise_duplicate=False)

    async def _send(
        self, prepared: Sequence[PreparedEnqueue], level: Durability, *, raise_duplicate: bool
    ) -> list[TaskInfo]:
        infos = [p.guess() for p in prepared]
        after = durability_commands(level, self.durability_timeout)

        async def send(slot: int, batches: list[Batch]) -> None:
            attempts = _attempts(batches, level)

            async def run(client: AsyncNodeClient) -> tuple[list[Any], int | None]:
                # See Client._send: the durability check is part of the retried call.
                replies, tail = await arun_pipelined(client, attempts.next(), after)
                return _raise_first(replies), confirmed_replicas(level, tail)

            replies, replicas = await self.backend.execute(slot, run)
            _settle(infos, prepared, batches, attempts, replies, replicas, raise_duplicate)
            where = self.backend.master_addr(slot)
            _require(level, replicas, prepared, batches, where, self.durability_timeout)

        plan = plan_batches(prepared)
        await asyncio.gather(*(send(s, b) for s, b in plan.items()))
        return infos

    async def info(self, task: TaskInfo | str, *, queue: str | None = None) -> TaskInfo:
        task_id, queue = self._locate(task, queue)
        qk = self.keys.queue(queue)
        commands = info_commands(qk, task_id)

        async def read(client: redis.asyncio.Redis) -> list[Any]:
            pipe = client.pipeline(transaction=False)
            for args in commands:
                pipe.execute_command(*args)
            return await pipe.execute()

        return task_info(queue, task_id, await self.backend.execute(qk.slot, read))

    async def result(
        self, task: TaskInfo | str, *, queue: str | None = None, timeout: float | None = 30.0
    ) -> Any:
        """See :meth:`Client.result`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        attempt = 0
        while True:
            info = await self.info(task, queue=queue)
            if _settled(info):
                return info.result
            if deadline is not None and time.monotonic() >= deadline:
                raise ResultTimeout(f"task {info.id} is still {info.state} after {timeout}s")
            await asyncio.sleep(_poll_delay(attempt))
            attempt += 1
