"""Traces of a workflow across masters, printed as a tree (OpenTelemetry's SDK with an
in-memory exporter; in production, an OTLP exporter to Jaeger, Tempo, Honeycomb...).

    pip install 'clusterq[otel]' opentelemetry-sdk
    clusterq dev up
    python examples/tracing.py

A chain of three steps, one per queue, the queues chosen on three different masters:
one trace, the workflow's PRODUCER span at its root, each step's CONSUMER span under it
with the keyslot and master its queue lives on. Each step reports its progress.
"""

from __future__ import annotations

import asyncio
import os

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from clusterq import Client, Router, Task, TaskSpec, Worker, chain
from clusterq.slots import keyslot

URL = os.environ.get("CLUSTERQ_URL", "redis://127.0.0.1:7000")
PREFIX = os.environ.get("CLUSTERQ_PREFIX", "clusterq")

router = Router()
done: list[str] = []


@router.task("resize")
async def resize(task: Task) -> int:
    task.progress(0.5, {"step": task.queue})
    done.append(task.queue)
    return len(done)


def queues_on_masters(client: Client, count: int = 3) -> list[str]:
    """Queue names whose slots belong to different masters (as many as there are, up to
    ``count``: one on a single node)."""
    chosen: dict[str, str] = {}
    for n in range(1000):
        name = f"trace-{n}"
        master = client.backend.topology.master_for_slot(keyslot(client.keys.queue(name).pending))
        chosen.setdefault(master.addr if master else "standalone", name)
        if len(chosen) == count:
            break
    names = list(chosen.values())
    return (names * count)[:count]


async def run(url: str = URL, prefix: str = PREFIX) -> str:
    """Enqueue the chain, run a worker until its three steps are done; the workflow id."""
    with Client(url, prefix=prefix) as client:
        queues = queues_on_masters(client)
        handle = client.enqueue(chain(*(TaskSpec("resize", None, {"queue": q}) for q in queues)))
    worker = Worker(url, router, queues=sorted(set(queues)), prefix=prefix, poll_interval=0.05)
    await worker.start()
    try:
        for _ in range(600):  # at most 30 s
            if len(done) >= 3:
                break
            await asyncio.sleep(0.05)
    finally:
        await worker.stop()
    return handle.id


def tree(spans: list[ReadableSpan]) -> str:
    """The spans as an indented tree, one line each: kind, name and where."""
    children: dict[int | None, list[ReadableSpan]] = {}
    for span in sorted(spans, key=lambda s: s.start_time or 0):
        parent = span.parent.span_id if span.parent is not None else None
        children.setdefault(parent, []).append(span)
    lines: list[str] = []

    def show(span: ReadableSpan, depth: int) -> None:
        a = dict(span.attributes or {})
        where = ""
        if "clusterq.keyslot" in a:
            where = f"  slot {a['clusterq.keyslot']} on {a['clusterq.master']}"
        kind = span.kind.name.lower()
        lines.append(
            f"{'  ' * depth}{kind} {span.name!r}  trace {span.context.trace_id:032x}{where}"
        )
        for child in children.get(span.context.span_id, []):
            show(child, depth + 1)

    for root in children.get(None, []):
        show(root, 0)
    return "\n".join(lines)


def main() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    workflow = asyncio.run(run())
    print(f"workflow {workflow}")
    print(tree(list(exporter.get_finished_spans())))


if __name__ == "__main__":
    main()
