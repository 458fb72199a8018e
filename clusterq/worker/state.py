"""What the parts of a worker share: its settings, its counters, the tasks it holds per
queue, and the outcome of one handler call."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from clusterq.broker.ack import Ack
from clusterq.keys import QueueKeys, validate_queue_name
from clusterq.retry import DEFAULT_RETRY_POLICY, RetryPolicy
from clusterq.serialization import DEFAULT_MAX_PAYLOAD_BYTES

DEFAULT_LEASE = 10.0
DEFAULT_RECOVER_INTERVAL = 1.0
DEFAULT_POLL_INTERVAL = 0.1
DEFAULT_TOPOLOGY_INTERVAL = 0.5
#: Seconds between surveys of idle queues (see :mod:`clusterq.worker.wakeups`): the
#: longest a lost wake-up can delay a task.
DEFAULT_SURVEY_INTERVAL = 1.0
#: How long the id of a task deleted on success is remembered: an enqueue of the same id
#: (a producer retrying after a timeout or a failover) is then "already enqueued" instead
#: of a second run. Longer than the client's retry timeout.
DEFAULT_DEDUP_WINDOW = 20.0
MAX_ERROR_LENGTH = 2000
#: A task of a type this worker has no handler for is retried this many times (another
#: worker, of another version, may know it), then archived with a clear error.
DEFAULT_NO_HANDLER_RETRIES = 3


def parse_queues(queues: Mapping[str, int] | Iterable[str] | str | None) -> dict[str, int]:
    """``{"critical": 6, "default": 3}``, ``["a", "b"]`` or ``"critical=6,default=3"``."""
    if queues is None:
        return {"default": 1}
    if isinstance(queues, str):
        parsed: dict[str, int] = {}
        for part in queues.split(","):
            queue_name, _, weight_text = part.strip().partition("=")
            try:
                parsed[queue_name] = int(weight_text) if weight_text else 1
            except ValueError:
                raise ValueError(
                    f"invalid queue weight in {part!r}: expected name=integer"
                ) from None
        queues = parsed
    weights = dict(queues) if isinstance(queues, Mapping) else {q: 1 for q in queues}
    if not weights:
        raise ValueError("a worker needs at least one queue")
    for name, weight in weights.items():
        validate_queue_name(name)
        if not isinstance(weight, int) or weight < 1:
            raise ValueError(f"weight of queue {name!r} must be a positive integer, got {weight!r}")
    return weights


def check_options(concurrency: object, shutdown_timeout: float, **seconds: float) -> None:
    """A worker's numeric options, each named in its error: ``seconds`` must be above 0."""
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ValueError(f"concurrency must be an integer of at least 1, got {concurrency!r}")
    for option, value in seconds.items():
        if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
            raise ValueError(f"{option} must be a number of seconds above 0, got {value!r}")
    if not (math.isfinite(shutdown_timeout) and shutdown_timeout >= 0):
        raise ValueError(f"shutdown_timeout must be 0 or more seconds, got {shutdown_timeout!r}")


@dataclass
class WorkerSettings:
    """How a worker behaves; see :class:`~clusterq.worker.Worker` for each setting."""

    concurrency: int = 10
    shutdown_timeout: float = 10.0
    lease: float = DEFAULT_LEASE
    recover_interval: float = DEFAULT_RECOVER_INTERVAL
    poll_interval: float = DEFAULT_POLL_INTERVAL
    retry_policy: RetryPolicy = DEFAULT_RETRY_POLICY
    batch_size: int = 10
    archive_max_size: int = 10_000
    archive_max_age: float = 90 * 24 * 3600.0
    max_result_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    dedup_window: float = DEFAULT_DEDUP_WINDOW
    #: Seconds between lease renewals (lease / 4 unless changed).
    heartbeat_interval: float = DEFAULT_LEASE / 4
    #: Retries of a task whose type no handler here knows, before it is archived.
    no_handler_retries: int = DEFAULT_NO_HANDLER_RETRIES
    #: Idle queues wait for wake-ups (sharded pub/sub) instead of polling.
    wakeups: bool = True
    survey_interval: float = DEFAULT_SURVEY_INTERVAL
    #: Seconds a plain ``def`` handler's attempt may run when its task has no timeout
    #: (None: no limit). Past it the attempt fails with a "timeout: ..." error like any
    #: timeout, and its thread is abandoned (see :attr:`Runner.abandoned
    #: <clusterq.worker.runner.Runner.abandoned>`). ``async def`` handlers are not
    #: affected (they are cancelled at a task's own timeout).
    hard_timeout: float | None = None

    @property
    def lease_ms(self) -> int:
        return int(self.lease * 1000)


