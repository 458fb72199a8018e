"""Starting a workflow (every step checked before anything is written) and advancing it
(by the worker that finished a step, before it acknowledges the step's task)."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from clusterq.broker import workflow as wf_script
from clusterq.broker.script import arun_pipelined, run_pipelined
from clusterq.durability import Durability, confirmed_replicas, durability_commands
from clusterq.errors import ClusterqError, DurabilityError, ResultTimeout
from clusterq.keys import MAX_TASK_ID_LENGTH
from clusterq.producer import MAX_SECONDS, PreparedEnqueue, TaskSpec, new_task_id
from clusterq.serialization import json_bytes
from clusterq.slots import keyslot
from clusterq.taskinfo import poll_delay
from clusterq.workflow.info import (
    WorkflowHandle,
    WorkflowInfo,
    ainfo_reader,
    info_from,
    read_workflow,
    settled,
)
from clusterq.workflow.shapes import Node, Plan, compile_workflow, step_task_id

#: The most steps one workflow has.
MAX_STEPS = 100_000
#: The most bytes a workflow's state takes when it starts (its steps' payloads included).
MAX_STATE_BYTES = 64 * 1024 * 1024
#: The most bytes of results one step waits for (a chord's callback gets them all).
MAX_PARENT_BYTES = 8 * 1024 * 1024
#: How long the state of a workflow that ended is kept (for ``result`` and ``inspect``).
DEFAULT_RETENTION = 24 * 3600.0
#: With durability "none", how long a change of the state waits for a live replica to
#: confirm it before going on without (best effort).
BEST_EFFORT_WAIT_MS = 500


def _spec_json(spec: TaskSpec) -> bytes:
    """A step's spec as stored in the workflow's state (strict JSON: no NaN)."""
    options = {
        name: value.total_seconds()
        if isinstance(value, timedelta)
        else value.timestamp()
        if isinstance(value, datetime)
        else value
        for name, value in spec.options.items()
    }
    data = {"type": spec.type, "payload": spec.payload, "options": options}
    try:
        return json_bytes(data)
    except (TypeError, ValueError) as exc:
        raise ClusterqError(f"a workflow step's payload and options must be JSON: {exc}") from None


def state_fields(plan: Plan, created: float, retention: float) -> list[tuple[str, Any]]:
    """The fields of a new workflow's state."""
    handlers = {step.on_error for step in plan.steps.values() if step.on_error is not None}
    fields: list[tuple[str, Any]] = [
        ("status", "running"),
        # an on_error step runs only if the workflow fails: success does not wait for it
        ("left", len(plan.steps) - len(handlers)),
        ("entries", json.dumps(plan.entries)),
        ("exits", json.dumps(plan.exits)),
        ("many", 1 if plan.many else 0),
        ("created", created),
        ("keep", int(retention * 1000)),
    ]
    entries = set(plan.entries)
    for step in plan.steps.values():
        fields += [
            # the entries are enqueued at once: written claimed
            (f"st:{step.id}", "q" if step.id in entries else "w"),
            (f"n:{step.id}", len(step.deps)),
            (f"dep:{step.id}", json.dumps(step.deps)),
            (f"out:{step.id}", json.dumps(step.out)),
            (f"spec:{step.id}", _spec_json(step.spec)),
        ]
        if step.on_error is not None:
            fields.append((f"onerr:{step.id}", step.on_error))
    return fields


@dataclass(frozen=True)
class Ready:
    """A step to enqueue now: its spec and what it waited for."""

    id: str
    spec: TaskSpec
    parents: list[Any]


def _ready(reply: Any, start: StartPlan | None = None) -> list[Ready] | None:
    if start is not None and (ids := wf_script.committed(reply)) is not None:
        return [Ready(i, start.specs[i], []) for i in ids]
    steps = wf_script.parse_ready(reply)
    if steps is None:
        return None
    return [
        Ready(s.id, TaskSpec(s.spec["type"], s.spec["payload"], dict(s.spec["options"])), s.parents)
        for s in steps
    ]


def with_step(
    record: bytes, workflow_id: str, step_id: str, parents: list[Any], level: Durability
) -> bytes:
    """A prepared task record with the workflow fields added to its meta (and the
    workflow's durability, where it asks for one)."""
    meta, newline, payload = record.partition(b"\n")
    fields: dict[str, Any] = {"wf": workflow_id, "ws": step_id, "pr": parents}
    if level != "none":
        fields["wd"] = level
    extra = json_bytes(fields)
    return meta[:-1] + b"," + extra[1:] + newline + payload


# ---------------------------------------------------------------------- durability


