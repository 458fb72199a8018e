"""Workers: fetch tasks, run their handlers, ack or fail them, keep their leases alive.

One asyncio event loop per worker process runs, for each queue, a fetch loop (so queues
on different masters are fetched concurrently), plus four background loops:

- heartbeat: renews the lease of every task this worker holds (every ``lease / 4``);
- recoverer: sweeps each queue (expired leases back to retry, retention, archive trim);
- announcer: publishes this worker under ``<prefix>:workers`` for ``clusterq worker ls``;
- ack flushers: acks that pile up while one is in flight go out together, in one call.

An idle fetch loop blocks on the server (``BLMOVE`` of the pending list onto itself,
which waits without taking anything) and wakes within milliseconds of an enqueue; it
also wakes every ``poll_interval`` (default 0.1 s) to forward scheduled and retry tasks
that became due.

Timeouts: an ``async def`` handler past its timeout or deadline is cancelled. A plain
function cannot be interrupted: it is abandoned (its result ignored), the attempt counts
as failed, and its concurrency slot stays taken until the function returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import os
import random
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from clusterq.broker import ack as ack_script
from clusterq.broker import dequeue as dequeue_script
from clusterq.broker import extend as extend_script
from clusterq.broker import fail as fail_script
from clusterq.broker import requeue as requeue_script
from clusterq.broker import sweep as sweep_script
from clusterq.cluster.abackend import AsyncBackend
from clusterq.cluster.changes import ReplicaAdded, TopologyEvent
from clusterq.cluster.connection import DEFAULT_URL, Mode, RedisURL, format_addr
from clusterq.cluster.routing import DEFAULT_RETRY_TIMEOUT, backoff
from clusterq.cluster.topology import Topology
from clusterq.events import EventListener, QueueResumed, QueueUnavailable
from clusterq.keys import DEFAULT_PREFIX, QueueKeys, validate_queue_name
from clusterq.priority import Capacity
from clusterq.producer import new_task_id
from clusterq.retry import DEFAULT_RETRY_POLICY, RetryIn, RetryPolicy, SkipRetry
from clusterq.router import CallNext, Handler, Router, is_async
from clusterq.serialization import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    PayloadError,
    encode_limited,
    get_codec,
)
from clusterq.task import Record, Task

log = logging.getLogger("clusterq.worker")

_current: contextvars.ContextVar[Worker] = contextvars.ContextVar("clusterq_worker")


def current_worker() -> Worker:
    """The worker running the calling handler (its ``backend`` can talk to the cluster)."""
    try:
        return _current.get()
    except LookupError:
        raise RuntimeError("current_worker() is only available inside a handler") from None


DEFAULT_LEASE = 10.0
DEFAULT_RECOVER_INTERVAL = 1.0
DEFAULT_POLL_INTERVAL = 0.1
DEFAULT_TOPOLOGY_INTERVAL = 0.5
#: How long the id of a task deleted on success is remembered: an enqueue of the same id
#: (a producer retrying after a timeout or a failover) is then "already enqueued" instead
#: of a second run. Longer than the client's retry timeout.
DEFAULT_DEDUP_WINDOW = 20.0
ANNOUNCE_INTERVAL = 2.0
ANNOUNCE_TTL = 10.0
ACK_BATCH = 200
MAX_ERROR_LENGTH = 2000


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


@dataclass
class WorkerStats:
    processed: int = 0
    failed: int = 0
    archived: int = 0
    recovered: int = 0
    #: Leases this worker lost (its ack or fail was then ignored; the task may run again).
    leases_lost: int = 0


@dataclass
class _Held:
    token: str
    done: bool = False
    lost: bool = False


@dataclass
class _Queue:
    name: str
    qk: QueueKeys
    held: dict[str, _Held] = field(default_factory=dict)
    acks: list[ack_script.Ack] = field(default_factory=list)
    flusher: asyncio.Task[None] | None = None
    fetcher: asyncio.Task[None] | None = None
    waiting: asyncio.Task[Any] | None = None


@dataclass
class _Outcome:
    ok: bool
    result: bytes = b""
    error: str = ""
    exception: BaseException | None = None
    retry_in: float | None = None
    archive: bool = False


class Worker:
    """Runs handlers for the tasks of some queues.

    ``queues`` maps queue names to weights (``{"critical": 6, "default": 3, "low": 1}``);
    with ``strict_priority`` a queue is served only when every heavier queue is empty.
    ``concurrency`` tasks run at once. ``lease`` seconds is how long a task stays
    reserved without a heartbeat; a worker that dies loses its tasks to the recoverer
    after about that long. ``shutdown_timeout`` is how long :meth:`stop` lets running
    tasks finish before it returns the rest to their queues.
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
        prefix: str = DEFAULT_PREFIX,
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
    ) -> None:
        if router is None:
            raise ValueError("a worker needs a Router")
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if lease <= 0 or poll_interval <= 0 or recover_interval <= 0:
            raise ValueError("lease, poll_interval and recover_interval must be positive")
        self.url = url
        self.router = router
        self.weights = parse_queues(queues)
        self.strict_priority = strict_priority
        self.concurrency = concurrency
        self.shutdown_timeout = shutdown_timeout
        self.prefix = prefix
        self.mode = mode
        self.lease = lease
        self.heartbeat_interval = lease / 4
        self.recover_interval = recover_interval
        self.poll_interval = poll_interval
        self.retry_policy = retry_policy
        self.batch_size = batch_size or min(concurrency, 50)
        self.archive_max_size = archive_max_size
        self.archive_max_age = archive_max_age
        self.max_result_bytes = max_result_bytes
        self.dedup_window = dedup_window
        self.retry_timeout = retry_timeout
        self.topology_interval = topology_interval
        self._listeners: list[EventListener] = []
        self.id = name or f"{socket.gethostname()}:{os.getpid()}:{new_task_id()[:6]}"
        self.stats = WorkerStats()
        self.started_at: float | None = None
        self.backend: AsyncBackend | None = None
        self._queues: dict[str, _Queue] = {}
        self._capacity = Capacity(concurrency, self.weights, strict=strict_priority)
        self._executor: ThreadPoolExecutor | None = None
        self._running: set[asyncio.Task[None]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._chains: dict[int, Callable[[Task], Awaitable[Any]]] = {}
        self._threads: dict[str, Future[Any]] = {}
        self._seq = 0
        self._stopping = False
        self._aborting = False
        self._closing = False
        self._closed: asyncio.Event | None = None

    # ------------------------------------------------------------------ lifecycle

    def subscribe(self, listener: EventListener) -> None:
        """Call ``listener(event)`` for every topology change this worker sees and when
        one of its queues becomes unavailable or resumes (see :mod:`clusterq.events`)."""
        self._listeners.append(listener)

    def _on_topology(self, _topology: Topology, events: list[TopologyEvent]) -> None:
        for event in events:
            self._emit(event)

    def _emit(self, event: TopologyEvent) -> None:
        level = logging.INFO if isinstance(event, QueueResumed | ReplicaAdded) else logging.WARNING
        log.log(level, "%s", event.describe())
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:
                log.exception("event listener failed")

    @property
    def queues(self) -> list[str]:
        return list(self.weights)

    @property
    def active(self) -> int:
        return self._capacity.in_use

    async def start(self) -> None:
        """Connect and start fetching. Returns once the worker runs."""
        if self.backend is not None:
            raise RuntimeError("worker already started")
        self._closed = asyncio.Event()
        _current.set(self)  # tasks created from here on inherit it
        self.backend = await AsyncBackend.connect(
            self.url, mode=self.mode, prefix=self.prefix, retry_timeout=self.retry_timeout
        )
        keys = self.backend.keys
        self.backend.note_queues(self.weights)
        self.backend.subscribe(self._on_topology)
        if self.backend.mode == "cluster":
            self.backend.start_watching(self.topology_interval)
        registry = keys.queues
        queues = list(self.weights)
        await self.backend.execute_key(registry, lambda c: c.sadd(registry, *queues))
        self._executor = ThreadPoolExecutor(self.concurrency, thread_name_prefix="clusterq-task")
        self.started_at = time.time()
        for name in self.weights:
            q = _Queue(name, keys.queue(name))
            self._queues[name] = q
            q.fetcher = asyncio.create_task(self._fetch_loop(q), name=f"fetch:{name}")
        self._loops = [
            asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
            asyncio.create_task(self._recover_loop(), name="recover"),
            asyncio.create_task(self._announce_loop(), name="announce"),
        ]
        log.info(
            "worker %s started: queues %s, concurrency %d, %s at %s",
            self.id,
            ", ".join(f"{q}={w}" for q, w in self.weights.items()),
            self.concurrency,
            self.backend.mode,
            self.backend.topology.source,
        )

    async def stop(self, timeout: float | None = None) -> None:
        """Stop fetching, let running tasks finish (``timeout``, default
        ``shutdown_timeout``), return unfinished ones to their queues, flush acks."""
        if self.backend is None or self._stopping:
            if self._closed is not None:
                await self._closed.wait()
            return
        self._stopping = True
        grace = self.shutdown_timeout if timeout is None else timeout
        log.info("worker %s stopping: %d tasks running", self.id, len(self._running))
        await self._stop_fetching()
        if self._running:
            _, late = await asyncio.wait(set(self._running), timeout=grace)
            if self._aborting:  # a second signal: abort() closes, returns nothing
                await self.wait_closed()
                return
            await _cancel_and_wait(late)
        await self._return_unfinished()
        await self._flush_all_acks()
        await self._close(announce=True)
        log.info("worker %s stopped: %s", self.id, self.stats)

    async def abort(self) -> None:
        """Stop at once: cancel everything; leases of unfinished tasks expire and the
        recoverer runs them again (nothing is lost)."""
        if self.backend is None:
            return
        self._stopping = self._aborting = True
        await self._stop_fetching()
        await _cancel_and_wait(set(self._running))
        await self._close(announce=False)
        log.warning("worker %s aborted; unfinished tasks return when their leases expire", self.id)

    async def wait_closed(self) -> None:
        if self._closed is not None:
            await self._closed.wait()

    async def _stop_fetching(self) -> None:
        self._capacity.close()
        fetchers = [q.fetcher for q in self._queues.values() if q.fetcher is not None]
        for q in self._queues.values():
            if q.waiting is not None:
                q.waiting.cancel()
        await asyncio.gather(*fetchers, return_exceptions=True)

    async def _close(self, *, announce: bool) -> None:
        self._closing = True
        await _cancel_and_wait(set(self._loops))
        backend = self.backend
        if backend is not None:
            if announce:
                with contextlib.suppress(Exception):
                    workers = backend.keys.workers
                    await backend.execute_key(
                        workers, lambda c: c.hdel(workers, self.id), timeout=2
                    )
            await backend.aclose()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        if self._closed is not None:
            self._closed.set()

    def run(self) -> None:
        """Run until SIGTERM or SIGINT: the first stops gracefully, a second at once."""
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        await self.start()
        loop = asyncio.get_running_loop()
        signals = 0
        stopping: list[asyncio.Task[None]] = []

        def on_signal(signum: int) -> None:
            nonlocal signals
            signals += 1
            if signals == 1:
                log.info(
                    "received %s: stopping gracefully (again to stop at once)",
                    signal.Signals(signum).name,
                )
                stopping.append(asyncio.ensure_future(self.stop()))
            else:
                log.warning("received %s again: stopping at once", signal.Signals(signum).name)
                stopping.append(asyncio.ensure_future(self.abort()))

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal, signum)
        loop.add_signal_handler(signal.SIGUSR1, _dump_tasks)
        try:
            await self.wait_closed()
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
                loop.remove_signal_handler(signum)
            await asyncio.gather(*stopping, return_exceptions=True)

    # ------------------------------------------------------------------ fetching

    def _next_token(self) -> str:
        self._seq += 1
        return f"{self.id}:{self._seq}"

    async def _fetch_loop(self, q: _Queue) -> None:
        backend = self.backend
        assert backend is not None
        lease_ms = int(self.lease * 1000)
        failures = 0
        outage_since = 0.0
        while not self._stopping:
            if failures:
                # Degraded: probe the master without holding any concurrency, so that a
                # dead or frozen shard never takes slots from the healthy ones.
                try:
                    await backend.execute(q.qk.slot, lambda c: c.ping(), timeout=0)
                except Exception:
                    failures += 1
                    await self._sleep(backoff(failures, base=0.02, cap=0.25))
                    continue
            granted = await self._capacity.acquire(q.name, self.batch_size)
            if granted == 0:
                break
            token = self._next_token()
            keys, args = dequeue_script.build(q.qk, granted, lease_ms, token)
            try:
                reply = await backend.run_script(
                    dequeue_script.SCRIPT, q.qk.slot, keys, args, timeout=0
                )
                got = dequeue_script.parse(reply)
            except Exception as exc:
                self._capacity.release(granted)
                if not failures:
                    outage_since = time.monotonic()
                    node = format_addr(backend.master_addr(q.qk.slot))
                    self._emit(QueueUnavailable(q.name, node, str(exc)))
                failures += 1
                await self._sleep(backoff(failures, base=0.02, cap=0.25))
                continue
            if failures:
                node = format_addr(backend.master_addr(q.qk.slot))
                self._emit(QueueResumed(q.name, node, time.monotonic() - outage_since))
                failures = 0
            if got.orphans:
                log.warning(
                    "queue %s: dropped %d pending ids without a record", q.name, got.orphans
                )
            self._capacity.release(granted - len(got.tasks))
            for task_id, raw in got.tasks:
                q.held[task_id] = _Held(token)
                running = asyncio.create_task(self._execute(q, task_id, token, raw))
                self._running.add(running)
                running.add_done_callback(self._running.discard)
            if got.paused:
                await self._sleep(min(1.0, self.poll_interval * 10))
            elif not got.tasks:
                await self._wait_for_work(q, got.next_due)

    async def _sleep(self, seconds: float) -> None:
        if not self._stopping:
            await asyncio.sleep(seconds)

    async def _wait_for_work(self, q: _Queue, next_due: float | None) -> None:
        """Block on the server until the pending list has an id, or until the next
        scheduled/retry task is due, or ``poll_interval`` at most."""
        wait = self.poll_interval
        if next_due is not None:
            wait = min(wait, next_due - time.time())
        if wait <= 0.001 or self._stopping:
            return
        backend = self.backend
        assert backend is not None
        pending = q.qk.pending

        async def block(client: Any) -> Any:
            return await client.blmove(pending, pending, round(wait, 3), "RIGHT", "RIGHT")

        q.waiting = asyncio.ensure_future(backend.execute(q.qk.slot, block, timeout=0))
        try:
            await q.waiting
        except asyncio.CancelledError:
            if not self._stopping:
                raise
        except Exception as exc:
            log.debug("queue %s: wait failed (%s)", q.name, exc)
            await self._sleep(backoff(1, base=0.05, cap=0.5))
        finally:
            q.waiting = None

    # ------------------------------------------------------------------ running

    async def _execute(self, q: _Queue, task_id: str, token: str, raw: bytes) -> None:
        keep_slot = False
        try:
            try:
                record = Record.decode(raw)
            except Exception as exc:
                await self._fail(
                    q,
                    task_id,
                    token,
                    None,
                    _Outcome(False, error=f"unreadable record: {exc}", archive=True),
                )
                return
            outcome = await self._call(q, task_id, record, token)
            keep_slot = task_id in self._threads  # an abandoned sync handler still runs
            if outcome.ok:
                self._ack(q, task_id, token, record, outcome.result)
            else:
                await self._fail(q, task_id, token, record, outcome)
        except asyncio.CancelledError:
            # Stopping: leave the task held; stop() returns it to the queue.
            raise
        except Exception:
            log.exception("queue %s: internal error handling task %s", q.name, task_id)
            held = q.held.pop(task_id, None)
            if held is not None:
                held.done = True  # no heartbeat: the lease expires, the recoverer retries it
        finally:
            if not keep_slot:
                self._capacity.release(1)

    async def _call(self, q: _Queue, task_id: str, record: Record, token: str) -> _Outcome:
        handler = self.router.resolve(record.type)
        if handler is None:
            return _Outcome(False, error=f"no handler registered for task type {record.type!r}")
        codec_name = record.codec
        try:
            codec = get_codec(codec_name)
            payload = codec.decode(record.payload)
        except PayloadError as exc:
            return _Outcome(False, error=str(exc), archive=True)
        now = time.time()
        timeout = record.timeout_ms / 1000 if record.timeout_ms else None
        if record.deadline_ms is not None:
            left = record.deadline_ms / 1000 - now
            if left <= 0:
                return _Outcome(
                    False, error="deadline passed before the task could start", archive=True
                )
            timeout = left if timeout is None else min(timeout, left)
        task = Task(  # positional: once per task
            task_id,
            record.type,
            payload,
            q.name,
            record.retried,
            record.max_retry,
            record.timeout_ms / 1000 if record.timeout_ms else None,
            record.deadline_ms / 1000 if record.deadline_ms is not None else None,
            record.enqueued_ms / 1000 if record.enqueued_ms else None,
            token,
        )
        call = self._chain(handler)
        try:
            if timeout is None:
                result = await call(task)
            else:
                result = await _with_timeout(call(task), timeout)
        except _TimedOut as exc:
            past_deadline = (
                record.deadline_ms is not None and time.time() * 1000 >= record.deadline_ms
            )
            what = "deadline" if past_deadline else "timeout"
            return _Outcome(
                False, error=f"{what}: the task ran longer than {timeout:.3g}s", exception=exc
            )
        except SkipRetry as exc:
            return _Outcome(False, error=f"SkipRetry: {exc}", exception=exc, archive=True)
        except RetryIn as exc:
            return _Outcome(False, error=f"RetryIn: {exc}", exception=exc, retry_in=exc.seconds)
        except Exception as exc:
            return _Outcome(False, error=f"{type(exc).__name__}: {exc}", exception=exc)
        finally:
            thread = self._threads.get(task_id)
            if thread is not None and thread.done():
                del self._threads[task_id]
        if not record.retention_ms:
            return _Outcome(True)
        try:
            return _Outcome(
                True, result=encode_limited(codec, result, self.max_result_bytes, "result")
            )
        except PayloadError as exc:
            # The work is done; running it again would repeat its effects. Keep it visible.
            return _Outcome(False, error=f"result not stored: {exc}", archive=True)

    def _chain(self, handler: Handler) -> Callable[[Task], Awaitable[Any]]:
        chain = self._chains.get(id(handler))
        if chain is not None:
            return chain
        if is_async(handler):

            async def call(task: Task) -> Any:
                return await handler(task)

        else:

            async def call(task: Task) -> Any:
                return await self._in_thread(handler, task)

        chain = call
        for middleware in reversed(self.router.middleware):
            chain = _wrap(middleware, chain)
        self._chains[id(handler)] = chain
        return chain

    async def _in_thread(self, handler: Handler, task: Task) -> Any:
        assert self._executor is not None
        future = self._executor.submit(contextvars.copy_context().run, handler, task)
        self._threads[task.id] = future
        loop = asyncio.get_running_loop()

        def finished(done: Future[Any]) -> None:
            # Release the slot of a handler that was abandoned after a timeout.
            def settle() -> None:
                if self._threads.get(task.id) is done:
                    del self._threads[task.id]
                    self._capacity.release(1)

            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(settle)

        try:
            return await asyncio.wrap_future(future)
        finally:
            if future.done():
                self._threads.pop(task.id, None)
            else:
                future.add_done_callback(finished)

    # ------------------------------------------------------------------ outcomes

    def _ack(self, q: _Queue, task_id: str, token: str, record: Record, result: bytes) -> None:
        held = q.held.get(task_id)
        if held is not None:
            held.done = True
        self.stats.processed += 1
        q.acks.append(
            ack_script.Ack(task_id, token, record.retention_ms or 0, result, record.unique_key)
        )
        if q.flusher is None or q.flusher.done():
            q.flusher = asyncio.create_task(self._flush_acks(q))

    async def _flush_acks(self, q: _Queue) -> None:
        backend = self.backend
        assert backend is not None
        failures = 0
        while q.acks:
            batch = q.acks[:ACK_BATCH]
            del q.acks[:ACK_BATCH]
            keys, args = ack_script.build(q.qk, batch, remember_ms=int(self.dedup_window * 1000))
            try:
                reply = await backend.run_script(ack_script.SCRIPT, q.qk.slot, keys, args)
            except Exception as exc:
                q.acks[:0] = batch
                failures += 1
                log.warning("queue %s: %d acks failed (%s); retrying", q.name, len(batch), exc)
                await asyncio.sleep(backoff(failures, base=0.05, cap=1.0))
                continue
            failures = 0
            for ack, applied in zip(batch, ack_script.parse(reply), strict=True):
                q.held.pop(ack.id, None)
                if not applied:
                    self.stats.leases_lost += 1
                    log.warning(
                        "queue %s: ack of task %s ignored: its lease was taken over "
                        "(it may run again)",
                        q.name,
                        ack.id,
                    )

    async def _flush_all_acks(self) -> None:
        for q in self._queues.values():
            if q.acks and (q.flusher is None or q.flusher.done()):
                q.flusher = asyncio.create_task(self._flush_acks(q))
        flushers = [q.flusher for q in self._queues.values() if q.flusher is not None]
        if flushers:
            _, late = await asyncio.wait(flushers, timeout=max(5.0, self.retry_timeout))
            for flusher in late:
                flusher.cancel()

    async def _fail(
        self, q: _Queue, task_id: str, token: str, record: Record | None, outcome: _Outcome
    ) -> None:
        backend = self.backend
        assert backend is not None
        held = q.held.get(task_id)
        if held is not None:
            held.done = True
        error = outcome.error[:MAX_ERROR_LENGTH]
        now_ms = int(time.time() * 1000)
        if record is None:
            meta = json.dumps({"t": "?", "err": error, "fa": now_ms}).encode()
            delay = None
        else:
            failed = record.failed(error, now_ms)
            meta = failed.meta()
            delay = self._retry_delay(record, outcome)
        keys, args = fail_script.build(
            q.qk, task_id, token, meta, retry_in_ms=None if delay is None else int(delay * 1000)
        )
        try:
            result = fail_script.parse(
                await backend.run_script(fail_script.SCRIPT, q.qk.slot, keys, args)
            )
        except Exception as exc:
            log.error(
                "queue %s: could not record the failure of task %s (%s); its lease will "
                "expire and it will be retried",
                q.name,
                task_id,
                exc,
            )
            q.held.pop(task_id, None)
            return
        q.held.pop(task_id, None)
        if result == "stale":
            self.stats.leases_lost += 1
            log.warning(
                "queue %s: failure of task %s ignored: its lease was taken over", q.name, task_id
            )
        elif result == "archived":
            self.stats.failed += 1
            self.stats.archived += 1
            log.warning(
                "queue %s: task %s (%s) archived: %s",
                q.name,
                task_id,
                record.type if record else "?",
                error,
            )
        else:
            self.stats.failed += 1
            log.info("queue %s: task %s failed, retry in %.3gs: %s", q.name, task_id, delay, error)

    def _retry_delay(self, record: Record, outcome: _Outcome) -> float | None:
        """Seconds until the next attempt, or None to archive."""
        if outcome.archive or record.retried >= record.max_retry:
            return None
        if outcome.retry_in is not None:
            return outcome.retry_in
        task = Task(
            id="",
            type=record.type,
            payload=None,
            queue="",
            retry_count=record.retried,
            max_retry=record.max_retry,
        )
        error = outcome.exception or RuntimeError(outcome.error)
        return max(0.0, float(self.retry_policy(record.retried, error, task)))

    async def _return_unfinished(self) -> None:
        backend = self.backend
        assert backend is not None
        for q in self._queues.values():
            unfinished = [(i, h.token) for i, h in q.held.items() if not h.done and not h.lost]
            if not unfinished:
                continue
            keys, args = requeue_script.build(q.qk, unfinished)
            try:
                n = requeue_script.parse(
                    await backend.run_script(requeue_script.SCRIPT, q.qk.slot, keys, args)
                )
                log.info("queue %s: returned %d unfinished tasks", q.name, n)
            except Exception as exc:
                log.warning(
                    "queue %s: could not return %d tasks (%s); their leases will expire",
                    q.name,
                    len(unfinished),
                    exc,
                )
            for task_id, _ in unfinished:
                q.held.pop(task_id, None)

    # ------------------------------------------------------------------ background loops

    async def _heartbeat_loop(self) -> None:
        while not self._closing:
            await asyncio.sleep(self.heartbeat_interval)
            # One renewal per queue, concurrently: a frozen shard delays only its own.
            await asyncio.gather(*(self._renew(q) for q in self._queues.values()))

    async def _renew(self, q: _Queue) -> None:
        backend = self.backend
        assert backend is not None
        held = [(i, h.token) for i, h in q.held.items() if not h.lost]
        if not held:
            return
        keys, args = extend_script.build(q.qk, int(self.lease * 1000), held)
        try:
            reply = await backend.run_script(
                extend_script.SCRIPT, q.qk.slot, keys, args, timeout=self.heartbeat_interval
            )
        except Exception as exc:
            log.warning("queue %s: lease renewal failed (%s)", q.name, exc)
            return
        for task_id in extend_script.parse(reply):
            entry = q.held.get(task_id)
            if entry is not None and not entry.lost:
                entry.lost = True
                self.stats.leases_lost += 1
                log.warning(
                    "queue %s: lost the lease of task %s (another worker may run it)",
                    q.name,
                    task_id,
                )

    async def _recover_loop(self) -> None:
        while not self._closing:
            await asyncio.sleep(self.recover_interval * (0.75 + 0.5 * _jitter()))
            await asyncio.gather(*(self._sweep(q) for q in self._queues.values()))

    async def _sweep(self, q: _Queue) -> None:
        backend = self.backend
        assert backend is not None
        keys, args = sweep_script.build(
            q.qk,
            archive_max_size=self.archive_max_size,
            archive_max_age_ms=int(self.archive_max_age * 1000),
        )
        try:
            reply = await backend.run_script(
                sweep_script.SCRIPT, q.qk.slot, keys, args, timeout=self.recover_interval
            )
        except Exception as exc:
            log.debug("queue %s: sweep failed (%s)", q.name, exc)
            return
        for task_id, token, raw in sweep_script.parse(reply).expired:
            mine = q.held.get(task_id)
            if mine is not None and mine.token == token:
                continue  # still running here; the heartbeat renews it
            await self._recover(q, task_id, token, raw)

    async def _recover(self, q: _Queue, task_id: str, token: str, raw: bytes) -> None:
        backend = self.backend
        assert backend is not None
        error = (
            "lease expired: the worker running the task stopped renewing it (crashed or cut off)"
        )
        now_ms = int(time.time() * 1000)
        try:
            record = Record.decode(raw)
        except Exception:
            meta, delay = json.dumps({"t": "?", "err": error, "fa": now_ms}).encode(), None
        else:
            meta = record.failed(error, now_ms).meta()
            delay = self._retry_delay(record, _Outcome(False, error=error))
        keys, args = fail_script.build(
            q.qk,
            task_id,
            token,
            meta,
            retry_in_ms=None if delay is None else int(delay * 1000),
            only_if_expired=True,
        )
        try:
            result = fail_script.parse(
                await backend.run_script(fail_script.SCRIPT, q.qk.slot, keys, args)
            )
        except Exception as exc:
            log.debug("queue %s: recovery of %s failed (%s)", q.name, task_id, exc)
            return
        if result != "stale":
            self.stats.recovered += 1
            log.warning(
                "queue %s: recovered task %s from an expired lease (%s)", q.name, task_id, result
            )

    async def _announce_loop(self) -> None:
        backend = self.backend
        assert backend is not None
        workers = backend.keys.workers
        host = socket.gethostname()
        rounds = 0
        while not self._closing:
            rounds += 1
            if rounds % 30 == 1:
                await self._forget_dead_workers(workers)
            info = {
                "id": self.id,
                "host": host,
                "pid": os.getpid(),
                "queues": self.weights,
                "strict_priority": self.strict_priority,
                "concurrency": self.concurrency,
                "started": self.started_at,
                "active": self.active,
                "processed": self.stats.processed,
                "failed": self.stats.failed,
                "expires": time.time() + ANNOUNCE_TTL,
            }
            data = json.dumps(info)

            async def publish(client: Any, data: str = data) -> Any:
                pipe = client.pipeline(transaction=False)
                pipe.hset(workers, self.id, data)
                pipe.expire(workers, int(ANNOUNCE_TTL * 6))  # gone if no worker is left
                return await pipe.execute()

            try:
                await backend.execute_key(workers, publish, timeout=ANNOUNCE_INTERVAL)
            except Exception as exc:
                log.debug("announce failed (%s)", exc)
            await asyncio.sleep(ANNOUNCE_INTERVAL)

    async def _forget_dead_workers(self, workers: str) -> None:
        """Remove announcements that expired a minute ago (workers that were killed)."""
        backend = self.backend
        assert backend is not None
        try:
            entries = await backend.execute_key(workers, lambda c: c.hgetall(workers), timeout=1)
            dead = []
            for worker_id, raw in entries.items():
                try:
                    expires = float(json.loads(raw)["expires"])
                except (ValueError, KeyError, TypeError):
                    expires = 0.0
                if expires < time.time() - 60:
                    dead.append(worker_id)
            if dead:
                await backend.execute_key(workers, lambda c: c.hdel(workers, *dead), timeout=1)
        except Exception as exc:
            log.debug("could not clean up dead workers (%s)", exc)


async def _cancel_and_wait(tasks: set[asyncio.Task[Any]], *, limit: float = 10.0) -> None:
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


def _wrap(middleware: Any, call_next: CallNext) -> Callable[[Task], Awaitable[Any]]:
    async def call(task: Task) -> Any:
        return await middleware(task, call_next)

    return call


class _TimedOut(Exception):
    """Our timer fired (unlike a TimeoutError the handler raised itself)."""


async def _with_timeout(work: Awaitable[Any], seconds: float) -> Any:
    """Await ``work``; cancel it and raise :class:`_TimedOut` after ``seconds``."""
    running = asyncio.ensure_future(work)
    try:
        done, _ = await asyncio.wait({running}, timeout=seconds)
    except asyncio.CancelledError:
        running.cancel()
        raise
    if not done:
        running.cancel()
        with contextlib.suppress(BaseException):
            await running
        raise _TimedOut(f"ran longer than {seconds:.3g}s")
    return running.result()


def _jitter() -> float:
    return random.random()
