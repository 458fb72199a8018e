"""Workflows (chain, group, chord) across queues on three masters, on a standalone node
and on the 6-node cluster: results handed from step to step, failures, and each next
step enqueued once."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from clusterq import Client, Router, SkipRetry, Task, TaskSpec, WorkflowFailed, chain, chord, group
from clusterq.retry import fixed
from clusterq.slots import keyslot
from clusterq.tools.devcluster import LocalCluster
from clusterq.workflow import Workflows, compile_workflow
from tests.helpers import await_for, running_worker, wait_for

QUEUES = ("images", "webhooks", "notifications")  # three masters on the cluster


def spec(task_type: str, payload: Any = None, queue: str = "images", **options: Any) -> TaskSpec:
    return TaskSpec(task_type, payload, {"queue": queue, **options})


def _router(ran: Counter[str], seen: dict[str, Any]) -> Router:
    router = Router()

    @router.task("value")
    async def value(task: Task) -> Any:
        ran[task.id] += 1
        return task.payload

    @router.task("add")
    async def add(task: Task) -> int:
        ran[task.id] += 1
        seen[task.id] = task.parent_results
        return sum(task.parent_results or []) + int(task.payload or 0)

    @router.task("bad")
    async def bad(task: Task) -> None:
        ran[task.id] += 1
        raise SkipRetry("broken step")

    @router.task("errors")
    async def errors(task: Task) -> list[Any]:
        ran[task.id] += 1
        seen[task.id] = task.parent_results
        return [e is not None for e in task.parent_results or []]

    return router


def _run(
    url: str, prefix: str, workflow: Any, timeout: float = 30, settle_step: str | None = None
) -> tuple[Any, Counter[str], dict[str, Any], Any]:
    ran: Counter[str] = Counter()
    seen: dict[str, Any] = {}

    async def scenario() -> tuple[Any, Any]:
        async with running_worker(
            url, _router(ran, seen), queues=QUEUES, prefix=prefix, concurrency=20
        ):
            with Client(url, prefix=prefix) as client:
                handle = client.enqueue(workflow)
                try:
                    result: Any = await asyncio.to_thread(client.result, handle, timeout=timeout)
                except WorkflowFailed as exc:
                    result = exc
                if settle_step is not None:  # a step result() does not wait for

                    def settled() -> bool:
                        steps = {s.id: s.state for s in client.info(handle).steps}
                        return steps[settle_step] == "done"

                    await await_for(settled, 15, f"step {settle_step}")
                return result, client.info(handle)

    result, info = asyncio.run(scenario())
    return result, ran, seen, info


def test_compile_a_chain_with_a_group_inside() -> None:
    plan = compile_workflow(
        chain(spec("a"), group(spec("b"), chain(spec("c"), spec("d"))), spec("e"))
    )
    steps = plan.steps
    assert plan.entries == ["0"] and plan.exits == ["2"]
    assert steps["1.0"].deps == ["0"] and steps["1.1.0"].deps == ["0"]
    assert steps["1.1.1"].deps == ["1.1.0"]
    assert steps["2"].deps == ["1.0", "1.1.1"]  # the group's results, in order
    assert sorted(steps["0"].out) == ["1.0", "1.1.0"]


def test_a_chain_over_three_masters(url: str, prefix: str) -> None:
    workflow = chain(
        spec("value", 1, "images"), spec("add", 10, "webhooks"), spec("add", 100, "notifications")
    )
    result, ran, seen, info = _run(url, prefix, workflow)
    assert result == 111
    assert set(ran.values()) == {1} and len(ran) == 3
    assert sorted(seen.values()) == [[1], [11]]  # each gets the previous result, one-item list
    assert [s.state for s in info.steps] == ["done"] * 3
    assert {s.queue for s in info.steps} == set(QUEUES)


def test_a_group_of_100_over_three_masters(url: str, prefix: str) -> None:
    workflow = group(*(spec("value", i, QUEUES[i % 3]) for i in range(100)))
    result, ran, _, _ = _run(url, prefix, workflow)
    assert result == list(range(100))
    assert len(ran) == 100 and set(ran.values()) == {1}


def test_a_chord_sums_the_group(url: str, prefix: str) -> None:
    workflow = chord(
        [spec("value", i, QUEUES[i % 3]) for i in range(30)], spec("add", 0, "webhooks")
    )
    result, ran, seen, _ = _run(url, prefix, workflow)
    assert result == sum(range(30))
    [callback] = [v for v in seen.values()]
    assert callback == list(range(30))  # the group's results in group order
    assert set(ran.values()) == {1}


def test_a_chord_with_an_unused_on_error_succeeds(url: str, prefix: str) -> None:
    workflow = chord(
        [spec("value", i, QUEUES[i % 3]) for i in range(3)],
        spec("add", 0, "webhooks"),
        on_error=spec("errors", queue="notifications"),
    )
    result, ran, _, info = _run(url, prefix, workflow)
    assert result == 3 and info.status == "succeeded"
    assert {s.id: s.state for s in info.steps}["err"] == "waiting"  # never needed
    assert not any(k.endswith(":err") for k in ran)


def test_a_chain_with_a_group_inside(url: str, prefix: str) -> None:
    workflow = chain(
        spec("value", 2, "images"),
        group(spec("add", 1, "webhooks"), spec("add", 3, "notifications")),
        spec("add", 0, "images"),
    )
    result, ran, seen, _ = _run(url, prefix, workflow)
    assert result == (2 + 1) + (2 + 3)
    assert sorted(map(str, seen.values())) == ["[2]", "[2]", "[3, 5]"]
    assert len(ran) == 4 and set(ran.values()) == {1}


def test_a_failing_step_stops_a_chain(url: str, prefix: str) -> None:
    workflow = chain(
        spec("value", 1), spec("bad", queue="webhooks"), spec("add", 0, "notifications")
    )
    result, ran, _, info = _run(url, prefix, workflow)
    assert isinstance(result, WorkflowFailed) and "broken step" in str(result)
    assert len(ran) == 2  # the third step never ran
    assert [s.state for s in info.steps] == ["done", "failed", "skipped"]
    assert info.status == "failed"


def test_a_failing_member_skips_the_callback_and_runs_on_error(url: str, prefix: str) -> None:
    workflow = chord(
        [spec("value", 1), spec("bad", queue="webhooks"), spec("value", 3, "notifications")],
        spec("add", 0, "images"),
        on_error=spec("errors", queue="notifications"),
    )
    result, ran, seen, info = _run(url, prefix, workflow, settle_step="err")
    assert isinstance(result, WorkflowFailed)
    states = {s.id: s.state for s in info.steps}
    assert states["cb"] == "skipped" and states["err"] == "done"
    [errors] = [v for k, v in seen.items() if k.endswith(":err")]
    assert errors[0] is None and "broken step" in errors[1] and errors[2] is None
    assert not any(k.endswith(":cb") for k in ran)  # the callback never ran


def test_workflow_inspect_names_each_steps_queue_and_master(url: str, prefix: str) -> None:
    import json

    from click.testing import CliRunner

    from clusterq.cli import main

    workflow = chain(spec("value", 1, "images"), spec("add", 1, "webhooks"))
    result, _, _, info = _run(url, prefix, workflow)
    assert result == 2
    shown = CliRunner().invoke(
        main, ["workflow", "inspect", info.id, "--json", "--url", url, "--prefix", prefix]
    )
    assert shown.exit_code == 0, shown.output
    data = json.loads(shown.output)
    assert data["status"] == "succeeded" and data["result"] == 2
    with Client(url, prefix=prefix) as client:
        topology = client.backend.topology
        for step in data["steps"]:
            master = topology.locate(step["queue"]).master
            assert master is not None and step["master"] == master.addr
            assert step["state"] == "done" and step["task_id"] == f"wf:{info.id}:{step['id']}"
    missing = CliRunner().invoke(main, ["workflow", "inspect", "nope", "--url", url])
    assert missing.exit_code == 1 and "no workflow 'nope'" in missing.output


@pytest.mark.slow
def test_a_kill_of_the_workflows_master_mid_workflow_runs_the_callback_once(
    fresh_cluster: Callable[[], LocalCluster], prefix: str
) -> None:
    """The master that holds the workflow's state is killed (-9) while the group runs;
    the state's writes were confirmed by its replica, so after the promotion the workflow
    goes on: the callback runs exactly once, with every member's result."""
    cluster = fresh_cluster()
    url = cluster.seed_url
    ran: Counter[str] = Counter()
    router = Router()

    @router.task("slow")
    async def slow(task: Task) -> int:
        ran[task.id] += 1
        await asyncio.sleep(0.3)
        return int(task.payload)

    @router.task("sum")
    async def total(task: Task) -> int:
        ran[task.id] += 1
        return sum(task.parent_results or [])

    workflow = chord(
        [spec("slow", i, QUEUES[i % 3]) for i in range(30)], spec("sum", None, "webhooks")
    )

    async def scenario() -> Any:
        with Client(url, prefix=prefix) as client:
            topology = client.backend.topology
            # a workflow whose state lives on the master of "images"
            target = topology.locate("images").master
            assert target is not None
            workflow_id = next(
                w
                for w in (f"kill{n}" for n in range(10_000))
                if topology.master_for_slot(keyslot(client.keys.workflow(w))) == target
            )
            async with running_worker(
                url, router, queues=QUEUES, prefix=prefix, concurrency=6, retry_policy=fixed(0.2)
            ):
                handle = Workflows(client).start(workflow, workflow_id)
                await await_for(lambda: len(ran) >= 8, 20, "part of the group")
                cluster.kill_node(target.port)
                result = await asyncio.to_thread(client.result, handle, timeout=90)
                await asyncio.to_thread(cluster.restart_node, target.port)
                return result, handle

    result, handle = asyncio.run(scenario())
    assert result == sum(range(30))
    assert ran[f"wf:{handle.id}:cb"] == 1  # the callback exactly once
    assert len([k for k in ran if not k.endswith(":cb")]) == 30


