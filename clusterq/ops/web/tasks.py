"""Task pages: one task (payload, headers, attempts, error, result, worker, progress,
timeline) and its actions; a queue's tasks by state with bulk actions; search by id
across every queue, and by type or text within a queue.

Routes: ``GET /task?queue=Q&id=ID``, ``POST /task/{run|delete|archive|cancel}``;
``GET /tasks?queue=Q&state=S&page=N``, ``POST /tasks/selected`` (the checked rows) and
``POST /tasks/all`` (every task in the state, optionally of one type: run in the
background, see :mod:`.jobs`); ``GET /search``.
Every action goes through :class:`~clusterq.ops.admin.Admin`; errors from a node (down,
or a command the ACL refuses) are shown on the page."""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

import redis
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from clusterq.errors import ClusterqError, TaskNotFound
from clusterq.keys import validate_queue_name, validate_task_id
from clusterq.ops.admin import Admin, BulkResult, Progress
from clusterq.ops.inspector import MAX_PAGE
from clusterq.ops.tasksearch import DEFAULT_PER_STATE, filter_tasks, find_task
from clusterq.ops.web.jobs import JobPages, new_job
from clusterq.task import STATES, TaskInfo

if TYPE_CHECKING:
    from clusterq.ops.web.ui import Ui

#: Rows per page of a task list.
PAGE_SIZE = 20
#: Characters of a payload or an error shown in a list row.
PREVIEW = 80
#: The actions on tasks, and the states each applies to.
ACTIONS: dict[str, tuple[str, ...]] = {
    "run": ("scheduled", "retry", "archived"),
    "archive": ("pending", "scheduled", "retry"),
    "delete": ("pending", "scheduled", "retry", "archived", "completed"),
    "cancel": ("active",),
}
#: What a failing node raises through the admin API.
NODE_ERRORS = (ClusterqError, redis.RedisError, OSError)


def routes(ui: Ui, jobs: JobPages) -> list[Route]:
    """This module's routes (its nav entries added to ``ui.nav``); a bulk action on a
    whole state starts a job of ``jobs``."""
    pages = TaskPages(ui, jobs)
    ui.nav.append(("Search", "/search"))
    return [
        Route("/task", pages.task),
        Route("/task/{action}", pages.act_one, methods=["POST"]),
        Route("/tasks", pages.tasks),
        Route("/tasks/selected", pages.act_selected, methods=["POST"]),
        Route("/tasks/all", pages.act_all, methods=["POST"]),
        Route("/search", pages.search),
    ]


