"""Bad input gets a clear error that names the problem, and nothing is written."""

from __future__ import annotations

import math

import pytest

from clusterq import Client, Inspector, InvalidName, PayloadError
from clusterq.tools.devcluster import LocalServer


@pytest.fixture
def client(url: str, prefix: str) -> Client:
    with Client(url, prefix=prefix, max_payload_bytes=1024) as made:
        yield made  # type: ignore[misc]


def _nothing_written(url: str, prefix: str) -> None:
    with Inspector(url, prefix=prefix) as inspector:
        assert inspector.queue_names() == []


@pytest.mark.parametrize("queue", ["a{b}", "{x}", "has space", "", "tab\t"])
def test_invalid_queue_names(client: Client, url: str, prefix: str, queue: str) -> None:
    with pytest.raises(InvalidName, match="invalid queue name"):
        client.enqueue("t", {}, queue=queue)
    _nothing_written(url, prefix)


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ({1, 2}, "not JSON-serialisable"),
        (object(), "not JSON-serialisable"),
        (math.nan, "not JSON"),
    ],
)
def test_non_json_payloads(
    client: Client, url: str, prefix: str, payload: object, fragment: str
) -> None:
    with pytest.raises(PayloadError, match=fragment):
        client.enqueue("t", payload)
    _nothing_written(url, prefix)


def test_oversized_payload_names_the_limit(client: Client, url: str, prefix: str) -> None:
    with pytest.raises(
        PayloadError, match=r"2\d\d\d bytes encoded, more than the limit of 1024 bytes"
    ):
        client.enqueue("t", "x" * 2000)
    with pytest.raises(PayloadError, match="limit of 1024"):
        client.enqueue_many([("t", "small"), ("t", "y" * 5000)])
    _nothing_written(url, prefix)  # the batch is checked before anything is sent


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"max_retry": -1}, "max_retry must be an integer from 0 to 1000000, got -1"),
        ({"max_retry": 10**7}, "max_retry must be an integer from 0 to 1000000"),
        ({"process_in": -5}, "process_in must be between 0 and 3153600000 seconds"),
        ({"process_in": 1, "process_at": 2}, "process_in or process_at, not both"),
        ({"task_id": "has space"}, "invalid task id"),
        ({"task_id": "a{b}"}, "invalid task id"),
    ],
)
def test_bad_options(
    client: Client, url: str, prefix: str, kwargs: dict[str, object], fragment: str
) -> None:
    with pytest.raises((ValueError, InvalidName), match=fragment):
        client.enqueue("t", {}, **kwargs)
    _nothing_written(url, prefix)


@pytest.mark.parametrize("task_type", ["", None, "bell\x07"])
def test_bad_task_types(client: Client, task_type: object) -> None:
    with pytest.raises(ValueError, match="task type"):
        client.enqueue(task_type, {})  # type: ignore[arg-type]


def test_unknown_codec(standalone: LocalServer, prefix: str) -> None:
    with pytest.raises(PayloadError, match="unknown codec 'pickle'"):
        Client(standalone.seed_url, prefix=prefix, codec="pickle")
