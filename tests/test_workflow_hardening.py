"""Workflows that cannot get stuck: results reach the next steps whatever a step's
retention; every step checked before anything is written; large workflows written
whole or not at all; a step that cannot be enqueued, or that lease recovery archives,
fails the workflow; a dead replica stops nothing; ended workflows expire."""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
from click.testing import CliRunner

from clusterq import Client, Router, Task, TaskSpec, WorkflowFailed, chain, chord, group
from clusterq.cli import main
from clusterq.errors import ClusterqError, DurabilityError
from clusterq.slots import keyslot
from clusterq.tools.devcluster import LocalCluster
from clusterq.workflow import MAX_STEPS, WorkflowGone, WorkflowHandle, Workflows
from tests.helpers import running_worker, wait_for
from tests.test_workflow import QUEUES, spec
from tests.test_workflow import _router as workflow_router


def _router(ran: Counter[str], seen: dict[str, Any]) -> Router:
    """test_workflow's handlers (value, add, bad, errors), and big and count."""
    router = workflow_router(ran, seen)

    @router.task("big")
    async def big(task: Task) -> str:
        ran[task.id] += 1
        return "x" * int(task.payload)

    @router.task("count")
    async def count(task: Task) -> int:
        ran[task.id] += 1
        seen[task.id] = task.parent_results
        return len(task.parent_results or [])

    return router


def _run(
    url: str,
    prefix: str,
    workflow: Any,
    timeout: float = 60,
    client_options: dict[str, Any] | None = None,
    **worker_options: Any,
) -> tuple[Any, Counter[str], dict[str, Any], Any]:
    ran: Counter[str] = Counter()
    seen: dict[str, Any] = {}
    settings = {"queues": QUEUES, "prefix": prefix, "concurrency": 20, **worker_options}

    async def scenario() -> tuple[Any, Any]:
        async with running_worker(url, _router(ran, seen), **settings):
            with Client(url, prefix=prefix, **(client_options or {})) as client:
                handle = client.enqueue(workflow)
                try:
                    result: Any = await asyncio.to_thread(client.result, handle, timeout=timeout)
                except WorkflowFailed as exc:
                    result = exc
                return result, client.info(handle)

    result, info = asyncio.run(scenario())
    return result, ran, seen, info


def _exists(client: Client, workflow_id: str) -> list[str]:
    """The keys of that workflow (its state, its staging hash) that exist."""
    keys = [client.keys.workflow(workflow_id), client.keys.workflow_staging(workflow_id)]
    return [k for k in keys if client.backend.execute_key(k, lambda c, k=k: c.exists(k))]


# ------------------------------------------------------------------ item 1: retention


def test_results_reach_the_next_steps_whatever_the_retention(url: str, prefix: str) -> None:
    workflow = chain(
        spec("value", 1, "images", retention=60),
        spec("add", 10, "webhooks", retention=60),
        chord(
            [spec("add", 0, "notifications", retention=60), spec("add", 1, "images")],
            spec("add", 100, "webhooks", retention=60),
        ),
    )
    result, ran, seen, info = _run(url, prefix, workflow)
    assert result == 11 + 12 + 100
    assert sorted(map(str, seen.values())) == sorted(["[1]", "[11, 12]", "[11]", "[11]"])
    assert set(ran.values()) == {1}
    # and the step's own task keeps its result for its retention, as any task does
    with Client(url, prefix=prefix) as client:
        kept = client.info(f"wf:{info.id}:1", queue="webhooks")
        assert kept.state.value == "completed" and kept.result == 11


# ------------------------------------------------------------------ item 2: checked first


BAD_STEPS: list[tuple[str, TaskSpec, str]] = [
    ("queue with a space", spec("value", 1, "bad name"), "queue name"),
    ("queue with a brace", spec("value", 1, "a{b}"), "queue name"),
    ("NaN payload", spec("value", float("nan")), "not JSON"),
    ("negative process_in", spec("value", 1, process_in=-1), "process_in"),
    ("unknown option", spec("value", 1, colour="red"), "colour"),
    ("empty type", spec("", 1), "task type"),
    ("600 KB payload", spec("value", "x" * 600_000), "bytes"),
    ("a set payload", spec("value", {1, 2}), "set"),
    ("max_retry a string", spec("value", 1, max_retry="3"), "max_retry"),
    ("task_id given", TaskSpec("value", 1, {"queue": "images", "task_id": "mine"}), "task ids"),
]


