"""Producers: :class:`Client` puts tasks into queues."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from clusterq.backend import DEFAULT_RETRY_TIMEOUT, Backend
from clusterq.broker import enqueue as enqueue_script
from clusterq.connection import DEFAULT_URL, Mode, RedisURL
from clusterq.errors import ClusterqError
from clusterq.keys import DEFAULT_PREFIX, KeySchema, validate_task_id
from clusterq.serialization import DEFAULT_MAX_PAYLOAD_BYTES, encode_limited, get_codec
from clusterq.task import TaskInfo, TaskState

DEFAULT_QUEUE = "default"
DEFAULT_MAX_RETRY = 25
MAX_TYPE_LENGTH = 256


class DuplicateTask(ClusterqError):
    """A unique task with the same type, payload and queue is already enqueued."""

    def __init__(self, message: str, existing_id: str) -> None:
        super().__init__(message)
        self.existing_id = existing_id


def new_task_id() -> str:
    """A random, URL-safe id of 16 characters (96 bits)."""
    return secrets.token_urlsafe(12)


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


def validate_task_type(task_type: object) -> str:
    if not isinstance(task_type, str) or not task_type:
        raise ValueError(f"task type must be a non-empty string, got {task_type!r}")
    if len(task_type) > MAX_TYPE_LENGTH or not task_type.isprintable():
        raise ValueError(
            f"invalid task type {task_type[:40]!r}: printable, at most {MAX_TYPE_LENGTH} characters"
        )
    return task_type


@dataclass(frozen=True)
class PreparedEnqueue:
    """An enqueue turned into one script call; shared by the sync and async clients."""

    task_id: str
    queue: str
    type: str
    payload: Any
    slot: int
    keys: list[str]
    args: list[Any]
    max_retry: int
    timeout: float | None
    deadline: float | None

    def info(self, outcome: enqueue_script.EnqueueOutcome) -> TaskInfo:
        if outcome.duplicate_of is not None:
            raise DuplicateTask(
                f"a unique task {self.type!r} with the same payload is already in queue "
                f"{self.queue!r} (task {outcome.duplicate_of})",
                outcome.duplicate_of,
            )
        return TaskInfo(
            id=self.task_id,
            queue=self.queue,
            type=self.type,
            state=TaskState(outcome.state) if outcome.state else TaskState.PENDING,
            payload=self.payload,
            max_retry=self.max_retry,
            timeout=self.timeout,
            deadline=self.deadline,
            already_enqueued=not outcome.created,
        )


class Producer:
    """Validation and encoding of enqueues (no I/O), shared by both clients."""

    def __init__(self, keys: KeySchema, codec: str, max_payload_bytes: int) -> None:
        self.keys = keys
        self.codec = get_codec(codec)
        self.max_payload_bytes = max_payload_bytes

    def prepare(
        self,
        type: str,
        payload: Any = None,
        *,
        queue: str = DEFAULT_QUEUE,
        max_retry: int = DEFAULT_MAX_RETRY,
        process_in: float | timedelta | None = None,
        process_at: datetime | float | None = None,
        timeout: float | timedelta | None = None,
        deadline: datetime | float | None = None,
        unique_for: float | timedelta | None = None,
        task_id: str | None = None,
        retention: float | timedelta | None = None,
    ) -> PreparedEnqueue:
        validate_task_type(type)
        qk = self.keys.queue(queue)
        task_id = validate_task_id(task_id) if task_id is not None else new_task_id()
        if not isinstance(max_retry, int) or max_retry < 0:
            raise ValueError(f"max_retry must be a non-negative integer, got {max_retry!r}")
        if process_in is not None and process_at is not None:
            raise ValueError("give process_in or process_at, not both")
        data = encode_limited(self.codec, payload, self.max_payload_bytes)
        delay = _seconds(process_in, "process_in") or 0.0
        due = _epoch(process_at)
        timeout_s = _seconds(timeout, "timeout")
        deadline_s = _epoch(deadline)
        unique_s = _seconds(unique_for, "unique_for")
        retention_s = _seconds(retention, "retention")
        fields: dict[str, Any] = {
            "type": type,
            "payload": data,
            "maxr": max_retry,
            "retried": 0,
            "att": 0,
        }
        if self.codec.name != "json":
            fields["codec"] = self.codec.name
        if timeout_s:
            fields["tmo"] = int(timeout_s * 1000)
        if deadline_s is not None:
            fields["dl"] = int(deadline_s * 1000)
        if retention_s:
            fields["ret"] = int(retention_s * 1000)
        unique_key = None
        if unique_s:
            digest = hashlib.sha256(type.encode() + b"\0" + data).hexdigest()[:32]
            unique_key = qk.unique(digest)
            fields["uq"] = unique_key
        keys, args = enqueue_script.build(
            qk,
            task_id,
            fields,
            delay_ms=int(delay * 1000),
            due_ms=int(due * 1000) if due is not None else 0,
            unique_key=unique_key,
            unique_ttl_ms=max(1, int((unique_s or 0) * 1000)),
        )
        return PreparedEnqueue(
            task_id=task_id,
            queue=queue,
            type=type,
            payload=payload,
            slot=qk.slot,
            keys=keys,
            args=args,
            max_retry=max_retry,
            timeout=timeout_s,
            deadline=deadline_s,
        )


class Client:
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
        backend: Backend | None = None,
    ) -> None:
        self.backend = backend or Backend(
            url, mode=mode, prefix=prefix, retry_timeout=retry_timeout
        )
        self._owns_backend = backend is None
        self.keys = self.backend.keys
        self.producer = Producer(self.keys, codec, max_payload_bytes)
        self._registered: set[str] = set()

    def close(self) -> None:
        if self._owns_backend:
            self.backend.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def register_queue(self, queue: str) -> None:
        """Add ``queue`` to the registry of queue names (once per client)."""
        if queue in self._registered:
            return
        self.backend.execute_key(self.keys.queues, lambda c: c.sadd(self.keys.queues, queue))
        self._registered.add(queue)
        self.backend.note_queues([queue])

    def enqueue(self, type: str, payload: Any = None, **options: Any) -> TaskInfo:
        """Enqueue one task; see :meth:`Producer.prepare` for the options.

        Retrying with the same ``task_id`` is safe: the second call returns a
        :class:`TaskInfo` with ``already_enqueued=True`` and changes nothing.
        """
        prepared = self.producer.prepare(type, payload, **options)
        self.register_queue(prepared.queue)
        reply = self.backend.execute(
            prepared.slot,
            lambda c: enqueue_script.SCRIPT.call(c, prepared.keys, prepared.args),
        )
        return prepared.info(enqueue_script.parse(reply))
