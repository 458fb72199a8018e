"""Task pages: one task (payload, headers, attempts, error, result, worker, progress,
timeline) and its actions; a queue's tasks by state with bulk actions; search by id
across every queue, and by type or text within a queue."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.routing import Route

if TYPE_CHECKING:
    from clusterq.ops.web.ui import Ui


def routes(ui: Ui) -> list[Route]:
    """This module's routes (its nav entries added to ``ui.nav``)."""
    return []
