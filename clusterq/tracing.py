"""OpenTelemetry traces (the ``otel`` extra: ``opentelemetry-api``; the SDK and its
exporters are the application's).

- A PRODUCER span ``send <queue>`` per ``enqueue``, per ``enqueue_many`` batch and per
  workflow started; its context goes into the task's headers (``traceparent``, through
  the global propagator), so the task carries it through retries, lease recovery and a
  workflow's steps.
- A CONSUMER span ``process <queue>`` around each attempt, its parent the context in
  the task's headers: one span per attempt, the attempt number on it; a failed attempt
  records its exception and an event ``clusterq.attempt_failed`` (error, attempt, and
  whether it goes to the archive). A handler's own spans, and the enqueues it makes
  (a workflow's next steps), are children of it.

Besides the messaging conventions' attributes, each span says where the queue lives:
``clusterq.queue``, ``clusterq.keyslot`` and ``clusterq.master`` (``host:port`` of the
master the call went to, as ``queue ls --cluster`` shows it).

Nothing happens, at the cost of one check per call, without the API or while no SDK
tracer provider is set.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

try:
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace
    from opentelemetry.trace import SpanKind, Status, StatusCode
except ImportError:  # pragma: no cover - the otel extra is not installed
    trace = None  # type: ignore[assignment]

from clusterq.cluster.connection import format_addr

#: ``messaging.system`` of clusterq's spans.
SYSTEM = "clusterq"

#: The tracer, and the provider it came from (an application may set a new one).
_cached: tuple[Any, Any] | None = None


def _operation(kind: str, name: str) -> dict[str, str]:
    """The messaging conventions' system and operation attributes of a span."""
    return {
        "messaging.system": SYSTEM,
        "messaging.operation.type": kind,
        "messaging.operation.name": name,
    }


def enabled() -> bool:
    """Whether spans are recorded: the API is there and an SDK provider is set."""
    if trace is None:
        return False
    provider = trace.get_tracer_provider()
    return not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)


def _tracer() -> Any:
    global _cached
    provider = trace.get_tracer_provider()
    if _cached is None or _cached[0] is not provider:
        from clusterq import __version__

        _cached = provider, provider.get_tracer("clusterq", __version__)
    return _cached[1]


def master_of(backend: Any, slot: int) -> str:
    """``host:port`` of the master that serves ``slot`` (standalone: the server)."""
    try:
        return format_addr(backend.master_addr(slot))
    except Exception:  # standalone, or no map yet
        return format_addr(backend.url.seeds[0])


#: ``where()``'s answers, by (queue, slot, master address): made once each.
_places: dict[tuple[str, int, Any], dict[str, Any]] = {}


def where(backend: Any, queue: str, slot: int) -> dict[str, Any]:
    """The attributes that say where ``queue`` lives (kept: a span per attempt asks)."""
    try:
        addr = backend.master_addr(slot)
    except Exception:  # standalone, or no map yet
        addr = backend.url.seeds[0]
    key = (queue, slot, addr)
    place = _places.get(key)
    if place is None:
        master = format_addr(addr)
        host, _, port = master.rpartition(":")
        if len(_places) >= 4096:
            _places.clear()
        place = _places[key] = {
            "messaging.destination.name": queue,
            "clusterq.queue": queue,
            "clusterq.keyslot": slot,
            "clusterq.master": master,
            "server.address": host.strip("[]"),
            "server.port": int(port) if port.isdigit() else 0,
        }
    return place


@contextlib.contextmanager
def producer(
    name: str, headers: Mapping[str, str] | None, attributes: Mapping[str, Any]
) -> Iterator[tuple[Any, dict[str, str]]]:
    """A PRODUCER span around an enqueue; yields it and the headers to enqueue with (the
    given ones, and the span's context). Its parent is the current span, or else a
    context the given headers carry (a workflow's later step)."""
    parent = None
    if headers and not trace.get_current_span().get_span_context().is_valid:
        parent = propagate.extract(headers)
    with _tracer().start_as_current_span(
        name,
        context=parent,
        kind=SpanKind.PRODUCER,
        attributes={
            **_operation("send", "send"),
            **attributes,
        },
    ) as span:
        carrier = dict(headers or {})
        propagate.inject(carrier)
        yield span, carrier


