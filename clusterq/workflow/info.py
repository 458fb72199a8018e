"""A workflow seen from outside: its handle, what ``client.info`` and ``clusterq workflow
inspect`` show, and how it is read (one ``HGETALL`` and ``PTTL`` of its state)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from clusterq.errors import ClusterqError, TaskFailed
from clusterq.serialization import json_value, reply_text
from clusterq.workflow.shapes import step_task_id


@dataclass(frozen=True)
class WorkflowHandle:
    """What ``client.enqueue(workflow)`` returns: pass it to ``client.result`` and
    ``client.info``."""

    id: str


class WorkflowFailed(TaskFailed):
    """A step of the workflow was archived for good."""


class WorkflowGone(ClusterqError, LookupError):
    """No such workflow: it never existed, or it ended and its state expired."""


@dataclass(frozen=True)
class StepInfo:
    id: str
    type: str
    queue: str
    state: str
    task_id: str
    error: str | None = None
    #: The steps this one waits for (their results are its input).
    deps: tuple[str, ...] = ()
    #: A done step's result (None otherwise, or when it is not JSON).
    result: Any = None


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
    #: Seconds until the state of an ended workflow expires (None: kept while it runs).
    expires_in: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": self.status,
            "created": self.created,
            "result": self.result,
            "errors": self.errors,
            "expires_in": self.expires_in,
            "steps": [s.__dict__ for s in self.steps],
        }


def _json_or(text: str | None, default: Any) -> Any:
    try:
        return json.loads(text) if text is not None else default
    except ValueError:
        return default


def workflow_info(
    workflow_id: str, fields: dict[Any, Any], ttl_ms: int | None = None
) -> WorkflowInfo:
    data = {reply_text(k): reply_text(v) for k, v in fields.items()}
    if "status" not in data:
        raise WorkflowGone(
            f"no workflow {workflow_id!r}: it never existed, or it ended and its state "
            "expired (kept for the workflow's retention)"
        )
    failed = data["status"] == "failed"
    steps, errors = [], {}
    for name in data:
        if not name.startswith("st:"):
            continue
        step_id = name[3:]
        spec = _json_or(data.get(f"spec:{step_id}"), {})
        spec = spec if isinstance(spec, dict) else {}
        options = spec.get("options")
        options = options if isinstance(options, dict) else {}
        error = data.get(f"err:{step_id}")
        if error is not None:
            errors[step_id] = error
        code = data[name]
        deps = _json_or(data.get(f"dep:{step_id}"), [])
        result = None
        if code == "d" and f"res:{step_id}" in data:
            result = _json_or(data[f"res:{step_id}"], None)
        if code == "w" and failed:
            code = "s"  # nothing will run it
        steps.append(
            StepInfo(
                id=step_id,
                type=str(spec.get("type", "?")),
                queue=str(options.get("queue", "default")),
                state=STEP_STATES.get(code, code),
                task_id=step_task_id(workflow_id, step_id),
                error=error,
                deps=tuple(str(d) for d in deps) if isinstance(deps, list) else (),
                result=result,
            )
        )
    result = None
    if data["status"] == "succeeded":
        exits = _json_or(data.get("exits"), [])
        results = [json_value(data[f"res:{e}"]) if f"res:{e}" in data else None for e in exits]
        result = results if data.get("many") == "1" else (results[-1] if results else None)
    created = float(data["created"]) if "created" in data else None
    expires_in = ttl_ms / 1000 if ttl_ms is not None and ttl_ms >= 0 else None
    return WorkflowInfo(
        workflow_id,
        data["status"],
        sorted(steps, key=lambda s: s.id),
        created,
        result,
        errors,
        expires_in,
    )


def info_reader(key: str) -> Any:
    """What reads a workflow's state over a sync node client."""

    def read(client: Any) -> tuple[Any, Any]:
        return _replies(client.fast_pipeline([("HGETALL", key), ("PTTL", key)]))

    return read


def ainfo_reader(key: str) -> Any:
    """The same over an asyncio node client."""

    async def read(client: Any) -> tuple[Any, Any]:
        return _replies(await client.fast_pipeline([("HGETALL", key), ("PTTL", key)]))

    return read


def _replies(replies: list[Any]) -> tuple[Any, Any]:
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    fields, ttl = replies
    return fields, ttl


def info_from(workflow_id: str, reply: tuple[Any, Any]) -> WorkflowInfo:
    """A workflow's info from the replies of a reader."""
    fields, ttl = reply
    if isinstance(fields, list):  # hiredis: a flat list
        fields = dict(zip(fields[::2], fields[1::2], strict=True))
    return workflow_info(workflow_id, fields, int(ttl))


def read_workflow(backend: Any, workflow_id: str, timeout: float | None = None) -> WorkflowInfo:
    """A workflow's state, read with a sync backend (HGETALL and PTTL of its hash)."""
    key = backend.keys.workflow(workflow_id)
    reply = backend.execute_key(key, info_reader(key), timeout=timeout)
    return info_from(workflow_id, reply)


def settled(info: WorkflowInfo) -> bool:
    if info.status == "failed":
        shown = "; ".join(f"step {k}: {v}" for k, v in sorted(info.errors.items()))
        raise WorkflowFailed(f"workflow {info.id} failed: {shown}", shown)
    return info.status == "succeeded"
