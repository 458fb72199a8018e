"""Reading one task: the commands that fetch its record and state, the
:class:`~clusterq.task.TaskInfo` built from their replies, and when a waiting
``result()`` is done."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import redis

from clusterq.broker.script import first_error
from clusterq.errors import ResultTimeout, TaskFailed, TaskNotFound
from clusterq.keys import QueueKeys
from clusterq.progress import decode_progress
from clusterq.serialization import PayloadError, get_codec
from clusterq.task import Record, TaskInfo, TaskState, ms_to_s


def info_commands(qk: QueueKeys, task_id: str) -> list[tuple[str, ...]]:
    return [
        ("HGET", qk.tasks, task_id),
        ("HGET", qk.results, task_id),
        ("ZSCORE", qk.active, task_id),
        ("ZSCORE", qk.scheduled, task_id),
        ("ZSCORE", qk.retry, task_id),
        ("ZSCORE", qk.archived, task_id),
        ("ZSCORE", qk.completed, task_id),
        ("GET", qk.progress(task_id)),
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
    raw, result, active, scheduled, retry, archived, completed, progress = values
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
        group=record.group,
        headers=record.headers or {},
        progress=decode_progress(progress) if not isinstance(progress, Exception) else None,
    )


def settled_result(info: TaskInfo) -> Any:
    """The result of a completed task; raises for an archived one; None if still going."""
    if info.state == TaskState.ARCHIVED:
        raise TaskFailed(
            f"task {info.id} in queue {info.queue!r} was archived after {info.retried} "
            f"retries: {info.last_error}",
            info.last_error,
        )
    return info.state == TaskState.COMPLETED


def poll_delay(attempt: int) -> float:
    return min(0.2, 0.005 * 2.0 ** min(attempt, 10))


def info_values(answers: Sequence[Any]) -> list[Any]:
    """The replies to :func:`info_commands`; an error among them is raised (a ``MOVED``
    or a connection loss: the backend retries the read)."""
    answers = list(answers)
    if isinstance(answers[7], redis.ResponseError) and "WRONGTYPE" in str(answers[7]):
        answers[7] = None  # a progress key holding something else: not progress
    error = first_error(answers)
    if error is not None:
        raise error
    return answers


class ResultWait:
    """How ``result()`` polls a task: until it completed (its result), was archived
    (:class:`TaskFailed`) or ``timeout`` passed (:class:`ResultTimeout`; None: never)."""

    def __init__(self, timeout: float | None) -> None:
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.attempt = 0

    def done(self, info: TaskInfo) -> bool:
        if settled_result(info):
            return True
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise ResultTimeout(f"task {info.id} is still {info.state} after {self.timeout}s")
        return False

    def delay(self) -> float:
        """Seconds until the next look: short at first, then up to 0.2 s."""
        self.attempt += 1
        return poll_delay(self.attempt - 1)