@pytest.mark.parametrize("where", ["first", "later"])
@pytest.mark.parametrize(("case", "bad", "named"), BAD_STEPS, ids=[c[0] for c in BAD_STEPS])
def test_a_bad_step_is_refused_before_anything_is_written(
    standalone: Any, prefix: str, where: str, case: str, bad: TaskSpec, named: str
) -> None:
    with Client(standalone.seed_url, prefix=prefix) as client:
        workflow_id = f"bad-{where}"
        with pytest.raises((ClusterqError, TypeError, ValueError)) as refused:
            steps = [bad, spec("value", 2)] if where == "first" else [spec("value", 2), bad]
            Workflows(client).start(chain(*steps), workflow_id)
        message = str(refused.value)
        assert "\n" not in message and named.lower() in message.lower(), message
        assert _exists(client, workflow_id) == []
        with pytest.raises(WorkflowGone):
            client.info(WorkflowHandle(workflow_id))
        # nothing enqueued either
        assert (
            client.backend.execute_key(
                client.keys.queue("images").pending,
                lambda c: c.llen(client.keys.queue("images").pending),
            )
            == 0
        )


def test_a_workflow_nested_too_deeply_is_refused_in_one_line(standalone: Any, prefix: str) -> None:
    node: Any = spec("value", 1)
    for _ in range(60):
        node = chain(spec("value", 1), group(node, spec("value", 2)))
    with Client(standalone.seed_url, prefix=prefix) as client:
        with pytest.raises(ClusterqError, match="nested too deeply") as refused:
            Workflows(client).start(node, "deep")
        assert "\n" not in str(refused.value)
        assert _exists(client, "deep") == []


def test_a_step_that_cannot_be_enqueued_at_run_time_fails_the_workflow(
    standalone: Any, prefix: str
) -> None:
    """The starting client allows 1 MB payloads; the worker's own client the default
    512 KB: the second step, checked at the start, cannot be enqueued by the worker. The
    workflow fails (it does not wait for ever) and names the step and why."""
    workflow = chain(spec("value", 1), spec("value", "y" * 600_000, "webhooks"))
    result, ran, _, info = _run(
        standalone.seed_url,
        prefix,
        workflow,
        client_options={"max_payload_bytes": 1024 * 1024},
    )
    assert isinstance(result, WorkflowFailed), result
    assert "could not be enqueued" in str(result) and "bytes" in str(result)
    assert [s.state for s in info.steps] == ["done", "failed"]
    assert len(ran) == 1  # the first step ran once, not again and again


def test_a_step_whose_next_enqueue_keeps_failing_fails_the_workflow(url: str, prefix: str) -> None:
    """The next step's queue holds foreign data (its pending list is a string): every
    enqueue of that step fails. The first step is tried until its retries run out; then
    it is archived and the workflow fails, naming why (it never stays running)."""
    with Client(url, prefix=prefix) as client:
        pending = client.keys.queue("webhooks").pending
        client.backend.execute_key(pending, lambda c: c.set(pending, "foreign"))
    workflow = chain(spec("value", 1, max_retry=1), spec("value", 2, "webhooks"))
    result, ran, _, info = _run(url, prefix, workflow, retry_policy=lambda *_: 0.05)
    assert isinstance(result, WorkflowFailed), result
    assert "WRONGTYPE" in str(result) and "never enqueued" in str(result)
    assert [s.state for s in info.steps] == ["done", "failed"]
    assert sum(ran.values()) == 2  # the first step: its attempt and one retry


