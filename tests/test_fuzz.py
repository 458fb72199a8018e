"""Property-based fuzz (hypothesis) against a real standalone server.

- Enqueue arguments: any mix of options, queue names, task types and payloads either
  enqueues a task that can be read back as given, or is refused with a clear error
  (ValueError / TypeError / ClusterqError) that leaves nothing behind.
- Task records written straight into Redis (anything: bytes, JSON of any shape, fields
  of the wrong types) beside well-formed tasks: the worker never loses a loop, every
  well-formed task still runs, and nothing stays pending or active.
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any

from helpers import await_for, running_worker, write_raw_records
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clusterq import AsyncClient, Client, Inspector, Router, Task
from clusterq.errors import ClusterqError, TaskNotFound
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
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=8,
)
OPTIONS = ("process_in", "timeout", "retention", "unique_for", "max_retry", "deadline")


@FUZZ
@given(
    type_=names,
    queue=names,
    payload=st.one_of(json_values, st.just(object()), st.binary(max_size=8)),
    options=st.dictionaries(st.sampled_from(OPTIONS), numbers, max_size=3),
)
def test_enqueue_either_writes_what_was_asked_or_refuses_cleanly(
    standalone: LocalServer, type_: str, queue: str, payload: Any, options: dict[str, Any]
) -> None:
    with Client(standalone.seed_url, prefix="fuzz") as client:
        task_id = f"f{abs(hash((type_, queue, repr(options)))) % 10**12}-{id(payload)}"
        try:
            info = client.enqueue(type_, payload, queue=queue, task_id=task_id, **options)
        except (ValueError, TypeError, ClusterqError) as exc:
            assert str(exc).strip(), "an error names the problem"
            assert "\n" not in str(exc).strip()
            try:
                client.info(task_id, queue=queue)
            except (TaskNotFound, ValueError, ClusterqError):
                return  # nothing was written (or the queue name itself was refused)
            raise AssertionError(f"refused ({exc}) yet task {task_id} exists") from None
        read = client.info(info)
        assert (read.id, read.queue, read.type) == (task_id, queue, type_)
        assert read.payload == json.loads(json.dumps(payload))


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
