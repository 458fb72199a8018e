"""Producers: :class:`Client` (sync) puts tasks into queues; its asyncio twin is
:class:`~clusterq.aclient.AsyncClient`.

Both share :class:`ClientBase`: the :class:`~clusterq.producer.Producer` that validates
and encodes without I/O, the queue registry bookkeeping, and the reading of task state
(:mod:`clusterq.taskinfo`). Enqueue is idempotent by task id: a call retried after a
timeout (by you, or inside the client after a failover) never creates a second task.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, overload

from clusterq import tracing
from clusterq.broker import enqueue as enqueue_script
from clusterq.broker import layout as layout_script
from clusterq.broker import limits as limits_script
from clusterq.broker.script import run_pipelined
from clusterq.cluster.backend import Backend
from clusterq.cluster.connection import DEFAULT_URL, Mode, RedisURL
from clusterq.cluster.routing import DEFAULT_DOWN_TIMEOUT, DEFAULT_RETRY_TIMEOUT
from clusterq.cluster.wire import NodeClient
from clusterq.durability import (
    Durability,
    confirmed_replicas,
    durability_commands,
    require_confirmed,
)
from clusterq.errors import ConfigError, DuplicateTask
from clusterq.keys import DEFAULT_PREFIX, KeySchema
from clusterq.limits import LimitOptions, Limits
from clusterq.partitions import (
    DECLARE_ATTEMPTS,
    LAYOUT_TTL,
    Layout,
    Layouts,
    check_partitions,
    read_layout,
    relayout,
)
from clusterq.producer import (
    DEFAULT_QUEUE,
    EnqueueOptions,
    PreparedEnqueue,
    Producer,
    TaskSpec,
    attempts_for,
    one_info,
    plan_batches,
    raise_first,
    settle_replies,
    spec_given,
)
from clusterq.serialization import DEFAULT_MAX_PAYLOAD_BYTES, reply_text
from clusterq.streams import (
    Published,
    StreamLayout,
    plan_publish,
    read_stream_layout,
    redeclare,
    stream_layout,
)
from clusterq.task import TaskInfo
from clusterq.taskevents import ClientEvents
from clusterq.taskinfo import ResultWait, info_commands, info_values, task_info
from clusterq.workflow import Chain, Chord, Group, Workflow, WorkflowHandle, WorkflowInfo, Workflows
from clusterq.workflow.run import start_options

if TYPE_CHECKING:
    from typing_extensions import Unpack

log = logging.getLogger("clusterq.client")

#: How long an enqueue waits for the registry of queue names (sync client; the asyncio
#: client registers in the background).
REGISTER_PATIENCE = 1.0
#: After a failed registration, enqueues skip registering for this long.
REGISTER_HOLDOFF = 5.0

__all__ = ["Client", "ClientBase", "DuplicateTask", "TaskSpec"]


class ClientBase:
    def __init__(
        self,
        keys: KeySchema,
        codec: str,
        max_payload_bytes: int,
        durability: Durability,
        durability_timeout: float | None,
    ) -> None:
        self.keys = keys
        self.producer = Producer(keys, codec, max_payload_bytes)
        durability_commands(durability, durability_timeout)  # validates
        self.durability: Durability = durability
        self.durability_timeout = durability_timeout
        self._registered: set[str] = set()
        self._register_again_at = 0.0
        #: Declarations of partitioned queues, read from the cluster every LAYOUT_TTL.
        self.layouts = Layouts()
        #: Declarations of streams, with when each was read.
        self._streams: dict[str, tuple[StreamLayout, float]] = {}
        self.producer.layouts = self.layouts

    def _plan_publish(
        self, layout: StreamLayout, events: Iterable[tuple[Any, str | None]]
    ) -> dict[int, list[tuple[int, int, tuple[Any, ...]]]]:
        """Per slot, the XADDs of ``events`` (checked and encoded; with the current trace
        context, where there is one)."""
        limit, headers = self.producer.max_payload_bytes, tracing.context_headers()
        return plan_publish(layout, self.keys, events, limit, headers)

    def _published(
        self,
        stream: str,
        slot: int,
        planned: Sequence[tuple[int, int, Any]],
        ids: Sequence[Any],
        confirmed: tuple[Durability, int | None],
        out: dict[int, Published],
    ) -> None:
        """The events of one slot, appended as ``planned`` with ``ids``, into ``out`` (by
        their index in the call); :class:`DurabilityError` if no replica confirmed them."""
        published = [
            Published(stream, partition, reply_text(event_id))
            for (_, partition, _), event_id in zip(planned, ids, strict=True)
        ]
        level, replicas = confirmed
        where = self.backend.master_addr(slot)  # type: ignore[attr-defined]
        shown = [p.id for p in published]
        require_confirmed(level, replicas, shown, where, self.durability_timeout, events=True)
        for (index, _, _), one in zip(planned, published, strict=True):
            out[index] = one

    def _layouts_read(self, entries: Any) -> None:
        if self.layouts.loaded(entries):
            self.producer.forget_templates()

    def _layouts_failed(self, exc: Exception) -> None:
        self.layouts.failed(REGISTER_HOLDOFF)
        log.warning("could not read the partitioned-queue declarations: %s (kept the last)", exc)

    def _layout_written(self, layout: Layout) -> None:
        self.layouts.put(layout)
        self.producer.forget_templates()

    def _claim_unregistered(self, queues: Iterable[str], *, now: bool = True) -> list[str]:
        """Queue names to add to the registry, marked registered at once so that
        concurrent enqueues do not send them twice (:meth:`_registration_failed` unmarks
        them). With ``now=False`` (on the way to an enqueue), none for a few seconds
        after a failure: an enqueue must not wait on the registry's shard each time."""
        if not now and time.monotonic() < self._register_again_at:
            return []
        new = sorted(set(queues) - self._registered)
        self._registered.update(new)
        return new

    def _registration_failed(self, new: list[str], exc: Exception) -> None:
        self._registered.difference_update(new)
        self._register_again_at = time.monotonic() + REGISTER_HOLDOFF
        log.warning("could not register queues %s: %s (retried on a later enqueue)", new, exc)

    def _members(self, layout: Layout | None, queue: str) -> tuple[str, ...]:
        """The queues behind ``queue``: its partitions, or itself (its name checked)."""
        return layout.members if layout is not None else (self.keys.queue(queue).queue,)

    @staticmethod
    def _locate(task: TaskInfo | str, queue: str | None) -> tuple[str, str]:
        if isinstance(task, TaskInfo):
            return task.id, queue or task.queue
        return task, queue or DEFAULT_QUEUE