class TaskPages:
    def __init__(self, ui: Ui, jobs: JobPages) -> None:
        self.ui = ui
        self.jobs = jobs

    @property
    def admin(self) -> Admin:
        return self.ui.admin

    def problem(self, request: Request, status: int, heading: str, message: str) -> Response:
        return self.ui.page(
            request, "problem.html", status=status, heading=heading, message=message
        )

    # ------------------------------------------------------------------ one task

    def task(self, request: Request) -> Response:
        queue = request.query_params.get("queue", "")
        task_id = request.query_params.get("id", "")
        try:
            validate_queue_name(queue)
            validate_task_id(task_id)
        except ClusterqError as exc:
            return self.problem(request, 404, "Not found", str(exc))
        try:
            detail = self.admin.task(queue, task_id)
        except TaskNotFound:
            return self.problem(
                request, 404, "Not found", f"no task {task_id!r} in queue {queue!r}"
            )
        except NODE_ERRORS as exc:
            return self.problem(request, 503, "Unavailable", f"queue {queue!r}: {exc}")
        timeline_error = None
        try:
            timeline = self.admin.timeline(queue, task_id)
        except NODE_ERRORS as exc:
            timeline, timeline_error = None, str(exc)
        info = detail.info
        progress = info.progress
        return self.ui.page(
            request,
            "task.html",
            t=task_row(info),
            payload=pretty(info.payload),
            result=pretty(info.result) if info.result is not None else None,
            headers=sorted(info.headers.items()),
            worker=detail.worker,
            lease_token=detail.lease_token,
            lease_expires=when(detail.lease_expires),
            progress=None
            if progress is None
            else {
                "percent": round(progress.fraction * 100, 1),
                "data": pretty(progress.data) if progress.data is not None else None,
                "at": when(progress.at),
            },
            timeline=None
            if timeline is None
            else [
                {
                    "time": when(e.time),
                    "event": e.event,
                    "attempt": e.attempt,
                    "worker": e.worker or "",
                    "state": e.state,
                    "error": e.error or "",
                    "progress": "" if e.progress is None else f"{e.progress:.0%}",
                }
                for e in timeline
            ],
            timeline_error=timeline_error,
            actions=[a for a, states in ACTIONS.items() if info.state.value in states],
        )

    async def act_one(self, request: Request) -> Response:
        """POST /task/run|delete|archive|cancel?queue=Q&id=ID."""
        refusal, _ = await self.ui.refused(request)
        if refusal is not None:
            return refusal
        action = request.path_params["action"]
        queue = request.query_params.get("queue", "")
        task_id = request.query_params.get("id", "")
        try:
            validate_queue_name(queue)
            validate_task_id(task_id)
        except ClusterqError as exc:
            return self.problem(request, 404, "Not found", str(exc))
        if action not in ACTIONS:
            return self.problem(request, 404, "Not found", f"unknown action {action!r}")
        method: Callable[[str, list[str]], dict[str, str]] = getattr(self.admin, action)
        try:
            statuses = await run_in_threadpool(method, queue, [task_id])
        except NODE_ERRORS as exc:
            self.ui.audit(request, action, f"task {task_id} in {queue}", f"failed: {exc}")
            return self.problem(request, 503, "Unavailable", f"{action} failed: {exc}")
        self.ui.audit(request, action, f"task {task_id} in {queue}", _outcome(statuses))
        return self.ui.page(
            request,
            "done.html",
            queue=queue,
            action=action,
            what=f"task {task_id}",
            task_id=task_id,
            counts=count_statuses(statuses.values()),
        )

    # ------------------------------------------------------------------ a state's tasks

    def tasks(self, request: Request) -> Response:
        queue = request.query_params.get("queue", "")
        state = request.query_params.get("state", "pending")
        try:
            validate_queue_name(queue)
        except ClusterqError as exc:
            return self.problem(request, 404, "Not found", str(exc))
        if state not in STATES:
            return self.problem(request, 404, "Not found", f"no state {state!r}")
        page = _int(request.query_params.get("page"), 1, 1, 10**9)
        try:  # a partitioned queue: the sums over its partitions
            members = self.admin.members(queue)
        except NODE_ERRORS:
            members = (queue,)
        infos = [self.admin.queue(member) for member in members]
        counts = {s: sum(getattr(info, s) for info in infos) for s in STATES}
        pages = max(1, math.ceil(counts[state] / PAGE_SIZE))
        rows: list[dict[str, Any]] = []
        errors = [f"{info.queue}: {info.error}" for info in infos if info.error]
        error = "; ".join(errors) or None
        offset = (page - 1) * PAGE_SIZE
        try:
            rows = [
                task_row(t) for t in self.admin.tasks(queue, state, offset=offset, limit=PAGE_SIZE)
            ]
        except NODE_ERRORS as exc:
            error = str(exc)
        return self.ui.page(
            request,
            "tasks.html",
            queue=queue,
            state=state,
            counts=counts,
            rows=rows,
            page=page,
            pages=pages,
            error=error,
            row_actions=[a for a, states in ACTIONS.items() if state in states],
            all_actions=[a for a, states in ACTIONS.items() if state in states and a != "cancel"],
        )

    async def act_selected(self, request: Request) -> Response:
        """POST /tasks/selected?queue=Q&state=S, the form: ``action`` and each ``id``."""
        refusal, form = await self.ui.refused(request)
        if refusal is not None:
            return refusal
        queue, state, action = self._bulk_target(request, form)
        if isinstance(queue, Response):
            return queue
        ids = form.get("id", [])
        try:
            for task_id in ids:
                validate_task_id(task_id)
        except ClusterqError as exc:
            return self.problem(request, 400, "Bad request", str(exc))
        try:
            statuses = await run_in_threadpool(self.admin.act, action, queue, ids)  # type: ignore[arg-type]
        except NODE_ERRORS as exc:
            self.ui.audit(request, action, f"{len(ids)} task(s) in {queue}", f"failed: {exc}")
            return self.problem(request, 503, "Unavailable", f"{action} failed: {exc}")
        self.ui.audit(request, action, f"{len(ids)} task(s) in {queue}", _outcome(statuses))
        return self.ui.page(
            request,
            "done.html",
            queue=queue,
            state=state,
            action=action,
            what=f"{len(ids)} selected {state} task(s)",
            counts=count_statuses(statuses.values()),
        )

    async def act_all(self, request: Request) -> Response:
        """POST /tasks/all?queue=Q&state=S, the form: ``action`` and ``type`` (optional):
        the action on every task in the state (of that type), in the background; then
        to the job's page (``/jobs/ID``), which shows its progress live."""
        refusal, form = await self.ui.refused(request)
        if refusal is not None:
            return refusal
        queue, state, action = self._bulk_target(request, form)
        if isinstance(queue, Response):
            return queue
        if action == "cancel":
            return self.problem(request, 400, "Bad request", "cancel applies to selected tasks")
        task_type = (form.get("type") or [""])[0].strip() or None
        of_type = f" of type {task_type!r}" if task_type else ""

        def run(progress: Progress) -> BulkResult:
            return self.admin.act_all(
                action,  # type: ignore[arg-type]
                queue,
                state,
                task_type=task_type,
                progress=progress,
            )

        job = new_job(action, queue, state, f"all {state} tasks{of_type}")
        return self.jobs.start(request, job, run)

    def _bulk_target(
        self, request: Request, form: dict[str, list[str]]
    ) -> tuple[str | Response, str, str]:
        queue = request.query_params.get("queue", "")
        state = request.query_params.get("state", "")
        action = (form.get("action") or [""])[0]
        try:
            validate_queue_name(queue)
        except ClusterqError as exc:
            return self.problem(request, 404, "Not found", str(exc)), state, action
        if state not in STATES:
            return self.problem(request, 404, "Not found", f"no state {state!r}"), state, action
        if action not in ACTIONS or state not in ACTIONS[action]:
            message = f"{action!r} does not apply to {state} tasks"
            return self.problem(request, 400, "Bad request", message), state, action
        return queue, state, action

    # ------------------------------------------------------------------ search

    def search(self, request: Request) -> Response:
        """``?id=ID``: that task id in every queue; ``?queue=Q`` with ``type``,
        ``error``, ``text`` and ``limit``: the bounded filter within Q."""
        params = request.query_params
        task_id = params.get("id", "").strip()
        queue = params.get("queue", "").strip()
        form = {
            "id": task_id,
            "queue": queue,
            "type": params.get("type", "").strip(),
            "error": params.get("error", "").strip(),
            "text": params.get("text", "").strip(),
        }
        limit = _int(params.get("limit"), DEFAULT_PER_STATE, 1, MAX_PAGE)
        context: dict[str, Any] = {"form": form, "limit": limit, "max_page": MAX_PAGE}
        try:
            if task_id:
                validate_task_id(task_id)
                found = find_task(self.admin, task_id)
                context["by_id"] = {
                    "rows": [task_row(t) for t in found.tasks],
                    "errors": sorted(found.errors.items()),
                    "queues": found.queues,
                }
            if queue:
                validate_queue_name(queue)
                filtered = filter_tasks(
                    self.admin,
                    queue,
                    task_type=form["type"],
                    error=form["error"],
                    text=form["text"],
                    per_state=limit,
                )
                context["filtered"] = {
                    "rows": [task_row(t) for t in filtered.tasks],
                    "looked": filtered.looked,
                    "errors": sorted(filtered.errors.items()),
                }
        except NODE_ERRORS as exc:
            context["error"] = str(exc)
        return self.ui.page(request, "search.html", **context)


