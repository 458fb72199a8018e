"""The typed task API: what ``@router.task(...)`` returns.

A :class:`TaskDef` is the handler (still callable as it was) and what a producer needs to
enqueue it with types a checker can see: the payload type ``P`` (given as
``@router.task("images:resize", payload=Resize)``; a dataclass, a TypedDict, a pydantic
model, or anything JSON can hold), the options as typed keywords (mypy rejects
``queu="images"`` or ``process_in="soon"``), and the result type ``R`` (the handler's
return type, awaited for an ``async def``)::

    @dataclass
    class Resize:
        src: str
        width: int

    @router.task("images:resize", payload=Resize)
    async def resize(task: Task) -> dict[str, int]:
        job: Resize = task.payload            # a Resize again on the worker
        ...

    info = resize.enqueue(client, Resize("a.png", 128), queue="images")
    size = resize.result(client, info)        # dict[str, int] to the type checker
    step = resize.spec(Resize("b.png", 64), queue="images")   # for chain/group/chord

On the worker, a payload whose type is a dataclass or a pydantic model is rebuilt from
its JSON before the handler sees it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from clusterq.producer import EnqueueOptions, TaskSpec
from clusterq.task import Task, TaskInfo

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from clusterq.aclient import AsyncClient
    from clusterq.client import Client

P = TypeVar("P")
R = TypeVar("R")


class TaskDef(Generic[P, R]):
    """A registered task type: its handler, payload type and result type."""

    def __init__(self, type: str, handler: Callable[[Task], Any], payload: type[P] | None) -> None:
        self.type = type
        self.handler = handler
        self.payload_type = payload
        self.__doc__ = getattr(handler, "__doc__", None)
        self.__name__ = getattr(handler, "__name__", type)

    def __call__(self, task: Task) -> Any:
        return self.handler(task)

    def __repr__(self) -> str:
        return f"TaskDef({self.type!r}, {self.__name__})"

    def spec(self, payload: P, **options: Unpack[EnqueueOptions]) -> TaskSpec:
        """A :class:`TaskSpec` of this task, for workflows and ``enqueue_many``."""
        return TaskSpec(self.type, payload, dict(options))

    def enqueue(self, client: Client, payload: P, **options: Unpack[EnqueueOptions]) -> TaskInfo:
        return client.enqueue(self.type, payload, **options)

    async def aenqueue(
        self, client: AsyncClient, payload: P, **options: Unpack[EnqueueOptions]
    ) -> TaskInfo:
        return await client.enqueue(self.type, payload, **options)

    def result(self, client: Client, task: TaskInfo | str, *, timeout: float | None = 30.0) -> R:
        """``client.result(task)``, typed as this task's result."""
        value: R = client.result(task, timeout=timeout)
        return value

    async def aresult(
        self, client: AsyncClient, task: TaskInfo | str, *, timeout: float | None = 30.0
    ) -> R:
        value: R = await client.result(task, timeout=timeout)
        return value


def rebuild_payload(payload_type: Any) -> Callable[[Task], Task] | None:
    """How the worker turns a JSON payload back into ``payload_type`` (a dataclass or a
    pydantic model); None when it stays as JSON gave it."""
    if payload_type is None:
        return None
    if dataclasses.is_dataclass(payload_type) and isinstance(payload_type, type):
        cls = payload_type

        def from_fields(task: Task) -> Task:
            if isinstance(task.payload, dict):
                return dataclasses.replace(task, payload=cls(**task.payload))
            return task

        return from_fields
    validate = getattr(payload_type, "model_validate", None)
    if callable(validate):

        def from_model(task: Task) -> Task:
            return dataclasses.replace(task, payload=validate(task.payload))

        return from_model
    return None


def with_payload_type(
    handler: Callable[[Task], Any], rebuild: Callable[[Task], Task], is_async: bool
) -> Callable[[Task], Any]:
    """``handler`` called with its payload rebuilt (an async handler stays async)."""
    if is_async:

        async def call_async(task: Task) -> Any:
            result: Awaitable[Any] = handler(rebuild(task))
            return await result

        return call_async

    def call(task: Task) -> Any:
        return handler(rebuild(task))

    return call