@contextlib.contextmanager
def enqueue_span(what: object, options: dict[str, Any]) -> Iterator[tuple[Any, dict[str, Any]]]:
    """The PRODUCER span of a client's ``enqueue`` of ``what`` (a task type, a workflow,
    or None for an ``enqueue_many`` batch) with ``options``; yields it and the options
    to enqueue with: the headers carry the span's context."""
    if isinstance(what, str):
        name = f"send {options.get('queue', 'default')}"
        attributes = {"clusterq.task.type": what}
    else:
        name, attributes = ("send batch" if what is None else "send workflow"), {}
    with producer(name, options.get("headers"), attributes) as (span, headers):
        yield span, {**options, "headers": headers}


F = TypeVar("F", bound=Callable[..., Any])


def _around(
    fn: F,
    start: Callable[[Any, Any, dict[str, Any]], Any],
    end: Callable[[Any, Any, Any, Any], None],
) -> F:
    """``fn(client, first, ...)``, sync or async, run inside ``start(client, first,
    kwargs)`` (a context manager giving the span and the keyword arguments to call
    with) while tracing is on; ``end(span, client, first, result)`` after."""
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def traced_async(client: Any, first: Any, *args: Any, **kwargs: Any) -> Any:
            if not enabled():
                return await fn(client, first, *args, **kwargs)
            with start(client, first, kwargs) as (span, kwargs):
                result = await fn(client, first, *args, **kwargs)
                end(span, client, first, result)
                return result

        return traced_async  # type: ignore[return-value]

    @functools.wraps(fn)
    def traced(client: Any, first: Any, *args: Any, **kwargs: Any) -> Any:
        if not enabled():
            return fn(client, first, *args, **kwargs)
        with start(client, first, kwargs) as (span, kwargs):
            result = fn(client, first, *args, **kwargs)
            end(span, client, first, result)
            return result

    return traced  # type: ignore[return-value]


def traced_enqueue(*, batch: bool) -> Callable[[F], F]:
    """A client's ``enqueue`` (``batch``: ``enqueue_many``), sync or async, in a PRODUCER
    span while tracing is on (:func:`enqueue_span`, :func:`sent`)."""

    def decorate(fn: F) -> F:
        return _around(
            fn,
            lambda client, what, kwargs: enqueue_span(None if batch else what, kwargs),
            lambda span, client, what, result: sent(span, client.backend, result),
        )

    return decorate


def sent(span: Any, backend: Any, result: Any) -> None:
    """What an enqueue's PRODUCER span learns once sent: the task (or the batch's size,
    or the workflow's id) and where its queue lives (every queue of a batch, where
    there are several)."""
    if not isinstance(result, list | tuple):
        if not hasattr(result, "queue"):  # a workflow's handle
            span.set_attribute("clusterq.workflow.id", str(getattr(result, "id", "")))
            return
        result = [result]
    infos: Sequence[Any] = result
    if not infos:
        return
    queues: dict[str, int] = {}
    for info in infos:
        if info.queue not in queues:
            queues[info.queue] = backend.keys.queue(info.queue).slot
    if len(infos) == 1:
        span.set_attribute("messaging.message.id", infos[0].id)
        span.set_attribute("clusterq.task.id", infos[0].id)
        span.set_attribute("clusterq.task.type", infos[0].type)
    else:
        span.set_attribute("messaging.batch.message_count", len(infos))
    if len(queues) == 1:
        [(queue, slot)] = queues.items()
        span.update_name(f"send {queue}")
        span.set_attributes(where(backend, queue, slot))
    else:
        span.set_attribute("clusterq.queues", list(queues))
        span.set_attribute("clusterq.keyslots", list(queues.values()))
        masters = {master_of(backend, slot) for slot in queues.values()}
        span.set_attribute("clusterq.masters", sorted(masters))


