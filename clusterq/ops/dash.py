"""``clusterq dash``: a live terminal dashboard (the ``dash`` extra: Textual).

The main screen shows every queue grouped by the master that owns it (keyslot, sizes per
state, processed per second since the last refresh, latency, paused, its limits), the
live workers, and the cluster's topology events (failovers, failed and recovered nodes)
as they happen.
Enter on a queue opens its tasks: page through a state, and run, archive or delete the
highlighted task.

All reads go through :class:`~clusterq.ops.admin.Admin` in a background thread, one refresh
at a time, so the screen stays responsive while a master is down (a queue that cannot be
read shows its error until it can).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from rich.text import Text
from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, RichLog, Static

from clusterq.cluster.changes import TopologyEvent
from clusterq.cluster.topology import Topology
from clusterq.ops.admin import Admin
from clusterq.ops.inspector import QueueInfo, WorkerInfo
from clusterq.ops.queueinfo import compact_limits
from clusterq.task import TaskInfo

#: Seconds between refreshes.
DEFAULT_INTERVAL = 1.0
PAGE = 20


def _clean(value: object) -> Text:
    """Data from Redis shown as plain text (never read as markup)."""
    text = "" if value is None else str(value)
    if not text.isprintable():
        text = "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)
    return Text(text)


@dataclass
class Snapshot:
    """One refresh: what the main screen shows."""

    queues: list[QueueInfo] = field(default_factory=list)
    workers: list[WorkerInfo] = field(default_factory=list)
    rates: dict[str, float] = field(default_factory=dict)
    mode: str = ""
    at: float = 0.0
    error: str | None = None


class QueueScreen(Screen[None]):
    """One queue's tasks, a page of one state at a time."""

    BINDINGS: ClassVar[list[Any]] = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("p", "state('pending')", "Pending"),
        Binding("s", "state('scheduled')", "Scheduled"),
        Binding("t", "state('retry')", "Retry"),
        Binding("a", "state('archived')", "Archived"),
        Binding("c", "state('completed')", "Completed"),
        Binding("v", "state('active')", "Active"),
        Binding("n", "page(1)", "Next page"),
        Binding("b", "page(-1)", "Prev page"),
        Binding("r", "act('run')", "Run now"),
        Binding("x", "act('archive')", "Archive"),
        Binding("d", "act('delete')", "Delete"),
    ]

    def __init__(self, admin: Admin, queue: str) -> None:
        super().__init__()
        self.admin = admin
        self.queue = queue
        self.task_state = "pending"
        self.page_offset = 0
        self.ids: list[str] = []

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(id="title")
        yield DataTable(id="tasks", cursor_type="row")
        yield Static(id="status")
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#tasks", DataTable)
        table.add_columns("Id", "Type", "Retried", "Next / at", "Last error", "Payload")
        self.load()

    def action_state(self, state: str) -> None:
        self.task_state, self.page_offset = state, 0
        self.load()

    def action_page(self, step: int) -> None:
        self.page_offset = max(0, self.page_offset + step * PAGE)
        self.load()

    def action_act(self, action: str) -> None:
        table = self.query_one("#tasks", DataTable)
        if not self.ids or table.cursor_row is None or table.cursor_row >= len(self.ids):
            return
        self.act(action, self.ids[table.cursor_row])

    @work(thread=True, exclusive=True, group="tasks")
    def load(self) -> None:
        try:
            tasks = self.admin.tasks(
                self.queue, self.task_state, offset=self.page_offset, limit=PAGE
            )
            error = None
        except Exception as exc:
            tasks, error = [], str(exc)
        self.app.call_from_thread(self.show, tasks, error)

    @work(thread=True, group="act")
    def act(self, action: str, task_id: str) -> None:
        try:
            status = self.admin.act(action, self.queue, [task_id])[task_id]  # type: ignore[arg-type]
            message = f"{action} {task_id}: {status}"
        except Exception as exc:
            message = f"{action} {task_id} failed: {exc}"
        self.app.call_from_thread(self.say, message)
        self.load()

    def say(self, message: str) -> None:
        self.query_one("#status", Static).update(_clean(message))

    def show(self, tasks: list[TaskInfo], error: str | None) -> None:
        first = self.page_offset + 1
        title = f"queue {self.queue}: {self.task_state} tasks {first}-{first + PAGE - 1}"
        self.query_one("#title", Static).update(_clean(title))
        table = self.query_one("#tasks", DataTable)
        table.clear()
        self.ids = [t.id for t in tasks]
        for t in tasks:
            when = t.next_process_at or t.retained_until
            table.add_row(
                _clean(t.id),
                _clean(t.type),
                _clean(f"{t.retried}/{t.max_retry}"),
                _clean(time.strftime("%H:%M:%S", time.localtime(when)) if when else "-"),
                _clean((t.last_error or "")[:40]),
                _clean(repr(t.payload)[:40]),
            )
        if error:
            self.say(f"cannot read the tasks: {error}")