@dataclass(frozen=True)
class Confirmation:
    """How one write for a workflow is confirmed by a replica: ``after`` follows it on
    the same connection; ``required``: an unconfirmed write raises DurabilityError."""

    level: Durability
    after: list[tuple[Any, ...]]
    required: bool


def confirmation(level: Durability, backend: Any, slot: int, timeout: float | None) -> Confirmation:
    """The client's durability, or with ``none``, a brief ``WAIT`` where the slot's
    master has a live replica (best effort: never an error, never a long stall)."""
    if level != "none":
        return Confirmation(level, durability_commands(level, timeout), True)
    if backend.topology.live_replicas(slot):
        return Confirmation("replica", [("WAIT", 1, BEST_EFFORT_WAIT_MS)], False)
    return Confirmation("none", [], False)


def _check_confirmed(c: Confirmation, tail: list[Any], what: str) -> None:
    if not c.required:
        return
    replicas = confirmed_replicas(c.level, tail)
    if replicas is not None and replicas < 1:
        raise DurabilityError(
            f"no replica confirmed the workflow's {what} (durability={c.level!r})", [], 0
        )


# ---------------------------------------------------------------------- starting, advancing


@dataclass
class StartPlan:
    """A workflow checked from end to end before anything is written."""

    id: str
    calls: list[list[Any]]
    queues: set[str]
    #: The entries' specs, by step id.
    specs: dict[str, TaskSpec]


def plan_start(
    client: Any,
    node: Node,
    workflow_id: str | None,
    retention: float | None,
    headers: dict[str, str] | None = None,
) -> StartPlan:
    """Compile ``node`` and check every step as its enqueue will be checked (queue,
    type, payload, options, task id), so that a bad step is refused here, with nothing
    written, rather than failing in a worker later. ``headers`` go to every step (a
    step's own headers win where both name the same one)."""
    plan = compile_workflow(node)
    if headers is not None:
        for step in plan.steps.values():
            own = step.spec.options.get("headers") or {}
            if not isinstance(own, dict):
                continue  # prepare() below names it
            options = {**step.spec.options, "headers": {**headers, **own}}
            step.spec = TaskSpec(step.spec.type, step.spec.payload, options)
    if len(plan.steps) > MAX_STEPS:
        raise ClusterqError(
            f"a workflow has at most {MAX_STEPS} steps, this one has {len(plan.steps)}"
        )
    keep = _retention(retention)
    workflow_id = workflow_id or new_task_id()
    client.keys.workflow(workflow_id)  # validates it
    queues = set()
    for step in plan.steps.values():
        task_id = step_task_id(workflow_id, step.id)
        if len(task_id) > MAX_TASK_ID_LENGTH:
            raise ClusterqError(
                f"workflow nested too deeply: step {step.id[:40]}... would get a task id of "
                f"{len(task_id)} characters (at most {MAX_TASK_ID_LENGTH})"
            )
        s = step.spec
        try:
            prepared = client.producer.prepare(s.type, s.payload, task_id=task_id, **s.options)
        except (TypeError, ValueError, ClusterqError) as exc:
            raise ClusterqError(f"workflow step {step.id} ({s.type!r}): {exc}") from None
        queues.add(prepared.queue)
    fields = state_fields(plan, time.time(), keep)
    size = sum(len(v) if isinstance(v, bytes | str) else 24 for _, v in fields)
    if size > MAX_STATE_BYTES:
        raise ClusterqError(
            f"a workflow's state is at most {MAX_STATE_BYTES} bytes, this one is {size} "
            "(payloads included)"
        )
    specs = {i: plan.steps[i].spec for i in plan.entries}
    return StartPlan(workflow_id, wf_script.create_calls(fields), queues, specs)


def _retention(retention: float | None) -> float:
    if retention is None:
        return DEFAULT_RETENTION
    if isinstance(retention, bool) or not isinstance(retention, int | float):
        raise ClusterqError(f"retention must be a number of seconds, got {retention!r}")
    if not 1 <= retention <= MAX_SECONDS:
        raise ClusterqError(
            f"a workflow's retention is from 1 to {MAX_SECONDS:.0f} seconds, got {retention!r}"
        )
    return float(retention)


@dataclass
class ReadyBatch:
    """The ready steps of one call, prepared: by slot, and those that cannot be
    enqueued (with why)."""

    by_slot: dict[int, list[tuple[str, PreparedEnqueue]]]
    bad: list[tuple[str, str]]

    @property
    def step_ids(self) -> list[str]:
        """The steps to enqueue (every slot's)."""
        return [step_id for steps in self.by_slot.values() for step_id, _ in steps]


