"""The key schema and name validation (pure functions)."""

from __future__ import annotations

import pytest

from clusterq.errors import InvalidName
from clusterq.keys import (
    MAX_QUEUE_NAME_LENGTH,
    KeySchema,
    validate_prefix,
    validate_queue_name,
    validate_task_id,
)
from clusterq.slots import keyslot


def test_every_queue_key_shares_the_queue_slot() -> None:
    qk = KeySchema("clusterq").queue("emails")
    keys = [*qk.all_keys(), qk.unique("d1g3st")]
    assert len(set(keys)) == len(keys)
    assert {keyslot(k) for k in keys} == {keyslot("emails")} == {qk.slot}
    assert qk.pending == "clusterq:{emails}:pending"
    assert qk.tasks == "clusterq:{emails}:tasks"


def test_prefix_applies_and_global_keys_have_no_tag() -> None:
    schema = KeySchema("myapp")
    assert schema.queue("q").pending.startswith("myapp:{q}:")
    assert "{" not in schema.queues and "{" not in schema.workers


@pytest.mark.parametrize(
    "name",
    [
        "",
        "a{b",
        "a}b",
        "{x}",
        "a b",
        "tab\there",
        "new\nline",
        "bell\x07",
        "x" * (MAX_QUEUE_NAME_LENGTH + 1),
    ],
)
def test_invalid_queue_names_are_refused_with_a_clear_error(name: str) -> None:
    with pytest.raises(InvalidName, match="invalid queue name"):
        validate_queue_name(name)
    with pytest.raises(InvalidName):
        KeySchema().queue(name)


@pytest.mark.parametrize(
    "name",
    ["default", "critical", "emails:eu", "images-v2", "ünïcode", "a" * MAX_QUEUE_NAME_LENGTH],
)
def test_valid_queue_names(name: str) -> None:
    assert validate_queue_name(name) == name


def test_non_string_queue_name() -> None:
    with pytest.raises(InvalidName, match="must be a string"):
        validate_queue_name(42)


def test_brace_message_names_the_problem() -> None:
    with pytest.raises(InvalidName) as info:
        validate_queue_name("a{b}")
    assert "'{'" in str(info.value) and "hash tag" in str(info.value)


def test_prefix_and_task_id_validation() -> None:
    with pytest.raises(InvalidName, match="key prefix"):
        validate_prefix("a{b}")
    with pytest.raises(InvalidName, match="key prefix"):
        KeySchema("has space")
    with pytest.raises(InvalidName, match="task id"):
        validate_task_id("id with space")
    assert validate_task_id("order-123") == "order-123"
