"""The :class:`Worker`: connects, then runs its parts until stopped.

One asyncio event loop per worker process runs, for each queue, a fetch loop
(:mod:`~clusterq.worker.fetcher`), the tasks it starts (:mod:`~clusterq.worker.runner`,
whose outcomes go through :mod:`~clusterq.worker.outcomes`), and background loops: the
heartbeat (:mod:`~clusterq.worker.leases`), the recoverer
(:mod:`~clusterq.worker.recoverer`), the announcer (:mod:`~clusterq.worker.announce`)
and the wake-ups of idle queues (:mod:`~clusterq.worker.wakeups`: with them, an idle
queue costs next to nothing on Redis >= 7.0 and Valkey).
This module owns only the lifecycle: start, graceful stop, abort, signals, events.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from clusterq.aclient import AsyncClient
from clusterq.broker.facade import Broker
from clusterq.cluster.abackend import AsyncBackend
from clusterq.cluster.changes import ReplicaAdded, TopologyEvent
from clusterq.cluster.connection import DEFAULT_URL, Mode, RedisURL
from clusterq.cluster.routing import DEFAULT_RETRY_TIMEOUT
from clusterq.cluster.topology import Topology
from clusterq.errors import ForeignData
from clusterq.events import EventListener, QueueResumed
from clusterq.priority import Capacity
from clusterq.producer import new_task_id
from clusterq.retry import DEFAULT_RETRY_POLICY, RetryPolicy
from clusterq.router import Router
from clusterq.serialization import DEFAULT_MAX_PAYLOAD_BYTES
from clusterq.streams import select_consumers
from clusterq.task import PROGRESS_REPORTER
from clusterq.worker.announce import Announcer
from clusterq.worker.consumers import Consumers
from clusterq.worker.fetcher import Fetcher
from clusterq.worker.leases import Leases
from clusterq.worker.outcomes import Outcomes
from clusterq.worker.partitions import PartitionWatch
from clusterq.worker.recoverer import Recoverer
from clusterq.worker.recycle import ProcessLimits, Recycler
from clusterq.worker.runner import Runner
from clusterq.worker.state import (
    DEFAULT_DEDUP_WINDOW,
    DEFAULT_LEASE,
    DEFAULT_NO_HANDLER_RETRIES,
    DEFAULT_POLL_INTERVAL,
    DEFAULT_RECOVER_INTERVAL,
    DEFAULT_SURVEY_INTERVAL,
    DEFAULT_TOPOLOGY_INTERVAL,
    QueueState,
    RunState,
    WorkerSettings,
    WorkerStats,
    check_options,
    parse_queues,
)
from clusterq.worker.supervise import Supervisor
from clusterq.worker.wakeups import Wakeups
from clusterq.workflow import AsyncWorkflows

if TYPE_CHECKING:
    from clusterq.cluster.backend import Backend
    from clusterq.ops.metrics import WorkerMetrics

log = logging.getLogger("clusterq.worker")

_current: contextvars.ContextVar[Worker] = contextvars.ContextVar("clusterq_worker")


def current_worker() -> Worker:
    """The worker running the calling handler (its ``backend`` can talk to the cluster)."""
    try:
        return _current.get()
    except LookupError:
        raise RuntimeError("current_worker() is only available inside a handler") from None


class Worker:
    """Runs handlers for the tasks of some queues.

    ``queues`` maps queue names to weights (``{"critical": 6, "default": 3, "low": 1}``);
    with ``strict_priority`` a queue is served only when every heavier queue is empty.
    ``concurrency`` tasks run at once. ``lease`` seconds is how long a task stays
    reserved without a heartbeat; a worker that dies loses its tasks to the recoverer
    after about that long. ``shutdown_timeout`` is how long :meth:`stop` lets running
    tasks finish before it returns the rest to their queues. ``wakeups`` and
    ``survey_interval``: see :mod:`clusterq.worker.wakeups` (without, an idle queue is
    polled every ``poll_interval``). ``hard_timeout``: the timeout of a plain-function
    handler whose task has none. Several processes: :mod:`clusterq.worker.processes`.
    """

    def __init__(
        self,
        url: str | RedisURL = DEFAULT_URL,
        router: Router | None = None,
        *,
        queues: Mapping[str, int] | Iterable[str] | str | None = None,
        strict_priority: bool = False,
        concurrency: int = 10,
        shutdown_timeout: float = 10.0,
        prefix: str = "clusterq",
        mode: Mode | None = None,
        lease: float = DEFAULT_LEASE,
        recover_interval: float = DEFAULT_RECOVER_INTERVAL,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        retry_policy: RetryPolicy = DEFAULT_RETRY_POLICY,
        batch_size: int | None = None,
        archive_max_size: int = 10_000,
        archive_max_age: float = 90 * 24 * 3600.0,
        max_result_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        dedup_window: float = DEFAULT_DEDUP_WINDOW,
        retry_timeout: float = DEFAULT_RETRY_TIMEOUT,
        topology_interval: float = DEFAULT_TOPOLOGY_INTERVAL,
        name: str | None = None,
        no_handler_retries: int = DEFAULT_NO_HANDLER_RETRIES,
        metrics: WorkerMetrics | None = None,
        streams: Iterable[str | tuple[str, str]] | str | None = None,
        wakeups: bool = True,
        survey_interval: float = DEFAULT_SURVEY_INTERVAL,
        hard_timeout: float | None = None,
    ) -> None:
        if router is None:
            raise ValueError("a worker needs a Router")
        check_options(
            concurrency,
            shutdown_timeout,
            lease=lease,
            poll_interval=poll_interval,
            recover_interval=recover_interval,
            survey_interval=survey_interval,
        )
        self.url = url
        self.router = router
        self.weights = parse_queues(queues)
        #: The stream consumers it runs (``streams``: "stream:group" names,
        #: default all the router's; "none" for none).
        self.consumers = Consumers(select_consumers(router, streams))
        self.strict_priority = strict_priority
        self.prefix = prefix
        self.mode = mode
        self.retry_timeout = retry_timeout
        self.topology_interval = topology_interval
        self.settings = WorkerSettings(
            concurrency=concurrency,
            shutdown_timeout=shutdown_timeout,
            lease=lease,
            recover_interval=recover_interval,
            poll_interval=poll_interval,
            retry_policy=retry_policy,
            batch_size=batch_size or min(concurrency, 50),
            archive_max_size=archive_max_size,
            archive_max_age=archive_max_age,
            max_result_bytes=max_result_bytes,
            dedup_window=dedup_window,
            heartbeat_interval=lease / 4,
            no_handler_retries=no_handler_retries,
            wakeups=wakeups,
            survey_interval=survey_interval,
            hard_timeout=hard_timeout,
        )
        self.id = name or f"{socket.gethostname()}:{os.getpid()}:{new_task_id()[:6]}"
        self.stats = WorkerStats()
        self.started_at: float | None = None
        self.backend: AsyncBackend | None = None
        self._listeners: list[EventListener] = []
        self._queues: dict[str, QueueState] = {}
        self._all_queues: list[QueueState] = []
        self._capacity = Capacity(concurrency, self.weights, strict=strict_priority)
        self._state = RunState()
        self._supervisor = Supervisor(self.stats, self._emit)
        self._seq = 0
        self._run = new_task_id()[:8]
        self._closed: asyncio.Event | None = None
        self._runner: Runner | None = None
        self._fetcher: Fetcher | None = None
        self._outcomes: Outcomes | None = None
        self._announcer: Announcer | None = None
        #: How idle queues are woken (set up by :meth:`start`).
        self.wakeups: Wakeups | None = None
        #: Prometheus metrics of this worker (``clusterq.ops.metrics.WorkerMetrics``), if any.
        self.metrics = metrics
        #: More fields for its announcement (a supervised process: its supervisor).
        self.labels: dict[str, Any] = {}
        #: Limits after which this process stops to be replaced (:mod:`.recycle`).
        self.limits = ProcessLimits()
        self.recycler: Recycler | None = None
        if metrics is not None:
            metrics.bind(self)

    # ------------------------------------------------------------------ settings

    @property
    def concurrency(self) -> int:
        return self.settings.concurrency

    @property
    def lease(self) -> float:
        return self.settings.lease

    @property
    def heartbeat_interval(self) -> float:
        """Seconds between lease renewals (a quarter of the lease by default)."""
        return self.settings.heartbeat_interval

    @heartbeat_interval.setter
    def heartbeat_interval(self, seconds: float) -> None:
        self.settings.heartbeat_interval = seconds

    @property
    def queues(self) -> list[str]:
        return list(self.weights)

    @property
    def active(self) -> int:
        """Concurrency slots in use: running handlers and slots a fetch loop holds
        while it asks for tasks."""
        return self._capacity.in_use

    @property
    def running(self) -> int:
        """Handlers running now (what ``worker ls`` shows)."""
        return len(self._running)

    @property
    def held(self) -> int:
        """Tasks whose leases this worker holds: taken and not yet acknowledged, failed
        or handed back (an ack waiting to be sent still holds its lease)."""
        return sum(len(q.held) for q in self._queues.values())

    # ------------------------------------------------------------------ events

    def subscribe(self, listener: EventListener) -> None:
        """Call ``listener(event)`` for every topology change this worker sees and when
        one of its queues becomes unavailable or resumes (see :mod:`clusterq.events`)."""
        self._listeners.append(listener)

    def _on_topology(self, _topology: Topology, events: list[TopologyEvent]) -> None:
        for event in events:
            self._emit(event)

    def _emit(self, event: TopologyEvent) -> None:
        routine = isinstance(event, QueueResumed | ReplicaAdded) or getattr(event, "routine", False)
        level = logging.INFO if routine else logging.WARNING
        log.log(level, "%s", event.describe(), extra={"event": event.to_dict()})
        if self._announcer is not None:
            self._announcer.note(event)
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("event listener failed")

    # ------------------------------------------------------------------ lifecycle

    def _next_token(self) -> str:
        """A fencing token no other dequeue ever gets: this worker's id, a nonce drawn
        for this run (two workers given the same ``name`` still differ), a counter."""
        self._seq += 1
        return f"{self.id}:{self._run}:{self._seq}"

    def _describe(self) -> dict[str, Any]:
        return {
            "queues": self.weights,
            "strict_priority": self.strict_priority,
            "concurrency": self.concurrency,
            "started": self.started_at,
            "active": self.running,
            "processed": self.stats.processed,
            "failed": self.stats.failed,
            "loop_restarts": self.stats.loop_restarts,
            "streams": self.consumers.labels,
            **self.labels,
        }

    async def start(self) -> None:
        """Connect and start fetching. Returns once the worker runs."""
        if self.backend is not None:
            raise RuntimeError("worker already started")
        self._closed = asyncio.Event()
        _current.set(self)  # tasks created from here on inherit it
        self.backend = backend = await AsyncBackend.connect(
            self.url, mode=self.mode, prefix=self.prefix, retry_timeout=self.retry_timeout
        )
        backend.note_queues(self.weights)
        backend.subscribe(self._on_topology)
        if backend.mode == "cluster":
            backend.start_watching(self.topology_interval)
        await _register(backend, list(self.weights))
        broker = Broker(backend)
        settings, stats, state = self.settings, self.stats, self._state
        self.wakeups = wakeups = Wakeups(broker, settings, state, lambda: self._all_queues)
        idle = await wakeups.start()
        self._outcomes = Outcomes(broker, settings, stats)
        observe = self.metrics.observe if self.metrics is not None else None
        aborting = lambda: state.aborting  # noqa: E731
        self._runner = Runner(self.router, settings, self._capacity, self._outcomes, aborting)
        PROGRESS_REPORTER.set(self._runner.progress.report)  # like _current, for handlers
        self._runner.observe = observe
        workflows = AsyncWorkflows(AsyncClient(backend))
        self._runner.workflows = self._outcomes.workflows = workflows
        cap, runner = self._capacity, self._runner
        fetcher = Fetcher(
            broker, settings, cap, runner, state, self._emit, self._next_token, wakeups
        )
        self._fetcher, fetcher.queues, fetcher.all_queues = fetcher, self._queues, self._all_queues
        fetcher.supervise = supervise = self._supervisor.start
        if self.limits.any:
            self.recycler = recycler = Recycler(self.id, self.limits, self._emit, self.stop)
            recycler.attach(fetcher, runner)
            if self.limits.kill_after is not None:
                stopping = lambda: state.stopping  # noqa: E731
                watch = functools.partial(recycler.watch_stuck, runner.abandoned, stopping)
                supervise("recycle", watch, lambda: not state.stopping)
        self._announcer = Announcer(backend, self.id, self._describe, state)
        self.started_at = time.time()
        running = lambda: not state.closing  # noqa: E731
        strict = self.strict_priority
        self._partitions = PartitionWatch(backend, self.weights, fetcher, strict, state)
        await self._partitions.load()  # a fetch loop per queue, or per partition
        all_queues = self._all_queues
        leases = Leases(broker, settings, stats, state, self._cancel)
        recoverer = Recoverer(broker, settings, stats, self._outcomes, state, wakeups)
        supervise("heartbeat", lambda: leases.loop(all_queues), running)
        supervise("recover", lambda: recoverer.loop(all_queues), running)
        supervise("announce", self._announcer.loop, running)
        supervise("partitions", self._partitions.loop, lambda: not state.stopping)
        supervise("wakeups", wakeups.loop, lambda: not state.closing and wakeups.active)
        self.consumers.start(backend, self.id, self.lease, state, self._supervisor.start)
        log.info(
            "worker %s started: queues %s, concurrency %d, %s at %s; %s",
            self.id,
            _queues_phrase(self.weights),
            self.concurrency,
            backend.mode,
            backend.topology.source,
            idle,
        )

    @property
    def sync_backend(self) -> Backend:
        """A blocking backend for plain ``def`` handlers: :mod:`clusterq.worker.blocking`."""
        if self._runner is None:
            raise RuntimeError("the worker is not started")
        return self._runner.sync_backend

    @property
    def fetching_from(self) -> list[str]:
        """The queues this worker fetches from: its queues, partitions expanded."""
        return [name for name, q in self._queues.items() if not q.retired]

    @property
    def _running(self) -> set[asyncio.Task[None]]:
        return self._fetcher.running if self._fetcher is not None else set()

    async def stop(self, timeout: float | None = None) -> None:
        """Stop fetching, let running tasks finish (``timeout``, default
        ``shutdown_timeout``), return unfinished ones to their queues, flush acks."""
        if self.backend is None or self._state.stopping:
            await self.wait_closed()
            return
        assert self._fetcher is not None and self._outcomes is not None
        self._state.stopping = True
        grace = self.settings.shutdown_timeout if timeout is None else timeout
        log.info("worker %s stopping: %d tasks running", self.id, len(self._running))
        queues = list(self._queues.values())
        await self._stop_fetching()
        if self._running:
            _, late = await asyncio.wait(set(self._running), timeout=grace)
            if self._state.aborting:  # a second signal: abort() closes, returns nothing
                await self.wait_closed()
                return
            await cancel_and_wait(late)
        await self._outcomes.return_unfinished(queues)
        await self._outcomes.flush_all(queues, max(5.0, self.retry_timeout))
        await self.consumers.stop()
        await self._close(announce=True)
        log.info("worker %s stopped: %s", self.id, self.stats)

    def _cancel(self, q: QueueState, task_id: str) -> None:
        """An operator asked to cancel ``task_id``: cancel its handler (once)."""
        held = q.held.get(task_id)
        if held is None or held.done or held.cancelled or held.run is None:
            return
        held.cancelled = True
        held.run.cancel()

    async def abort(self) -> None:
        """Stop at once: cancel everything; leases of unfinished tasks expire and the
        recoverer runs them again (nothing is lost)."""
        if self.backend is None:
            return
        assert self._fetcher is not None
        self._state.stopping = self._state.aborting = True
        await self._stop_fetching()
        await cancel_and_wait(set(self._running))
        await self._close(announce=False)
        log.warning("worker %s aborted; unfinished tasks return when their leases expire", self.id)

    async def wait_closed(self) -> None:
        if self._closed is not None:
            await self._closed.wait()

    async def _stop_fetching(self) -> None:
        assert self._fetcher is not None
        self._fetcher.stop(list(self._queues.values()))
        await self._supervisor.wait("fetch:")

    async def _close(self, *, announce: bool) -> None:
        self._state.closing = True
        if self.wakeups is not None:
            self.wakeups.close()
        await cancel_and_wait(self._supervisor.running())
        if self.backend is not None:
            if announce and self._announcer is not None:
                await self._announcer.withdraw()
            await self.backend.aclose()
        if self._runner is not None:
            self._runner.close()
        if self._closed is not None:
            self._closed.set()

    def run(self) -> None:
        """Run until SIGTERM or SIGINT: the first stops gracefully, a second at once."""
        asyncio.run(serve(self))


async def serve(worker: Worker, on_started: Callable[[], object] | None = None) -> None:
    """Start ``worker`` and run it until SIGTERM or SIGINT (the first stops it
    gracefully, a second at once) or until it is stopped otherwise."""
    await worker.start()
    if on_started is not None:
        on_started()
    loop = asyncio.get_running_loop()
    signals = 0
    stopping: list[asyncio.Task[None]] = []

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        name = signal.Signals(signum).name
        if signals == 1:
            log.info("received %s: stopping gracefully (again to stop at once)", name)
            stopping.append(asyncio.ensure_future(worker.stop()))
        else:
            log.warning("received %s again: stopping at once", name)
            stopping.append(asyncio.ensure_future(worker.abort()))

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    loop.add_signal_handler(signal.SIGUSR1, _dump_tasks)
    try:
        await worker.wait_closed()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
            loop.remove_signal_handler(signum)
        await asyncio.gather(*stopping, return_exceptions=True)


def _queues_phrase(weights: Mapping[str, int]) -> str:
    """``a=1, b=2``: one line, even for a worker of a thousand queues."""
    named = [f"{q}={w}" for q, w in weights.items()]
    if len(named) > 12:
        named = [*named[:10], f"… ({len(named)} queues)"]
    return ", ".join(named)


async def cancel_and_wait(tasks: set[asyncio.Task[Any]], *, limit: float = 10.0) -> None:
    """Cancel ``tasks`` and wait until they are done, cancelling again if needed.

    On Python 3.11 a cancellation can be lost: redis-py sends under ``asyncio.wait_for``,
    which swallows a cancel that arrives as the send completes (fixed in 3.12). A single
    ``cancel()`` is therefore not enough; our loops also check a stop flag.
    """
    deadline = time.monotonic() + limit
    pending = {t for t in tasks if not t.done()}
    while pending and time.monotonic() < deadline:
        for running in pending:
            running.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.2)
    if pending:
        log.error("%d tasks did not stop: %s", len(pending), [t.get_name() for t in pending])


def _dump_tasks() -> None:
    """SIGUSR1: log where every asyncio task of the worker is waiting."""
    import io

    for running in asyncio.all_tasks():
        out = io.StringIO()
        running.print_stack(file=out)
        log.warning("task %s:\n%s", running.get_name(), out.getvalue())


async def _register(backend: AsyncBackend, queues: list[str]) -> None:
    """Add the worker's queues to the registry (what `queue ls` lists). A registry that
    holds something else is the listing's loss, not the work's: said, and served anyway."""
    registry = backend.keys.queues
    try:
        await backend.execute_key(registry, lambda c: c.sadd(registry, *queues))
    except ForeignData as exc:
        log.warning("queues not registered (`queue ls` will not list them): %s", exc)