@pytest.mark.slow
def test_a_worker_killed_mid_workflow_the_callback_still_runs_once(
    cluster: LocalCluster, prefix: str, clusterq_bin: str
) -> None:
    """A worker process is kill -9'd while a chord's group runs; another worker takes
    the expired leases over: every member runs (some twice: at-least-once), the callback
    exactly once, with the right sum."""
    url = cluster.seed_url
    log = f"{prefix}:wfkill:{{log}}"
    workflow = chord(
        [spec("wf:slow", {"log": log, "n": i, "sleep": 0.4}, QUEUES[i % 3]) for i in range(24)],
        spec("wf:sum", {"log": log}, "webhooks"),
    )

    def worker(name: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [clusterq_bin, "--url", url, "--prefix", prefix, "worker", "tests.wf_handlers:router",
             "--queues", ",".join(QUEUES), "--concurrency", "6", "--lease", "2",
             "--recover-interval", "0.2", "--name", name],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip

    with Client(url, prefix=prefix) as client:
        reader = client.backend

        def runs() -> dict[str, int]:
            raw = reader.execute_key(log, lambda c: c.hgetall(log))
            return {k.decode(): int(v) for k, v in raw.items()}

        first = worker("first")
        second = None
        try:
            handle = client.enqueue(workflow)
            wait_for(lambda: len(runs()) >= 6, 30, "part of the group")
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=10)
            second = worker("second")
            result = client.result(handle, timeout=90)
        finally:
            for proc in (first, second):
                if proc is not None and proc.poll() is None:
                    proc.terminate()
                    proc.wait(timeout=10)
        counts = runs()
    assert result == sum(range(24))
    assert counts[f"wf:{handle.id}:cb"] == 1  # the callback once
    members = {k: v for k, v in counts.items() if not k.endswith(":cb")}
    assert len(members) == 24 and min(members.values()) >= 1
