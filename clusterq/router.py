"""Routing task types to handlers, like asynq's ServeMux; middleware around handlers.

A handler takes a :class:`~clusterq.task.Task` and returns a JSON-serialisable result
(or None). It may be ``async def`` (run on the worker's event loop) or a plain function
(run in the worker's thread pool). Middleware are ``async def mw(task, call_next)``
that ``return await call_next(task)`` (or not)::

    router = Router()

    @router.task("email:send")
    async def send_email(task: Task) -> None: ...

    router.use(log_timing)

Lookup: the exact type first, then the longest registered pattern that ends with ``:``
and is a prefix of the type (``"email:"`` handles ``"email:send"``).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Generic, TypeVar, overload

from clusterq.task import Task
from clusterq.typed import TaskDef, rebuild_payload, with_payload_type

Handler = Callable[[Task], Any]
CallNext = Callable[[Task], Awaitable[Any]]
Middleware = Callable[[Task, CallNext], Awaitable[Any]]
P = TypeVar("P")
R = TypeVar("R")


class Router:
    """Task type -> handler, plus middleware applied to every handler."""

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}
        self._prefixes: list[str] = []
        self.middleware: list[Middleware] = []

    def handle(self, pattern: str, handler: Handler) -> None:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError("a task type pattern must be a non-empty string")
        if pattern in self._handlers:
            raise ValueError(f"a handler for {pattern!r} is already registered")
        if not callable(handler):
            raise TypeError(f"handler for {pattern!r} is not callable")
        self._handlers[pattern] = handler
        if pattern.endswith(":"):
            self._prefixes = sorted([*self._prefixes, pattern], key=len, reverse=True)

    @overload
    def task(self, pattern: str) -> _Register[Any]: ...

    @overload
    def task(self, pattern: str, payload: type[P]) -> _Register[P]: ...

    def task(self, pattern: str, payload: type[P] | None = None) -> _Register[Any]:
        """Decorator form of :meth:`handle`; returns a :class:`~clusterq.typed.TaskDef`
        (the handler, still callable, with typed ``enqueue``/``spec``/``result``).
        ``payload``: the payload's type (a dataclass or pydantic model is rebuilt from
        JSON before the handler sees it)."""
        return _Register(self, pattern, payload)

    def use(self, *middleware: Middleware) -> None:
        """Add middleware; the first added is the outermost."""
        self.middleware.extend(middleware)

    def resolve(self, task_type: str) -> Handler | None:
        handler = self._handlers.get(task_type)
        if handler is not None:
            return handler
        for prefix in self._prefixes:
            if task_type.startswith(prefix):
                return self._handlers[prefix]
        return None

    @property
    def types(self) -> list[str]:
        return sorted(self._handlers)


class _Register(Generic[P]):
    """What ``router.task(pattern)`` returns: registers the handler it decorates."""

    def __init__(self, router: Router, pattern: str, payload: type[P] | None) -> None:
        self.router, self.pattern, self.payload = router, pattern, payload

    @overload
    def __call__(self, handler: Callable[[Task], Coroutine[Any, Any, R]]) -> TaskDef[P, R]: ...

    @overload
    def __call__(self, handler: Callable[[Task], R]) -> TaskDef[P, R]: ...

    def __call__(self, handler: Callable[[Task], Any]) -> TaskDef[P, Any]:
        rebuild = rebuild_payload(self.payload)
        served = handler
        if rebuild is not None:
            served = with_payload_type(handler, rebuild, is_async(handler))
        self.router.handle(self.pattern, served)
        return TaskDef(self.pattern, handler, self.payload)


def is_async(handler: Handler) -> bool:
    target = getattr(handler, "__call__", handler)  # noqa: B004 - callable objects too
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(target)