def prepare_ready(
    client: Any, workflow_id: str, ready: list[Ready], level: Durability
) -> ReadyBatch:
    """The enqueues of ``ready`` steps (their records carrying the workflow's fields).
    A step checked at the start cannot fail here, unless this client is set up
    otherwise (a smaller payload limit): such a step fails the workflow."""
    batch = ReadyBatch({}, [])
    for r in ready:
        spec = r.spec
        try:
            prepared = client.producer.prepare(
                spec.type, spec.payload, task_id=step_task_id(workflow_id, r.id), **spec.options
            )
        except (TypeError, ValueError, ClusterqError) as exc:
            batch.bad.append((r.id, f"could not be enqueued: {exc}"))
            continue
        prepared.new.record = with_step(prepared.new.record, workflow_id, r.id, r.parents, level)
        batch.by_slot.setdefault(prepared.qk.slot, []).append((r.id, prepared))
    return batch


def _state_call(keys: Any, workflow_id: str, args: list[Any], c: Confirmation, what: str) -> Any:
    """A call to the workflow's script, what confirms it (on the same connection), and
    the check of the replies."""

    def check(replies: list[Any], tail: list[Any]) -> Any:
        if isinstance(replies[0], Exception):
            raise replies[0]
        _check_confirmed(c, tail, what)
        return replies[0]

    script_keys = [keys.workflow(workflow_id), keys.workflow_staging(workflow_id)]
    return (wf_script.SCRIPT, script_keys, args), c.after, check


#: Writes that nothing waits on (the parts of a large workflow: the last call's
#: confirmation covers them, the replication stream being in order).
UNCONFIRMED = Confirmation("none", [], False)


