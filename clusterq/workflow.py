"""Workflows across shards: :func:`chain`, :func:`group` and :func:`chord`, nestable,
whose steps (each a :class:`~clusterq.producer.TaskSpec`) may go to any queue, so the
steps of one workflow run on different masters.

How it stays correct on a cluster:

- The workflow's state is one hash under its own hash tag (``<prefix>:{wf:<id>}``), so
  every change to it is one script on one slot (``broker/workflow.lua``); a step's
  task lives in its own queue's slot. No script crosses slots: advancing a workflow is
  a separate call, made by the worker that finished a step *before* it acknowledges the
  step's task.
- Step ids are the step's place in the tree and the step's task id is
  ``wf:<workflow id>:<step id>``; a step is claimed in the workflow's state before its
  task is enqueued and marked enqueued after. A worker killed in between leaves its
  step's task un-acknowledged: it runs again, the advance is repeated, the claimed steps
  come back and their enqueue is answered "already enqueued". Each next step is
  enqueued once, a chord's callback once.
- The state's writes are confirmed by a replica (``WAIT 1``) where the workflow's master
  has one, before the step's task is acknowledged: a failover of that master loses no
  advance that a task's acknowledgement relied on.

Results: a step's result is stored in the workflow's state (JSON), and the next step
receives what it waited for as ``task.parent_results``. A step archived for good fails
the workflow: what has not started is skipped, except a chord's ``on_error`` step, which
runs with the group's errors.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeAlias

from clusterq.broker.script import LuaScript, arun_pipelined, run_pipelined
from clusterq.errors import ClusterqError, DurabilityError, ResultTimeout, TaskFailed
from clusterq.producer import TaskSpec, new_task_id
from clusterq.serialization import json_bytes, json_default, json_value, reply_text
from clusterq.slots import keyslot
from clusterq.taskinfo import poll_delay

SCRIPT = LuaScript("workflow")
#: How long the confirmation of a state change by a replica may take.
WAIT_MS = 1000


@dataclass(frozen=True)
class Chain:
    """Steps one after the other; each gets the previous one's result."""

    steps: tuple[Node, ...]


@dataclass(frozen=True)
class Group:
    """Steps at the same time; the group's result is the list of theirs, in order."""

    steps: tuple[Node, ...]


@dataclass(frozen=True)
class Chord:
    """A group, then ``callback`` with the group's results; if a member fails for good,
    ``on_error`` (if given) runs instead, with the group's errors."""

    group: Group
    callback: Node
    on_error: TaskSpec | None = None


Node: TypeAlias = TaskSpec | Chain | Group | Chord
#: What ``client.enqueue`` starts as a workflow.
Workflow: TypeAlias = Chain | Group | Chord


def chain(*steps: Node) -> Chain:
    if not steps:
        raise ClusterqError("a chain needs at least one step")
    return Chain(tuple(_check(s) for s in steps))


def group(*steps: Node) -> Group:
    if not steps:
        raise ClusterqError("a group needs at least one step")
    return Group(tuple(_check(s) for s in steps))


def chord(
    members: Group | Sequence[Node], callback: Node, *, on_error: TaskSpec | None = None
) -> Chord:
    members = members if isinstance(members, Group) else group(*members)
    if on_error is not None and not isinstance(on_error, TaskSpec):
        raise ClusterqError("a chord's on_error is one TaskSpec")
    return Chord(members, _check(callback), on_error)


def _check(node: Any) -> Node:
    if not isinstance(node, TaskSpec | Chain | Group | Chord):
        raise ClusterqError(f"a workflow step is a TaskSpec, chain, group or chord, not {node!r}")
    if isinstance(node, TaskSpec) and "task_id" in node.options:
        raise ClusterqError("workflow steps get their task ids from the workflow")
    return node


# ---------------------------------------------------------------------- the plan


@dataclass
class Step:
    id: str
    spec: TaskSpec
    deps: list[str] = field(default_factory=list)
    out: list[str] = field(default_factory=list)
    on_error: str | None = None


@dataclass
class Plan:
    """A workflow compiled to steps with dependencies."""

    steps: dict[str, Step]
    entries: list[str]
    exits: list[str]
    #: The root is a group (its result is a list), or not (one result).
    many: bool


