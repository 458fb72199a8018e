"""Flow control: a queue's rate limit and concurrency cap (the vocabulary; no I/O).

A queue's limits live in one hash in the queue's own slot (``<prefix>:{queue}:limits``,
see :mod:`clusterq.keys`), beside its other keys, so ``dequeue.lua`` checks them and
takes tasks in one atomic step on the queue's master. The hash holds:

- the declaration as the user gave it (``spec``, JSON: ``rate``, ``burst``,
  ``concurrency``, and for a partitioned queue how many partitions share it);
- what this queue (or partition) enforces: ``interval`` (ms between two tasks at the
  steady rate, a float), ``burst`` (tasks that may start at once after a quiet time),
  ``concurrency`` (tasks active at once: the size of the queue's ``active`` set, so a
  crashed worker's slots come back with its leases);
- state the scripts keep: ``tat`` (the rate limiter's "theoretical arrival time", ms:
  GCRA, a token bucket kept as one number) and ``hold`` (ms until which nothing starts,
  set by a handler's ``raise RateLimited(..., scope="queue")``);
- per task type (``type_rates``): the flag ``types`` (so that a queue without them
  pays nothing more), ``ti:<type>`` and ``tb:<type>`` (that type's interval and burst),
  and the state ``tt:<type>`` (its GCRA tat) and ``th:<type>`` (its reservation
  horizon: when the next task of the type put back for lack of a token is due);
- per task type caps (``type_concurrency``): the flag ``tcaps``, ``tc:<type>`` (that
  type's cap) and the state ``ta:<type>`` (the ids of the type's tasks started: those
  still in ``active`` count). A queue with type caps is served by its fair groups (see
  ``dequeue.lua``): its ungrouped tasks wait in one group per type, so a type at its cap
  holds up no other type;
- per fair group (``rate_per_group``, ``concurrency_per_group``): ``gi`` and ``gb``
  (each group's interval and burst) and ``gc`` (each group's cap), the same in every
  partition (a group lives in one partition). Their state is in the queue's ``groups``
  hash (see ``dequeue.lua``).

The rate is a token bucket of ``burst`` tokens refilled one per ``interval``: over any
window of W ms, at most ``burst + W / interval`` tasks start.

A partitioned queue's limits are split into static shares, one per partition (rate and
burst divided evenly, concurrency divided with the remainder to the first partitions):
the queue as a whole never goes over its declaration (plus rounding of the burst), and
a partition without a backlog leaves its share unused (see the README, "Rate limits,
concurrency caps").
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypedDict, TypeVar

from clusterq.errors import ClusterqError
from clusterq.serialization import reply_text

_V = TypeVar("_V")


class InvalidLimits(ClusterqError, ValueError):
    """A rate, burst or concurrency that cannot be a limit."""


#: Units a rate may be given in, in ms.
_PERIODS = {
    "ms": 1.0,
    "s": 1000.0,
    "sec": 1000.0,
    "second": 1000.0,
    "m": 60_000.0,
    "min": 60_000.0,
    "minute": 60_000.0,
    "h": 3_600_000.0,
    "hour": 3_600_000.0,
    "d": 86_400_000.0,
    "day": 86_400_000.0,
}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)?\s*([a-z]+)\s*$")

#: The default burst: this share of a second's worth of the rate (at least 1).
DEFAULT_BURST_SECONDS = 0.1


class LimitOptions(TypedDict, total=False):
    """What ``set_limits`` takes (see :meth:`Limits.of`)."""

    rate: str | None
    burst: int | None
    concurrency: int | None
    type_rates: dict[str, str] | None
    type_concurrency: dict[str, int] | None
    rate_per_group: str | None
    burst_per_group: int | None
    concurrency_per_group: int | None


@dataclass(frozen=True)
class Rate:
    """``count`` tasks per ``period_ms``."""

    count: float
    period_ms: float
    text: str

    @property
    def interval_ms(self) -> float:
        """Milliseconds between two tasks at the steady rate."""
        return self.period_ms / self.count

    @property
    def per_second(self) -> float:
        return self.count * 1000.0 / self.period_ms

    def default_burst(self) -> int:
        return max(1, math.ceil(self.per_second * DEFAULT_BURST_SECONDS))


def parse_rate(text: str) -> Rate:
    """``"200/s"``, ``"5000/m"``, ``"10/h"``, ``"3/10s"``: a count per period."""
    if not isinstance(text, str):
        raise InvalidLimits(f"invalid rate {text!r}: give it as text such as '200/s'")
    match = _RATE.match(text.lower())
    if match is None or match.group(3) not in _PERIODS:
        raise InvalidLimits(
            f"invalid rate {text!r}: give a count per period, such as '200/s', '5000/m', "
            "'10/h' or '3/10s'"
        )
    count = float(match.group(1))
    period = float(match.group(2) or 1) * _PERIODS[match.group(3)]
    if count <= 0 or period <= 0 or not math.isfinite(count):
        raise InvalidLimits(f"invalid rate {text!r}: the count and period must be above 0")
    if period / count < 0.01:
        raise InvalidLimits(f"invalid rate {text!r}: at most 100 tasks per ms")
    return Rate(count, period, text.strip())


def _positive_int(what: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidLimits(f"invalid {what} {value!r}: must be a whole number of at least 1")
    return value


@dataclass(frozen=True)
class Limits:
    """A queue's declared limits (None: no such limit)."""

    rate: Rate | None = None
    burst: int | None = None
    concurrency: int | None = None
    #: Per task type: (type, rate), sorted by type; each type's burst is its rate's
    #: default (a tenth of a second's worth, at least 1).
    type_rates: tuple[tuple[str, Rate], ...] = ()
    #: Each fair group's own rate (and burst) and cap (``enqueue(..., group=...)``).
    rate_per_group: Rate | None = None
    burst_per_group: int | None = None
    concurrency_per_group: int | None = None
    #: Per task type: (type, cap), sorted by type.
    type_caps: tuple[tuple[str, int], ...] = ()

    @classmethod
    def of(
        cls,
        rate: str | Rate | None = None,
        burst: int | None = None,
        concurrency: int | None = None,
        type_rates: Mapping[str, str | Rate] | None = None,
        rate_per_group: str | Rate | None = None,
        burst_per_group: int | None = None,
        concurrency_per_group: int | None = None,
        type_concurrency: Mapping[str, int] | None = None,
    ) -> Limits:
        """Checked limits from what a user gives (:class:`InvalidLimits` names what is
        wrong)."""
        types = _type_rates(type_rates)
        parsed = _rate_with_burst(rate, burst, "rate", "burst")
        if concurrency is not None:
            _positive_int("concurrency", concurrency)
        group_rate = _rate_with_burst(
            rate_per_group, burst_per_group, "rate_per_group", "burst_per_group"
        )
        if concurrency_per_group is not None:
            _positive_int("concurrency_per_group", concurrency_per_group)
        return cls(
            parsed,
            burst,
            concurrency,
            types,
            group_rate,
            burst_per_group,
            concurrency_per_group,
            _type_caps(type_concurrency),
        )

    @property
    def empty(self) -> bool:
        return (
            self.rate is None
            and self.concurrency is None
            and not self.type_rates
            and self.rate_per_group is None
            and self.concurrency_per_group is None
            and not self.type_caps
        )

    @property
    def group_burst(self) -> int | None:
        if self.rate_per_group is None:
            return None
        if self.burst_per_group is not None:
            return self.burst_per_group
        return self.rate_per_group.default_burst()

    @property
    def declared(self) -> Limits | None:
        """These limits, or None when they limit nothing."""
        return None if self.empty else self

    @property
    def effective_burst(self) -> int | None:
        if self.rate is None:
            return None
        return self.burst if self.burst is not None else self.rate.default_burst()

    def __str__(self) -> str:
        return self.describe()

    def describe(self) -> str:
        """One short line: ``200/s (burst 20), 5 at once``; ``-`` without limits."""
        parts = []
        if self.rate is not None:
            parts.append(f"{self.rate.text} (burst {self.effective_burst})")
        if self.concurrency is not None:
            parts.append(f"{self.concurrency} at once")
        for name, rate in self.type_rates:
            parts.append(f"type {name} {rate.text} (burst {rate.default_burst()})")
        for name, cap in self.type_caps:
            parts.append(f"type {name} {cap} at once")
        if self.rate_per_group is not None:
            parts.append(f"per group {self.rate_per_group.text} (burst {self.group_burst})")
        if self.concurrency_per_group is not None:
            parts.append(f"{self.concurrency_per_group} at once per group")
        return ", ".join(parts) or "-"

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "rate": self.rate.text if self.rate else None,
            "rate_per_second": round(self.rate.per_second, 6) if self.rate else None,
            "burst": self.effective_burst,
            "concurrency": self.concurrency,
        }
        if self.type_rates:  # only when declared: the other fields' set stays as it was
            out["type_rates"] = {
                name: {
                    "rate": rate.text,
                    "rate_per_second": round(rate.per_second, 6),
                    "burst": rate.default_burst(),
                }
                for name, rate in self.type_rates
            }
        if self.type_caps:
            out["type_concurrency"] = dict(self.type_caps)
        if self.rate_per_group is not None or self.concurrency_per_group is not None:
            group_rate = self.rate_per_group
            out["per_group"] = {
                "rate": group_rate.text if group_rate else None,
                "rate_per_second": round(group_rate.per_second, 6) if group_rate else None,
                "burst": self.group_burst,
                "concurrency": self.concurrency_per_group,
            }
        return out

    # ------------------------------------------------------------------ storage

    def shares(self, partitions: int) -> list[dict[str, str]]:
        """The hash fields each of ``partitions`` queues enforces (one for a plain
        queue): the rate and burst divided evenly, the concurrency with the remainder
        to the first ones. A concurrency below the number of partitions is refused (a
        partition with no share could run nothing)."""
        if partitions < 1:
            raise InvalidLimits("a queue has at least one partition")
        if self.concurrency is not None and self.concurrency < partitions:
            raise InvalidLimits(
                f"concurrency {self.concurrency} cannot be shared by {partitions} "
                f"partitions (each needs at least 1): set at least {partitions}"
            )
        for name, cap in self.type_caps:
            if cap < partitions:
                raise InvalidLimits(
                    f"task type {name!r}: concurrency {cap} cannot be shared by {partitions} "
                    f"partitions (each needs at least 1): set at least {partitions}"
                )
        spec: dict[str, Any] = {
            "rate": self.rate.text if self.rate else None,
            "burst": self.burst,
            "concurrency": self.concurrency,
            "partitions": partitions,
        }
        if self.type_rates:
            spec["type_rates"] = {name: rate.text for name, rate in self.type_rates}
        if self.type_caps:
            spec["type_concurrency"] = dict(self.type_caps)
        if self.rate_per_group is not None:
            spec["rate_per_group"] = self.rate_per_group.text
            spec["burst_per_group"] = self.burst_per_group
        if self.concurrency_per_group is not None:
            spec["concurrency_per_group"] = self.concurrency_per_group
        out = []
        for i in range(partitions):
            fields = {"spec": json.dumps(spec, separators=(",", ":"))}
            if self.rate is not None:
                burst = self.effective_burst or 1
                fields["interval"] = repr(self.rate.interval_ms * partitions)
                fields["burst"] = str(max(1, math.ceil(burst / partitions)))
            if self.concurrency is not None:
                base, extra = divmod(self.concurrency, partitions)
                fields["concurrency"] = str(base + (1 if i < extra else 0))
            if self.type_rates:
                fields["types"] = "1"
            for name, rate in self.type_rates:
                fields[f"ti:{name}"] = repr(rate.interval_ms * partitions)
                fields[f"tb:{name}"] = str(max(1, math.ceil(rate.default_burst() / partitions)))
            if self.type_caps:
                fields["tcaps"] = "1"
            for name, cap in self.type_caps:
                base, extra = divmod(cap, partitions)
                fields[f"tc:{name}"] = str(base + (1 if i < extra else 0))
            # A group lives in one partition: each enforces the whole per-group limits.
            if self.rate_per_group is not None:
                fields["gi"] = repr(self.rate_per_group.interval_ms)
                fields["gb"] = str(self.group_burst)
            if self.concurrency_per_group is not None:
                fields["gc"] = str(self.concurrency_per_group)
            out.append(fields)
        return out

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> Limits | None:
        """The declaration stored in a limits hash (None: no limits, or none readable)."""
        raw = fields.get("spec")
        if not raw:
            return None
        try:
            spec = json.loads(raw)
            limits = cls.of(
                spec.get("rate"),
                spec.get("burst"),
                spec.get("concurrency"),
                spec.get("type_rates"),
                spec.get("rate_per_group"),
                spec.get("burst_per_group"),
                spec.get("concurrency_per_group"),
                spec.get("type_concurrency"),
            )
        except (ValueError, TypeError, AttributeError):
            return None
        return None if limits.empty else limits


