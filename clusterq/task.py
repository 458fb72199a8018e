"""Task states, the task record, and the :class:`Task` a handler receives.

A task lives in one queue's slot: its record is a field of the queue's ``tasks`` hash,
and its id is a member of exactly one state structure of that queue:

=========  ==================================================  ==========================
state      where the id is                                     how it gets there
=========  ==================================================  ==========================
pending    ``pending`` list                                    enqueue, forward, requeue
scheduled  ``scheduled`` zset (score: due time)                enqueue with a delay
active     ``active`` zset (score: lease expiry) + ``leases``  dequeue
retry      ``retry`` zset (score: next attempt)                fail, lease expiry
archived   ``archived`` zset (score: archived at)              fail after the last retry
completed  ``completed`` zset (score: kept until)              ack with a retention
=========  ==================================================  ==========================

The record is ``<meta JSON>\\n<payload bytes>``. Scripts treat it as opaque bytes, except
the fail transition, which swaps the meta part for one the worker computed. Meta fields
(short names keep a small task small; absent means the default):

====  =========================================  ====  ==================================
t     task type                                  to    timeout of one attempt (ms)
c     payload codec (absent: json)               dl    deadline (ms since the epoch)
mr    retries allowed after the first attempt    u     key of the unique lock
r     retries so far                             rt    kept after success for (ms)
e     enqueued at (ms since the epoch)           err   last error; ``fa`` when (ms)
g     fair group (right after ``t``)           h     headers: a small string map (before ``e``)
====  =========================================  ====  ==================================
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field, fields, replace
from enum import Enum
from types import MappingProxyType
from typing import Any

from clusterq.progress import Progress
from clusterq.serialization import json_bytes, json_value

#: The headers of a task enqueued without any (shared, read-only).
NO_HEADERS: Mapping[str, str] = MappingProxyType({})


#: How ``Task.progress`` reaches the worker running the handler (set by the worker; see
#: :mod:`clusterq.worker.progress`).
PROGRESS_REPORTER: ContextVar[Callable[[Task, float, dict[str, Any] | None], None]] = ContextVar(
    "clusterq_progress"
)


class TaskState(str, Enum):
    PENDING = "pending"
    SCHEDULED = "scheduled"
    ACTIVE = "active"
    RETRY = "retry"
    ARCHIVED = "archived"
    COMPLETED = "completed"

    def __str__(self) -> str:
        return self.value


#: State by name (a dict lookup is ten times faster than ``TaskState(name)``).
STATES: dict[str, TaskState] = {state.value: state for state in TaskState}


@dataclass(frozen=True)
class Record:
    """A task record as stored in the queue's ``tasks`` hash."""

    type: str
    payload: bytes
    codec: str = "json"
    max_retry: int = 25
    retried: int = 0
    enqueued_ms: int = 0
    timeout_ms: int | None = None
    deadline_ms: int | None = None
    unique_key: str | None = None
    retention_ms: int | None = None
    last_error: str | None = None
    failed_ms: int | None = None
    #: A workflow step: the workflow's id, the step's id, and what the step waited for
    #: (results of its parents in order; errors for a chord's on_error step).
    workflow: str | None = None
    step: str | None = None
    parent_results: list[Any] | None = None
    #: The workflow's durability, where it is not "none" (its state's changes wait on it).
    workflow_durability: str | None = None
    #: The fair group the task belongs to (``enqueue(..., group=...)``).
    group: str | None = None
    #: Metadata beside the payload (``enqueue(..., headers=...)``): trace context, tenant...
    headers: dict[str, str] | None = None

    def meta(self) -> bytes:
        fields = _meta_fields(
            self.type,
            self.group,
            self.codec,
            self.max_retry,
            self.timeout_ms,
            self.deadline_ms,
            self.unique_key,
            self.retention_ms,
        )
        if self.retried:
            fields["r"] = self.retried
        if self.last_error is not None:
            fields["err"] = self.last_error
        if self.failed_ms is not None:
            fields["fa"] = self.failed_ms
        if self.workflow is not None:
            fields["wf"] = self.workflow
            fields["ws"] = self.step
            fields["pr"] = self.parent_results
            if self.workflow_durability is not None:
                fields["wd"] = self.workflow_durability
        if self.headers:
            fields["h"] = self.headers
        return json_bytes(fields)[:-1] + b',"e":%d}' % self.enqueued_ms  # last, as in with_enqueued

    def encode(self) -> bytes:
        return self.meta() + b"\n" + self.payload

    @classmethod
    def decode(cls, raw: bytes) -> Record:
        """Parse a stored record; raises ``ValueError`` (naming the field) for one that
        is not what clusterq writes, so that it is archived as unreadable rather than
        breaking whatever reads it later."""
        meta_raw, _, payload = raw.partition(b"\n")
        meta = json_value(meta_raw)
        if not isinstance(meta, dict):
            raise ValueError("record meta is not a JSON object")
        get = meta.get
        record = cls(  # positional: this runs once per task a worker takes
            get("t", ""),
            payload,
            get("c", "json"),
            get("mr", 0),
            get("r", 0),
            get("e", 0),
            get("to"),
            get("dl"),
            get("u"),
            get("rt"),
            get("err"),
            get("fa"),
            get("wf"),
            get("ws"),
            get("pr"),
            get("wd"),
            get("g"),
            get("h"),
        )
        record._check()
        return record

    def _check(self) -> None:
        if type(self.type) is not str or not self.type or type(self.codec) is not str:
            raise ValueError("record has no task type (t) or a codec (c) that is not a string")
        counts: tuple[tuple[str, object], ...] = (
            ("mr", self.max_retry),
            ("r", self.retried),
            ("e", self.enqueued_ms),
        )
        for name, count in counts:
            if type(count) is not int or count < 0:
                raise ValueError(f"record field {name!r} is not a non-negative integer: {count!r}")
        optional: tuple[tuple[str, object], ...] = (
            ("to", self.timeout_ms),
            ("dl", self.deadline_ms),
            ("rt", self.retention_ms),
            ("fa", self.failed_ms),
        )
        for name, field_value in optional:
            if field_value is not None and type(field_value) is not int:
                raise ValueError(f"record field {name!r} is not an integer: {field_value!r}")
        if self.workflow is not None and (
            type(self.workflow) is not str
            or type(self.step) is not str
            or not isinstance(self.parent_results, list | None)
        ):
            raise ValueError("record fields 'wf', 'ws' and 'pr' are not a workflow step")
        if self.workflow_durability not in (None, "replica", "aof"):
            raise ValueError(f"record field 'wd' is not a durability: {self.workflow_durability!r}")
        for name, text in (("u", self.unique_key), ("err", self.last_error), ("g", self.group)):
            if text is not None and type(text) is not str:
                raise ValueError(f"record field {name!r} is not a string: {text!r}")
        headers = self.headers
        if headers is not None and (
            type(headers) is not dict
            or not all(type(k) is str and type(v) is str for k, v in headers.items())
        ):
            raise ValueError(f"record field 'h' is not a map of strings: {headers!r:.80}")

    @staticmethod
    def unreadable_meta(error: str, at_ms: int) -> bytes:
        """The meta written over a record that could not be read, when its task is
        archived: type unknown ("?"), the error and when it happened; the payload part
        of the record is kept as it was, for inspection."""
        return json_bytes({"t": "?", "err": error, "fa": at_ms})

    def failed(self, error: str, at_ms: int, *, count: bool = True) -> Record:
        """The record after a failed attempt (``count``: it uses up one retry)."""
        return replace(
            self, retried=self.retried + (1 if count else 0), last_error=error, failed_ms=at_ms
        )


