"""A FastAPI app that enqueues from a request and awaits the result (needs `fastapi`).

uvicorn examples.fastapi_app:app      (with `python examples/worker.py` running)

One AsyncClient per process, opened and closed with the app (its connections are shared
by every request).
"""

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

from clusterq import AsyncClient, ResultTimeout, TaskFailed

URL = os.environ.get("CLUSTERQ_URL", "redis://127.0.0.1:7000")
PREFIX = os.environ.get("CLUSTERQ_PREFIX", "clusterq")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.clusterq = await AsyncClient.connect(URL, prefix=PREFIX)
    yield
    await app.state.clusterq.aclose()


app = FastAPI(lifespan=lifespan)


class Resize(BaseModel):
    src: str


@app.post("/resize")
async def resize(body: Resize) -> dict[str, object]:
    """Enqueue, then wait up to 10 s for the worker's result."""
    client: AsyncClient = app.state.clusterq
    info = await client.enqueue("images:resize", body.model_dump(), queue="images", retention=60)
    try:
        result = await client.result(info, timeout=10)
    except ResultTimeout:
        raise HTTPException(504, f"task {info.id} not done yet") from None
    except TaskFailed as exc:
        raise HTTPException(502, f"task {info.id} failed: {exc}") from None
    return {"task": info.id, "queue": info.queue, "result": result}


@app.post("/resize/later", status_code=202)
async def resize_later(body: Resize) -> dict[str, str]:
    """Enqueue and answer at once with the task id."""
    info = await app.state.clusterq.enqueue("images:resize", body.model_dump(), queue="images")
    return {"task": info.id}