def _rate_with_burst(
    rate: str | Rate | None, burst: int | None, rate_name: str, burst_name: str
) -> Rate | None:
    """A rate as given, parsed (an error names ``rate_name`` unless it is the queue's
    own), and its burst checked (a burst needs a rate)."""
    try:
        parsed = rate if isinstance(rate, Rate) or rate is None else parse_rate(rate)
    except InvalidLimits as exc:
        if rate_name == "rate":
            raise
        raise InvalidLimits(f"{rate_name}: {exc}") from None
    if burst is not None:
        _positive_int(burst_name, burst)
        if parsed is None:
            raise InvalidLimits(f"a {burst_name} needs a {rate_name}")
    return parsed


def _type_caps(given: object) -> tuple[tuple[str, int], ...]:
    """Checked per-type caps, sorted by type."""
    return _per_type(
        given,
        "type_concurrency",
        "a cap, such as {'report:build': 2}",
        lambda cap: _positive_int("concurrency", cap),
    )


def _type_rates(given: object) -> tuple[tuple[str, Rate], ...]:
    """Checked per-type rates, sorted by type."""
    return _per_type(
        given,
        "type_rates",
        "rate, such as {'email:send': '10/s'}",
        lambda rate: rate if isinstance(rate, Rate) else parse_rate(rate),
    )


