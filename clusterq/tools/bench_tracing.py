"""``clusterq bench e2e --tracing``: the same drain with an OpenTelemetry SDK set up, in
the benchmark's process (its enqueues) and in its worker processes (their attempts).

The SDK is what an application would run: a ``TracerProvider`` with a
``BatchSpanProcessor``, whose exporter here counts the spans and drops them (no network:
what is measured is clusterq's and the SDK's work, not a collector's). Worker processes
set it up when they import the benchmark's handlers with ``CLUSTERQ_BENCH_TRACING=1``
in their environment."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from clusterq.errors import ConfigError

#: Set (to "1") in the environment of worker processes that trace.
ENV = "CLUSTERQ_BENCH_TRACING"


def install() -> None:
    """Set the process's global tracer provider to the SDK's, spans counted and dropped."""
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            SpanExporter,
            SpanExportResult,
        )
    except ImportError:
        raise ConfigError(
            "bench --tracing needs OpenTelemetry's SDK: pip install opentelemetry-sdk"
        ) from None

    class Dropped(SpanExporter):
        def __init__(self) -> None:
            self.count = 0

        def export(self, spans: Sequence[ReadableSpan]) -> Any:
            self.count += len(spans)
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Dropped()))
    trace.set_tracer_provider(provider)


def install_from_env() -> None:
    """:func:`install` in a worker process whose environment asks for it."""
    if os.environ.get(ENV) == "1":
        install()
