"""The typed task API: payload types rebuilt on the worker, typed specs and results;
and mypy, run on a user's scripts, rejecting misspelled or mistyped options."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from clusterq import Client, Router, Task, TaskDef, chain
from tests.helpers import running_worker

TYPING = Path(__file__).parent / "typing"


@dataclass
class Resize:
    src: str
    width: int


def test_a_dataclass_payload_comes_back_as_itself(url: str, prefix: str) -> None:
    router = Router()
    seen: list[object] = []

    @router.task("images:resize", payload=Resize)
    async def resize(task: Task) -> dict[str, int]:
        seen.append(task.payload)
        return {"width": task.payload.width * 2}

    @router.task("total")
    def total(task: Task) -> int:  # a plain function: payload stays JSON
        return sum(r["width"] for r in task.parent_results or [])

    assert isinstance(resize, TaskDef) and resize.type == "images:resize"

    async def scenario() -> tuple[dict[str, int], int]:
        with Client(url, prefix=prefix) as client:
            async with running_worker(url, router, queues=["images", "default"], prefix=prefix):
                info = resize.enqueue(client, Resize("a.png", 10), queue="images", retention=60)
                first = await asyncio.to_thread(resize.result, client, info, timeout=10)
                flow = client.enqueue(
                    chain(
                        resize.spec(Resize("b.png", 1), queue="images"),
                        total.spec(None),
                    )
                )
                second = await asyncio.to_thread(client.result, flow, timeout=10)
        return first, second

    first, second = asyncio.run(scenario())
    assert first == {"width": 20} and second == 2
    assert seen == [Resize("a.png", 10), Resize("b.png", 1)]


def _mypy(script: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--follow-imports=silent",
         str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parents[1],
    )  # fmt: skip


def test_mypy_accepts_a_correct_script() -> None:
    done = _mypy(TYPING / "good.py")
    assert done.returncode == 0, done.stdout


def test_mypy_rejects_each_misspelled_or_mistyped_option() -> None:
    done = _mypy(TYPING / "bad.py")
    errors = {int(m.group(1)) for m in re.finditer(r"bad\.py:(\d+): error", done.stdout)}
    marked = {
        n
        for n, line in enumerate((TYPING / "bad.py").read_text().splitlines(), start=1)
        if "# E:" in line
    }
    assert done.returncode == 1
    assert marked <= errors, done.stdout  # every marked line is an error
    assert errors <= marked, done.stdout  # and nothing else is
