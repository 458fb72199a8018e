"""The operator surface: what people and dashboards use to see and steer queues, kept
apart from the library's core (enqueue, work, scripts, routing).

- :mod:`~clusterq.ops.inspector` — read-only views (`Inspector`), built on the rows of
  :mod:`~clusterq.ops.queueinfo`, :mod:`~clusterq.ops.streaminfo` and
  :mod:`~clusterq.ops.croninfo`;
- :mod:`~clusterq.ops.admin` — an operator's actions (`Admin`, `AsyncAdmin`);
- :mod:`~clusterq.ops.metrics` — Prometheus: the cluster-wide collector and a worker's own;
- :mod:`~clusterq.ops.dash` — the terminal dashboard;
- :mod:`~clusterq.ops.permissions` and :mod:`~clusterq.ops.doctor` — what each role needs
  from the server, and the check of a user.

The CLI's operator commands are thin layers over these; the public names are also
exported from :mod:`clusterq` (``clusterq.Admin``, ``clusterq.Inspector``).
"""