def compile_workflow(node: Node) -> Plan:
    steps: dict[str, Step] = {}

    def add(node: Node, path: str) -> tuple[list[str], list[str]]:
        """Compile ``node`` at ``path``; returns its (entry, exit) step ids."""
        if isinstance(node, TaskSpec):
            steps[path] = Step(path, node)
            return [path], [path]
        if isinstance(node, Chain):
            entries, exits = add(node.steps[0], f"{path}.0" if path else "0")
            for n, child in enumerate(node.steps[1:], start=1):
                child_entries, child_exits = add(child, f"{path}.{n}" if path else str(n))
                for entry in child_entries:
                    steps[entry].deps = list(exits)
                for done in exits:
                    steps[done].out += child_entries
                exits = child_exits
            return entries, exits
        if isinstance(node, Group):
            entries, exits = [], []
            for n, child in enumerate(node.steps):
                child_entries, child_exits = add(child, f"{path}.{n}" if path else str(n))
                entries += child_entries
                exits += child_exits
            return entries, exits
        members = f"{path}.g" if path else "g"
        entries, exits = add(node.group, members)
        cb_entries, cb_exits = add(node.callback, f"{path}.cb" if path else "cb")
        for entry in cb_entries:
            steps[entry].deps = list(exits)
        for done in exits:
            steps[done].out += cb_entries
        if node.on_error is not None:
            handler = f"{path}.err" if path else "err"
            steps[handler] = Step(handler, node.on_error, deps=list(exits))
            for member in _all_under(steps, members):
                steps[member].on_error = handler
        return entries, cb_exits

    entries, exits = add(_check(node), "")
    return Plan(steps, entries, exits, many=isinstance(node, Group))


def _all_under(steps: dict[str, Step], prefix: str) -> list[str]:
    return [i for i in steps if i == prefix or i.startswith(prefix + ".")]


def _spec_json(spec: TaskSpec) -> str:
    options = {
        name: value.total_seconds()
        if isinstance(value, timedelta)
        else value.timestamp()
        if isinstance(value, datetime)
        else value
        for name, value in spec.options.items()
    }
    data = {"type": spec.type, "payload": spec.payload, "options": options}
    return json.dumps(data, default=json_default)


def create_args(plan: Plan, created: float) -> list[Any]:
    handlers = {step.on_error for step in plan.steps.values() if step.on_error is not None}
    fields: dict[str, Any] = {
        "status": "running",
        # an on_error step runs only if the workflow fails: success does not wait for it
        "left": len(plan.steps) - len(handlers),
        "entries": json.dumps(plan.entries),
        "exits": json.dumps(plan.exits),
        "many": 1 if plan.many else 0,
        "created": created,
    }
    for step in plan.steps.values():
        fields[f"st:{step.id}"] = "w"
        fields[f"n:{step.id}"] = len(step.deps)
        fields[f"dep:{step.id}"] = json.dumps(step.deps)
        fields[f"out:{step.id}"] = json.dumps(step.out)
        fields[f"spec:{step.id}"] = _spec_json(step.spec)
        if step.on_error is not None:
            fields[f"onerr:{step.id}"] = step.on_error
    args: list[Any] = ["create"]
    for name, value in fields.items():
        args += [name, value]
    return args


@dataclass(frozen=True)
class Ready:
    """A step to enqueue now: its spec and what it waited for."""

    id: str
    spec: TaskSpec
    parents: list[Any]


def parse_ready(reply: Any) -> list[Ready]:
    """The steps a state change made ready (an op that readies none answers 1)."""
    if not isinstance(reply, list | tuple):
        return []
    out = []
    for i in range(0, len(reply), 3):
        step_id = reply_text(reply[i])
        spec = json.loads(reply_text(reply[i + 1]))
        out.append(
            Ready(
                step_id,
                TaskSpec(spec["type"], spec["payload"], dict(spec["options"])),
                json.loads(reply_text(reply[i + 2])),
            )
        )
    return out


def step_task_id(workflow_id: str, step_id: str) -> str:
    return f"wf:{workflow_id}:{step_id}"


