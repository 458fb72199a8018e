"""Progress a running task reports (``task.progress(0.4, {"rows": 4000})``): what is
stored and how it is read back. The write is fenced by the attempt's lease token
(``broker/progress.lua``), so a worker that lost its lease cannot overwrite the report of
the one that took the task over; :mod:`clusterq.worker.progress` writes it."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from clusterq.serialization import json_bytes, json_value, too_large

#: The most bytes of one report's data (as JSON).
MAX_PROGRESS_BYTES = 4096
#: How long a report is kept after its last write (ms): past the end of a long task.
PROGRESS_TTL_MS = 3_600_000


@dataclass(frozen=True)
class Progress:
    """The latest report of a task: ``fraction`` done (0 to 1), the handler's ``data``,
    when it was written and under which attempt (the lease token)."""

    fraction: float
    data: dict[str, Any] | None
    at: float
    attempt: str

    def to_dict(self) -> dict[str, Any]:
        return {"fraction": self.fraction, "data": self.data, "at": self.at}


def encode_progress(fraction: object, data: object, attempt: str) -> bytes:
    """A report as stored; ValueError naming what is wrong with ``fraction`` or ``data``."""
    if isinstance(fraction, bool) or not isinstance(fraction, int | float):
        raise ValueError(f"progress must be a number from 0 to 1, got {fraction!r:.40}")
    if not (math.isfinite(fraction) and 0 <= fraction <= 1):
        raise ValueError(f"progress must be a number from 0 to 1, got {fraction!r}")
    if data is not None and not isinstance(data, dict):
        raise ValueError(f"progress data must be a dict, got {type(data).__name__}")
    try:
        encoded = json_bytes(data)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"progress data must be JSON: {exc}") from None
    if len(encoded) > MAX_PROGRESS_BYTES:
        raise too_large(len(encoded), MAX_PROGRESS_BYTES, "progress data")
    at_ms = int(time.time() * 1000)
    return b'{"f":%s,"at":%d,"k":%s,"d":%s}' % (
        repr(float(fraction)).encode(),
        at_ms,
        json_bytes(attempt),
        encoded,
    )


def decode_progress(raw: bytes | None) -> Progress | None:
    """A stored report, or None where there is none or it is not one (foreign data is
    not shown as progress, and breaks nothing)."""
    if raw is None:
        return None
    try:
        value = json_value(bytes(raw))
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(value, dict):
        return None
    fraction, at, attempt, data = value.get("f"), value.get("at"), value.get("k"), value.get("d")
    if (
        not isinstance(fraction, int | float)
        or not isinstance(at, int)
        or not isinstance(attempt, str)
        or not isinstance(data, dict | None)
    ):
        return None
    return Progress(float(fraction), data, at / 1000.0, attempt)
