"""Bad input gets a clear error that names the problem, and nothing is written."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import pytest

from clusterq import (
    AsyncClient,
    Client,
    ForeignData,
    Inspector,
    InvalidName,
    PayloadError,
    Router,
    Task,
    TaskSpec,
)
from clusterq.tools.devcluster import LocalServer
from tests.helpers import await_for, running_worker


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


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (lambda c: c.enqueue("t", 1, queue=["a"]), "invalid queue name ['a']"),
        (lambda c: c.enqueue(["t"], 1), "task type must be a non-empty string"),
        (lambda c: c.enqueue_many([("t", 1)], queue={"a": 1}), "invalid queue name {'a': 1}"),
        (lambda c: c.enqueue_many([(["t"], 1)]), "task type must be a non-empty string"),
        (lambda c: c.enqueue_many([TaskSpec("t", 1, {"queue": ["x"]})]), "invalid queue name"),
        (lambda c: c.enqueue(TaskSpec("t", 1, {"queue": "a"})), "enqueue_many([spec])"),
    ],
)
def test_unhashable_names_and_a_task_spec_get_a_clear_error(
    client: Client, url: str, prefix: str, call: Any, fragment: str
) -> None:
    with pytest.raises((TypeError, ValueError)) as refused:
        call(client)
    assert fragment in str(refused.value) and "unhashable" not in str(refused.value)
    _nothing_written(url, prefix)


def test_the_async_client_says_the_same_of_a_task_spec(url: str, prefix: str) -> None:
    async def scenario() -> None:
        async with await AsyncClient.connect(url, prefix=prefix) as client:
            with pytest.raises(TypeError, match=r"enqueue_many\(\[spec\]\)"):
                await client.enqueue(TaskSpec("t", 1))  # type: ignore[call-overload]

    asyncio.run(scenario())


def test_a_registry_of_another_type_is_named_and_stops_no_worker(
    standalone: LocalServer, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``<prefix>:queues`` written as a string by something else: listing the queues says
    which key, in one line; a worker still serves its queues (and says why they are not
    registered)."""
    url = standalone.seed_url
    standalone.client().set(f"{prefix}:queues", "foreign")
    with Inspector(url, prefix=prefix) as inspector, pytest.raises(ForeignData) as named:
        inspector.queue_names()
    assert f"{prefix}:queues" in str(named.value) and "\n" not in str(named.value)
    ran: list[int] = []
    router = Router()

    @router.task("t")
    async def handle(task: Task) -> None:
        ran.append(task.payload)

    async def scenario() -> None:
        async with running_worker(url, router, prefix=prefix):
            with Client(url, prefix=prefix) as client:
                client.enqueue("t", 7)
            await await_for(lambda: ran == [7], 30, "the task to run")

    with caplog.at_level("WARNING", logger="clusterq.worker"):
        asyncio.run(scenario())
    assert any(f"{prefix}:queues" in r.getMessage() for r in caplog.records)


def test_a_url_with_an_empty_port_is_refused() -> None:
    from clusterq.cluster.connection import RedisURL
    from clusterq.errors import ConfigError

    for text in ("redis://127.0.0.1:", "redis://[::1]:", "redis://a:1,b:"):
        with pytest.raises(ConfigError, match="empty port"):
            RedisURL.parse(text)


def test_a_partitions_name_is_not_a_queue_to_enqueue_into(client: Client) -> None:
    with pytest.raises(InvalidName, match=r"marks the partitions.*enqueue into 'clicks'"):
        client.enqueue("t", 1, queue="clicks~0of12.41")


def test_text_logs_escape_control_characters() -> None:
    import io
    import logging

    from clusterq.logs import TEXT_FORMAT, TextFormatter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TextFormatter(TEXT_FORMAT))
    logger = logging.getLogger("clusterq.test-escape")
    logger.addHandler(handler)
    try:
        try:
            raise ValueError("bad\x1b[2J")
        except ValueError:
            logger.error("worker %s: %s", "w\x1b[31m", "line\nforged line", exc_info=True)
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert "\x1b" not in text
    assert "w\\x1b[31m" in text and "line\\x0aforged line" in text
    assert "ValueError: bad\\x1b[2J" in text
    assert text.count("\n") >= 3  # the traceback keeps its lines


def test_an_unreadable_layout_is_said_once(
    standalone: LocalServer, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    standalone.client().hset(f"{prefix}:layouts", "clicks", "not json")
    with caplog.at_level("WARNING", logger="clusterq.partitions"):
        for _ in range(3):
            with Inspector(standalone.seed_url, prefix=prefix) as inspector:
                inspector.queues()
    said = [r for r in caplog.records if "'clicks'" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in said]


@pytest.mark.parametrize("payload", [math.nan, math.inf, "\ud800", object(), {1, 2}], ids=repr)
def test_stream_publish_takes_what_task_payloads_take(
    standalone: LocalServer, prefix: str, payload: object
) -> None:
    with Client(standalone.seed_url, prefix=prefix) as client:
        client.declare_stream("s", 1)
        with pytest.raises(PayloadError, match="not JSON-serialisable"):
            client.publish("s", payload)
        nested: list[Any] = []
        inner = nested
        for _ in range(5000):
            inner.append([])
            inner = inner[0]
        with pytest.raises(PayloadError, match="nested too deeply"):
            client.publish("s", nested)
        sk = client.keys.stream(client.stream_layout("s").partitions[0])
        assert standalone.client().xlen(sk.events) == 0  # nothing appended


def test_stream_publish_of_nan_from_the_command_line_is_refused(
    standalone: LocalServer, prefix: str
) -> None:
    from click.testing import CliRunner

    from clusterq.cli import main

    base = ["--url", standalone.seed_url, "--prefix", prefix]
    runner = CliRunner()
    assert runner.invoke(main, [*base, "stream", "create", "s", "--partitions", "1"]).exit_code == 0
    result = runner.invoke(main, [*base, "stream", "publish", "s", "NaN"])
    assert result.exit_code == 1 and "not JSON-serialisable" in result.output
