"""What runs: workers (processes, queues, tasks, heartbeats; queues no live worker
serves), periodic entries, event streams, partitioned queues, a workflow's steps."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.routing import Route

if TYPE_CHECKING:
    from clusterq.ops.web.ui import Ui


def routes(ui: Ui) -> list[Route]:
    """This module's routes (its nav entries added to ``ui.nav``)."""
    return []