class Dashboard(App[None]):
    """The live view of queues, workers and the cluster."""

    TITLE = "clusterq"
    CSS = """
    #queues { height: 2fr; }
    #workers { height: 1fr; }
    #events { height: 1fr; border: round $accent; }
    """
    BINDINGS: ClassVar[list[Any]] = [
        Binding("q", "quit", "Quit"),
        Binding("enter", "open", "Tasks of the queue", show=True),
        Binding("space", "refresh_now", "Refresh"),
    ]

    def __init__(self, admin: Admin, *, interval: float = DEFAULT_INTERVAL) -> None:
        super().__init__()
        self.admin = admin
        self.interval = interval
        self.snapshot = Snapshot()
        self._previous: dict[str, tuple[int, float]] = {}
        self.queue_rows: list[str] = []
        self.events_seen: list[str] = []
        admin.backend.subscribe(self._on_topology)

    def compose(self) -> ComposeResult:
        yield Header(show_clock=True)
        with Vertical():
            yield Static(id="summary")
            yield DataTable(id="queues", cursor_type="row")
            yield DataTable(id="workers")
            yield RichLog(id="events", wrap=True, markup=False)
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#queues", DataTable).add_columns(
            "Master", "Queue", "Keyslot", "Pending", "Active", "Scheduled", "Retry",
            "Archived", "Done/s", "Latency", "Paused", "Limits",
        )  # fmt: skip
        self.query_one("#workers", DataTable).add_columns(
            "Worker", "Queues", "Running", "Concurrency", "Processed", "Failed", "Seen"
        )
        self.log_event(f"watching {self.admin.topology.mode} at {self.admin.topology.source}")
        self.refresh_data()
        self.set_interval(self.interval, self.refresh_data)

    # ------------------------------------------------------------------ data

    def _on_topology(self, _new: Topology, events: list[TopologyEvent]) -> None:
        # called in the refresh thread
        for event in events:
            self.call_from_thread(self.log_event, event.describe())

    def log_event(self, message: str) -> None:
        self.events_seen.append(message)
        stamp = time.strftime("%H:%M:%S")
        self.query_one("#events", RichLog).write(_clean(f"{stamp} {message}"))

    @work(thread=True, exclusive=True, group="refresh")
    def refresh_data(self) -> None:
        snapshot = Snapshot(at=time.time())
        try:
            self.admin.refresh()
            snapshot.mode = self.admin.topology.mode
            snapshot.queues = self.admin.queues()
            snapshot.workers = self.admin.workers()
        except Exception as exc:
            snapshot.error = str(exc)
        now = time.monotonic()
        for q in snapshot.queues:
            before = self._previous.get(q.queue)
            if before is not None and not q.error and now > before[1]:
                snapshot.rates[q.queue] = max(0.0, (q.processed - before[0]) / (now - before[1]))
            if not q.error:
                self._previous[q.queue] = (q.processed, now)
        self.call_from_thread(self.show, snapshot)

    def show(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        summary = self.query_one("#summary", Static)
        if snapshot.error:
            summary.update(_clean(f"cannot read the cluster: {snapshot.error}"))
        else:
            masters = {q.master for q in snapshot.queues if q.master}
            summary.update(
                _clean(
                    f"{snapshot.mode}: {len(snapshot.queues)} queues on {len(masters)} "
                    f"master(s), {len(snapshot.workers)} worker(s) — "
                    f"updated {time.strftime('%H:%M:%S', time.localtime(snapshot.at))}"
                )
            )
        self._show_queues(snapshot)
        self._show_workers(snapshot)

    def _show_queues(self, snapshot: Snapshot) -> None:
        table = self.query_one("#queues", DataTable)
        cursor = table.cursor_row
        table.clear()
        ordered = sorted(snapshot.queues, key=lambda q: (q.master or "~", q.queue))
        self.queue_rows = [q.queue for q in ordered]
        last_master = None
        for q in ordered:
            master = q.master or "(no master)"
            shown_master = master if master != last_master else ""
            last_master = master
            if q.error:
                table.add_row(
                    _clean(shown_master), _clean(q.queue), _clean(q.keyslot),
                    Text(f"error: {q.error}"[:60], style="red"), *[Text("")] * 8,
                )  # fmt: skip
                continue
            rate = snapshot.rates.get(q.queue)
            table.add_row(
                _clean(shown_master), _clean(q.queue), _clean(q.keyslot), _clean(q.pending),
                _clean(q.active), _clean(q.scheduled), _clean(q.retry), _clean(q.archived),
                _clean("-" if rate is None else f"{rate:.1f}"), _clean(f"{q.latency:.2f}s"),
                _clean("yes" if q.paused else ""), _clean(compact_limits(q.limits)),
            )  # fmt: skip
        if cursor is not None and ordered:
            table.move_cursor(row=min(cursor, len(ordered) - 1))

    def _show_workers(self, snapshot: Snapshot) -> None:
        table = self.query_one("#workers", DataTable)
        table.clear()
        now = time.time()
        for w in snapshot.workers:
            table.add_row(
                _clean(w.id), _clean(", ".join(w.queues)), _clean(w.active),
                _clean(w.concurrency), _clean(w.processed), _clean(w.failed),
                _clean(f"{max(0.0, now - w.at):.0f}s ago" if w.at else "-"),
            )  # fmt: skip

    # ------------------------------------------------------------------ actions

    def action_refresh_now(self) -> None:
        self.refresh_data()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        if event.data_table.id == "queues":
            self.action_open()

    def action_open(self) -> None:
        table = self.query_one("#queues", DataTable)
        row = table.cursor_row
        if row is None or not 0 <= row < len(self.queue_rows):
            return
        self.push_screen(QueueScreen(self.admin, self.queue_rows[row]))
