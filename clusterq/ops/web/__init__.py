"""The web UI (``clusterq web``, the ``web`` extra): see :mod:`clusterq.ops.web.app`."""

from __future__ import annotations

from clusterq.ops.web.app import create_app, create_multi_app

__all__ = ["create_app", "create_multi_app"]
