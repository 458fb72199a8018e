"""Bulk actions in the background, and a queue's purge and removal.

A bulk action on every task of a state (``POST /tasks/all``, and a queue's purge) runs
in a thread as a :class:`Job`; its progress (``Admin.act_all``'s ``progress`` callback)
is kept in memory per job id (the latest :data:`KEEP` jobs). ``GET /jobs/{id}`` shows
it; ``GET /live/jobs/{id}`` pushes each change over server-sent events, which
``static/job.js`` writes into the page's elements marked ``data-job``; when done, the
outcome counts.

``POST /queue/purge?name=Q`` (the form: ``state`` and ``confirm``) and ``POST
/queue/remove?name=Q`` (``confirm``, ``force``) need the queue's name typed in
``confirm``: another name is refused with a page saying so, and nothing is done."""

from __future__ import annotations

import collections
import json
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from clusterq.errors import ClusterqError
from clusterq.keys import validate_queue_name
from clusterq.ops.admin import BulkResult, Progress, QueueNotEmpty
from clusterq.task import STATES

if TYPE_CHECKING:
    from clusterq.ops.web.ui import Ui

#: Jobs kept in memory (the oldest finished ones are forgotten first).
KEEP = 100
#: The job page's script, read once.
SCRIPT = (Path(__file__).parent / "static" / "job.js").read_text()


@dataclass
class Job:
    """One bulk action running (or run) in the background."""

    id: str
    action: str
    queue: str
    state: str
    what: str
    started: float = field(default_factory=time.time)
    #: Tasks looked at so far, of ``total`` (summed over a partitioned queue's parts).
    seen: int = 0
    total: int = 0
    #: running, done or failed.
    status: str = "running"
    error: str | None = None
    result: BulkResult | None = None
    #: Bumped at each change (what the event stream waits on).
    version: int = 0
    _base: tuple[int, int] = (0, 0)
    _last: tuple[int, int] = (0, 0)
    _changed: threading.Condition = field(default_factory=threading.Condition)

    def progress(self, seen: int, total: int) -> None:
        """``Admin.act_all``'s callback: each partition counts from zero again."""
        with self._changed:
            last_seen, last_total = self._last
            # the next partition: within one, seen only grows (to a total that stays)
            if last_total and (seen <= last_seen or total != last_total or last_seen >= last_total):
                self._base = (self._base[0] + self._last[0], self._base[1] + self._last[1])
            self._last = (seen, total)
            self.seen, self.total = self._base[0] + seen, self._base[1] + total
            self._bump()

    def finish(self, result: BulkResult | None, error: str | None = None) -> None:
        with self._changed:
            self.result, self.error = result, error
            self.status = "failed" if error is not None else "done"
            if result is not None:
                self.seen = max(self.seen, result.done + result.skipped)
                self.total = max(self.total, self.seen)
            self._bump()

    def _bump(self) -> None:
        self.version += 1
        self._changed.notify_all()

    def wait(self, version: int, timeout: float) -> int:
        """Block until the job changes past ``version`` (or ``timeout``); its version."""
        with self._changed:
            self._changed.wait_for(lambda: self.version != version, timeout)
            return self.version

    def to_dict(self) -> dict[str, Any]:
        with self._changed:
            result = self.result
            return {
                "id": self.id,
                "action": self.action,
                "queue": self.queue,
                "state": self.state,
                "what": self.what,
                "status": self.status,
                "seen": self.seen,
                "total": self.total,
                "percent": 100 if self.status != "running" else _percent(self.seen, self.total),
                "error": self.error,
                "done": result.done if result else None,
                "skipped": result.skipped if result else None,
                "counts": dict(sorted(result.statuses.items())) if result else {},
            }


class Jobs:
    """The jobs of one UI process, by id."""

    def __init__(self, keep: int = KEEP) -> None:
        self.keep = keep
        self._jobs: collections.OrderedDict[str, Job] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def start(
        self,
        job: Job,
        run: Callable[[Progress], BulkResult],
        done: Callable[[Job], None] = lambda job: None,
    ) -> Job:
        """Run ``run(job.progress)`` in a thread; ``done(job)`` after it ended."""
        with self._lock:
            self._jobs[job.id] = job
            while len(self._jobs) > self.keep:
                oldest = next(
                    (k for k, j in self._jobs.items() if j.status != "running"),
                    next(iter(self._jobs)),
                )
                del self._jobs[oldest]

        def main() -> None:
            try:
                result = run(job.progress)
            except Exception as exc:  # a node down, an ACL refusal: shown on the page
                job.finish(None, str(exc) or type(exc).__name__)
            else:
                job.finish(result)
            done(job)

        threading.Thread(target=main, name=f"clusterq-web-job-{job.id}", daemon=True).start()
        return job


def new_job(action: str, queue: str, state: str, what: str) -> Job:
    return Job(secrets.token_hex(8), action, queue, state, what)