def task_row(t: TaskInfo) -> dict[str, Any]:
    """What a page shows of a task (its times as text)."""
    preview = json.dumps(t.payload, ensure_ascii=False, default=repr)
    error = t.last_error or ""
    return {
        "id": t.id,
        "queue": t.queue,
        "type": t.type,
        "state": t.state.value,
        "preview": preview if len(preview) <= PREVIEW else preview[: PREVIEW - 1] + "…",
        "retried": t.retried,
        "max_retry": t.max_retry,
        "next": when(t.next_process_at),
        "enqueued": when(t.enqueued_at),
        "failed": when(t.last_failed_at),
        "retained": when(t.retained_until),
        "deadline": when(t.deadline),
        "timeout": t.timeout,
        "group": t.group,
        "error": error,
        "error_line": error.strip().splitlines()[-1][:PREVIEW] if error.strip() else "",
        "link": "/task?" + urlencode({"queue": t.queue, "id": t.id}),
    }


def pretty(value: Any) -> str:
    """``value`` as indented JSON (what JSON cannot hold, as its repr)."""
    if isinstance(value, bytes):
        return repr(value)
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True, default=repr)


def when(at: float | None) -> str:
    """A Unix time as UTC text, with how long ago or from now."""
    if at is None:
        return ""
    delta = at - time.time()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(at))
    ago = f"in {delta:.0f}s" if delta >= 0 else f"{-delta:.0f}s ago"
    return f"{stamp}Z ({ago})"


def count_statuses(statuses: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for status in statuses:
        counts[status] = counts.get(status, 0) + 1
    return dict(sorted(counts.items()))


def _int(raw: str | None, default: int, low: int, high: int) -> int:
    try:
        value = int(raw) if raw else default
    except ValueError:
        value = default
    return min(high, max(low, value))


def _outcome(statuses: dict[str, Any]) -> str:
    """An action's outcome for the audit: how many tasks ended each way (``statuses``:
    task id -> status, or status -> count as a bulk action gives them)."""
    if all(isinstance(v, int) for v in statuses.values()):
        counts = {str(k): int(v) for k, v in statuses.items()}
    else:
        counts = dict(Counter(str(v) for v in statuses.values()))
    return ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "nothing"