def context_headers() -> dict[str, str] | None:
    """The current span's context as headers (None while nothing is traced): what a
    published event carries."""
    if not enabled() or not trace.get_current_span().get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def traced_publish(fn: F) -> F:
    """A client's ``publish_many``, sync or async, in a PRODUCER span ``publish
    <stream>`` while tracing is on; the events carry its context
    (:func:`context_headers`)."""
    return _around(fn, _publish_span, _published)


@contextlib.contextmanager
def _publish_span(
    client: Any, stream: str, kwargs: dict[str, Any]
) -> Iterator[tuple[Any, dict[str, Any]]]:
    attributes = {
        **_operation("send", "publish"),
        "messaging.destination.name": stream,
        "clusterq.stream": stream,
    }
    with _tracer().start_as_current_span(
        f"publish {stream}", kind=SpanKind.PRODUCER, attributes=attributes
    ) as span:
        yield span, kwargs


def _published(span: Any, client: Any, stream: str, result: Any) -> None:
    span.set_attribute("messaging.batch.message_count", len(result))
    parts = sorted({p.partition for p in result})
    cached = client._streams.get(stream)  # the layout publish_many just read
    if len(parts) == 1 and cached is not None:
        slot = client.keys.stream(cached[0].partitions[parts[0]]).slot
        span.set_attribute("clusterq.partition", parts[0])
        span.set_attributes(where(client.backend, stream, slot))


@contextlib.contextmanager
def consuming(backend: Any, event: Any, slot: int) -> Iterator[Any]:
    """The CONSUMER span ``process <stream>`` of one event's handling, current while it
    runs; its parent the publisher's context the event carries."""
    parent = propagate.extract(event.headers) if event.headers else None
    with _tracer().start_as_current_span(
        f"process {event.stream}",
        context=parent,
        kind=SpanKind.CONSUMER,
        attributes={
            **_operation("process", "process"),
            "messaging.message.id": event.id,
            "messaging.consumer.group.name": event.group,
            "clusterq.stream": event.stream,
            "clusterq.partition": event.partition,
            "clusterq.deliveries": event.deliveries,
            **where(backend, event.stream, slot),
        },
    ) as span:
        yield span


def start_consumer(
    backend: Any, queue: str, slot: int, task_id: str, task_type: str, attempt: int,
    headers: Mapping[str, str] | None,
) -> tuple[Any, object]:  # fmt: skip
    """Start the CONSUMER span of one attempt and make it current; end it with
    :func:`end_consumer` (in the same asyncio task)."""
    parent = propagate.extract(headers) if headers else None
    span = _tracer().start_span(
        f"process {queue}",
        context=parent,
        kind=SpanKind.CONSUMER,
        attributes={
            **_operation("process", "process"),
            "messaging.message.id": task_id,
            "clusterq.task.id": task_id,
            "clusterq.task.type": task_type,
            "clusterq.attempt": attempt,
            **where(backend, queue, slot),
        },
    )
    return span, otel_context.attach(trace.set_span_in_context(span))


def end_consumer(
    started: tuple[Any, object],
    ok: bool | None,
    *,
    error: str | None = None,
    exception: BaseException | None = None,
    archive: bool = False,
    attempt: int = 0,
) -> None:
    """End an attempt's span: ``ok`` None means it ended without an outcome (the worker
    stopped, or an internal error)."""
    span, token = started
    otel_context.detach(token)  # type: ignore[arg-type]
    if ok is None:
        span.set_status(Status(StatusCode.ERROR, "the attempt ended without an outcome"))
    elif not ok:
        if exception is not None:
            span.record_exception(exception)
        span.add_event(
            "clusterq.attempt_failed",
            {
                "clusterq.error": error or "",
                "clusterq.attempt": attempt,
                "clusterq.archive": archive,
            },
        )
        span.set_status(Status(StatusCode.ERROR, error or "failed"))
    span.end()