def _percent(seen: int, total: int) -> int:
    return 100 if total <= 0 else min(100, seen * 100 // total)


def routes(pages: JobPages) -> list[Route]:
    return [
        Route("/queue/purge", pages.purge, methods=["POST"]),
        Route("/queue/remove", pages.remove, methods=["POST"]),
        Route("/jobs/{id}", pages.job),
        Route("/live/jobs/{id}", pages.events),
        Route("/static/job.js", pages.script),
    ]


class JobPages:
    def __init__(self, ui: Ui, jobs: Jobs | None = None) -> None:
        self.ui = ui
        self.jobs = jobs or Jobs()

    def start(self, request: Request, job: Job, run: Callable[[Progress], BulkResult]) -> Response:
        """Start ``job`` (audited when it ends) and go to its page."""

        def audit(job: Job) -> None:
            outcome = (
                f"failed: {job.error}"
                if job.error is not None
                else ", ".join(f"{n} {s}" for s, n in sorted(job.to_dict()["counts"].items()))
                or "nothing"
            )
            self.ui.audit(request, job.action, f"{job.what} in {job.queue}", outcome)

        self.jobs.start(job, run, audit)
        root = request.scope.get("root_path", "")
        return RedirectResponse(f"{root}/jobs/{job.id}", status_code=303)

    def job(self, request: Request) -> Response:
        job = self.jobs.get(request.path_params["id"])
        if job is None:
            return self._problem(request, 404, "Not found", "no such job (or forgotten)")
        return self.ui.page(request, "job.html", job=job.to_dict())

    def events(self, request: Request) -> Response:
        """Server-sent events: the job as JSON at each change, until it ended."""
        job = self.jobs.get(request.path_params["id"])
        if job is None:
            return Response("no such job", status_code=404)

        async def stream() -> AsyncIterator[str]:
            yield "retry: 2000\n\n"
            version = -1
            while True:
                data = job.to_dict()
                version = job.version
                yield f"data: {json.dumps(data)}\n\n"
                if data["status"] != "running" or await request.is_disconnected():
                    return
                while job.version == version and not await request.is_disconnected():
                    await run_in_threadpool(job.wait, version, 1.0)
                if await request.is_disconnected():
                    return

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"}
        )

    def script(self, request: Request) -> Response:
        return Response(SCRIPT, media_type="text/javascript")

    async def purge(self, request: Request) -> Response:
        """Delete every task of one state (not active), in the background."""
        refusal, form = await self.ui.refused(request)
        if refusal is not None:
            return refusal
        name = request.query_params.get("name", "")
        state = (form.get("state") or [""])[0]
        checked = self._confirmed(request, form, name, f"purge {state}")
        if checked is not None:
            return checked
        if state not in STATES or state == "active":
            return self._problem(
                request, 400, "Bad request", f"cannot purge {state!r} tasks (not active)"
            )

        def run(progress: Progress) -> BulkResult:
            return self.ui.admin.purge(name, state, progress=progress)

        return self.start(request, new_job("purge", name, state, f"all {state} tasks"), run)

    async def remove(self, request: Request) -> Response:
        """Remove the queue (with ``force``: its tasks too, active ones included)."""
        refusal, form = await self.ui.refused(request)
        if refusal is not None:
            return refusal
        name = request.query_params.get("name", "")
        checked = self._confirmed(request, form, name, "remove")
        if checked is not None:
            return checked
        force = (form.get("force") or [""])[0] == "1"
        action = "remove (force)" if force else "remove"
        try:
            result = await run_in_threadpool(self.ui.admin.remove_queue, name, force=force)
        except QueueNotEmpty as exc:
            self.ui.audit(request, action, f"queue {name}", f"refused: {exc}")
            return self._problem(request, 409, "Not removed", str(exc))
        except Exception as exc:  # a node down, an ACL refusal
            self.ui.audit(request, action, f"queue {name}", f"failed: {exc}")
            return self._problem(request, 503, "Unavailable", f"remove failed: {exc}")
        outcome = f"removed, {result.done} task(s) deleted"
        self.ui.audit(request, action, f"queue {name}", outcome)
        return self._problem(request, 200, "Removed", f"queue {name!r} {outcome}.")

    def _confirmed(
        self, request: Request, form: dict[str, list[str]], name: str, action: str
    ) -> Response | None:
        """None when ``confirm`` is the queue's name; else the page refusing."""
        try:
            validate_queue_name(name)
        except ClusterqError as exc:
            return self._problem(request, 404, "Not found", str(exc))
        typed = (form.get("confirm") or [""])[0]
        if typed != name:
            self.ui.audit(request, action, f"queue {name}", "refused: the typed name differs")
            return self._problem(
                request,
                400,
                "Not confirmed",
                f"the name typed ({typed!r}) is not the queue's ({name!r}): nothing was done",
            )
        return None

    def _problem(self, request: Request, status: int, heading: str, message: str) -> Response:
        back = f"/queue?{urlencode({'name': request.query_params.get('name', '')})}"
        return self.ui.page(
            request, "problem.html", status=status, heading=heading, message=message, back=back
        )