@dataclass
class WorkerStats:
    #: Tasks whose ack the server applied (what ``worker ls`` shows).
    processed: int = 0
    #: Handlers that returned (their ack queued, perhaps not yet applied, or refused).
    succeeded: int = 0
    failed: int = 0
    archived: int = 0
    recovered: int = 0
    #: Leases this worker lost (its ack or fail was then ignored; the task may run again).
    leases_lost: int = 0
    #: Times one of its loops stopped unexpectedly and was started again.
    loop_restarts: int = 0
    #: Sweeps of a queue started (retention, archive trimming, expired leases).
    sweeps: int = 0
    #: Tasks handed back to their queues unfinished at a stop (no retry spent).
    returned: int = 0
    #: Handlers that raised ``RateLimited`` (their tasks wait, no retry spent).
    rate_limited: int = 0


@dataclass
class Held:
    """A task this worker took: its fencing token, and whether its outcome was decided
    (``done``: no more renewals) or its lease lost."""

    token: str
    done: bool = False
    lost: bool = False
    #: The task running it (``Runner.execute``), and whether an operator cancelled it.
    run: asyncio.Task[None] | None = None
    cancelled: bool = False


@dataclass
class QueueState:
    """One queue as this worker serves it."""

    name: str
    qk: QueueKeys
    held: dict[str, Held] = field(default_factory=dict)
    acks: list[Ack] = field(default_factory=list)
    flusher: asyncio.Task[None] | None = None
    waiting: asyncio.Future[Any] | None = None
    #: A drained partition that was retired: its fetch loop ends.
    retired: bool = False
    #: Set to wake the idle fetch loop (a wake-up, the survey, a stop); cleared by the
    #: loop before each dequeue.
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    #: Unix time (s) the earliest scheduled/retry task is due, as last seen; None: none.
    next_due: float | None = None
    #: The recoverer should sweep it (work was taken since its last sweep, or the survey
    #: saw something to sweep for); an idle queue with wake-ups is not swept otherwise.
    sweep_due: bool = True
    #: Why the fetch loop waits with tasks pending (the queue's limits: "rate",
    #: "concurrency", "hold"; "group": every fair group held back by its own); None
    #: when it does not.
    flow_limited: str | None = None
    #: Dequeues that found tasks pending but took none because of the queue's limits,
    #: by reason.
    held_back: dict[str, int] = field(default_factory=dict)

    def slot_freed(self) -> None:
        """A task of the queue ended here (acked, failed): a loop waiting for the
        queue's concurrency cap looks again."""
        if self.flow_limited == "concurrency":
            self.wake.set()

    def unfinished(self) -> list[tuple[str, str]]:
        """(id, token) of the tasks still held and neither decided nor lost."""
        return [(i, h.token) for i, h in self.held.items() if not h.done and not h.lost]

    def renewable(self) -> list[tuple[str, str]]:
        """(id, token) of the tasks whose leases are still ours to renew."""
        return [(i, h.token) for i, h in self.held.items() if not h.lost]


@dataclass
class Outcome:
    """How one attempt of a task ended."""

    ok: bool
    result: bytes = b""
    error: str = ""
    exception: BaseException | None = None
    retry_in: float | None = None
    archive: bool = False
    #: ``RateLimited``: again after ``retry_in`` without spending a retry; the queue held
    #: back for that long too when ``hold``.
    rate_limited: bool = False
    hold: str = ""
    #: No handler for the task's type here: retried a few times (another worker version
    #: may know it), then archived.
    no_handler: bool = False
    #: The handler raised ``exception`` itself: its traceback goes into the log.
    traceback: bool = False
    #: A workflow step's result, JSON-encoded for the workflow's state.
    workflow_result: bytes = b"null"


class RunState:
    """The worker's lifecycle flags, read by every loop."""

    def __init__(self) -> None:
        #: No more fetching; running tasks may finish.
        self.stopping = False
        #: A second signal: stop at once.
        self.aborting = False
        #: Background loops end.
        self.closing = False


class Persistent:
    """Says at WARNING when an operation keeps failing for one subject (a queue): a
    failure or two (a failover) at DEBUG, then WARNING with the reason, at most once per
    ``every`` seconds while it goes on (with how many failed meanwhile), and INFO when it
    works again."""

    def __init__(
        self, log: logging.Logger, what: str, *, after: int = 3, every: float = 60.0
    ) -> None:
        self.log = log
        self.what = what
        self.after = after
        self.every = every
        #: subject -> (failures in a row, when last warned, failures since)
        self._state: dict[str, tuple[int, float, int]] = {}

    def failed(self, subject: str, exc: BaseException) -> None:
        count, warned, since = self._state.get(subject, (0, 0.0, 0))
        count += 1
        since += 1
        now = time.monotonic()
        if count < self.after:
            self.log.debug("%s of %s failed (%s)", self.what, subject, exc)
        elif now - warned >= self.every:
            self.log.warning(
                "%s of %s keeps failing (%d in a row, %d since last said): %s",
                self.what,
                subject,
                count,
                since,
                exc,
            )
            warned, since = now, 0
        self._state[subject] = (count, warned, since)

    def worked(self, subject: str) -> None:
        state = self._state.pop(subject, None)
        if state is not None and state[0] >= self.after:
            self.log.info("%s of %s works again (after %d failures)", self.what, subject, state[0])
