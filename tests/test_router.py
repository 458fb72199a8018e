"""The router's registration rules (no servers needed)."""

from __future__ import annotations

import dataclasses
from typing import Any, TypedDict

import pytest

from clusterq import Router, Task, TaskDef


@dataclasses.dataclass
class Resize:
    src: str
    width: int


class Thumb(TypedDict):
    src: str


def test_a_handler_given_as_the_payload_type_is_refused_in_one_line() -> None:
    """``router.task("t", handler)`` read like ``router.handle("t", handler)`` used to take
    the handler for the payload type and register nothing, without a word."""
    router = Router()

    def resize(task: Task) -> None: ...

    with pytest.raises(TypeError) as raised:
        router.task("images:resize", resize)  # type: ignore[call-overload]
    message = str(raised.value)
    assert "\n" not in message
    assert "payload type must be a class" in message and "'resize'" in message
    assert "router.handle('images:resize', handler)" in message
    assert "@router.task('images:resize')" in message
    assert router.types == [] and router.resolve("images:resize") is None

    for not_a_type in ("Resize", 3, lambda task: None):
        with pytest.raises(TypeError, match="payload type must be a class"):
            router.task("images:resize", not_a_type)  # type: ignore[call-overload]
    assert router.types == []


def test_classes_and_typing_forms_are_payload_types() -> None:
    router = Router()
    forms: list[Any] = [Resize, Thumb, dict[str, int], list[Resize], int | None, None]
    for n, payload in enumerate(forms):
        made = router.task(f"t{n}", payload)(lambda task: task.payload)
        assert isinstance(made, TaskDef) and made.payload_type is payload
    assert router.types == [f"t{n}" for n in range(len(forms))]

    @router.task("images:resize", payload=Resize)
    def resize(task: Task) -> int:
        job: Resize = task.payload
        return job.width

    handler = router.resolve("images:resize")
    assert handler is not None
    task = Task(id="1", type="images:resize", payload={"src": "a.png", "width": 3}, queue="q")
    assert handler(task) == 3  # the payload rebuilt as a Resize on the worker
    assert resize(dataclasses.replace(task, payload=Resize("b", 4))) == 4
