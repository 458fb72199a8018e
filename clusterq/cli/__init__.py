"""The ``clusterq`` command: a thin layer over the public Python API.

Each command parses its options, calls :mod:`clusterq` (client, inspector, topology,
devcluster), and renders the result with rich for people or as JSON for scripts. Errors
are printed as one line on stderr with a non-zero exit status, never as a traceback.
"""

from __future__ import annotations

from clusterq.cli.app import main

__all__ = ["main"]
