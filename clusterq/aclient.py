"""The asyncio producer, :class:`AsyncClient`: the twin of :class:`~clusterq.client.Client`
(same preparation, same replies applied), with enqueues into different slots sent
concurrently and new queue names registered in the background."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, overload

from clusterq import tracing
from clusterq.broker import enqueue as enqueue_script
from clusterq.broker import layout as layout_script
from clusterq.broker import limits as limits_script
from clusterq.broker.script import arun_pipelined
from clusterq.client import REGISTER_PATIENCE, ClientBase
from clusterq.cluster.abackend import AsyncBackend
from clusterq.cluster.connection import DEFAULT_URL, Mode, RedisURL
from clusterq.cluster.routing import DEFAULT_DOWN_TIMEOUT, DEFAULT_RETRY_TIMEOUT
from clusterq.cluster.wire import AsyncNodeClient
from clusterq.durability import (
    Durability,
    confirmed_replicas,
    durability_commands,
    require_confirmed,
)
from clusterq.errors import ConfigError
from clusterq.keys import DEFAULT_PREFIX
from clusterq.limits import LimitOptions, Limits
from clusterq.partitions import (
    DECLARE_ATTEMPTS,
    LAYOUT_TTL,
    Layout,
    check_partitions,
    read_layout,
    relayout,
)
from clusterq.producer import (
    Batch,
    EnqueueOptions,
    PreparedEnqueue,
    TaskSpec,
    attempts_for,
    one_info,
    plan_batches,
    raise_first,
    settle_replies,
    spec_given,
)
from clusterq.serialization import DEFAULT_MAX_PAYLOAD_BYTES
from clusterq.slots import keyslot
from clusterq.streams import (
    Published,
    StreamLayout,
    read_stream_layout,
    redeclare,
    stream_layout,
)
from clusterq.task import TaskInfo
from clusterq.taskevents import AsyncClientEvents
from clusterq.taskinfo import ResultWait, info_commands, info_values, task_info
from clusterq.workflow import (
    AsyncWorkflows,
    Chain,
    Chord,
    Group,
    Workflow,
    WorkflowHandle,
    WorkflowInfo,
)
from clusterq.workflow.run import start_options

if TYPE_CHECKING:
    from typing_extensions import Unpack

log = logging.getLogger("clusterq.client")


class AsyncClient(ClientBase, AsyncClientEvents):
    """The asyncio twin of :class:`Client`. Create with ``await AsyncClient.connect(url)``."""

    def __init__(
        self,
        backend: AsyncBackend,
        *,
        codec: str = "json",
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
        durability: Durability = "none",
        durability_timeout: float | None = None,
        owns_backend: bool = False,
    ) -> None:
        if not isinstance(backend, AsyncBackend):
            raise TypeError(
                f"AsyncClient() takes a connected AsyncBackend, not {backend!r}: connect with "
                "`client = await AsyncClient.connect(url)` (or `async with await "
                "AsyncClient.connect(url) as client:`)"
            )
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
        down_timeout: float = DEFAULT_DOWN_TIMEOUT,
        durability: Durability = "none",
        durability_timeout: float | None = None,
        watch_interval: float | None = None,
    ) -> AsyncClient:
        """``watch_interval``: re-read the cluster map that often in the background, so
        that calls stuck on a frozen master are re-routed soon after its replacement."""
        backend = await AsyncBackend.connect(
            url,
            mode=mode,
            prefix=prefix,
            retry_timeout=retry_timeout,
            down_timeout=down_timeout,
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
        new = self._claim_unregistered(queues)
        if new:
            try:
                await self._register(new, timeout=None)
            except Exception:
                self._registered.difference_update(new)
                raise

    def _register_soon(self, queues: Iterable[str]) -> None:
        """Register new queue names in the background (see
        :meth:`Client._register_soon`); :meth:`aclose` waits for what is still running."""
        new = self._claim_unregistered(queues, now=False)
        if new:
            task = asyncio.ensure_future(self._register_in_background(new))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _register_in_background(self, new: list[str]) -> None:
        try:
            await self._register(new, timeout=max(60.0, self.backend.retry_timeout))
        except Exception as exc:
            self._registration_failed(new, exc)

    async def _refresh_layouts(self) -> None:
        """See :meth:`Client._refresh_layouts`."""
        if not self.layouts.due():
            return
        key = self.keys.layouts
        try:
            entries = await self.backend.execute_key(
                key, lambda c: c.hgetall(key), timeout=REGISTER_PATIENCE
            )
        except Exception as exc:
            self._layouts_failed(exc)
        else:
            self._layouts_read(entries)

    async def declare_queue(self, name: str, partitions: int) -> Layout:
        """See :meth:`Client.declare_queue`."""
        check_partitions(name, partitions)
        key = self.keys.layouts
        for _ in range(DECLARE_ATTEMPTS):
            current = await self.layout(name)
            new = relayout(current, name, partitions, int(time.time() * 1000))
            if new is not None:
                script_keys, args = layout_script.put(
                    self.keys, new, current.version if current else 0
                )
                reply = await self.backend.run_script(
                    layout_script.SCRIPT, keyslot(key), script_keys, args
                )
                if not layout_script.written(reply, new):
                    continue
                await limits_script.acarry(self.backend, current, new)
            layout = new or current
            assert layout is not None
            self._layout_written(layout)
            await self.register_queues((name, *layout.members))
            return layout
        raise ConfigError(f"the declaration of queue {name!r} kept changing while it was written")

    async def declare_stream(
        self, name: str, partitions: int, *, maxlen: int | None = None
    ) -> StreamLayout:
        """See :meth:`Client.declare_stream`."""
        wanted = stream_layout(name, partitions, maxlen)
        key = self.keys.streams
        raw = await self.backend.execute_key(key, lambda c: c.hget(key, name))
        stored = read_stream_layout(name, raw) if raw is not None else None
        new = redeclare(stored, wanted)
        if new is not None:
            await self.backend.execute_key(key, lambda c: c.hset(key, name, new.to_json()))
        layout = new or stored
        assert layout is not None
        self._streams[name] = (layout, time.monotonic())
        return layout

    async def stream_layout(self, name: str) -> StreamLayout:
        """See :meth:`Client.stream_layout`."""
        cached = self._streams.get(name)
        if cached is not None and time.monotonic() - cached[1] < LAYOUT_TTL:
            return cached[0]
        key = self.keys.streams
        raw = await self.backend.execute_key(key, lambda c: c.hget(key, name))
        layout = read_stream_layout(name, raw)
        self._streams[name] = (layout, time.monotonic())
        return layout

    async def publish(
        self,
        stream: str,
        payload: Any,
        *,
        key: str | None = None,
        durability: Durability | None = None,
    ) -> Published:
        """See :meth:`Client.publish`."""
        return (await self.publish_many(stream, [(payload, key)], durability=durability))[0]

    @tracing.traced_publish
    async def publish_many(
        self,
        stream: str,
        events: Iterable[tuple[Any, str | None]],
        *,
        durability: Durability | None = None,
    ) -> list[Published]:
        """See :meth:`Client.publish_many`; the slots are written concurrently."""
        layout = await self.stream_layout(stream)
        plan = self._plan_publish(layout, events)
        level = durability or self.durability
        after = durability_commands(level, self.durability_timeout)
        out: dict[int, Published] = {}

        async def send(slot: int, planned: list[tuple[int, int, tuple[Any, ...]]]) -> None:
            commands = [command for _, _, command in planned]
            ids, replicas = await self.backend.execute(
                slot, functools.partial(_append, commands=commands, after=after, level=level)
            )
            self._published(stream, slot, planned, ids, (level, replicas), out)

        await asyncio.gather(*(send(slot, planned) for slot, planned in plan.items()))
        return [out[i] for i in range(len(out))]

    async def layout(self, name: str) -> Layout | None:
        """See :meth:`Client.layout`."""
        key = self.keys.layouts
        return read_layout(await self.backend.execute_key(key, lambda c: c.hget(key, name)))

    async def set_limits(self, queue: str, **options: Unpack[LimitOptions]) -> Limits | None:
        """See :meth:`Client.set_limits`."""
        limits, layout = Limits.of(**options), await self.layout(queue)
        parts = len(layout.queues) if layout else 1
        await limits_script.astore(self.backend, self._members(layout, queue), limits, parts)
        return limits.declared

    async def limits(self, queue: str) -> Limits | None:
        """See :meth:`Client.limits`."""
        members = self._members(await self.layout(queue), queue)
        return await limits_script.aload(self.backend, members[0])

    async def _register(self, new: list[str], *, timeout: float | None) -> None:
        registry = self.keys.queues
        await self.backend.execute_key(registry, lambda c: c.sadd(registry, *new), timeout=timeout)
        self.backend.note_queues(new)

    @overload
    async def enqueue(
        self,
        type: str,
        payload: Any = None,
        *,
        durability: Durability | None = None,
        **options: Unpack[EnqueueOptions],
    ) -> TaskInfo: ...

    @overload
    async def enqueue(
        self,
        type: Workflow,
        payload: None = None,
        *,
        durability: Durability | None = None,
        retention: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> WorkflowHandle: ...

    @tracing.traced_enqueue(batch=False)
    async def enqueue(
        self,
        type: str | Workflow,
        payload: Any = None,
        *,
        durability: Durability | None = None,
        **options: Any,
    ) -> TaskInfo | WorkflowHandle:
        """See :meth:`Client.enqueue`."""
        if type.__class__ is not str and isinstance(type, Chain | Group | Chord):  # a workflow
            options = start_options(payload, options)
            return await AsyncWorkflows(self).start(type, durability=durability, **options)
        if type.__class__ is not str and isinstance(type, TaskSpec):
            raise spec_given()
        if self.layouts.due():  # (no coroutine made for nothing)
            await self._refresh_layouts()
        prepared = self.producer.prepare_options(type, payload, options)
        if prepared.queue not in self._registered:
            self._register_soon([prepared.queue])
        level = durability or self.durability
        if level != "none":
            return (await self.send_prepared([prepared], level, raise_duplicate=True))[0]
        one = enqueue_script.One(prepared.qk, prepared.new)
        reply = await self.backend.execute(prepared.qk.slot, one.arun)
        if one.pushed:  # created, as guessed
            return prepared.guess()
        return one_info(prepared, one, reply)

    @tracing.traced_enqueue(batch=True)
    async def enqueue_many(
        self,
        items: Iterable[TaskSpec | tuple[str, Any]],
        *,
        durability: Durability | None = None,
        **defaults: Any,
    ) -> list[TaskInfo]:
        """See :meth:`Client.enqueue_many`; the slots are written concurrently."""
        await self._refresh_layouts()
        prepared = self.producer.prepare_many(items, defaults)
        self._register_soon(p.queue for p in prepared)
        return await self.send_prepared(
            prepared, durability or self.durability, raise_duplicate=False
        )

    async def send_prepared(
        self, prepared: Sequence[PreparedEnqueue], level: Durability, *, raise_duplicate: bool
    ) -> list[TaskInfo]:
        infos = [p.guess() for p in prepared]
        after = durability_commands(level, self.durability_timeout)

        async def send(slot: int, batches: list[Batch]) -> None:
            attempts = attempts_for(batches, level)

            async def run(client: AsyncNodeClient) -> tuple[list[Any], int | None]:
                # See Client.send_prepared: the durability check is part of the retried call.
                replies, tail = await arun_pipelined(client, attempts.next(), after)
                return raise_first(replies), confirmed_replicas(level, tail)

            replies, replicas = await self.backend.execute(slot, run)
            settle_replies(infos, prepared, batches, attempts, replies, replicas, raise_duplicate)
            where = self.backend.master_addr(slot)
            ids = [prepared[i].new.id for indexes, _, _ in batches for i in indexes]
            require_confirmed(level, replicas, ids, where, self.durability_timeout)

        plan = plan_batches(prepared)
        await asyncio.gather(*(send(s, b) for s, b in plan.items()))
        return infos

    @overload
    async def info(self, task: TaskInfo | str, *, queue: str | None = None) -> TaskInfo: ...

    @overload
    async def info(self, task: WorkflowHandle, *, queue: None = None) -> WorkflowInfo: ...

    async def info(
        self, task: TaskInfo | str | WorkflowHandle, *, queue: str | None = None
    ) -> TaskInfo | WorkflowInfo:
        """See :meth:`Client.info`."""
        if isinstance(task, WorkflowHandle):
            return await AsyncWorkflows(self).info(task)
        task_id, queue = self._locate(task, queue)
        await self._refresh_layouts()
        members = self.layouts.members(queue)
        for member in members:  # a partitioned queue: look in each partition
            qk = self.keys.queue(member)
            read = functools.partial(_read_info, commands=info_commands(qk, task_id))
            values = await self.backend.execute(qk.slot, read)
            if values[0] is not None or member == members[-1]:
                return task_info(member if values[0] is not None else queue, task_id, values)
        raise AssertionError("unreachable")

    async def result(
        self,
        task: TaskInfo | str | WorkflowHandle,
        *,
        queue: str | None = None,
        timeout: float | None = 30.0,
    ) -> Any:
        """See :meth:`Client.result`."""
        if isinstance(task, WorkflowHandle):
            return await AsyncWorkflows(self).result(task, timeout)
        wait = ResultWait(timeout)
        while True:
            info: TaskInfo = await self.info(task, queue=queue)
            if wait.done(info):
                return info.result
            await asyncio.sleep(wait.delay())


async def _read_info(client: AsyncNodeClient, commands: Sequence[Sequence[Any]]) -> list[Any]:
    return info_values(await client.fast_pipeline(commands))


async def _append(
    client: AsyncNodeClient,
    commands: Sequence[Sequence[Any]],
    after: Sequence[Sequence[Any]],
    level: Durability,
) -> tuple[list[Any], int | None]:
    """See the sync client's ``_append``. With a ``WAIT``, on a pooled connection of its
    own (it blocks): the lane that other calls share is held up by nothing."""
    if not after:
        return raise_first(await client.fast_pipeline(commands)), None
    pipe = client.pipeline(transaction=False)
    for command in [*commands, *after]:
        pipe.execute_command(*command)
    replies = await pipe.execute(raise_on_error=False)
    return raise_first(replies[: len(commands)]), confirmed_replicas(
        level, replies[len(commands) :]
    )
