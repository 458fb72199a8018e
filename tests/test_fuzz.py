"""Property-based fuzz (hypothesis) against a real standalone server.

- Enqueue arguments: any mix of options, queue names, task types and payloads either
  enqueues a task that can be read back as given, or is refused with a one-line error of
  the kind bad input gets (ValueError / TypeError; DuplicateTask for a unique task) that
  leaves nothing behind: no key holds the task's id.
- Task records written straight into Redis (anything: bytes, JSON of any shape, fields
  of the wrong types) beside well-formed tasks: the worker never loses a loop, every
  well-formed task still runs, and nothing stays pending or active.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from typing import Any

from helpers import await_for, keys_holding, running_worker, write_raw_records
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from clusterq import AsyncClient, Client, Inspector, Router, Task
from clusterq.errors import DuplicateTask
from clusterq.tools.devcluster import LocalServer

FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

numbers = st.one_of(
    st.none(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 0.001, 1, 60, 1e9, 1e17, -1, math.nan, math.inf]),
    st.text(max_size=5),
)
names = st.one_of(
    st.sampled_from(["default", "images", "a{b}", "{x}", "", " ", "q:1", "é", "x" * 300]),
    st.text(max_size=12),
    # names that the rules allow (printable, no whitespace, no braces), so that as many
    # examples are enqueued as refused
    st.text(
        st.characters(blacklist_categories=("Z", "C"), blacklist_characters="{}"),
        min_size=1,
        max_size=12,
    ),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=8,
)
OPTIONS = ("process_in", "timeout", "retention", "unique_for", "max_retry", "deadline")


#: Options that take a duration in seconds; ``deadline`` takes a point in time.
DURATIONS = ("process_in", "timeout", "retention", "unique_for")
YEAR = 365 * 24 * 3600.0


def _verdict(type_: str, queue: str, payload: Any, options: dict[str, Any]) -> str:
    """What the README's rules say of these arguments, written here independently of the
    code: "valid" (must be enqueued), "invalid" (must be refused) or "unsure" (near a
    limit: either outcome, as long as a refusal is clean)."""
    if not (0 < len(queue) <= 128) or any(
        c in "{}" or c.isspace() or not c.isprintable() for c in queue
    ):
        return "invalid"
    if "~" in queue:  # marks a partition's name: only a declaration picks those
        return "invalid"
    if not (0 < len(type_) <= 256) or not type_.isprintable():
        return "invalid"
    try:
        json.dumps(payload, allow_nan=False)
    except (TypeError, ValueError):
        return "invalid"
    verdict = "valid"
    for name, value in options.items():
        if value is None and name != "max_retry":
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            return "invalid"
        if name == "max_retry":
            if not isinstance(value, int) or not 0 <= value <= 1_000_000:
                return "invalid"
        elif not math.isfinite(value) or (name in DURATIONS and value < 0):
            return "invalid"
        elif name in DURATIONS and not (value == 0 or 0.001 <= value <= 99 * YEAR):
            verdict = "unsure"  # beyond 100 years refused; below a millisecond rounds
        elif name == "deadline" and abs(value - time.time()) > 99 * YEAR:
            verdict = "unsure"  # more than 100 years away from now is refused
    return verdict


def _refusals(options: dict[str, Any]) -> tuple[type[Exception], ...]:
    """What an enqueue may raise for bad input: a ValueError / TypeError naming the
    argument (InvalidName, PayloadError, ConfigError are ValueErrors), or DuplicateTask
    when a unique task meets an identical one. Never a connection or server error."""
    bad_input: tuple[type[Exception], ...] = (ValueError, TypeError)
    return (*bad_input, DuplicateTask) if "unique_for" in options else bad_input


def _assert_nothing_written(server: LocalServer, task_id: str, refusal: Exception) -> None:
    """No key of the prefix (the queue's task hash, its state lists and sets, locks,
    results...) names or holds ``task_id``: read from the server, not through clusterq."""
    node = server.client()
    try:
        left = keys_holding(node, "fuzz", task_id)
    finally:
        node.close()
    assert left == [], f"refused ({refusal!r}) yet {task_id} is in {left}"


@FUZZ
@given(
    type_=names,
    queue=names,
    payload=st.one_of(json_values, st.just(object()), st.binary(max_size=8)),
    options=st.dictionaries(st.sampled_from(OPTIONS), numbers, max_size=3),
)
# always: a unique task (enqueued again under another id: refused by the server), and a
# queue name with a brace (it would change the keys' hash tag)
@example(type_="t", queue="fz-unique", payload={"n": [1, None]}, options={"unique_for": 60})
@example(type_="t", queue="a{b}", payload=None, options={})
def test_enqueue_either_writes_what_was_asked_or_refuses_cleanly(
    standalone: LocalServer, type_: str, queue: str, payload: Any, options: dict[str, Any]
) -> None:
    # A fresh id for every example: nothing of an earlier one can be taken for this one's.
    task_id = f"f{uuid.uuid4().hex}"
    verdict = _verdict(type_, queue, payload, options)
    with Client(standalone.seed_url, prefix="fuzz") as client:
        try:
            info = client.enqueue(type_, payload, queue=queue, task_id=task_id, **options)
        except Exception as exc:
            expected = _refusals(options)
            assert isinstance(exc, expected), f"refused with {exc!r}, not {expected}"
            assert verdict != "valid" or isinstance(exc, DuplicateTask), f"refused: {exc!r}"
            assert str(exc).strip(), "an error names the problem"
            assert "\n" not in str(exc).strip()
            _assert_nothing_written(standalone, task_id, exc)
            return
        assert verdict != "invalid", f"enqueued what must be refused: {info}"
        read = client.info(info)
        assert (read.id, read.queue, read.type) == (task_id, queue, type_)
        assert read.payload == json.loads(json.dumps(payload))
        unique_for = options.get("unique_for")
        if verdict == "valid" and isinstance(unique_for, int | float) and unique_for >= 10:
            # The one refusal the server decides: the same unique task again, under
            # another id, within its window.
            again = f"f{uuid.uuid4().hex}"
            try:
                twin = client.enqueue(type_, payload, queue=queue, task_id=again, **options)
            except DuplicateTask as exc:
                assert exc.existing_id == task_id and str(exc).strip()
                _assert_nothing_written(standalone, again, exc)
            else:
                raise AssertionError(f"a unique task enqueued twice: {info} and {twin}")


_meta_fields = st.dictionaries(
    st.sampled_from(["t", "c", "mr", "r", "e", "to", "dl", "u", "rt", "err", "fa", "zz"]),
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=False),
        st.sampled_from(["good", "nohandler", "json", "msgpack", "pickle", ""]),
        st.text(max_size=6),
        st.lists(st.integers(), max_size=2),
    ),
    max_size=8,
)
raw_records = st.one_of(
    st.binary(max_size=40),
    st.builds(
        lambda meta, payload: json.dumps(meta).encode() + b"\n" + payload,
        _meta_fields,
        st.one_of(st.binary(max_size=10), st.just(b"null"), st.just(b'{"n": 1}')),
    ),
    st.builds(lambda meta: json.dumps(meta).encode(), _meta_fields),
)


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(records=st.lists(raw_records, min_size=1, max_size=25), active=st.booleans())
def test_records_of_any_shape_never_stop_the_worker(
    standalone: LocalServer, records: list[bytes], active: bool
) -> None:
    url = standalone.seed_url
    queue = f"fz{abs(hash(tuple(records))) % 10**9}"
    ran: list[str] = []
    router = Router()

    @router.task("good")
    async def good(task: Task) -> str:
        ran.append(task.id)
        return "ok"

    raw = {f"raw-{n}": record for n, record in enumerate(records)}
    write_raw_records(url, "fuzz", queue, raw, active=active)

    async def scenario() -> tuple[int, list[str]]:
        client = await AsyncClient.connect(url, prefix="fuzz")
        wanted = [await client.enqueue("good", n, queue=queue, retention=60) for n in range(5)]
        async with running_worker(
            url, router, prefix="fuzz", queues={queue: 1}, no_handler_retries=0
        ) as worker:
            for info in wanted:
                assert await client.result(info, timeout=30) == "ok"

            def settled() -> bool:
                with Inspector(url, prefix="fuzz") as inspector:
                    [row] = [q for q in inspector.queues() if q.queue == queue]
                return row.pending == 0 and row.active == 0

            await await_for(lambda: asyncio.to_thread(settled), 30, "nothing pending or active")
            restarts = worker.stats.loop_restarts
        await client.aclose()
        return restarts, [i.id for i in wanted]

    restarts, wanted_ids = asyncio.run(scenario())
    assert restarts == 0
    assert set(wanted_ids) <= set(ran)