class Client(ClientBase, ClientEvents):
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
        down_timeout: float = DEFAULT_DOWN_TIMEOUT,
        durability: Durability = "none",
        durability_timeout: float | None = None,
        backend: Backend | None = None,
    ) -> None:
        self.backend = backend or Backend(
            url,
            mode=mode,
            prefix=prefix,
            retry_timeout=retry_timeout,
            down_timeout=down_timeout,
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
        self._register(self._claim_unregistered(queues), timeout=None)

    def _register_soon(self, queues: Iterable[str]) -> None:
        """Register new queue names on the way to an enqueue, waiting at most
        REGISTER_PATIENCE: the registry is one key, in one slot, and while its master
        fails over, enqueues into queues on other masters must go on. A name that could
        not be registered is tried again by a later enqueue."""
        new = self._claim_unregistered(queues, now=False)
        if new:
            try:
                self._register(new, timeout=REGISTER_PATIENCE)
            except Exception as exc:
                self._registration_failed(new, exc)

    def _refresh_layouts(self) -> None:
        """Read the partitioned-queue declarations when the cached ones are old (waiting
        at most REGISTER_PATIENCE: a slow registry shard must not hold up enqueues)."""
        if not self.layouts.due():
            return
        key = self.keys.layouts
        try:
            entries = self.backend.execute_key(
                key, lambda c: c.hgetall(key), timeout=REGISTER_PATIENCE
            )
        except Exception as exc:
            self._layouts_failed(exc)
        else:
            self._layouts_read(entries)

    def declare_queue(self, name: str, partitions: int) -> Layout:
        """Declare ``name`` a partitioned queue of ``partitions`` partitions (stored in
        the cluster, so every producer and worker agrees); see :mod:`clusterq.partitions`.

        Declaring it again with another count changes the layout of a live queue: new
        tasks go to the new partitions, the old ones drain. ``partitions=1`` makes it a
        plain queue again. Returns the layout now in force.
        """
        check_partitions(name, partitions)
        key = self.keys.layouts
        for _ in range(DECLARE_ATTEMPTS):
            current = read_layout(self.backend.execute_key(key, lambda c: c.hget(key, name)))
            new = relayout(current, name, partitions, int(time.time() * 1000))
            if new is not None:
                built = layout_script.put(self.keys, new, current.version if current else 0)
                script_keys, args = built
                put = functools.partial(layout_script.SCRIPT.call, keys=script_keys, args=args)
                reply = self.backend.execute_key(key, put)
                if not layout_script.written(reply, new):
                    continue
                limits_script.carry(self.backend, current, new)
            layout = new or current
            assert layout is not None
            self._layout_written(layout)
            self.register_queues((name, *layout.members))
            return layout
        raise ConfigError(f"the declaration of queue {name!r} kept changing while it was written")

    # ------------------------------------------------------------------ streams

    def declare_stream(
        self, name: str, partitions: int, *, maxlen: int | None = None
    ) -> StreamLayout:
        """Declare stream ``name`` with ``partitions`` partitions, each trimmed to about
        ``maxlen`` events on publish (None: never trimmed); see :mod:`clusterq.streams`.
        Declaring it again with another ``maxlen`` changes that; another partition count
        is refused."""
        wanted = stream_layout(name, partitions, maxlen)
        key = self.keys.streams
        raw = self.backend.execute_key(key, lambda c: c.hget(key, name))
        stored = read_stream_layout(name, raw) if raw is not None else None
        new = redeclare(stored, wanted)
        if new is not None:
            self.backend.execute_key(key, lambda c: c.hset(key, name, new.to_json()))
        layout = new or stored
        assert layout is not None
        self._streams[name] = (layout, time.monotonic())
        return layout

    def stream_layout(self, name: str) -> StreamLayout:
        """The declaration of stream ``name`` (cached for LAYOUT_TTL seconds)."""
        cached = self._streams.get(name)
        if cached is not None and time.monotonic() - cached[1] < LAYOUT_TTL:
            return cached[0]
        key = self.keys.streams
        layout = read_stream_layout(
            name, self.backend.execute_key(key, lambda c: c.hget(key, name))
        )
        self._streams[name] = (layout, time.monotonic())
        return layout

    def publish(
        self,
        stream: str,
        payload: Any,
        *,
        key: str | None = None,
        durability: Durability | None = None,
    ) -> Published:
        """Append an event to ``stream`` (``XADD`` on the partition of ``key``; without a
        key the partitions take turns). At least once: a call retried through a failover
        may append it twice. ``durability`` (default: the client's) as for
        :meth:`enqueue`: with ``"replica"``, an event no replica confirmed raises
        :class:`DurabilityError` instead of being acknowledged."""
        return self.publish_many(stream, [(payload, key)], durability=durability)[0]

    @tracing.traced_publish
    def publish_many(
        self,
        stream: str,
        events: Iterable[tuple[Any, str | None]],
        *,
        durability: Durability | None = None,
    ) -> list[Published]:
        """Append ``(payload, key)`` events: one pipeline per slot (with durability, its
        ``WAIT`` on the same connection covers the slot's events)."""
        layout = self.stream_layout(stream)
        plan = self._plan_publish(layout, events)
        after = durability_commands(level := durability or self.durability, self.durability_timeout)
        out: dict[int, Published] = {}
        for slot, planned in plan.items():
            commands = [command for _, _, command in planned]
            send = functools.partial(_append, commands=commands, after=after, level=level)
            ids, replicas = self.backend.execute(slot, send)
            self._published(stream, slot, planned, ids, (level, replicas), out)
        return [out[i] for i in range(len(out))]

    def layout(self, name: str) -> Layout | None:
        """The declaration of partitioned queue ``name`` as stored now (None: plain)."""
        key = self.keys.layouts
        return read_layout(self.backend.execute_key(key, lambda c: c.hget(key, name)))

    def set_limits(self, queue: str, **options: Unpack[LimitOptions]) -> Limits | None:
        """Limit ``queue``'s tasks across every worker: ``rate`` (``"200/s"``, ``"3/10s"``)
        with a ``burst`` (default a tenth of a second's worth, at least 1), ``concurrency``
        (running at once). Replaces its limits; none given clears them. A partitioned
        queue's partitions each enforce a share (:mod:`clusterq.limits`)."""
        limits, layout = Limits.of(**options), self.layout(queue)
        parts = len(layout.queues) if layout else 1
        limits_script.store(self.backend, self._members(layout, queue), limits, parts)
        return limits.declared

    def limits(self, queue: str) -> Limits | None:
        """The limits declared on ``queue`` (None: none)."""
        return limits_script.load(self.backend, self._members(self.layout(queue), queue)[0])

    def _register(self, new: list[str], *, timeout: float | None) -> None:
        if not new:
            return
        registry = self.keys.queues
        try:
            self.backend.execute_key(registry, lambda c: c.sadd(registry, *new), timeout=timeout)
        except Exception:
            self._registered.difference_update(new)
            raise
        self.backend.note_queues(new)

    @overload
    def enqueue(
        self,
        type: str,
        payload: Any = None,
        *,
        durability: Durability | None = None,
        **options: Unpack[EnqueueOptions],
    ) -> TaskInfo: ...

    @overload
    def enqueue(
        self,
        type: Workflow,
        payload: None = None,
        *,
        durability: Durability | None = None,
        retention: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> WorkflowHandle: ...

    @tracing.traced_enqueue(batch=False)
    def enqueue(
        self,
        type: str | Workflow,
        payload: Any = None,
        *,
        durability: Durability | None = None,
        **options: Any,
    ) -> TaskInfo | WorkflowHandle:
        """Enqueue one task; the options are those of :meth:`Producer.prepare`.

        Raises :class:`DuplicateTask` when ``unique_for`` refuses it. Retrying with the
        same ``task_id`` is safe: the second call returns ``already_enqueued=True``.
        ``durability="replica"`` (or the client's default) waits until a replica has the
        task and raises :class:`DurabilityError` if none confirms it in time.
        """
        if type.__class__ is not str and isinstance(type, Chain | Group | Chord):  # a workflow
            options = start_options(payload, options)
            return Workflows(self).start(type, durability=durability, **options)
        if type.__class__ is not str and isinstance(type, TaskSpec):
            raise spec_given()
        if self.layouts.due():
            self._refresh_layouts()
        prepared = self.producer.prepare_options(type, payload, options)
        if prepared.queue not in self._registered:
            self._register_soon([prepared.queue])
        level = durability or self.durability
        if level != "none":
            return self.send_prepared([prepared], level, raise_duplicate=True)[0]
        one = enqueue_script.One(prepared.qk, prepared.new)
        reply = self.backend.execute(prepared.qk.slot, one)
        if one.pushed:  # created, as guessed
            return prepared.guess()
        return one_info(prepared, one, reply)

    @tracing.traced_enqueue(batch=True)
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
        self._refresh_layouts()
        prepared = self.producer.prepare_many(items, defaults)
        self._register_soon(p.queue for p in prepared)
        return self.send_prepared(prepared, durability or self.durability, raise_duplicate=False)

    def send_prepared(
        self, prepared: Sequence[PreparedEnqueue], level: Durability, *, raise_duplicate: bool
    ) -> list[TaskInfo]:
        infos: list[TaskInfo] = []

        def guess() -> None:  # while the first slot's server runs the scripts
            if not infos:
                infos.extend([p.guess() for p in prepared])

        after = durability_commands(level, self.durability_timeout)
        for slot, batches in plan_batches(prepared).items():
            attempts = attempts_for(batches, level)

            def run(
                client: NodeClient, attempts: enqueue_script.Attempts = attempts
            ) -> tuple[list[Any], int | None]:
                # Inside the retried call: a WAIT cut short by a failover (-UNBLOCKED,
                # a closed connection) re-runs the (idempotent) enqueue and the WAIT.
                replies, tail = run_pipelined(client, attempts.next(), after, meanwhile=guess)
                return raise_first(replies), confirmed_replicas(level, tail)

            replies, replicas = self.backend.execute(slot, run)
            guess()
            settle_replies(infos, prepared, batches, attempts, replies, replicas, raise_duplicate)
            where = self.backend.master_addr(slot)
            ids = [prepared[i].new.id for indexes, _, _ in batches for i in indexes]
            require_confirmed(level, replicas, ids, where, self.durability_timeout)
        return infos

    @overload
    def info(self, task: TaskInfo | str, *, queue: str | None = None) -> TaskInfo: ...

    @overload
    def info(self, task: WorkflowHandle, *, queue: None = None) -> WorkflowInfo: ...

    def info(
        self, task: TaskInfo | str | WorkflowHandle, *, queue: str | None = None
    ) -> TaskInfo | WorkflowInfo:
        """State and details of a task (``queue`` defaults to the TaskInfo's or "default"),
        or of a workflow and each of its steps."""
        if isinstance(task, WorkflowHandle):
            return Workflows(self).info(task)
        task_id, queue = self._locate(task, queue)
        self._refresh_layouts()
        members = self.layouts.members(queue)
        for member in members:  # a partitioned queue: look in each partition
            qk = self.keys.queue(member)
            commands = info_commands(qk, task_id)
            read = functools.partial(_read_info, commands=commands)
            values = self.backend.execute(qk.slot, read)
            if values[0] is not None or member == members[-1]:
                return task_info(member if values[0] is not None else queue, task_id, values)
        raise AssertionError("unreachable")

    def result(
        self,
        task: TaskInfo | str | WorkflowHandle,
        *,
        queue: str | None = None,
        timeout: float | None = 30.0,
    ) -> Any:
        """Wait for a task to complete and return its result.

        Needs the task to have been enqueued with a ``retention`` (or it is gone when it
        completes). Raises :class:`TaskFailed` if it was archived, :class:`ResultTimeout`
        after ``timeout`` seconds (None: wait forever), :class:`TaskNotFound`.
        """
        if isinstance(task, WorkflowHandle):
            return Workflows(self).result(task, timeout)
        wait = ResultWait(timeout)
        while not wait.done(info := self.info(task, queue=queue)):
            time.sleep(wait.delay())
        return info.result


def _read_info(client: NodeClient, commands: Sequence[Sequence[Any]]) -> list[Any]:
    return info_values(client.fast_pipeline(commands))


def _append(
    client: NodeClient,
    commands: Sequence[Sequence[Any]],
    after: Sequence[Sequence[Any]],
    level: Durability,
) -> tuple[list[Any], int | None]:
    """Events appended, then what confirms them on the same connection (retried whole:
    a WAIT cut short by a failover appends them again, at least once)."""
    replies = client.fast_pipeline([*commands, *after])
    return raise_first(replies[: len(commands)]), confirmed_replicas(
        level, replies[len(commands) :]
    )
