"""What a workflow is: chains, groups and chords of :class:`~clusterq.producer.TaskSpec`
steps, and the plan they compile to (step ids, dependencies)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from clusterq.errors import ClusterqError
from clusterq.producer import TaskSpec


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


def step_task_id(workflow_id: str, step_id: str) -> str:
    return f"wf:{workflow_id}:{step_id}"
