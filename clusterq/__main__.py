"""``python -m clusterq``: the same as the ``clusterq`` command."""

from clusterq.cli import main

main()
