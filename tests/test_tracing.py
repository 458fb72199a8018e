"""OpenTelemetry traces (issue 30), with the SDK's in-memory exporter: a producer span
per enqueue (per batch for ``enqueue_many``, per workflow), a consumer span per attempt
under it, each saying which keyslot and master its queue lives on, checked against
``queue ls --cluster --json``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.util._once import Once

from clusterq import AsyncClient, Client, Event, Router, Task, TaskSpec, chain, tracing
from clusterq.cli import main
from clusterq.slots import keyslot
from tests.helpers import await_for, running_worker


def _reset_provider() -> None:
    """Forget the global tracer provider (what opentelemetry's own test utilities do),
    so that no other test runs traced."""
    trace._TRACER_PROVIDER_SET_ONCE = Once()  # type: ignore[attr-defined]
    trace._TRACER_PROVIDER = None  # type: ignore[attr-defined]


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    _reset_provider()
    trace.set_tracer_provider(provider)
    try:
        yield exporter
    finally:
        provider.shutdown()
        _reset_provider()


def _by_kind(exporter: InMemorySpanExporter, kind: SpanKind) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.kind is kind]


def _located(url: str, prefix: str) -> dict[str, dict[str, Any]]:
    shown = CliRunner().invoke(
        main, ["--url", url, "--prefix", prefix, "queue", "ls", "--cluster", "--json"]
    )
    assert shown.exit_code == 0, shown.output
    data = json.loads(shown.output)
    rows = data["queues"] if isinstance(data, dict) else data
    return {row["queue"]: row for row in rows}


def _queues_on_three_masters(cluster: Any, prefix: str) -> list[str]:
    """Three queue names whose slots three different masters own."""
    with Client(cluster.seed_url, prefix=prefix) as client:
        topology = client.backend.topology
        chosen: dict[str, str] = {}
        for n in range(1000):
            name = f"tq{n}"
            master = topology.master_for_slot(keyslot(client.keys.queue(name).pending))
            assert master is not None
            chosen.setdefault(master.addr, name)
            if len(chosen) == 3:
                return list(chosen.values())
    raise AssertionError("no three masters")


def test_nothing_is_traced_without_a_provider(standalone: Any, prefix: str) -> None:
    assert not tracing.enabled()
    with Client(standalone.seed_url, prefix=prefix) as client:
        info = client.enqueue("job", 1, queue="untraced")
        assert client.info(info.id, queue="untraced").headers == {}


def test_a_chain_over_three_masters_is_one_trace_with_the_right_places(
    cluster: Any, prefix: str, spans: InMemorySpanExporter
) -> None:
    url = cluster.seed_url
    queues = _queues_on_three_masters(cluster, prefix)
    router = Router()
    done: list[str] = []

    @router.task("step")
    async def step(task: Task) -> int:
        done.append(task.queue)
        return 1

    with Client(url, prefix=prefix) as client:
        handle = client.enqueue(chain(*(TaskSpec("step", q, {"queue": q}) for q in queues)))

    async def run() -> None:
        async with running_worker(url, router, queues=queues, prefix=prefix):
            await await_for(lambda: len(done) == 3, 30, "three steps")

    asyncio.run(run())
    finished = spans.get_finished_spans()
    assert len({s.context.trace_id for s in finished}) == 1  # one trace
    [root] = [s for s in finished if s.parent is None]
    assert root.kind is SpanKind.PRODUCER and root.name == "send workflow"
    assert root.attributes is not None and root.attributes["clusterq.workflow.id"] == handle.id
    by_id = {s.context.span_id: s for s in finished}
    consumers = sorted(_by_kind(spans, SpanKind.CONSUMER), key=lambda s: s.start_time or 0)
    assert [s.name for s in consumers] == [f"process {q}" for q in queues]  # in chain order
    located = _located(url, prefix)
    masters = set()
    for span in consumers:
        attributes = dict(span.attributes or {})
        queue = attributes["clusterq.queue"]
        assert attributes["clusterq.keyslot"] == located[queue]["keyslot"]
        assert attributes["clusterq.master"] == located[queue]["master"]
        assert attributes["messaging.system"] == "clusterq"
        masters.add(attributes["clusterq.master"])
        ancestor = span
        while ancestor.parent is not None:  # each step's span is under the workflow's
            ancestor = by_id[ancestor.parent.span_id]
        assert ancestor is root
    assert len(masters) == 3


def test_a_retried_task_shows_each_attempt_under_its_producer(
    url: str, prefix: str, spans: InMemorySpanExporter
) -> None:
    router = Router()
    attempts: list[int] = []

    @router.task("flaky")
    async def flaky(task: Task) -> None:
        attempts.append(task.retry_count)
        if task.retry_count < 2:
            raise RuntimeError(f"attempt {task.retry_count} fails")

    with Client(url, prefix=prefix) as client:
        info = client.enqueue("flaky", None, queue="tr", max_retry=5)

    async def run() -> None:
        async with running_worker(
            url, router, queues=["tr"], prefix=prefix, retry_policy=lambda n, e, t: 0.05
        ):
            await await_for(lambda: len(attempts) == 3, 30, "three attempts")
            await await_for(lambda: len(_by_kind(spans, SpanKind.CONSUMER)) == 3, 10, "spans")

    asyncio.run(run())
    [producer] = _by_kind(spans, SpanKind.PRODUCER)
    assert producer.name == "send tr"
    assert dict(producer.attributes or {})["messaging.message.id"] == info.id
    consumers = sorted(
        _by_kind(spans, SpanKind.CONSUMER),
        key=lambda s: dict(s.attributes or {})["clusterq.attempt"],
    )
    assert [dict(s.attributes or {})["clusterq.attempt"] for s in consumers] == [0, 1, 2]
    for span in consumers:
        assert span.parent is not None and span.parent.span_id == producer.context.span_id
        assert span.context.trace_id == producer.context.trace_id
    for span in consumers[:2]:
        assert span.status.status_code is StatusCode.ERROR
        names = [e.name for e in span.events]
        assert "exception" in names and "clusterq.attempt_failed" in names
    assert consumers[2].status.status_code is not StatusCode.ERROR


def test_enqueue_many_is_one_producer_span_with_each_task_under_it(
    url: str, prefix: str, spans: InMemorySpanExporter
) -> None:
    router = Router()
    done: list[int] = []

    @router.task("item")
    async def item(task: Task) -> None:
        done.append(task.payload)

    with Client(url, prefix=prefix) as client:
        client.enqueue_many([("item", i) for i in range(100)], queue="tm")

    async def run() -> None:
        async with running_worker(url, router, queues=["tm"], prefix=prefix, concurrency=20):
            await await_for(lambda: len(done) == 100, 60, "100 tasks")
            await await_for(lambda: len(_by_kind(spans, SpanKind.CONSUMER)) == 100, 10, "spans")

    asyncio.run(run())
    [producer] = _by_kind(spans, SpanKind.PRODUCER)
    attributes = dict(producer.attributes or {})
    assert producer.name == "send tm" and attributes["messaging.batch.message_count"] == 100
    assert attributes["clusterq.queue"] == "tm"
    consumers = _by_kind(spans, SpanKind.CONSUMER)
    assert all(
        s.parent is not None and s.parent.span_id == producer.context.span_id for s in consumers
    )
    assert len({dict(s.attributes or {})["clusterq.task.id"] for s in consumers}) == 100


def test_the_tracing_example_prints_one_trace_over_three_masters(
    cluster: Any, prefix: str, spans: InMemorySpanExporter
) -> None:
    from examples import tracing as example

    example.done.clear()
    asyncio.run(example.run(cluster.seed_url, prefix))
    lines = example.tree(list(spans.get_finished_spans())).splitlines()
    assert lines[0].startswith("producer 'send workflow'")
    assert [line.split("'")[0] for line in lines[1:]] == ["  consumer "] * 3
    assert len({line.split("trace ")[1].split()[0] for line in lines}) == 1
    assert len({line.rsplit(" on ", 1)[1] for line in lines[1:]}) == 3


def test_published_events_are_traced_to_each_groups_handling(
    url: str, prefix: str, spans: InMemorySpanExporter
) -> None:
    """``publish_many`` of 4 events with one key: one PRODUCER span; each group's
    handling of each event (unordered, and ordered) a CONSUMER span under it, on the
    partition's keyslot and master."""
    router = Router()
    handled: list[tuple[str, int]] = []

    @router.consumer("tstream", group="billing")
    async def billing(event: Event) -> None:
        handled.append(("billing", event.payload))

    @router.consumer("tstream", group="ship", ordered=True)
    def ship(event: Event) -> None:
        handled.append(("ship", event.payload))

    async def scenario() -> Any:
        with Client(url, prefix=prefix) as client:
            layout = client.declare_stream("tstream", 3)
            async with running_worker(url, router, prefix=prefix):
                published = client.publish_many("tstream", [(n, "one-key") for n in range(4)])
                await await_for(lambda: len(handled) == 8, 30, "both groups, four events")
                await await_for(
                    lambda: len(_by_kind(spans, SpanKind.CONSUMER)) == 8, 10, "eight spans"
                )
            slot = client.keys.stream(layout.partitions[published[0].partition]).slot
            return published[0].partition, slot, tracing.master_of(client.backend, slot)

    partition, slot, master = asyncio.run(scenario())
    [producer] = _by_kind(spans, SpanKind.PRODUCER)
    attributes = dict(producer.attributes or {})
    assert producer.name == "publish tstream"
    assert attributes["messaging.batch.message_count"] == 4
    assert (attributes["clusterq.partition"], attributes["clusterq.keyslot"]) == (partition, slot)
    consumers = _by_kind(spans, SpanKind.CONSUMER)
    groups = sorted(dict(s.attributes or {})["messaging.consumer.group.name"] for s in consumers)
    assert groups == ["billing"] * 4 + ["ship"] * 4
    for span in consumers:
        assert span.parent is not None and span.parent.span_id == producer.context.span_id
        consumed = dict(span.attributes or {})
        assert (consumed["clusterq.keyslot"], consumed["clusterq.master"]) == (slot, master)


def test_the_async_client_is_traced_too(
    standalone: Any, prefix: str, spans: InMemorySpanExporter
) -> None:
    url = standalone.seed_url

    async def scenario() -> tuple[Any, Any]:
        client = await AsyncClient.connect(url, prefix=prefix)
        try:
            await client.declare_stream("astream", 2)
            info = await client.enqueue("job", 1, queue="aq")
            await client.publish_many("astream", [(1, "k"), (2, "k")])
            stored = await client.info(info.id, queue="aq")
        finally:
            await client.aclose()
        return info, stored

    info, stored = asyncio.run(scenario())
    producers = {s.name: dict(s.attributes or {}) for s in _by_kind(spans, SpanKind.PRODUCER)}
    assert producers["send aq"]["messaging.message.id"] == info.id
    assert "traceparent" in stored.headers  # the context went with the task
    assert producers["publish astream"]["messaging.batch.message_count"] == 2
    assert isinstance(producers["publish astream"]["clusterq.keyslot"], int)
