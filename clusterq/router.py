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
import typing
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Generic, TypeVar, overload

from clusterq.keys import validate_queue_name
from clusterq.streams import DEFAULT_MAX_DELIVERIES, ConsumerHandler, ConsumerSpec, validate_group
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
        #: Stream consumers, by ``stream:group``.
        self.consumers: dict[str, ConsumerSpec] = {}

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
        JSON before the handler sees it). A handler given here instead (as to
        :meth:`handle`) is refused with a TypeError."""
        check_payload_type(pattern, payload)
        return _Register(self, pattern, payload)

    def consumer(
        self,
        stream: str,
        *,
        group: str,
        ordered: bool = False,
        max_deliveries: int = DEFAULT_MAX_DELIVERIES,
    ) -> Callable[[ConsumerHandler], ConsumerHandler]:
        """Register a handler of the events of ``stream`` for consumer group ``group``
        (``def handle(event: Event)``, plain or ``async``); see :mod:`clusterq.streams`.

        ``ordered``: events with the same key are handled one at a time in publish
        order (each partition has one owner in the group at a time). An event delivered
        ``max_deliveries`` times without success (deliveries to consumers that died
        count) goes to the partition's dead-letter stream."""
        validate_queue_name(stream)
        validate_group(group)
        if (
            isinstance(max_deliveries, bool)
            or not isinstance(max_deliveries, int)
            or (max_deliveries < 1)
        ):
            raise ValueError(f"max_deliveries must be a positive integer, got {max_deliveries!r}")

        def register(handler: ConsumerHandler) -> ConsumerHandler:
            if not callable(handler):
                raise TypeError(f"consumer of {stream}:{group} is not callable")
            spec = ConsumerSpec(stream, group, handler, ordered, max_deliveries)
            if spec.label in self.consumers:
                raise ValueError(f"a consumer of {spec.label} is already registered")
            self.consumers[spec.label] = spec
            return handler

        return register

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


def check_payload_type(pattern: str, payload: object) -> None:
    """Refuse a payload type that is no type: most often the handler itself, as in
    ``router.task("t", handler)`` (which would register nothing, without a word)."""
    if (
        payload is None
        or isinstance(payload, type | typing.NewType)
        or typing.get_origin(payload) is not None  # list[int], Literal[...], X | None
    ):
        return
    if callable(payload):
        what = f"the callable {getattr(payload, '__name__', type(payload).__name__)!r}"
        hint = (
            f"; to register it as the handler use router.handle({pattern!r}, handler) "
            f"or decorate it with @router.task({pattern!r})"
        )
    else:
        what, hint = f"{payload!r:.80} ({type(payload).__name__})", ""
    raise TypeError(
        f"router.task({pattern!r}, payload): the payload type must be a class (a dataclass, "
        f"a pydantic model, a TypedDict), not {what}{hint}"
    )


def is_async(handler: Handler) -> bool:
    target = getattr(handler, "__call__", handler)  # noqa: B004 - callable objects too
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(target)