def _meta_fields(
    type: str,
    group: str | None,
    codec: str,
    max_retry: int,
    timeout_ms: int | None,
    deadline_ms: int | None,
    unique_key: str | None,
    retention_ms: int | None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {"t": type}
    if group is not None:  # right after the type: dequeue.lua reads it there
        meta["g"] = group
    meta["mr"] = max_retry
    if codec != "json":
        meta["c"] = codec
    for key, value in (
        ("to", timeout_ms),
        ("dl", deadline_ms),
        ("u", unique_key),
        ("rt", retention_ms),
    ):
        if value is not None:
            meta[key] = value
    return meta


_META_CACHE: dict[tuple[Any, ...], bytes] = {}


def record_meta(
    type: str,
    *,
    group: str | None = None,
    codec: str = "json",
    max_retry: int = 25,
    timeout_ms: int | None = None,
    deadline_ms: int | None = None,
    unique_key: str | None = None,
    retention_ms: int | None = None,
) -> bytes:
    """The meta JSON of a new task's record, open: without its last field, the enqueue
    time, which :func:`with_enqueued` adds. Cached for tasks that share all of it."""
    key = (type, group, codec, max_retry, timeout_ms, deadline_ms, unique_key, retention_ms)
    meta = _META_CACHE.get(key)
    if meta is None:
        meta = json_bytes(_meta_fields(*key))[:-1]
        if deadline_ms is None and unique_key is None:  # those vary from task to task
            if len(_META_CACHE) >= 1024:
                _META_CACHE.clear()
            _META_CACHE[key] = meta
    return meta


def headers_field(headers: dict[str, str]) -> bytes:
    """The headers' part of a record's meta, inserted before its last field (``e``)."""
    return b',"h":' + json_bytes(headers)


def with_enqueued(meta: bytes, enqueued_ms: int) -> bytes:
    """A new task's record up to its payload: ``head + payload`` is what
    ``Record(...).encode()`` gives."""
    return meta + b',"e":%d}\n' % enqueued_ms


@dataclass(frozen=True)
class Task:
    """What a handler receives."""

    id: str
    type: str
    payload: Any
    queue: str
    #: Retries so far (0 on the first attempt).
    retry_count: int = 0
    max_retry: int = 0
    #: Seconds one attempt may take, if limited.
    timeout: float | None = None
    #: Unix time after which the task must not run, if set.
    deadline: float | None = None
    enqueued_at: float | None = None
    #: Identifies this delivery (the lease's fencing token): a task that runs twice,
    #: after a crash or a failover, gets a different value each time.
    attempt: str = ""
    #: In a workflow: what this step waited for — the previous step's result as a
    #: one-item list in a chain, the group's results in order for a chord's callback,
    #: the group's errors (None where a member did not fail) for a chord's on_error.
    parent_results: list[Any] | None = None
    #: The id of the workflow this task is a step of, if any.
    workflow: str | None = None
    #: The fair group it was enqueued in (``enqueue(..., group=...)``), if any.
    group: str | None = None
    #: The string map given as ``enqueue(..., headers=...)`` (empty if none).
    headers: Mapping[str, str] = field(default_factory=lambda: NO_HEADERS)

    def progress(self, fraction: float, data: dict[str, Any] | None = None) -> None:
        """Report how far this attempt got: ``fraction`` from 0 to 1 and a small JSON
        dict, seen by ``client.info(...).progress`` and ``task inspect`` while it runs.
        An async handler's report is written in the background (the call does not
        wait); a plain ``def`` handler's before the call returns. A report from an
        attempt that lost its lease is refused (logged; the task goes on)."""
        try:
            report = PROGRESS_REPORTER.get()
        except LookupError:
            raise RuntimeError("task.progress() works only in a handler a worker runs") from None
        report(self, fraction, data)


@dataclass(slots=True)
class TaskInfo:
    """What is known about one task."""

    id: str
    queue: str
    type: str
    state: TaskState
    payload: Any = None
    max_retry: int = 0
    retried: int = 0
    enqueued_at: float | None = None
    #: When a scheduled or retry task becomes pending; lease expiry of an active task.
    next_process_at: float | None = None
    timeout: float | None = None
    deadline: float | None = None
    last_error: str | None = None
    last_failed_at: float | None = None
    #: For completed tasks: until when the task and its result are kept.
    retained_until: float | None = None
    result: Any = None
    #: True when enqueue found a task with this id already there (an idempotent retry).
    already_enqueued: bool = False
    #: From enqueue_many: the id of the unique task that made this one a duplicate.
    duplicate_of: str | None = None
    #: With durable enqueue: how many replicas confirmed the write (WAIT's answer).
    replicas: int | None = None
    #: The fair group it was enqueued in, if any.
    group: str | None = None
    #: The headers it was enqueued with (empty if none).
    headers: dict[str, str] = field(default_factory=dict)
    #: The latest progress the running (or last) attempt reported, if any.
    progress: Progress | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["state"] = self.state.value
        out["progress"] = None if self.progress is None else self.progress.to_dict()
        return out


def ms_to_s(value: int | float | None) -> float | None:
    return None if value is None else value / 1000.0