def with_step(record: bytes, workflow_id: str, step_id: str, parents: list[Any]) -> bytes:
    """A prepared task record with the workflow fields added to its meta."""
    meta, newline, payload = record.partition(b"\n")
    extra = json_bytes({"wf": workflow_id, "ws": step_id, "pr": parents})
    return meta[:-1] + b"," + extra[1:] + newline + payload


# ---------------------------------------------------------------------- handles, info


@dataclass(frozen=True)
class WorkflowHandle:
    """What ``client.enqueue(workflow)`` returns: pass it to ``client.result`` and
    ``client.info``."""

    id: str


class WorkflowFailed(TaskFailed):
    """A step of the workflow was archived for good."""


@dataclass(frozen=True)
class StepInfo:
    id: str
    type: str
    queue: str
    state: str
    task_id: str
    error: str | None = None


STEP_STATES = {
    "w": "waiting",
    "q": "enqueuing",
    "e": "enqueued",
    "d": "done",
    "f": "failed",
    "s": "skipped",
}


@dataclass(frozen=True)
class WorkflowInfo:
    id: str
    status: str
    steps: list[StepInfo]
    created: float | None
    result: Any = None
    errors: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": self.status,
            "created": self.created,
            "result": self.result,
            "errors": self.errors,
            "steps": [s.__dict__ for s in self.steps],
        }


def workflow_info(workflow_id: str, fields: dict[Any, Any]) -> WorkflowInfo:
    data = {reply_text(k): reply_text(v) for k, v in fields.items()}
    if "status" not in data:
        raise ClusterqError(f"no workflow {workflow_id!r} (or its state has expired)")
    steps, errors = [], {}
    for name in data:
        if not name.startswith("st:"):
            continue
        step_id = name[3:]
        spec = json.loads(data.get(f"spec:{step_id}", "{}"))
        error = data.get(f"err:{step_id}")
        if error is not None:
            errors[step_id] = error
        steps.append(
            StepInfo(
                id=step_id,
                type=str(spec.get("type", "?")),
                queue=str(spec.get("options", {}).get("queue", "default")),
                state=STEP_STATES.get(data[name], data[name]),
                task_id=step_task_id(workflow_id, step_id),
                error=error,
            )
        )
    result = None
    if data["status"] == "succeeded":
        exits = json.loads(data["exits"])
        results = [json_value(data[f"res:{e}"]) if f"res:{e}" in data else None for e in exits]
        result = results if data.get("many") == "1" else results[-1]
    created = float(data["created"]) if "created" in data else None
    return WorkflowInfo(
        workflow_id, data["status"], sorted(steps, key=lambda s: s.id), created, result, errors
    )


def read_workflow(backend: Any, workflow_id: str, timeout: float | None = None) -> WorkflowInfo:
    """A workflow's state, read with a sync backend (one HGETALL of its hash)."""
    key = backend.keys.workflow(workflow_id)
    fields = backend.execute_key(key, lambda c: c.hgetall(key), timeout=timeout)
    return workflow_info(workflow_id, fields)


def settled(info: WorkflowInfo) -> bool:
    if info.status == "failed":
        shown = "; ".join(f"step {k}: {v}" for k, v in sorted(info.errors.items()))
        raise WorkflowFailed(f"workflow {info.id} failed: {shown}", shown)
    return info.status == "succeeded"


# ---------------------------------------------------------------------- starting, advancing


def _durable_call(workflow_key: str, args: list[Any], replicas: bool) -> tuple[Any, list[Any]]:
    """The step and the commands after it for one state change (``WAIT`` if replicas)."""
    after = [("WAIT", 1, WAIT_MS)] if replicas else []
    return (SCRIPT, [workflow_key], args), after


def prepare_step(client: Any, workflow_id: str, ready: Ready) -> tuple[Any, str]:
    """The prepared enqueue of a ready step (its record carrying the workflow fields)
    and the durability to send it with: the client's, or ``replica`` where the step's
    master has one (a next step must outlive a failover of its queue's master)."""
    spec = ready.spec
    prepared = client.producer.prepare(
        spec.type, spec.payload, task_id=step_task_id(workflow_id, ready.id), **spec.options
    )
    prepared.new.record = with_step(prepared.new.record, workflow_id, ready.id, ready.parents)
    level = client.durability
    if level == "none" and client.backend.topology.locate_slot_replicas(prepared.qk.slot):
        level = "replica"
    return prepared, level