class Workflows:
    """Starting and advancing workflows, over a sync :class:`Client`."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.backend = client.backend

    def _state(
        self,
        workflow_id: str,
        args: list[Any],
        what: str,
        level: Durability,
        confirm: Confirmation | None = None,
        start: StartPlan | None = None,
    ) -> list[Ready] | None:
        slot = keyslot(self.backend.keys.workflow(workflow_id))
        c = confirm or confirmation(level, self.backend, slot, self.client.durability_timeout)
        step, after, check = _state_call(self.backend.keys, workflow_id, args, c, what)

        def call(node: Any) -> Any:
            return check(*run_pipelined(node, [step], after))

        return _ready(self.backend.execute(slot, call), start)

    def start(
        self,
        node: Node,
        workflow_id: str | None = None,
        *,
        retention: float | None = None,
        durability: Durability | None = None,
        headers: dict[str, str] | None = None,
    ) -> WorkflowHandle:
        plan = plan_start(self.client, node, workflow_id, retention, headers)
        self.client._register_soon(plan.queues)
        level = durability or self.client.durability
        for args in plan.calls[:-1]:  # the parts of a large workflow, if any
            self._state(plan.id, args, "parts", level, UNCONFIRMED)
        ready = self._state(plan.id, plan.calls[-1], "creation", level, start=plan)
        self.enqueue_ready(plan.id, ready or [], level)
        return WorkflowHandle(plan.id)

    def enqueue_ready(self, workflow_id: str, ready: list[Ready], level: Durability) -> None:
        while ready:
            batch = prepare_ready(self.client, workflow_id, ready, level)
            ready = []
            for step_id, error in batch.bad:  # fails the workflow; may ready an on_error
                args = wf_script.fail(step_id, error)
                ready += self._state(workflow_id, args, "failure", level) or []
            for slot, steps in batch.by_slot.items():
                c = confirmation(level, self.backend, slot, self.client.durability_timeout)
                try:
                    self.client.send_prepared([p for _, p in steps], c.level, raise_duplicate=False)
                except DurabilityError:
                    if c.required:
                        raise
            # one mark for the steps of every slot (fewer calls to the workflow's master)
            for args in wf_script.enqueued_calls(batch.step_ids):
                self._state(workflow_id, args, "enqueue mark", level)

    def info(self, handle: WorkflowHandle | str) -> WorkflowInfo:
        workflow_id = handle.id if isinstance(handle, WorkflowHandle) else handle
        return read_workflow(self.backend, workflow_id)

    def result(self, handle: WorkflowHandle, timeout: float | None) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        attempt = 0
        while True:
            info = self.info(handle)
            if settled(info):
                return info.result
            if deadline is not None and time.monotonic() >= deadline:
                raise ResultTimeout(f"workflow {handle.id} is still {info.status} after {timeout}s")
            time.sleep(poll_delay(attempt))
            attempt += 1


class AsyncWorkflows:
    """The same over an :class:`AsyncClient`; also what a worker uses to advance."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.backend = client.backend

    async def _state(
        self,
        workflow_id: str,
        args: list[Any],
        what: str,
        level: Durability,
        confirm: Confirmation | None = None,
        start: StartPlan | None = None,
    ) -> list[Ready] | None:
        slot = keyslot(self.backend.keys.workflow(workflow_id))
        c = confirm or confirmation(level, self.backend, slot, self.client.durability_timeout)
        step, after, check = _state_call(self.backend.keys, workflow_id, args, c, what)

        async def call(node: Any) -> Any:
            return check(*await arun_pipelined(node, [step], after))

        return _ready(await self.backend.execute(slot, call), start)

    async def start(
        self,
        node: Node,
        workflow_id: str | None = None,
        *,
        retention: float | None = None,
        durability: Durability | None = None,
        headers: dict[str, str] | None = None,
    ) -> WorkflowHandle:
        plan = plan_start(self.client, node, workflow_id, retention, headers)
        self.client._register_soon(plan.queues)
        level = durability or self.client.durability
        for args in plan.calls[:-1]:
            await self._state(plan.id, args, "parts", level, UNCONFIRMED)
        ready = await self._state(plan.id, plan.calls[-1], "creation", level, start=plan)
        await self.enqueue_ready(plan.id, ready or [], level)
        return WorkflowHandle(plan.id)

    async def enqueue_ready(self, workflow_id: str, ready: list[Ready], level: Durability) -> None:
        while ready:
            batch = prepare_ready(self.client, workflow_id, ready, level)
            ready = []
            for step_id, error in batch.bad:
                args = wf_script.fail(step_id, error)
                ready += await self._state(workflow_id, args, "failure", level) or []
            for slot, steps in batch.by_slot.items():
                c = confirmation(level, self.backend, slot, self.client.durability_timeout)
                try:
                    await self.client.send_prepared(
                        [p for _, p in steps], c.level, raise_duplicate=False
                    )
                except DurabilityError:
                    if c.required:
                        raise
            # one mark for the steps of every slot (fewer calls to the workflow's master)
            for args in wf_script.enqueued_calls(batch.step_ids):
                await self._state(workflow_id, args, "enqueue mark", level)

    async def step_done(
        self, workflow_id: str, step_id: str, result: bytes, level: Durability = "none"
    ) -> bool:
        """A step's handler returned ``result`` (JSON): record it, enqueue what follows.
        False when the workflow is gone (its state expired): nothing to advance."""
        args = wf_script.done(step_id, result, MAX_PARENT_BYTES)
        ready = await self._state(workflow_id, args, "step result", level)
        if ready is None:
            return False
        await self.enqueue_ready(workflow_id, ready, level)
        return True

    async def step_failed(
        self, workflow_id: str, step_id: str, error: str, level: Durability = "none"
    ) -> bool:
        """A step was archived for good: fail the workflow, run its on_error step.
        False when the workflow is gone."""
        args = wf_script.fail(step_id, error)
        ready = await self._state(workflow_id, args, "step failure", level)
        if ready is None:
            return False
        await self.enqueue_ready(workflow_id, ready, level)
        return True

    async def info(self, handle: WorkflowHandle | str) -> WorkflowInfo:
        workflow_id = handle.id if isinstance(handle, WorkflowHandle) else handle
        key = self.backend.keys.workflow(workflow_id)
        return info_from(workflow_id, await self.backend.execute_key(key, ainfo_reader(key)))

    async def result(self, handle: WorkflowHandle, timeout: float | None) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        attempt = 0
        while True:
            info = await self.info(handle)
            if settled(info):
                return info.result
            if deadline is not None and time.monotonic() >= deadline:
                raise ResultTimeout(f"workflow {handle.id} is still {info.status} after {timeout}s")
            await asyncio.sleep(poll_delay(attempt))
            attempt += 1


def start_options(payload: Any, options: dict[str, Any]) -> dict[str, Any]:
    """The options ``client.enqueue(workflow, ...)`` takes: ``retention``, ``headers``
    (given to every step) and the call's ``durability``, given apart; its steps carry
    their own."""
    if payload is not None:
        raise ClusterqError("a workflow takes no payload: each step carries its own")
    unknown = sorted(set(options) - {"retention", "headers"})
    if unknown:
        raise ClusterqError(
            "a workflow takes retention=, headers= and durability= only, not "
            f"{', '.join(unknown)} "
            "(each step carries its own options)"
        )
    return options