@pytest.mark.slow
def test_a_step_archived_by_lease_recovery_fails_the_workflow(
    standalone: Any, prefix: str, clusterq_bin: str
) -> None:
    """A worker dies (kill -9) holding the first step, which has no retries left: the
    recoverer of another worker archives it, and tells the workflow, which fails."""
    url = standalone.seed_url
    log = f"{prefix}:wfkill:{{log}}"
    workflow = chain(
        spec("wf:slow", {"log": log, "n": 1, "sleep": 60}, max_retry=0),
        spec("value", 2, "webhooks"),
    )
    proc = subprocess.Popen(
        [clusterq_bin, "--url", url, "--prefix", prefix, "worker", "tests.wf_handlers:router",
         "--queues", ",".join(QUEUES), "--lease", "2", "--name", "doomed"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        with Client(url, prefix=prefix) as client:
            handle = client.enqueue(workflow)
            wait_for(
                lambda: client.backend.execute_key(log, lambda c: c.hlen(log)), 30, "step 0 ran"
            )
        proc.kill()
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()

    async def recover() -> Any:
        async with running_worker(url, _router(Counter(), {}), queues=QUEUES, prefix=prefix):
            with Client(url, prefix=prefix) as client:
                try:
                    await asyncio.to_thread(client.result, handle, timeout=60)
                except WorkflowFailed as exc:
                    return exc, client.info(handle)
                raise AssertionError("the workflow succeeded")

    failed, info = asyncio.run(recover())
    assert "lease expired" in str(failed)
    assert [s.state for s in info.steps] == ["failed", "skipped"]


# ------------------------------------------------------------------ item 3: large workflows


def test_a_chain_of_800_and_a_chord_of_2000_run_to_the_end(url: str, prefix: str) -> None:
    long_chain = chain(*(spec("add", 1, QUEUES[i % 3]) for i in range(800)))
    result, ran, _, info = _run(url, prefix, long_chain, timeout=240)
    assert result == 800 and len(ran) == 800 and set(ran.values()) == {1}
    assert info.status == "succeeded"
    wide = chord([spec("value", i, QUEUES[i % 3]) for i in range(2000)], spec("count", None))
    result, ran, seen, _ = _run(url, prefix, wide, timeout=240)
    assert result == 2000
    [callback] = [v for k, v in seen.items() if k.endswith(":cb")]
    assert callback == list(range(2000))


def test_a_group_of_20000_is_written_whole(url: str, prefix: str) -> None:
    """Written in parts to a staging hash and renamed: the state is complete, and each
    of its 20,000 first steps is enqueued once."""
    with Client(url, prefix=prefix) as client:
        workflow = group(*(spec("value", i, QUEUES[i % 3]) for i in range(20_000)))
        handle = Workflows(client).start(workflow, "wide")
        info = client.info(handle)
        assert info.status == "running" and len(info.steps) == 20_000
        assert {s.state for s in info.steps} == {"enqueued"}
        assert _exists(client, "wide") == [client.keys.workflow("wide")]  # no staging left
        pending = sum(
            client.backend.execute_key(
                client.keys.queue(q).pending, lambda c, q=q: c.llen(client.keys.queue(q).pending)
            )
            for q in QUEUES
        )
        assert pending == 20_000
        # started again under the same id: nothing changes, nothing enqueued twice
        Workflows(client).start(workflow, "wide")
        assert len(client.info(handle).steps) == 20_000


def test_a_workflow_over_the_step_limit_is_refused_in_one_line(
    standalone: Any, prefix: str
) -> None:
    with Client(standalone.seed_url, prefix=prefix) as client:
        workflow = group(*(spec("value", i) for i in range(MAX_STEPS + 1)))
        with pytest.raises(ClusterqError, match=f"at most {MAX_STEPS} steps") as refused:
            Workflows(client).start(workflow, "huge")
        assert "\n" not in str(refused.value)
        assert _exists(client, "huge") == []


def test_a_step_result_over_the_limit_fails_the_workflow(standalone: Any, prefix: str) -> None:
    workflow = chain(spec("big", 2 * 1024 * 1024), spec("value", 1))
    result, ran, _, info = _run(standalone.seed_url, prefix, workflow)
    assert isinstance(result, WorkflowFailed)
    assert "result not stored" in str(result) and "limit" in str(result)
    assert [s.state for s in info.steps] == ["failed", "skipped"]
    assert len(ran) == 1


def test_results_a_step_waits_for_are_capped(standalone: Any, prefix: str) -> None:
    """17 members of 500 KB each: 8.5 MB of results for the callback, over the 8 MB cap.
    The callback fails (its error says why); the state holds no 8.5 MB record."""
    workflow = chord([spec("big", 500_000) for _ in range(17)], spec("count", None))
    result, ran, _, info = _run(standalone.seed_url, prefix, workflow)
    assert isinstance(result, WorkflowFailed)
    assert "more than 8388608 bytes" in str(result)
    assert {s.id: s.state for s in info.steps}["cb"] == "failed"
    assert not any(k.endswith(":cb") for k in ran)


# ------------------------------------------------------------------ item 6: dead replica


def _workflow_id_on(client: Client, master_port: int, stem: str) -> str:
    topology = client.backend.topology
    return next(
        w
        for w in (f"{stem}{n}" for n in range(10_000))
        if (m := topology.master_for_slot(keyslot(client.keys.workflow(w)))) is not None
        and m.port == master_port
    )


@pytest.mark.slow
@pytest.mark.both_servers
def test_a_dead_replica_stops_no_workflow(
    fresh_cluster: Callable[[], LocalCluster], prefix: str
) -> None:
    """The only replica of the master that holds a workflow's state is killed (-9): with
    durability "none" a chain and a chord start and finish, each step once; with
    "replica" the start says that no replica confirmed it."""
    cluster = fresh_cluster()
    url = cluster.seed_url
    ran: Counter[str] = Counter()
    seen: dict[str, Any] = {}
    with Client(url, prefix=prefix) as client:
        master = client.backend.topology.locate("images").master
        assert master is not None
        [replica] = [n for n in client.backend.topology.nodes if n.master_id == master.id]
        cluster.kill_node(replica.port)
        chain_id = _workflow_id_on(client, master.port, "chain")
        chord_id = _workflow_id_on(client, master.port, "chord")

    async def scenario() -> tuple[Any, Any]:
        async with running_worker(
            url, _router(ran, seen), queues=QUEUES, prefix=prefix, concurrency=10
        ):
            with Client(url, prefix=prefix) as client:
                flows = Workflows(client)
                a = flows.start(
                    chain(spec("value", 1), spec("add", 10, "webhooks"), spec("add", 100)),
                    chain_id,
                )
                b = flows.start(
                    chord([spec("value", i, QUEUES[i % 3]) for i in range(30)], spec("add", 0)),
                    chord_id,
                )
                results = await asyncio.gather(
                    asyncio.to_thread(client.result, a, timeout=90),
                    asyncio.to_thread(client.result, b, timeout=90),
                )
            return results[0], results[1]

    first, second = asyncio.run(scenario())
    assert first == 111 and second == sum(range(30))
    assert len(ran) == 3 + 31 and set(ran.values()) == {1}
    with Client(url, prefix=prefix, durability="replica") as client:
        workflow_id = _workflow_id_on(client, master.port, "d")
        with pytest.raises(DurabilityError, match="no replica confirmed"):
            Workflows(client).start(chain(spec("value", 1)), workflow_id)


# ------------------------------------------------------------------ item 8: expiry


def test_an_ended_workflow_expires_after_its_retention(url: str, prefix: str) -> None:
    ran: Counter[str] = Counter()

    async def scenario() -> str:
        async with running_worker(url, _router(ran, {}), queues=QUEUES, prefix=prefix):
            with Client(url, prefix=prefix) as client:
                handle = client.enqueue(chain(spec("value", 1), spec("add", 1)), retention=1)
                assert await asyncio.to_thread(client.result, handle, timeout=30) == 2
                assert client.info(handle).expires_in is not None
                kept = client.enqueue(chain(spec("value", 1)))
                await asyncio.to_thread(client.result, kept, timeout=30)
                assert client.info(kept).expires_in > 3600  # the default: a day
                return handle.id

    workflow_id = asyncio.run(scenario())
    with Client(url, prefix=prefix) as client:

        def gone() -> bool:
            try:
                client.info(WorkflowHandle(workflow_id))
            except WorkflowGone:
                return True
            return False

        wait_for(gone, 30, "the workflow's state to expire")
    shown = CliRunner().invoke(
        main, ["workflow", "inspect", workflow_id, "--url", url, "--prefix", prefix]
    )
    assert shown.exit_code == 1
    assert "expired" in shown.output and "Traceback" not in shown.output


def test_workflow_options_are_checked(standalone: Any, prefix: str) -> None:
    with Client(standalone.seed_url, prefix=prefix) as client:
        with pytest.raises(ClusterqError, match="retention=, headers= and durability= only"):
            client.enqueue(chain(spec("value", 1)), queue="images")  # type: ignore[call-overload]
        with pytest.raises(ClusterqError, match="retention"):
            client.enqueue(chain(spec("value", 1)), retention=-5)


def test_inspect_survives_a_foreign_spec(standalone: Any, prefix: str) -> None:
    with Client(standalone.seed_url, prefix=prefix) as client:
        handle = Workflows(client).start(chain(spec("value", 1)), "foreign")
        key = client.keys.workflow("foreign")
        client.backend.execute_key(key, lambda c: c.hset(key, "spec:0", json.dumps([1, 2])))
        info = client.info(handle)
        assert [(s.id, s.type) for s in info.steps] == [("0", "?")]
