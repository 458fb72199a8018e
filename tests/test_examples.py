"""The examples run: each against the test servers, as a user would run it."""

from __future__ import annotations

import asyncio
import importlib
import threading
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest

from clusterq import Client, Router
from tests.helpers import await_for, running_worker, wait_for

QUEUES = ["images", "webhooks", "notifications"]


class BackgroundWorker:
    """An in-process worker on its own thread and event loop (the apps under test run
    their own loops, or none)."""

    def __init__(self, url: str, router: Router, prefix: str) -> None:
        self.url, self.router, self.prefix = url, router, prefix
        self.ready = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def _serve(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        async with running_worker(self.url, self.router, queues=QUEUES, prefix=self.prefix):
            self.ready.set()
            await self._stop.wait()

    def __enter__(self) -> BackgroundWorker:
        self.thread.start()
        assert self.ready.wait(30), "the worker did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(30)


def _fresh(name: str, monkeypatch: pytest.MonkeyPatch, url: str, prefix: str) -> ModuleType:
    """Import an example with the test server's URL and prefix in its environment."""
    monkeypatch.setenv("CLUSTERQ_URL", url)
    monkeypatch.setenv("CLUSTERQ_PREFIX", prefix)
    module = importlib.import_module(name)
    return importlib.reload(module)


@pytest.fixture
def worker_router() -> Router:
    from examples.worker import router

    return router


def test_the_async_producer(url: str, prefix: str, worker_router: Router) -> None:
    from examples.async_producer import main

    async def scenario() -> Any:
        async with running_worker(url, worker_router, queues=QUEUES, prefix=prefix):
            return await main(url, prefix)

    assert asyncio.run(scenario()) == {"src": "cat.png", "width": 128}


def test_the_middleware_times_every_task(url: str, prefix: str) -> None:
    from examples.middleware import TIMINGS, router

    TIMINGS.clear()

    async def scenario() -> None:
        async with running_worker(url, router, queues=["images"], prefix=prefix):
            with Client(url, prefix=prefix) as client:
                info = client.enqueue("images:resize", {"src": "a.png"}, queue="images",
                                      retention=60)  # fmt: skip
                assert await asyncio.to_thread(client.result, info, timeout=10) == {
                    "src": "a.png",
                    "width": 128,
                }
            await await_for(lambda: TIMINGS, 5, "the timing")

    asyncio.run(scenario())
    [(task_type, seconds, ok)] = TIMINGS
    assert task_type == "images:resize" and ok and seconds >= 0


@pytest.fixture
def app_worker(url: str, prefix: str, worker_router: Router) -> Iterator[None]:
    with BackgroundWorker(url, worker_router, prefix):
        yield


def test_the_fastapi_app(
    url: str, prefix: str, app_worker: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # fastapi and httpx come with the dev extra: missing, the test fails (no skip)
    from fastapi.testclient import TestClient

    module = _fresh("examples.fastapi_app", monkeypatch, url, prefix)
    with TestClient(module.app) as http:  # runs the lifespan: connects, then closes
        answer = http.post("/resize", json={"src": "dog.png"})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["result"] == {"src": "dog.png", "width": 128} and body["queue"] == "images"
        later = http.post("/resize/later", json={"src": "cow.png"})
        assert later.status_code == 202 and later.json()["task"]
        assert http.post("/resize", json={}).status_code == 422  # validated by the model


def test_the_flask_app(
    url: str, prefix: str, app_worker: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # flask comes with the dev extra: missing, importing the app fails the test (no skip)
    module = _fresh("examples.flask_app", monkeypatch, url, prefix)
    try:
        http = module.app.test_client()
        sent = http.post("/webhooks", json={"url": "https://example.com/hook"})
        assert sent.status_code == 202, sent.get_data(as_text=True)
        task_id = sent.get_json()["task"]

        def state() -> str:
            return str(http.get(f"/webhooks/{task_id}").get_json()["state"])

        assert wait_for(lambda: state() == "completed", 20, "the webhook task")
        assert http.post("/webhooks", json={}).status_code == 400
        assert http.get("/webhooks/nope").status_code == 404
    finally:
        module.client.close()
