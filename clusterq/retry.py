"""Retry policies and the exceptions a handler raises to steer its own retries.

A policy maps (retries so far, the error, the task) to the delay in seconds before the
next attempt. The default is exponential backoff with jitter; :func:`fibonacci` waits
1, 1, 2, 3, 5, 8... units as machinery does.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from clusterq.task import Task

RetryPolicy = Callable[[int, BaseException, Task], float]


class RetryIn(Exception):
    """Raise from a handler to retry after ``seconds`` (uses up one retry)."""

    def __init__(self, seconds: float, reason: str = "") -> None:
        super().__init__(reason or f"retry requested in {seconds}s")
        self.seconds = max(0.0, float(seconds))


class RateLimited(Exception):
    """Raise from a handler when what it calls said "too many requests" (an HTTP 429):
    the task goes back to its queue and runs again after ``retry_in`` seconds, without
    using up a retry or counting as a failure. ``scope="queue"`` also holds back every
    other task of the queue for that long (none starts on any worker until then);
    ``scope="group"`` every task of the task's fair group (``enqueue(..., group=...)``;
    a task in no group is held alone); ``scope="task"`` (the default) only this one."""

    def __init__(self, retry_in: float, scope: str = "task", reason: str = "") -> None:
        if scope not in ("task", "queue", "group"):
            raise ValueError(f"RateLimited scope {scope!r}: must be 'task', 'group' or 'queue'")
        seconds = float(retry_in)
        if not seconds >= 0 or seconds == float("inf"):
            raise ValueError(f"RateLimited retry_in {retry_in!r}: must be seconds, 0 or more")
        super().__init__(reason or f"rate limited, again in {seconds:g}s ({scope})")
        self.retry_in = seconds
        self.scope = scope


class SkipRetry(Exception):
    """Raise from a handler to archive the task at once, without further retries."""


def exponential(
    base: float = 1.0, factor: float = 2.0, maximum: float = 3600.0, jitter: float = 0.5
) -> RetryPolicy:
    """``min(maximum, base * factor**n)``, scaled by a random factor in [1 - jitter, 1]."""
    if not 0 <= jitter <= 1:
        raise ValueError("jitter must be between 0 and 1")

    def policy(retried: int, error: BaseException, task: Task) -> float:
        delay = min(maximum, base * factor ** min(retried, 64))
        return delay * random.uniform(1.0 - jitter, 1.0)

    return policy


def fibonacci(unit: float = 1.0, maximum: float = 3600.0) -> RetryPolicy:
    """``unit`` times the (n+1)-th Fibonacci number: 1, 1, 2, 3, 5, 8... units."""

    def policy(retried: int, error: BaseException, task: Task) -> float:
        a, b = 1, 1
        for _ in range(min(retried, 90)):
            a, b = b, a + b
        return min(maximum, unit * a)

    return policy


def fixed(seconds: float) -> RetryPolicy:
    """The same delay every time."""
    return lambda retried, error, task: seconds


DEFAULT_RETRY_POLICY = exponential()
