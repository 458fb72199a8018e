"""The stream consumers one worker runs: which, their counters, start and stop."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable

from clusterq.cluster.abackend import AsyncBackend
from clusterq.streams import ConsumerSpec
from clusterq.worker.consumer import ConsumerStats, StreamConsumer, UnorderedConsumer
from clusterq.worker.ordered import OrderedConsumer
from clusterq.worker.state import RunState
from clusterq.worker.supervise import LoopFactory


class Consumers:
    """A worker's consumers (one per ``stream:group``), sharing one set of counters."""

    def __init__(self, specs: list[ConsumerSpec]) -> None:
        self.specs = specs
        self.stats = ConsumerStats()
        self.running: list[StreamConsumer] = []

    @property
    def labels(self) -> list[str]:
        return [spec.label for spec in self.specs]

    def start(
        self,
        backend: AsyncBackend,
        name: str,
        lease: float,
        run_state: RunState,
        supervise: Callable[[str, LoopFactory, Callable[[], bool]], None],
    ) -> None:
        """Start each consumer's start loop (it waits for the stream's declaration)."""
        for spec in self.specs:
            kind = OrderedConsumer if spec.ordered else UnorderedConsumer
            consumer = kind(backend, spec, name, lease=lease, run_state=run_state, stats=self.stats)
            self.running.append(consumer)
            start = functools.partial(consumer.start, supervise)
            supervise(f"stream:{spec.label}:start", start, consumer.starting)

    async def stop(self) -> None:
        await asyncio.gather(*(consumer.stop() for consumer in self.running))