def _per_type(
    given: object, option: str, wanted: str, check: Callable[[Any], _V]
) -> tuple[tuple[str, _V], ...]:
    """``given`` (a mapping of task type to a value ``check`` reads) checked, sorted by
    type; else :class:`InvalidLimits` naming the type."""
    if given is None:
        return ()
    if not isinstance(given, Mapping):
        raise InvalidLimits(f"invalid {option} {given!r}: give a mapping of task type to {wanted}")
    out = []
    for name, value in given.items():
        if not isinstance(name, str) or not name:
            raise InvalidLimits(f"invalid task type {name!r}: must be a non-empty string")
        try:
            out.append((name, check(value)))
        except InvalidLimits as exc:
            raise InvalidLimits(f"task type {name!r}: {exc}") from None
    return tuple(sorted(out, key=lambda pair: pair[0]))


#: The hash fields a declaration writes (all of them are cleared before a new one;
#: with the per-type fields, ``ti:<type>`` and ``tb:<type>``).
DECLARED_FIELDS = (
    "spec", "interval", "burst", "concurrency", "types", "gi", "gb", "gc", "tcaps"
)  # fmt: skip


def text_fields(raw: Any) -> dict[str, str]:
    """A limits hash as ``HGETALL`` returns it (a mapping, or a flat list of fields and
    values; bytes or text) as text fields."""
    if isinstance(raw, list | tuple):
        raw = dict(zip(raw[::2], raw[1::2], strict=False))
    return {reply_text(k): reply_text(v) for k, v in dict(raw).items()}


def partitions_of(fields: dict[str, str]) -> int:
    """How many partitions share the declaration stored in ``fields`` (1 if unknown)."""
    try:
        return max(1, int(json.loads(fields.get("spec") or "{}").get("partitions", 1)))
    except (ValueError, TypeError, AttributeError):
        return 1