def _confirmed(tail: list[Any], replicas: bool, what: str) -> None:
    if replicas and (not tail or isinstance(tail[-1], Exception) or int(tail[-1]) < 1):
        raise DurabilityError(f"no replica confirmed the workflow's {what}", [], 0)


class Workflows:
    """Starting and advancing workflows, over a sync :class:`Client`."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.backend = client.backend

    def _state(self, key: str, args: list[Any], what: str) -> list[Ready]:
        slot = keyslot(key)
        replicas = bool(self.backend.topology.locate_slot_replicas(slot))
        step, after = _durable_call(key, args, replicas)

        def call(c: Any) -> Any:
            replies, tail = run_pipelined(c, [step], after)
            if isinstance(replies[0], Exception):
                raise replies[0]
            _confirmed(tail, replicas, what)
            return replies[0]

        return parse_ready(self.backend.execute(slot, call))

    def start(self, node: Node, workflow_id: str | None = None) -> WorkflowHandle:
        plan = compile_workflow(node)
        workflow_id = workflow_id or new_task_id()
        key = self.backend.keys.workflow(workflow_id)
        ready = self._state(key, create_args(plan, time.time()), "creation")
        self.enqueue_ready(workflow_id, key, ready)
        return WorkflowHandle(workflow_id)

    def enqueue_ready(self, workflow_id: str, key: str, ready: list[Ready]) -> None:
        for r in ready:
            prepared, level = prepare_step(self.client, workflow_id, r)
            self.client.send_prepared([prepared], level, raise_duplicate=False)
            self._state(key, ["enqueued", r.id], "enqueue mark")

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

    async def _state(self, key: str, args: list[Any], what: str) -> list[Ready]:
        slot = keyslot(key)
        replicas = bool(self.backend.topology.locate_slot_replicas(slot))
        step, after = _durable_call(key, args, replicas)

        async def call(c: Any) -> Any:
            replies, tail = await arun_pipelined(c, [step], after)
            if isinstance(replies[0], Exception):
                raise replies[0]
            _confirmed(tail, replicas, what)
            return replies[0]

        return parse_ready(await self.backend.execute(slot, call))

    async def start(self, node: Node, workflow_id: str | None = None) -> WorkflowHandle:
        plan = compile_workflow(node)
        workflow_id = workflow_id or new_task_id()
        key = self.backend.keys.workflow(workflow_id)
        ready = await self._state(key, create_args(plan, time.time()), "creation")
        await self.enqueue_ready(workflow_id, key, ready)
        return WorkflowHandle(workflow_id)

    async def enqueue_ready(self, workflow_id: str, key: str, ready: list[Ready]) -> None:
        for r in ready:
            prepared, level = prepare_step(self.client, workflow_id, r)
            await self.client.send_prepared([prepared], level, raise_duplicate=False)
            await self._state(key, ["enqueued", r.id], "enqueue mark")

    async def step_done(self, workflow_id: str, step_id: str, result: bytes) -> None:
        """A step's handler returned ``result`` (JSON): record it, enqueue what follows."""
        key = self.backend.keys.workflow(workflow_id)
        ready = await self._state(key, ["done", step_id, result], "step result")
        await self.enqueue_ready(workflow_id, key, ready)

    async def step_failed(self, workflow_id: str, step_id: str, error: str) -> None:
        """A step was archived for good: fail the workflow, run its on_error step."""
        key = self.backend.keys.workflow(workflow_id)
        ready = await self._state(key, ["fail", step_id, error], "step failure")
        await self.enqueue_ready(workflow_id, key, ready)

    async def info(self, handle: WorkflowHandle | str) -> WorkflowInfo:
        workflow_id = handle.id if isinstance(handle, WorkflowHandle) else handle
        key = self.backend.keys.workflow(workflow_id)
        fields = await self.backend.execute_key(key, lambda c: c.hgetall(key))
        return workflow_info(workflow_id, fields)

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
